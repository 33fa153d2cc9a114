//! NAR writing throughput: our `dump_path` against `nix-store --dump` on the same tree, in the
//! same run, with the page cache warm for both.
//!
//! A plain `main` rather than criterion: the baseline is an external process whose output has
//! to be read through a pipe, and the point is the ratio of the two figures.
//!
//! Run: `cargo bench --bench nar_write` (NAR_BENCH_MIB=… changes the tree size, default 200).

use std::fs;
use std::hint::black_box;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use peerix_nix::nar::dump_path;
use peerix_test_support::io::HashingWriter;
use peerix_test_support::rng::SplitMix;
use sha2::Digest;

const ITERATIONS: usize = 5;

/// A package-like tree: many small files of varied sizes in nested directories (most under
/// 16 KiB, some up to 1 MiB), a few symlinks, and a few large files making up about half.
fn generate(root: &Path, total: u64) -> io::Result<(u64, u64)> {
    let mut rng = SplitMix(42);
    let mut written = 0u64;
    let mut files = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    let large_total = total / 2;
    for i in 0..4 {
        let dir = root.join("lib");
        fs::create_dir_all(&dir)?;
        let size = large_total / 4 + rng.next() % (1 << 20);
        let mut f = fs::File::create(dir.join(format!("libbig{i}.so")))?;
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            rng.fill(&mut buf[..n]);
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        written += size;
        files += 1;
    }
    while written < total {
        let dir = root.join(format!("share/d{}/s{}", rng.next() % 40, rng.next() % 8));
        fs::create_dir_all(&dir)?;
        // Log-uniform sizes from 0 bytes to 1 MiB, like a real package's files.
        let bits = rng.next() % 21;
        let size = (rng.next() % (1u64 << bits)) as usize;
        rng.fill(&mut buf[..size]);
        let p = dir.join(format!("f{files}"));
        fs::write(&p, &buf[..size])?;
        if rng.next() % 10 == 1 {
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
        }
        if rng.next() % 50 == 1 {
            std::os::unix::fs::symlink(format!("f{files}"), dir.join(format!("l{files}")))?;
        }
        written += size as u64;
        files += 1;
    }
    Ok((written, files))
}

fn ours_sink(root: &Path) -> u64 {
    dump_path(root, &mut io::sink()).expect("dump_path")
}

fn ours_hash(root: &Path) -> u64 {
    let mut w = HashingWriter::new();
    let n = dump_path(root, &mut w).expect("dump_path");
    black_box(w.sha.finalize());
    n
}

/// Ours through a pipe to another process, to compare with nix-store on equal terms.
fn ours_pipe(root: &Path) -> u64 {
    let mut cat = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn cat");
    let mut stdin = cat.stdin.take().expect("stdin");
    let n = dump_path(root, &mut stdin).expect("dump_path");
    drop(stdin);
    assert!(cat.wait().expect("wait").success());
    n
}

/// `nix-store --dump` with its stdout read fully, as `nix-store --dump > /dev/null` would but
/// through a pipe, like any consumer of it.
fn nix_dump(root: &Path) -> u64 {
    let mut child = Command::new("nix-store")
        .arg("--dump")
        .arg(root)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn nix-store");
    let mut out = child.stdout.take().expect("stdout");
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("reading nix-store: {e}"),
        }
    }
    assert!(
        child.wait().expect("wait").success(),
        "nix-store --dump failed"
    );
    n
}

/// Best and median throughput in MiB/s over `ITERATIONS` runs after one warm-up.
fn measure(name: &str, f: impl Fn() -> u64) -> f64 {
    let size = f();
    let mut times: Vec<Duration> = (0..ITERATIONS)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(black_box(f()), size);
            t.elapsed()
        })
        .collect();
    times.sort();
    let mib = size as f64 / (1 << 20) as f64;
    let median = mib / times[ITERATIONS / 2].as_secs_f64();
    let best = mib / times[0].as_secs_f64();
    println!("{name:<34} median {median:8.1} MiB/s   best {best:8.1} MiB/s");
    median
}

fn have_nix_store() -> bool {
    Command::new("nix-store")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument from `cargo bench -- x` is ignored.
    let mib: u64 = std::env::var("NAR_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("tree");
    let (bytes, files) = generate(&root, mib << 20).expect("generating the tree");
    let nar_size = ours_sink(&root);
    println!(
        "tree: {files} files, {:.1} MiB of contents, NAR {:.1} MiB, {ITERATIONS} iterations after a warm-up",
        bytes as f64 / (1 << 20) as f64,
        nar_size as f64 / (1 << 20) as f64
    );

    let ours = measure("dump_path -> io::sink", || ours_sink(&root));
    measure("dump_path -> sha256", || ours_hash(&root));
    let piped = measure("dump_path | cat > /dev/null", || ours_pipe(&root));
    if have_nix_store() {
        let nix = measure("nix-store --dump | read to EOF", || nix_dump(&root));
        assert_eq!(nix_dump(&root), nar_size, "NAR sizes differ");
        println!(
            "ratio ours/nix (medians): to io::sink {:.2}, both through a pipe {:.2}",
            ours / nix,
            piped / nix
        );
    } else {
        println!("nix-store not found: baseline skipped");
    }
}
