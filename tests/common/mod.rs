//! Helpers shared by the integration tests.

use std::path::PathBuf;

/// The real MNIST subset at `../shared/data/mnist-10k`, or `None` (after
/// printing why the caller skips) when it is absent.
pub fn mnist_10k() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/mnist-10k");
    if dir.join("train-images-idx3-ubyte.gz").exists() {
        Some(dir)
    } else {
        eprintln!(
            "skipping: MNIST test data not found at {} (see ../shared/data/README.md)",
            dir.display()
        );
        None
    }
}
