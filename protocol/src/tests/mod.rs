//! In-memory tests of the session state machines, driven by [`util::Harness`].

mod claims;
mod downloads;
mod folded;
mod overlap;
mod sealed;
mod session;
mod training_time;
pub(crate) mod util;
