//! What a run costs, from the process itself: CPU time (user + system, every thread, or the
//! threads of one runtime) and the peak resident set. On a shared machine these hold where
//! MiB/s do not.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::data::NarGen;

/// What this process has used so far, every thread, from one `getrusage`.
#[derive(Clone, Copy, Default)]
pub struct Usage {
    /// User and system CPU time.
    pub cpu: Duration,
    /// Page faults, minor and major: each is a page the kernel mapped, and zeroed when it was
    /// new, because memory was given back and touched again. Allocator churn shows here before
    /// it shows in the CPU figures' noise.
    pub faults: u64,
}

impl Usage {
    pub fn now() -> Self {
        // SAFETY: getrusage only writes the struct it is given.
        let mut u: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
            return Self::default();
        }
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        Self {
            cpu: tv(u.ru_utime) + tv(u.ru_stime),
            faults: (u.ru_minflt + u.ru_majflt) as u64,
        }
    }

    /// What was used between `earlier` and now.
    pub fn since(earlier: Self) -> Self {
        let now = Self::now();
        Self {
            cpu: now.cpu.saturating_sub(earlier.cpu),
            faults: now.faults.saturating_sub(earlier.faults),
        }
    }
}

/// CPU time other processes have used so far, all together (user + system, from
/// `/proc/PID/stat`, in clock ticks); a process that is gone counts nothing.
pub fn processes_cpu(pids: &[u32]) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let total: u64 = pids
        .iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name, in parentheses, may hold spaces: count fields after it.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after it.
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .sum();
    Duration::from_secs_f64(total as f64 / ticks)
}

/// CPU time the calling thread has used so far.
fn thread_cpu() -> Duration {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// What CPU clock `id` reads (none for a thread that is gone).
fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the struct it is given.
    if unsafe { libc::clock_gettime(id, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The threads of one runtime of this process, whose CPU time is told apart from the rest's:
/// the loopback seeders run on a runtime of their own, so that what the leecher costs is not
/// mixed with what serving it does, as when they are processes of their own.
#[derive(Clone, Default)]
pub struct ThreadGroup(Arc<Mutex<Members>>);

#[derive(Default)]
struct Members {
    /// Each live thread's CPU clock.
    live: HashMap<ThreadId, libc::clockid_t>,
    /// What the threads that have exited used.
    exited: Duration,
}

impl ThreadGroup {
    /// A multi-threaded runtime whose every thread (workers and blocking pool) is a member.
    pub fn runtime(&self, name: &str) -> std::io::Result<tokio::runtime::Runtime> {
        let (joins, leaves) = (self.clone(), self.clone());
        tokio::runtime::Builder::new_multi_thread()
            .thread_name(name)
            .enable_all()
            .on_thread_start(move || joins.join())
            .on_thread_stop(move || leaves.leave())
            .build()
    }

    fn join(&self) {
        let mut id: libc::clockid_t = 0;
        // SAFETY: pthread_self is the calling thread; the call only writes `id`.
        if unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut id) } == 0 {
            let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
            m.live.insert(std::thread::current().id(), id);
        }
    }

    fn leave(&self) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.live.remove(&std::thread::current().id());
        m.exited += thread_cpu();
    }

    /// CPU time the members have used so far, those that exited included.
    pub fn cpu(&self) -> Duration {
        // Held while the clocks are read: a member leaving meanwhile adds its time once.
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.exited + m.live.values().map(|&id| clock(id)).sum::<Duration>()
    }
}

/// The peak resident set of this process so far (VmHWM), in bytes.
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// CPU seconds per GiB for `cpu` spent on `bytes`.
pub fn per_gib(cpu: Duration, bytes: u64) -> f64 {
    amount_per_gib(cpu.as_secs_f64(), bytes)
}

/// Page faults per GiB for `faults` taken over `bytes`.
pub fn faults_per_gib(faults: u64, bytes: u64) -> f64 {
    amount_per_gib(faults as f64, bytes)
}

fn amount_per_gib(amount: f64, bytes: u64) -> f64 {
    amount / (bytes as f64 / (1u64 << 30) as f64)
}

/// The CPU time SHA-256 takes over the benchmark's NAR of `size` bytes: the NarHash check any
/// substituter pays, the floor of what a download costs. Generating the bytes is not counted.
pub fn sha256_cpu(size: u64) -> std::io::Result<Duration> {
    let mut gen = NarGen::new(1, size);
    let mut buf = vec![0u8; 1 << 20];
    let mut h = Sha256::new();
    let mut spent = Duration::ZERO;
    loop {
        let n = gen.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let t = thread_cpu();
        h.update(&buf[..n]);
        spent += thread_cpu().saturating_sub(t);
    }
    std::hint::black_box(h.finalize());
    Ok(spent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_process_cpu_is_read_from_proc() {
        // This process, read the way another's is: it has spent some CPU, and not more than
        // getrusage says (clock ticks round down).
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        let here = processes_cpu(&[std::process::id()]);
        assert!(here > Duration::ZERO);
        assert!(here <= Usage::now().cpu + Duration::from_millis(20));
        assert_eq!(
            processes_cpu(&[u32::MAX]),
            Duration::ZERO,
            "no such process"
        );
    }

    #[test]
    fn a_runtime_s_threads_are_counted_apart_from_the_rest() {
        let group = ThreadGroup::default();
        let rt = group.runtime("cpu-test").unwrap();
        // Spins until the calling thread has used `d` of CPU, however loaded the machine.
        let spin = |d: Duration| {
            let t = thread_cpu();
            while thread_cpu() - t < d {
                std::hint::black_box(0u64);
            }
        };
        let before = group.cpu();
        // 60 ms on a worker, 60 on a blocking thread (gone before the last reading), 60 on
        // this thread, which is not the runtime's.
        rt.block_on(async move {
            tokio::spawn(async move { spin(Duration::from_millis(60)) })
                .await
                .unwrap();
            tokio::task::spawn_blocking(move || spin(Duration::from_millis(60)))
                .await
                .unwrap();
        });
        spin(Duration::from_millis(60));
        rt.shutdown_timeout(Duration::from_secs(10));
        let spent = group.cpu() - before;
        assert!(
            (Duration::from_millis(120)..Duration::from_millis(175)).contains(&spent),
            "{spent:?}"
        );
    }
}
