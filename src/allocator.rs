//! Process-wide heap settings for training processes.

/// Largest request glibc's malloc may serve from its heap instead of a
/// fresh `mmap` (glibc's own ceiling on 64-bit targets).
pub const MMAP_THRESHOLD_BYTES: i32 = 32 << 20;

/// Free memory at the top of the heap that glibc keeps instead of
/// returning it to the kernel.
pub const TRIM_THRESHOLD_BYTES: i32 = 256 << 20;

/// Makes glibc's malloc keep and reuse freed memory.
///
/// Training allocates and frees tensors of a few hundred kilobytes to a few
/// megabytes on every step. With glibc's defaults many of them are fresh
/// `mmap`s or sit at a heap top that is trimmed on free, so every step
/// page-faults and zeroes the same memory again: a third of the ViT's
/// training time. With these settings the ViT trains 1.6x faster and peak
/// memory does not grow (`examples/train_bench.rs`, see
/// `docs/benchmarks.md`). Call it first thing in `main`, before other
/// threads start. Does nothing where the C library is not glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's tuning parameters; it is called
    // before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES);
    }
}
