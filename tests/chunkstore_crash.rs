//! SIGKILL in the middle of an ingest, a put or a GC, again and again: the store must open,
//! pass fsck, show no half-made NAR, and lose nothing that was committed.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use peerix_chunkstore::{ChunkStore, Manifest, Options, PUT_UNSYNCED_MAX};
use peerix_nix::Sha256Hash;
use peerix_test_support::rng::data;

fn peerix_out(state: &Path, args: &[&str]) -> (bool, String) {
    let out = common::peerix()
        .args(["store", "--state-dir", state.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn assert_fsck_clean(state: &Path) {
    let (ok, out) = peerix_out(state, &["fsck", "--verify"]);
    assert!(ok && out.contains("clean"), "fsck after a crash: {out}");
}

/// Start `child`, wait for `lines` lines on the given pipe that start with `prefix`, then
/// SIGKILL it. Returns whether it was still running when killed.
fn kill_after(mut child: Child, prefix: &str, lines: usize) -> bool {
    let pipe: Box<dyn Read> = match (child.stderr.take(), child.stdout.take()) {
        (Some(e), _) => Box::new(e),
        (None, Some(o)) => Box::new(o),
        _ => unreachable!("no pipe"),
    };
    let mut seen = 0;
    for line in BufReader::new(pipe).lines() {
        let Ok(line) = line else { break };
        if line.starts_with(prefix) {
            seen += 1;
            if seen >= lines {
                break;
            }
        }
    }
    let running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    running
}

fn stats_nars(state: &Path) -> String {
    let (ok, out) = peerix_out(state, &["stats"]);
    assert!(ok, "{out}");
    out.lines()
        .find(|l| l.starts_with("NARs:"))
        .unwrap()
        .to_owned()
}

#[test]
fn sigkill_during_ingest_leaves_a_clean_store_and_no_half_nar() {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let file = t.path().join("big.nar");
    let bytes = data(7, 64 << 20);
    std::fs::write(&file, &bytes).unwrap();
    let mut killed = 0;
    for round in 0..5 {
        let child = common::peerix()
            .args(["store", "--state-dir", state.to_str().unwrap(), "ingest"])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if kill_after(child, "ingest:", 1 + round % 4) {
            killed += 1;
            assert_eq!(stats_nars(&state), "NARs: 0 (0 downloads in progress)");
        }
        assert_fsck_clean(&state);
    }
    assert!(killed > 0, "no ingest was ever killed mid-way");
    // After all that, a full ingest works and gives back the exact bytes.
    let (ok, out) = peerix_out(&state, &["ingest", file.to_str().unwrap()]);
    assert!(ok, "{out}");
    let hash = Sha256Hash::digest(&bytes);
    assert!(out.contains(&hash.to_string()), "{out}");
    let cat = common::peerix()
        .args(["store", "--state-dir", state.to_str().unwrap(), "cat"])
        .arg(hash.to_string())
        .output()
        .unwrap();
    assert!(cat.status.success());
    assert!(cat.stdout == bytes, "cat differs from the ingested bytes");
    // The crashed attempts' leftovers are garbage that GC reclaims.
    let (ok, out) = peerix_out(&state, &["gc"]);
    assert!(ok, "{out}");
    let (ok, out) = peerix_out(&state, &["fsck", "--verify"]);
    assert!(ok && out.contains("0.0 MiB reclaimable"), "{out}");
}

#[test]
fn sigkill_during_gc_leaves_a_clean_store() {
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let chunks = state.join("chunks");
    let mut kept: Vec<(Manifest, Vec<u8>)> = vec![];
    // Four packs (one per open) of three NARs; two of each three are removed, so GC deletes
    // chunks, then compacts every pack.
    for p in 0..4u64 {
        let cs = ChunkStore::open(&chunks, Options::default()).unwrap();
        for n in 0..3u64 {
            let bytes = data(p * 10 + n + 1, 6 << 20);
            let m = cs
                .ingest_nar(bytes.as_slice(), None, None, &mut |_| {})
                .unwrap();
            if n == 0 {
                kept.push((m, bytes));
            } else {
                assert!(cs.remove_manifest(&m.nar_hash).unwrap());
            }
        }
    }
    let mut killed = 0;
    for round in 0..4 {
        let child = common::peerix()
            .args(["store", "--state-dir", state.to_str().unwrap(), "gc"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if kill_after(child, "gc:", 1 + round % 3) {
            killed += 1;
        }
        assert_fsck_clean(&state);
    }
    assert!(killed > 0, "no GC was ever killed mid-way");
    let (ok, out) = peerix_out(&state, &["gc"]);
    assert!(ok, "{out}");
    assert_fsck_clean(&state);
    let cs = ChunkStore::open(&chunks, Options::default()).unwrap();
    for (m, bytes) in &kept {
        let mut v = vec![];
        cs.nar_reader(&m.nar_hash)
            .unwrap()
            .read_to_end(&mut v)
            .unwrap();
        assert!(&v == bytes, "a kept NAR changed");
    }
    // GC compacts a pack once at least half of it is garbage; less may remain.
    let r = cs.fsck(true).unwrap();
    let packs = cs.stats().unwrap().pack_file_bytes;
    assert!(
        r.garbage_bytes <= packs / 2,
        "{} of {packs}",
        r.garbage_bytes
    );
}

/// The child half of the put test: re-run this test binary with PEERIX_CRASH_PUT set.
fn put_child(state: &Path, src: &Path) {
    let cs = ChunkStore::open(&state.join("chunks"), Options::default()).unwrap();
    let bytes = std::fs::read(src).unwrap();
    let m = {
        let scratch = tempfile::tempdir().unwrap();
        let other = ChunkStore::open(scratch.path(), Options::default()).unwrap();
        other
            .ingest_nar(bytes.as_slice(), None, None, &mut |_| {})
            .unwrap()
    };
    cs.begin_download(&m).unwrap();
    let mut out = std::io::stdout().lock();
    for (off, c) in m.offsets() {
        let off = off as usize;
        cs.put_chunk(&c.id, &bytes[off..off + c.len as usize])
            .unwrap();
        writeln!(out, "put {}", c.id).unwrap();
        out.flush().unwrap();
    }
    cs.finish_download(&m.nar_hash, None).unwrap();
    writeln!(out, "done").unwrap();
}

/// This test binary, re-run as the child that puts chunks.
fn put_child_cmd(state: &Path, src: &Path) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "sigkill_during_puts_keeps_what_was_put_and_hides_the_partial_nar",
        "--nocapture",
    ])
    .env("PEERIX_CRASH_PUT_STATE", state)
    .env("PEERIX_CRASH_PUT_SRC", src);
    c
}

#[test]
fn sigkill_during_puts_keeps_what_was_put_and_hides_the_partial_nar() {
    let state_env = std::env::var_os("PEERIX_CRASH_PUT_STATE");
    if let (Some(state), Some(src)) = (state_env, std::env::var_os("PEERIX_CRASH_PUT_SRC")) {
        put_child(Path::new(&state), Path::new(&src));
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let src = t.path().join("src.nar");
    let bytes = data(99, 64 << 20);
    std::fs::write(&src, &bytes).unwrap();
    let hash = Sha256Hash::digest(&bytes);
    let mut killed = 0;
    let mut kept_before = std::collections::HashSet::new();
    for round in 0..4 {
        let child = put_child_cmd(&state, &src)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Past PUT_UNSYNCED_MAX (24 MiB, some 96 chunks) from the first round on.
        let lines = 110 + 30 * round;
        if kill_after(child, "put ", lines) {
            killed += 1;
            let cs = ChunkStore::open(&state.join("chunks"), Options::default()).unwrap();
            // No half NAR: neither readable nor counted.
            assert!(cs.nar_reader(&hash).is_err(), "a partial NAR is visible");
            assert!(
                !cs.has_manifest(&hash).unwrap(),
                "a partial NAR has a manifest"
            );
            // The download's record is durable from its start.
            let m = cs
                .partial_manifest(&hash)
                .unwrap()
                .expect("download record");
            // When the child printed line `lines`, at most PUT_UNSYNCED_MAX bytes of its puts
            // were not durable, and those the last ones: every chunk put before them is
            // kept; they may be forgotten, never wrong.
            let mut durable = vec![];
            let mut unsynced = 0;
            for c in m.chunks.iter().take(lines).rev() {
                if kept_before.contains(&c.id) {
                    continue;
                }
                unsynced += u64::from(c.len);
                if unsynced > PUT_UNSYNCED_MAX {
                    durable.push(c.id);
                }
            }
            let mut kept = std::collections::HashSet::new();
            for (off, c) in m.offsets() {
                if cs.has_chunk(&c.id).unwrap() {
                    // Every chunk the index lists reads back, verified, as it was put.
                    let off = off as usize;
                    let got = cs.read_chunk(&c.id).unwrap();
                    assert!(got == bytes[off..off + c.len as usize], "chunk {}", c.id);
                    kept.insert(c.id);
                }
            }
            // What survived one crash (and a clean close) survives the next.
            assert!(
                kept.is_superset(&kept_before),
                "round {round}: kept chunks were lost"
            );
            let lost = durable.iter().filter(|id| !kept.contains(*id)).count();
            assert!(
                lost == 0,
                "round {round}: {lost} chunks put durably were lost"
            );
            assert!(round > 0 || !durable.is_empty(), "no put was durable");
            kept_before = kept;
        }
        assert_fsck_clean(&state);
    }
    assert!(killed > 0, "no put was ever killed mid-way");
    // Resuming the download completes it.
    let child = put_child_cmd(&state, &src).output().unwrap();
    assert!(child.status.success());
    let cs = ChunkStore::open(&state.join("chunks"), Options::default()).unwrap();
    let mut v = vec![];
    cs.nar_reader(&hash).unwrap().read_to_end(&mut v).unwrap();
    assert!(v == bytes);
    assert!(cs.fsck(true).unwrap().is_clean());
}

/// The child half of the finish test: index a store path in place, find one of its files
/// changed on disk, put the right bytes of what no longer reads (as the peers' fetch does when
/// a stored NAR fails half-way), finish, and wait to be killed.
fn finish_child(state: &Path, root: &Path, base: &str, nar: &Path) {
    let opts = Options {
        store_root: Some(root.to_owned()),
        ..Options::default()
    };
    let cs = ChunkStore::open(&state.join("chunks"), opts).unwrap();
    let sp = peerix_nix::StorePath::from_base_name(base).unwrap();
    let m = cs.ingest_local(&sp, None, &mut |_| {}).unwrap();
    let blob = root.join("nix/store").join(base).join("blob");
    let mut changed = std::fs::read(&blob).unwrap();
    changed[1 << 20] ^= 0xff;
    std::fs::write(&blob, changed).unwrap();
    assert!(cs
        .nar_reader(&m.nar_hash)
        .and_then(|mut r| {
            std::io::copy(&mut r, &mut std::io::sink()).map_err(|e| peerix_chunkstore::Error::Io {
                path: "reading".into(),
                source: e,
            })
        })
        .is_err());
    let bytes = std::fs::read(nar).unwrap();
    for (off, c) in m.offsets() {
        if !cs.has_chunk(&c.id).unwrap() {
            let off = off as usize;
            cs.put_chunk(&c.id, &bytes[off..off + c.len as usize])
                .unwrap();
        }
    }
    cs.finish_download(&m.nar_hash, None).unwrap();
    println!("finished");
    loop {
        std::thread::park();
    }
}

/// A NAR read in place whose file changed on disk is finished from peers: the chunks fetched
/// for it survive a SIGKILL right after, and the store reads the NAR back whole.
#[test]
fn sigkill_after_a_stored_nar_is_finished_from_peers_keeps_the_fetched_chunks() {
    let vars = ["STATE", "ROOT", "BASE", "NAR"]
        .map(|v| std::env::var_os(format!("PEERIX_CRASH_FINISH_{v}")));
    if let [Some(state), Some(root), Some(base), Some(nar)] = &vars {
        finish_child(
            Path::new(state),
            Path::new(root),
            base.to_str().unwrap(),
            Path::new(nar),
        );
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (state, root) = (t.path().join("state"), t.path().join("root"));
    let base = "0a0b0c0d0f0g0h0i0j0k0l0m0n0p0q0r-pkg-1.0";
    let tree = root.join("nix/store").join(base);
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("blob"), data(7, 3 << 20)).unwrap();
    let mut nar = vec![];
    peerix_nix::nar::dump_path(&tree, &mut nar).unwrap();
    let nar_file = t.path().join("pkg.nar");
    std::fs::write(&nar_file, &nar).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sigkill_after_a_stored_nar_is_finished_from_peers_keeps_the_fetched_chunks",
            "--nocapture",
        ])
        .env("PEERIX_CRASH_FINISH_STATE", &state)
        .env("PEERIX_CRASH_FINISH_ROOT", &root)
        .env("PEERIX_CRASH_FINISH_BASE", base)
        .env("PEERIX_CRASH_FINISH_NAR", &nar_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        kill_after(child, "finished", 1),
        "the child ended by itself"
    );
    let opts = Options {
        store_root: Some(root.clone()),
        ..Options::default()
    };
    let cs = ChunkStore::open(&state.join("chunks"), opts).unwrap();
    let hash = Sha256Hash::digest(&nar);
    let m = cs.manifest(&hash).unwrap().expect("the NAR is still held");
    assert!(
        cs.missing(&m).unwrap().is_empty(),
        "fetched chunks were lost"
    );
    let mut back = vec![];
    cs.nar_reader(&hash)
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == nar, "the NAR does not read back whole");
    let r = cs.fsck(true).unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
}
