//! The `greyfed` command-line tool as a library: heap settings
//! ([`allocator`]), argument definitions
//! ([`cli`]), configuration files ([`config_file`]) and presets ([`preset`]), key generation ([`keygen`]) and key custody (certificate requests, a sealed image key: [`custody`]), the coordinator and participant
//! nodes over typed settings ([`node`]: the binary maps its arguments to
//! them, the library never sees clap types), the coordinator's optional central evaluation
//! ([`central`]), the local multi-process simulation ([`simulate`]), the
//! in-process federation harness ([`federation`]: every participant a task of one process, for tests and examples), the peak-memory reports of
//! simulations ([`memory`]), live progress displays ([`progress`]), run
//! reports with plots ([`report`]), the measurements of [`lab`] (experiments, attacks, image quality), and
//! classification and evaluation with a saved model file ([`predict`]),
//! and differential-privacy planning ([`dp`]).
//!
//! The protocol, coordinator and participant logic live in the
//! `greyfed-protocol`, `greyfed-coordinator` and `greyfed-participant`
//! crates; this crate only wires them to the command line.

pub mod allocator;
pub mod central;
pub mod cli;
pub mod config_file;
pub mod custody;
pub mod dp;
pub mod federation;
pub mod keygen;
pub mod lab;
pub mod memory;
pub mod node;
pub mod predict;
pub mod preset;
pub mod preview;
pub mod progress;
pub mod report;
pub mod simulate;
pub mod transform;
