//! The `greyfed` command-line tool as a library: heap settings
//! ([`allocator`]), argument definitions
//! ([`cli`]) and configuration files ([`config_file`]), key generation ([`keygen`]), the coordinator and participant
//! commands ([`commands`]), the coordinator's optional central evaluation
//! ([`central`]), the local multi-process simulation ([`simulate`]), the
//! in-process federation harness ([`sim`]), the peak-memory reports of
//! simulations ([`memory`]), live progress displays ([`progress`]), run
//! reports with plots ([`report`]) and the measurements of [`experiment`].
//!
//! The protocol, coordinator and participant logic live in the
//! `greyfed-protocol`, `greyfed-coordinator` and `greyfed-participant`
//! crates; this crate only wires them to the command line.

pub mod allocator;
pub mod central;
pub mod cli;
pub mod commands;
pub mod config_file;
pub mod experiment;
pub mod keygen;
pub mod memory;
pub mod preview;
pub mod progress;
pub mod report;
pub mod sim;
pub mod simulate;
pub mod transform;
