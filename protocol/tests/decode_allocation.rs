//! A payload whose length prefixes lie allocates nothing close to what they
//! claim: the decoder refuses a claim longer than the payload could hold
//! before allocating for it. Measured with a counting global allocator, so
//! this file holds one test (others would allocate concurrently).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use greyfed_protocol::Message;
use greyfed_protocol::frame::{DEFAULT_MAX_FRAME, HEADER_LEN, decode_payload, encode_frame};

/// The system allocator, recording the largest single allocation.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Largest = Largest;

/// The payload of an `Error` message whose text is `text`.
fn error_payload(text: &str) -> Vec<u8> {
    let msg = Message::Error {
        message: text.to_string(),
    };
    encode_frame(&msg, DEFAULT_MAX_FRAME).unwrap()[HEADER_LEN..].to_vec()
}

/// Decodes `payload` and returns the result with the largest allocation made.
fn decode_measured(payload: &[u8]) -> (Result<Message, String>, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    let out = decode_payload(payload).map_err(|e| e.to_string());
    (out, LARGEST.load(Ordering::Relaxed))
}

#[test]
fn lying_length_prefixes_are_refused_before_allocation() {
    // Honest messages of every size tier still decode.
    for len in [0, 1, 65_000, 70_000, 3 << 20] {
        let text = "x".repeat(len);
        let (out, _) = decode_measured(&error_payload(&text));
        assert_eq!(
            out,
            Ok(Message::Error { message: text }),
            "a {len}-byte text"
        );
    }

    // The text's length prefix (varint: 1, the text "x") replaced by ones
    // claiming 4 GB (u32 form) and 2^62 bytes (u64 form).
    let honest = error_payload("x");
    let (head, tail) = honest.split_at(honest.len() - 2);
    assert_eq!(tail, [1, b'x']);
    let mut u64_claim = vec![253];
    u64_claim.extend((1u64 << 62).to_le_bytes());
    for claim in [vec![252, 0, 0, 0, 0xF0], u64_claim] {
        let mut lying = head.to_vec();
        lying.extend(&claim);
        lying.push(b'x');
        let (out, largest) = decode_measured(&lying);
        let err = out.expect_err("a lying length must not decode");
        assert!(err.contains("claims more bytes"), "{err}");
        assert!(
            largest < 1 << 20,
            "decoding {} bytes allocated {largest} bytes at once",
            lying.len()
        );
    }
}
