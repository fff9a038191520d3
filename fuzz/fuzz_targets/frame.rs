//! Frame and message decoding: arbitrary bytes, fed to the incremental
//! decoder in arbitrary chunks, must give messages or a clear error, never
//! a panic, a hang or an allocation beyond the frame limit.
#![no_main]

use greyfed_protocol::frame::{FrameDecoder, decode_payload, encode_frame};
use libfuzzer_sys::fuzz_target;

/// A small limit so that length fields near it are explored.
const MAX_FRAME: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so partial reads are exercised.
    let Some((&chunk, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut decoder = FrameDecoder::new(MAX_FRAME);
    'feed: for piece in bytes.chunks(chunk) {
        decoder.push(piece);
        loop {
            match decoder.next_message() {
                Ok(Some(msg)) => {
                    // What decodes re-encodes to a frame that decodes to a
                    // message with the same encoding. (Bytes, not values:
                    // a NaN weight decodes, and NaN != NaN; the session
                    // refuses non-finite values, the decoder need not.)
                    let frame = encode_frame(&msg, MAX_FRAME).expect("re-encoding");
                    let again = decode_payload(&frame[8..]).expect("decoding own frame");
                    let again = encode_frame(&again, MAX_FRAME).expect("re-encoding again");
                    assert_eq!(again, frame);
                }
                Ok(None) => break,
                Err(_) => {
                    // Poisoned: the same error again, and no more messages.
                    assert!(decoder.next_message().is_err());
                    break 'feed;
                }
            }
        }
    }
    let _ = decoder.finish();
    // The payload decoder alone, on the raw bytes.
    let _ = decode_payload(bytes);
});
