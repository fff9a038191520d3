//! Local training on a thread of its own, below the protocol's priority.
//!
//! A participant's session loop answers the coordinator (key agreement,
//! shares, the evaluation sum) while local training runs. Where processes
//! outnumber cores, as in `simulate`, a loop that must wait for a core
//! behind every training thread makes each protocol stage wait as long:
//! with 50 participant processes on 2 cores the evaluation stage took
//! 2.5 s a round, and 1.0-1.1 s with the training threads at nice
//! [`TRAINING_NICE`] (docs/benchmarks.md). The loop, when it wakes, then
//! preempts training, and training still gets every cycle nothing else
//! wants. It also yields to other programs on the participant's machine.
//! Only that thread is lowered: with more than one compute thread
//! (`--threads`), candle's pool threads keep the process's priority.

use tokio::sync::oneshot;

/// Nice value of the training thread (Linux; 0 is the default, 19 the
/// lowest priority). A process that already runs nicer keeps its value.
pub const TRAINING_NICE: i32 = 10;

/// Work running on a thread of its own (see [`spawn_training`]). Await it
/// for the result; dropping it discards the result (the thread runs on to
/// its end, as a blocking task would).
pub type Background<T> = oneshot::Receiver<T>;

/// Runs `work` on a new thread named `name`, at [`TRAINING_NICE`].
///
/// # Errors
/// The thread cannot be started. Awaiting the result fails when `work`
/// panicked.
pub fn spawn_training<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<Background<T>> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            lower_priority();
            let _ = tx.send(work());
        })?;
    Ok(rx)
}

/// Lowers the calling thread to [`TRAINING_NICE`] (never raises it).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // On Linux the nice value is a per-thread attribute: this changes
        // only the calling thread.
        let tid = unsafe { libc::gettid() } as libc::id_t;
        if current_nice(tid) < TRAINING_NICE {
            let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, TRAINING_NICE) };
            if rc != 0 {
                tracing::debug!(
                    error = %std::io::Error::last_os_error(),
                    "could not lower the training thread's priority"
                );
            }
        }
    }
}

/// The nice value of thread `tid` (Linux).
#[cfg(target_os = "linux")]
fn current_nice(tid: libc::id_t) -> i32 {
    unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    fn own_nice() -> i32 {
        current_nice(unsafe { libc::gettid() } as libc::id_t)
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn training_runs_below_the_callers_priority() {
        let before = own_nice();
        let task = spawn_training("greyfed-test-train", || {
            (own_nice(), std::thread::current().name().map(String::from))
        })
        .unwrap();
        let (nice, name) = task.await.unwrap();
        assert!(nice >= TRAINING_NICE, "training thread at nice {nice}");
        assert_eq!(name.as_deref(), Some("greyfed-test-train"));
        assert_eq!(own_nice(), before, "the caller's priority is unchanged");
    }

    #[tokio::test]
    async fn a_panic_in_training_is_an_error_not_a_hang() {
        let task = spawn_training("greyfed-test-panic", || -> u32 { panic!("boom") }).unwrap();
        assert!(task.await.is_err());
    }
}
