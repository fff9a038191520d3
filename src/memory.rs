//! Peak memory of the processes of a simulation.
//!
//! Each process measures itself: `greyfed coordinator` and `greyfed
//! participant` started with the hidden `--peak-rss-file FILE` write their
//! peak resident set size (`VmHWM` in `/proc/self/status`) to FILE when they
//! exit, and `simulate` collects the files. A process that is killed (a
//! scheduled `--dropout` crash) writes nothing and is left out of the figures.
//! Measuring in the process, not by sampling `/proc/PID` from outside, also
//! catches a peak in the last moments before exit.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// This process's peak resident set size in bytes (`VmHWM`), or `None`
/// where `/proc/self/status` has no such line (not Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    parse_vm_hwm(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// The `VmHWM` line of a `/proc/PID/status` text, in bytes.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// Writes this process's peak RSS in bytes (decimal) to `path`; a no-op
/// where it cannot be measured.
///
/// # Errors
/// When `path` cannot be written.
pub fn write_peak_rss(path: &Path) -> std::io::Result<()> {
    match peak_rss_bytes() {
        Some(bytes) => std::fs::write(path, format!("{bytes}\n")),
        None => Ok(()),
    }
}

/// What [`write_peak_rss`] wrote to `path`, or `None` (no file: the process
/// was killed, or memory cannot be measured here).
pub fn read_peak_rss(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Peak resident set sizes of a simulation's processes, in bytes, as
/// `simulate` prints them and writes them to `OUT/summary.json`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// The coordinator process (`None` if it reported nothing).
    pub coordinator_bytes: Option<u64>,
    /// Each participant process, by index (`None`: killed, or no report).
    pub participant_bytes: Vec<Option<u64>>,
    /// Mean over the participants that reported.
    pub participant_mean_bytes: Option<u64>,
    /// Largest participant.
    pub participant_max_bytes: Option<u64>,
    /// Coordinator plus every participant that reported: the sum of the
    /// peaks, an upper bound on the federation's peak total (the processes
    /// need not peak at the same moment).
    pub total_bytes: u64,
    /// The `simulate` process itself (not in `total_bytes`).
    pub launcher_bytes: Option<u64>,
}

impl MemoryReport {
    /// Summarises the processes' reports.
    pub fn new(coordinator: Option<u64>, participants: Vec<Option<u64>>) -> Self {
        let reported: Vec<u64> = participants.iter().flatten().copied().collect();
        let sum: u64 = reported.iter().sum();
        Self {
            coordinator_bytes: coordinator,
            participant_mean_bytes: (!reported.is_empty()).then(|| sum / reported.len() as u64),
            participant_max_bytes: reported.iter().max().copied(),
            total_bytes: coordinator.unwrap_or(0) + sum,
            participant_bytes: participants,
            launcher_bytes: peak_rss_bytes(),
        }
    }

    /// Participants that reported.
    pub fn participants_reported(&self) -> usize {
        self.participant_bytes.iter().flatten().count()
    }

    /// One line for the summary, e.g. `peak memory (RSS): coordinator
    /// 52.1 MB; participants mean 61.0 MB, max 63.2 MB (10 of 10 reported);
    /// sum over coordinator and participants 662.1 MB`.
    pub fn line(&self) -> String {
        let mb = |b: Option<u64>| {
            b.map_or_else(|| "-".to_string(), |b| format!("{:.1} MB", b as f64 / 1e6))
        };
        format!(
            "peak memory (RSS): coordinator {}; participants mean {}, max {} ({} of {} reported); \
             sum over coordinator and participants {}",
            mb(self.coordinator_bytes),
            mb(self.participant_mean_bytes),
            mb(self.participant_max_bytes),
            self.participants_reported(),
            self.participant_bytes.len(),
            mb(Some(self.total_bytes)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_in_bytes() {
        let status = "Name:\tgreyfed\nVmPeak:\t  200 kB\nVmHWM:\t   44004 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(44004 * 1024));
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\t12 MB\n"), None);
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().is_some_and(|b| b > 0));
        }
    }

    #[test]
    fn the_report_summarises_those_that_reported() {
        let r = MemoryReport::new(Some(100), vec![Some(10), None, Some(30)]);
        assert_eq!(r.participant_mean_bytes, Some(20));
        assert_eq!(r.participant_max_bytes, Some(30));
        assert_eq!(r.total_bytes, 140);
        assert_eq!(r.participants_reported(), 2);
        assert!(r.line().contains("(2 of 3 reported)"), "{}", r.line());
        let none = MemoryReport::new(None, vec![None]);
        assert_eq!(none.participant_mean_bytes, None);
        assert_eq!(none.total_bytes, 0);
    }

    #[test]
    fn written_peaks_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peak");
        write_peak_rss(&path).unwrap();
        if let Some(written) = read_peak_rss(&path) {
            // A high-water mark: it can only have grown since.
            assert!(written > 0 && written <= peak_rss_bytes().unwrap());
        }
        assert_eq!(read_peak_rss(&dir.path().join("absent")), None);
    }
}
