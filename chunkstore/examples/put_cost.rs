//! What storing a download's chunks costs, made durable: `put_verified` of every chunk of a
//! generated, incompressible NAR, then `flush`, into a fresh store, by 1 writer (one peer) and
//! by 4 writers at once (four peers). Prints wall and CPU time (user + system of the whole
//! process, sled's threads included), medians of the runs.
//!
//! `cargo run --release -p peerix-chunkstore --example put_cost [MIB] [RUNS]` (defaults 128, 5).
//! The store goes under PEERIX_BENCH_DIR, else the system's temporary directory: it must be on
//! the disk being measured (a tmpfs makes every fsync free).

use std::time::{Duration, Instant};

use peerix_chunkstore::{ChunkId, ChunkStore, Options, VerifiedChunk};
use peerix_test_support::rng::data;

const CHUNK: usize = 256 * 1024;

/// User + system time of this process so far.
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

fn run(chunks: &[VerifiedChunk], writers: usize) -> (Duration, Duration) {
    let base = std::env::var_os("PEERIX_BENCH_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    let cs = ChunkStore::open(dir.path(), Options::default()).expect("open");
    let (w0, c0) = (Instant::now(), cpu());
    std::thread::scope(|s| {
        for w in 0..writers {
            let cs = &cs;
            s.spawn(move || {
                for c in chunks.iter().skip(w).step_by(writers) {
                    assert!(cs.put_verified(c).expect("put"));
                }
            });
        }
    });
    cs.flush().expect("flush");
    let r = (w0.elapsed(), cpu() - c0);
    drop(cs);
    r
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map_or(128, |a| a.parse().expect("MIB"));
    let runs: usize = args.next().map_or(5, |a| a.parse().expect("RUNS"));
    let bytes = data(42, mib << 20);
    let chunks: Vec<VerifiedChunk> = bytes
        .chunks(CHUNK)
        .map(|c| {
            let c = bytes::Bytes::copy_from_slice(c);
            VerifiedChunk::new(ChunkId::of(&c), c).expect("verified")
        })
        .collect();
    for writers in [1, 4] {
        let (mut wall, mut cpus) = (vec![], vec![]);
        for _ in 0..runs {
            let (w, c) = run(&chunks, writers);
            wall.push(w);
            cpus.push(c);
        }
        let (w, c) = (median(wall), median(cpus));
        println!(
            "put {mib} MiB ({} chunks of {} KiB), {writers} writer(s): wall {:.0} ms ({:.0} MiB/s), CPU {:.0} ms (median of {runs})",
            chunks.len(),
            CHUNK / 1024,
            w.as_secs_f64() * 1e3,
            mib as f64 / w.as_secs_f64(),
            c.as_secs_f64() * 1e3,
        );
    }
}
