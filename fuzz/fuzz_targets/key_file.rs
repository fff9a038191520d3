//! Image key files: any contents give a key or an error that never quotes
//! the contents' key material (no run of 8 hex digits from the file).
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
            // Not the whole contents: a file may hold the words of the error
            // itself. Key material is hex, and none of it may be quoted.
            for run in data.windows(8).filter(|w| w.iter().all(u8::is_ascii_hexdigit)) {
                let run = std::str::from_utf8(run).expect("hex digits are ASCII");
                assert!(!reason.contains(run), "error quotes key material {run}");
            }
        }
    }
});
