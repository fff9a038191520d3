//! IDX dataset parsing (images and labels, raw or gzipped): any bytes give
//! data or a clear error, and decompression stops at its limit.
#![no_main]

use std::path::Path;

use greyfed_participant::data::idx::{gunzip, parse_idx_images, parse_idx_labels};
use libfuzzer_sys::fuzz_target;

/// Decompressed-size limit for the fuzzer (the real one is 2 GiB).
const LIMIT: u64 = 16 << 20;

fuzz_target!(|data: &[u8]| {
    let source = Path::new("fuzz.idx");
    let bytes = if data.starts_with(&[0x1f, 0x8b]) {
        match gunzip(data, source, LIMIT) {
            Ok(out) => {
                assert!(out.len() as u64 <= LIMIT);
                out
            }
            Err(_) => return,
        }
    } else {
        data.to_vec()
    };
    if let Ok((rows, cols, pixels)) = parse_idx_images(&bytes, source) {
        assert!(rows > 0 && cols > 0);
        assert_eq!(pixels.len() % (rows * cols), 0);
    }
    let _ = parse_idx_labels(&bytes, source);
});
