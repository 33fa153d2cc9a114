//! Chunk-store benchmarks, each against a baseline measured in the same run:
//! - ingest throughput against sha256 over the same bytes (ingest must compute that sha256
//!   anyway; the target is at most 1.5× its cost), in place (a local store path) and into packs;
//! - reassembly (the verified NAR reader) against reading the same bytes from a file;
//! - the chunk-size sweep: dedup of an update against index size against speed.
//!
//! Data: real files (shared libraries from /usr/lib/x86_64-linux-gnu, or the tree named by
//! PEERIX_BENCH_TREE), 128 MiB by default (PEERIX_BENCH_MIB). "Version 2" is the same tree
//! updated the way a Nix rebuild changes a package: in every file a few 32-byte store-path
//! hashes are rewritten, and one file in twenty changes wholesale.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use peerix_chunkstore::{ChunkStore, ChunkerParams, Options};
use peerix_test_support::fixtures::{named_store_path, nar_of};
use peerix_test_support::rng::Rng;
use sha2::Digest;

/// Copy regular files from `src` (recursively, sorted) into `dst` until `budget` bytes.
fn copy_tree(src: &Path, dst: &Path, budget: &mut u64) {
    std::fs::create_dir_all(dst).unwrap();
    let mut entries: Vec<_> = match std::fs::read_dir(src) {
        Ok(d) => d.filter_map(Result::ok).map(|e| e.path()).collect(),
        Err(_) => return,
    };
    entries.sort();
    for p in entries {
        if *budget == 0 {
            return;
        }
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let to = dst.join(p.file_name().unwrap());
        if md.is_dir() {
            copy_tree(&p, &to, budget);
        } else if md.is_file()
            && md.len() <= *budget
            && md.len() > 0
            && std::fs::copy(&p, &to).is_ok()
        {
            *budget -= md.len();
        }
    }
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// The update: rewritten store-path hashes in every file, a few files rebuilt wholesale.
fn update(v2: &Path) {
    let mut r = Rng(0x9e3779b97f4a7c15);
    let mut all = vec![];
    files(v2, &mut all);
    for f in all {
        let mut b = std::fs::read(&f).unwrap();
        if b.len() < 64 {
            continue;
        }
        if r.next().is_multiple_of(20) {
            for x in b.iter_mut() {
                *x ^= r.next() as u8;
            }
        } else {
            // Three references near the start (dynamic section, string table), one anywhere.
            for k in 0..4 {
                let span = if k < 3 {
                    b.len().min(64 * 1024)
                } else {
                    b.len()
                };
                let at = r.next() as usize % (span - 32);
                for x in &mut b[at..at + 32] {
                    *x = peerix_nix::base32::ALPHABET[r.next() as usize % 32];
                }
            }
        }
        std::fs::write(&f, b).unwrap();
    }
}

fn mean_ns(group: &str, bench: &str) -> Option<f64> {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let p = Path::new(&target)
        .join("criterion")
        .join(group)
        .join(bench)
        .join("new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn main() {
    let mib: u64 = std::env::var("PEERIX_BENCH_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(128);
    let src = std::env::var_os("PEERIX_BENCH_TREE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/lib/x86_64-linux-gnu".into());
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let (p1, p2) = (named_store_path("pkg-1"), named_store_path("pkg-2"));
    let v1 = root.join("nix/store").join(p1.base_name());
    let v2 = root.join("nix/store").join(p2.base_name());
    let mut budget = mib << 20;
    copy_tree(&src, &v1, &mut budget);
    let mut budget = mib << 20;
    copy_tree(&src, &v2, &mut budget);
    update(&v2);
    let (n1, n2) = (nar_of(&v1), nar_of(&v2));
    let size = n1.len() as u64;
    println!(
        "data: {:.1} MiB NAR of {} (v2 {:.1} MiB)",
        size as f64 / 1048576.0,
        src.display(),
        n2.len() as f64 / 1048576.0
    );

    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8))
        .configure_from_args();

    {
        let mut g = c.benchmark_group("ingest");
        g.throughput(Throughput::Bytes(size));
        g.bench_function("sha256", |b| {
            b.iter(|| sha2::Sha256::digest(&n1));
        });
        g.bench_function("in_place", |b| {
            b.iter_with_setup(
                || {
                    let d = tempfile::tempdir().unwrap();
                    let cs = ChunkStore::open(
                        d.path(),
                        Options {
                            store_root: Some(root.clone()),
                            ..Options::default()
                        },
                    )
                    .unwrap();
                    (d, cs)
                },
                |(d, cs)| {
                    cs.ingest_local(&p1, None, &mut |_| {}).unwrap();
                    (d, cs)
                },
            );
        });
        g.bench_function("into_packs", |b| {
            b.iter_with_setup(
                || {
                    let d = tempfile::tempdir().unwrap();
                    let cs = ChunkStore::open(d.path(), Options::default()).unwrap();
                    (d, cs)
                },
                |(d, cs)| {
                    cs.ingest_nar(n1.as_slice(), None, None, &mut |_| {})
                        .unwrap();
                    (d, cs)
                },
            );
        });
        g.finish();
    }

    let file = tmp.path().join("v1.nar");
    std::fs::write(&file, &n1).unwrap();
    let local_dir = tempfile::tempdir().unwrap();
    let local = ChunkStore::open(
        local_dir.path(),
        Options {
            store_root: Some(root.clone()),
            ..Options::default()
        },
    )
    .unwrap();
    let m = local.ingest_local(&p1, None, &mut |_| {}).unwrap();
    let packs_dir = tempfile::tempdir().unwrap();
    let packed = ChunkStore::open(packs_dir.path(), Options::default()).unwrap();
    packed
        .ingest_nar(n1.as_slice(), None, None, &mut |_| {})
        .unwrap();
    {
        let mut g = c.benchmark_group("reassembly");
        g.throughput(Throughput::Bytes(size));
        let drain = |mut r: Box<dyn Read>| {
            let mut buf = vec![0u8; 256 * 1024];
            while r.read(&mut buf).unwrap() > 0 {}
        };
        g.bench_function("file_read", |b| {
            b.iter(|| drain(Box::new(std::fs::File::open(&file).unwrap())))
        });
        // What any verified serve must do at least: read the bytes and hash them.
        g.bench_function("file_read_sha256", |b| {
            b.iter(|| {
                let mut f = std::fs::File::open(&file).unwrap();
                let mut h = sha2::Sha256::new();
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    let n = f.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
                h.finalize()
            })
        });
        g.bench_function("from_local_store", |b| {
            b.iter(|| drain(Box::new(local.nar_reader(&m.nar_hash).unwrap())))
        });
        g.bench_function("from_packs", |b| {
            b.iter(|| drain(Box::new(packed.nar_reader(&m.nar_hash).unwrap())))
        });
        g.finish();
    }
    c.final_summary();

    let ratio = |g: &str, a: &str, base: &str| match (mean_ns(g, a), mean_ns(g, base)) {
        (Some(x), Some(y)) => format!("{:.2}×", x / y),
        _ => "n/a".into(),
    };
    let rate = |g: &str, a: &str| {
        mean_ns(g, a).map_or("n/a".into(), |ns| {
            format!("{:.0} MiB/s", size as f64 / 1048576.0 / (ns / 1e9))
        })
    };
    println!("\n== summary (time relative to the baseline; lower is better)");
    println!(
        "ingest in place : {} = {} of sha256 ({})",
        rate("ingest", "in_place"),
        ratio("ingest", "in_place", "sha256"),
        rate("ingest", "sha256")
    );
    println!(
        "ingest to packs : {} = {} of sha256",
        rate("ingest", "into_packs"),
        ratio("ingest", "into_packs", "sha256")
    );
    println!(
        "read local store: {} = {} of a file read ({})",
        rate("reassembly", "from_local_store"),
        ratio("reassembly", "from_local_store", "file_read"),
        rate("reassembly", "file_read")
    );
    println!(
        "read from packs : {} = {} of a file read",
        rate("reassembly", "from_packs"),
        ratio("reassembly", "from_packs", "file_read")
    );
    println!(
        "verified reads  : local store {}, packs {} of a file read + sha256 ({})",
        ratio("reassembly", "from_local_store", "file_read_sha256"),
        ratio("reassembly", "from_packs", "file_read_sha256"),
        rate("reassembly", "file_read_sha256")
    );

    println!(
        "\n== chunk-size sweep: v1 then v2 indexed in place; 'v2 new' is what an update costs"
    );
    println!("| min/avg/max KiB | chunks (v1) | mean chunk | v2 new bytes | v2 new % | index bytes | index % | chunking MiB/s |");
    println!("|---|---|---|---|---|---|---|---|");
    for (min, avg, max) in [(16, 64, 256), (32, 128, 512), (64, 256, 1024)] {
        let d = tempfile::tempdir().unwrap();
        let cs = ChunkStore::open(
            d.path(),
            Options {
                chunker: ChunkerParams::new(min << 10, avg << 10, max << 10).unwrap(),
                store_root: Some(root.clone()),
            },
        )
        .unwrap();
        let t = Instant::now();
        let m1 = cs.ingest_local(&p1, None, &mut |_| {}).unwrap();
        let secs = t.elapsed().as_secs_f64();
        let mut last = peerix_chunkstore::Progress::default();
        // In place, every chunk is "new" to the index; what v2 would fetch is what v1 lacks.
        let have: std::collections::HashSet<_> = m1.chunks.iter().map(|c| c.id).collect();
        let m2 = cs.ingest_local(&p2, None, &mut |p| last = *p).unwrap();
        let mut seen = std::collections::HashSet::new();
        let new_bytes: u64 = m2
            .chunks
            .iter()
            .filter(|c| !have.contains(&c.id) && seen.insert(c.id))
            .map(|c| u64::from(c.len))
            .sum();
        // What the index holds per chunk: its manifest entry (36 bytes) and its record
        // (32-byte key, ~50-byte value), and sled's own overhead on top.
        let stats = cs.stats().unwrap();
        let index = stats.chunks * (32 + 50) + (m1.chunks.len() + m2.chunks.len()) as u64 * 36;
        println!(
            "| {min}/{avg}/{max} | {} | {:.0} KiB | {:.1} MiB | {:.1}% | {:.0} KiB | {:.3}% | {:.0} |",
            m1.chunks.len(),
            size as f64 / m1.chunks.len() as f64 / 1024.0,
            new_bytes as f64 / 1048576.0,
            100.0 * new_bytes as f64 / last.bytes as f64,
            index as f64 / 1024.0,
            100.0 * index as f64 / stats.logical_bytes as f64,
            size as f64 / 1048576.0 / secs
        );
    }
}
