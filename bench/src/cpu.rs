//! What a run costs, from the process itself: CPU time (user + system, every thread) and the
//! peak resident set. On a shared machine these hold where MiB/s do not.

use std::io::Read;
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
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the struct it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
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
}
