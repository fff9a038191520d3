//! In-memory tests of the session state machines, driven by [`util::Harness`].

mod session;
pub(crate) mod util;
