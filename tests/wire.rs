//! Chunks on the wire, with real Nix: compressed on a cold fetch, and as deltas against the
//! older release B already holds on an update. Nix imports the exact NARs (NarHash), and the
//! daemon's own counters show the bytes compression and deltas kept off the wire. (Peers that
//! lie in compressed or delta frames are in `hostile.rs`.)

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::pair::{assert_substitutes, sign};
use common::{Daemon, Nix};

/// A release of real software: nixpkgs' `lib` (tests/data), as the directory
/// `nixlib-VERSION` under `parent`. Later releases change a few lines in a few files, as a
/// point release does.
fn write_release(parent: &Path, version: &str, edits: usize) -> PathBuf {
    let dir = parent.join(format!("nixlib-{version}"));
    std::fs::create_dir_all(&dir).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/nixpkgs-lib/lib");
    let mut names: Vec<_> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    for (i, name) in names.iter().enumerate() {
        let mut text = std::fs::read_to_string(src.join(name)).unwrap();
        if i < edits {
            // A line added near the top and one changed in the middle.
            text.insert_str(0, &format!("# nixlib {version}\n"));
            let mid = text.len() / 2;
            let at = mid + text[mid..].find('\n').unwrap_or(0);
            text.insert_str(at, &format!("\n# changed in {version}"));
        }
        std::fs::write(dir.join(name), text).unwrap();
    }
    dir
}

/// `nix-store --add` a tree and sign it.
fn add_signed(nix: &Nix, key: &Path, tree: &Path) -> String {
    let path = nix.add(tree);
    sign(nix, key, &path);
    path
}

fn release(nix: &Nix, key: &Path, version: &str, edits: usize) -> String {
    let tree = write_release(&nix.scratch("releases"), version, edits);
    add_signed(nix, key, &tree)
}

fn nar_size(nix: &Nix, path: &str) -> u64 {
    nix.path_info_json(&[path])[0]["narSize"].as_u64().unwrap()
}

mod needs_nix {
    use super::*;

    #[test]
    fn compressed_and_delta_transfers_give_the_exact_nar() {
        let a_nix = common::nix();
        let b_nix = common::nix();
        let (a_sec, a_pub) = a_nix.keys("peer-a-1");
        let old = release(&a_nix, &a_sec, "24.05", 0);
        let new = release(&a_nix, &a_sec, "24.11", 3);
        b_nix.init_store();
        let mut a = Daemon::start("A", &a_nix, &["--private-key", a_sec.to_str().unwrap()]);
        assert!(a.wait_scan() >= 2);
        let mut b = Daemon::start(
            "B",
            &b_nix,
            &[
                "--trusted-key",
                &a_pub,
                "--peer",
                &a.p2p,
                "--wire-compression",
                "always",
            ],
        );
        b.wait_peer(&a);

        // Cold: B holds nothing of it; the chunks come compressed.
        assert_substitutes(
            &b_nix,
            &a_nix,
            &old,
            &b.url(),
            &a_pub,
            std::slice::from_ref(&old),
        );
        let cold_wire = b.counter("peerix_chunk_wire_bytes");
        let size = nar_size(&a_nix, &old);
        assert!(b.counter("peerix_compression_saved_bytes") > 0);
        assert!(
            cold_wire * 2 < size,
            "cold: {cold_wire} bytes on the wire for a {size}-byte NAR of text"
        );
        assert_eq!(b.counter("peerix_delta_saved_bytes"), 0);

        // The update: the changed chunks come as deltas against the release B holds.
        assert_substitutes(
            &b_nix,
            &a_nix,
            &new,
            &b.url(),
            &a_pub,
            std::slice::from_ref(&new),
        );
        let update_wire = b.counter("peerix_chunk_wire_bytes") - cold_wire;
        let size = nar_size(&a_nix, &new);
        eprintln!(
            "cold: {cold_wire} wire bytes for a {} byte NAR; update: {update_wire} for {size}",
            nar_size(&a_nix, &old)
        );
        assert!(b.counter("peerix_delta_saved_bytes") > 0);
        assert!(
            update_wire * 20 < size,
            "update: {update_wire} bytes on the wire for a {size}-byte NAR, six lines changed"
        );
    }
}

/// Real release pairs: nixpkgs' lib (in the repository) by default; with
/// `PEERIX_WIRE_PAIRS="numpy:1.26.3:1.26.4 …"` wheels from PyPI (Linux x86_64, CPython 3.11),
/// downloaded once into `PEERIX_WIRE_CACHE` (default: the system's temporary directory) and
/// unpacked as `python3.11-NAME-VERSION`. Each: (name, old tree, new tree).
fn release_pairs(scratch: &Path) -> Vec<(String, PathBuf, PathBuf)> {
    let Ok(spec) = std::env::var("PEERIX_WIRE_PAIRS") else {
        return vec![(
            "nixlib".into(),
            write_release(scratch, "24.05", 0),
            write_release(scratch, "24.11", 3),
        )];
    };
    let cache = std::env::var("PEERIX_WIRE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("peerix-wire-pairs"));
    spec.split_whitespace()
        .map(|p| {
            let mut it = p.split(':');
            let (name, old, new) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
            let tree = |v: &str| wheel(&cache, name, v);
            (name.to_owned(), tree(old), tree(new))
        })
        .collect()
}

/// A wheel from PyPI, unpacked (cached).
fn wheel(cache: &Path, name: &str, version: &str) -> PathBuf {
    let dir = cache.join(format!("python3.11-{name}-{version}"));
    if dir.exists() {
        return dir;
    }
    let dl = cache.join("wheels");
    let st = Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
        ])
        .args([
            "--python-version",
            "3.11",
            "--platform",
            "manylinux2014_x86_64",
            "-d",
        ])
        .arg(&dl)
        .arg(format!("{name}=={version}"))
        .status()
        .unwrap();
    assert!(st.success(), "pip download {name}=={version}");
    let file = std::fs::read_dir(&dl)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let f = p.file_name().unwrap().to_string_lossy().to_lowercase();
            f.starts_with(&format!("{}-{version}-", name.replace('-', "_"))) && f.ends_with(".whl")
        })
        .unwrap_or_else(|| panic!("no wheel of {name} {version} in {}", dl.display()));
    let tmp = cache.join(format!(".unpacking-{name}-{version}"));
    let st = Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&file)
        .arg(&tmp)
        .status()
        .unwrap();
    assert!(st.success(), "unzip {}", file.display());
    std::fs::rename(&tmp, &dir).unwrap();
    dir
}

/// Sizes of the NAR of `path` as the baselines would send it: raw, xz -6 (what
/// cache.nixos.org serves), zstd -3 and -19.
fn baselines(nix: &Nix, path: &str) -> [u64; 4] {
    let s = nix.store_arg();
    let nar = nix.run_bytes("nix", &["store", "dump-path", "--store", &s, path]);
    let mut xz = Command::new("xz")
        .args(["-6", "-T1", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("xz (Debian: xz-utils)");
    let mut input = xz.stdin.take().unwrap();
    let feed = {
        let nar = nar.clone();
        std::thread::spawn(move || input.write_all(&nar).unwrap())
    };
    let xz_len = xz.wait_with_output().unwrap().stdout.len() as u64;
    feed.join().unwrap();
    let z = |level| zstd::bulk::compress(&nar, level).unwrap().len() as u64;
    [nar.len() as u64, xz_len, z(3), z(19)]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    /// B holds nothing of the package.
    Cold,
    /// B holds the previous release; deltas off.
    Update,
    /// B holds the previous release; deltas on (the default).
    Delta,
    /// B holds nothing; A has seeded the release, and recompressed it for the wire.
    Recompressed,
}

mod needs_root {
    use super::*;
    use common::netns::Netns;

    /// README's "Bytes on the wire": A and B in namespaces of their own, A's uplink capped
    /// (`PEERIX_WIRE_RATE`, default 100mbit), B's Nix substituting the newer release of each
    /// pair from A with B's daemon at its defaults, the bytes B receives counted by the
    /// kernel on its veth: cold, update without deltas, update with deltas, against the xz
    /// NAR the upstream cache would send.
    #[test]
    fn wire_bytes_of_real_updates() {
        assert!(peerix_bench::is_root(), "needs root: network namespaces");
        let ns = Netns::create("w");
        let rate = std::env::var("PEERIX_WIRE_RATE").unwrap_or_else(|_| "100mbit".into());
        // The chunk size both daemons cut with (their stores are new).
        let chunk = std::env::var("PEERIX_WIRE_CHUNK").unwrap_or_else(|_| "256KiB".into());
        ns.cap_uplink(&rate);
        let [srv, cli] = &ns.names;
        let scratch = tempfile::tempdir().unwrap();
        let mut rows = vec![];
        for (name, old_tree, new_tree) in release_pairs(scratch.path()) {
            let a_nix = common::nix();
            let (a_sec, a_pub) = a_nix.keys("peer-a-1");
            add_signed(&a_nix, &a_sec, &old_tree);
            let new = add_signed(&a_nix, &a_sec, &new_tree);
            let [nar, xz, z3, z19] = baselines(&a_nix, &new);
            let mut a = Daemon::start_in(
                Some(srv),
                "A",
                &a_nix,
                &[
                    "--private-key",
                    a_sec.to_str().unwrap(),
                    "--p2p-listen",
                    "/ip4/10.231.0.1/tcp/0",
                    "--chunk-size",
                    &chunk,
                ],
            );
            assert!(a.wait_scan() >= 2);
            let mut wire = vec![];
            for case in [Case::Cold, Case::Update, Case::Delta, Case::Recompressed] {
                if case == Case::Recompressed {
                    let state = a_nix.scratch("state-A");
                    common::peerix_ok(&[
                        "seed",
                        &new,
                        "--state-dir",
                        state.to_str().unwrap(),
                        "--store",
                        &a_nix.store_arg(),
                        "--upstream-cache",
                        "none",
                    ]);
                    // In the background at a quarter of a core: zstd-19 of the wheels' tens of
                    // MB takes minutes.
                    let wait = std::time::Duration::from_secs(1800);
                    a.wait_for_within(wait, "recompression", |l| {
                        l.starts_with("peerix: recompressed ")
                    });
                }
                let b_nix = common::nix();
                b_nix.init_store();
                let (b_sec, _) = b_nix.keys("peer-b-1");
                if matches!(case, Case::Update | Case::Delta) {
                    add_signed(&b_nix, &b_sec, &old_tree);
                }
                let mut args = vec![
                    "--trusted-key",
                    &a_pub,
                    "--private-key",
                    b_sec.to_str().unwrap(),
                    "--peer",
                    &a.p2p,
                    "--p2p-listen",
                    "/ip4/10.231.0.2/tcp/0",
                    "--chunk-size",
                    &chunk,
                ];
                if case == Case::Update {
                    args.push("--no-deltas");
                }
                let mut b = Daemon::start_in(Some(cli), "B", &b_nix, &args);
                b.wait_scan();
                b.wait_peer(&a);
                let before = ns.cli_rx_bytes();
                let s = b_nix.store_arg();
                let out = b_nix
                    .cmd("ip")
                    .args(["netns", "exec", cli, "nix-store", "--store", &s, "-r", &new])
                    .args(["--option", "substituters", &b.url()])
                    .args(["--option", "trusted-public-keys", &a_pub])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "{name} {case:?}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                wire.push(ns.cli_rx_bytes() - before);
                let one = std::slice::from_ref(&new);
                assert_eq!(
                    b_nix.nar_hashes(one),
                    a_nix.nar_hashes(one),
                    "{name} {case:?}"
                );
            }
            rows.push((name, [nar, xz, z3, z19], wire));
        }
        let mib = |b: u64| b as f64 / 1048576.0;
        println!(
            "\nwire bytes on B's veth (A's uplink capped at {rate}, {chunk} chunks); × = ratio to the xz NAR"
        );
        println!(
            "{:<16} {:>9} {:>9} {:>9} {:>9} | {:>15} {:>15} {:>15} {:>15}",
            "pair",
            "NAR",
            "xz -6",
            "zstd -3",
            "zstd -19",
            "cold",
            "update",
            "update+delta",
            "cold, seeded"
        );
        for (name, [nar, xz, z3, z19], wire) in &rows {
            let cell = |w: u64| format!("{:.2}M {:.2}×", mib(w), w as f64 / *xz as f64);
            println!(
                "{name:<16} {:>8.2}M {:>8.2}M {:>8.2}M {:>8.2}M | {:>15} {:>15} {:>15} {:>15}",
                mib(*nar),
                mib(*xz),
                mib(*z3),
                mib(*z19),
                cell(wire[0]),
                cell(wire[1]),
                cell(wire[2]),
                cell(wire[3])
            );
            // Holding the old release saves bytes; deltas save more; a seeder's recompressed
            // frames beat compressing on the fly.
            assert!(wire[1] < wire[0], "{name}: update {wire:?}");
            assert!(wire[2] < wire[1], "{name}: deltas {wire:?}");
            assert!(wire[3] < wire[0], "{name}: recompressed {wire:?}");
        }
    }
}
