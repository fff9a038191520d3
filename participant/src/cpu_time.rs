//! CPU time of local training: the floor a round's wall time is measured
//! against (`train_cpu_secs` in the coordinator's metrics).

/// A CPU clock started before local training.
///
/// It reads the calling thread's CPU clock when training runs on one
/// compute thread (the default: `RAYON_NUM_THREADS=1`), and the whole
/// process's when it uses more, which is exact when the process trains one
/// participant (as `greyfed participant` and `simulate`'s processes do) and
/// counts every participant's work when several share a process.
#[derive(Clone, Copy, Debug)]
pub struct CpuClock {
    clock: Clock,
    start: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Clock {
    Thread,
    Process,
}

impl CpuClock {
    /// Starts the clock on the calling thread.
    pub fn start() -> Self {
        Self::start_on(if candle_core::utils::get_num_threads() <= 1 {
            Clock::Thread
        } else {
            Clock::Process
        })
    }

    fn start_on(clock: Clock) -> Self {
        Self {
            clock,
            start: read(clock).unwrap_or(0.0),
        }
    }

    /// CPU seconds since [`Self::start`] (call it on the same thread);
    /// `None` where the platform has no CPU clock.
    pub fn elapsed_secs(&self) -> Option<f64> {
        read(self.clock).map(|now| (now - self.start).max(0.0))
    }
}

#[cfg(unix)]
fn read(clock: Clock) -> Option<f64> {
    let id = match clock {
        Clock::Thread => libc::CLOCK_THREAD_CPUTIME_ID,
        Clock::Process => libc::CLOCK_PROCESS_CPUTIME_ID,
    };
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock ids are
    // constants every POSIX system with CPU-time clocks defines.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    (rc == 0).then_some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9)
}

#[cfg(not(unix))]
fn read(_: Clock) -> Option<f64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_counts_work_and_not_sleep() {
        // The thread's clock: other tests run in the process meanwhile.
        let clock = CpuClock::start_on(Clock::Thread);
        let process = CpuClock::start_on(Clock::Process);
        std::thread::sleep(std::time::Duration::from_millis(200));
        let slept = clock.elapsed_secs().unwrap();
        assert!(slept < 0.05, "sleeping 200 ms counted {slept} s");
        // Work until the clock has counted 100 ms: it ends only if the clock
        // counts work, and a thread's CPU time never runs ahead of the wall.
        let wall = std::time::Instant::now();
        let mut x = 0u64;
        while clock.elapsed_secs().unwrap() - slept < 0.1 {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            assert!(
                wall.elapsed().as_secs() < 30,
                "the clock does not count work"
            );
        }
        assert!(wall.elapsed().as_secs_f64() >= 0.1 - 1e-3);
        assert!(process.elapsed_secs().unwrap() >= 0.1);
    }
}
