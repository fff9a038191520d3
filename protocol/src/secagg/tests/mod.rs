//! In-memory tests of the secure-aggregation state machines, driven by
//! [`util::Harness`]: whole rounds with scripted dropouts (and a property
//! test against an oracle), the privacy checks, and rejected messages.

mod noise;
mod rejects;
mod robust;
mod rounds;
mod security;
pub(crate) mod util;
