//! Image key files: any contents give a key or an error that never quotes
//! the contents.
#![no_main]

use greyfed_participant::cipher::ImageKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match ImageKey::parse_key_file_contents(data) {
        Ok(key) => {
            // A key parses only from exactly 64 hex characters.
            let trimmed = data.trim_ascii();
            assert_eq!(trimmed.len(), 64);
            assert_eq!(key.fingerprint().len(), 16);
        }
        Err(reason) => {
            let trimmed = data.trim_ascii();
            if trimmed.len() >= 8 {
                let text = String::from_utf8_lossy(trimmed);
                assert!(!reason.contains(text.as_ref()), "error quotes the file");
            }
        }
    }
});
