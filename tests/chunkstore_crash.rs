//! SIGKILL in the middle of an ingest, a put or a GC, again and again: the store must open,
//! pass fsck, show no half-made NAR, and lose nothing that was committed.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use peerix_chunkstore::{ChunkStore, Manifest, Options};
use peerix_nix::Sha256Hash;

/// Incompressible-ish bytes, deterministic.
fn data(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(n);
    v
}

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

/// The child half of the put test: re-run this test binary with PEERIX_CRASH_PUT_STATE set.
/// After `pause_after` puts it waits well past sled's flush interval (500 ms) and prints
/// `paused`, so the puts before that line are durable by the time the parent kills it.
fn put_child(state: &Path, src: &Path, pause_after: usize) {
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
    for (i, (off, c)) in m.offsets().enumerate() {
        if i == pause_after {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            writeln!(out, "paused").unwrap();
        }
        let off = off as usize;
        cs.put_chunk(&c.id, &bytes[off..off + c.len as usize])
            .unwrap();
        writeln!(out, "put {}", c.id).unwrap();
        out.flush().unwrap();
    }
    cs.finish_download(&m.nar_hash, None).unwrap();
    writeln!(out, "done").unwrap();
}

/// This test binary, re-run as the child that puts chunks (pausing after `pause_after`).
fn put_child_cmd(state: &Path, src: &Path, pause_after: usize) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args([
        "--exact",
        "sigkill_during_puts_keeps_what_was_put_and_hides_the_partial_nar",
        "--nocapture",
    ])
    .env("PEERIX_CRASH_PUT_STATE", state)
    .env("PEERIX_CRASH_PUT_SRC", src)
    .env("PEERIX_CRASH_PUT_PAUSE", pause_after.to_string());
    c
}

/// Reads the child's stdout until `more` put lines after `paused`, then SIGKILLs it. Returns
/// the chunk ids it reported put before `paused` (durable by then), or None if it was no longer
/// running when killed.
fn kill_after_pause(mut child: Child, more: usize) -> Option<Vec<String>> {
    let out = child.stdout.take().unwrap();
    let (mut before, mut paused, mut after) = (vec![], false, 0);
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        if line == "paused" {
            paused = true;
        } else if let Some(id) = line.strip_prefix("put ") {
            if paused {
                after += 1;
                if after >= more {
                    break;
                }
            } else {
                before.push(id.to_owned());
            }
        }
    }
    let running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    (running && paused).then_some(before)
}

#[test]
fn sigkill_during_puts_keeps_what_was_put_and_hides_the_partial_nar() {
    let state_env = std::env::var_os("PEERIX_CRASH_PUT_STATE");
    if let (Some(state), Some(src), Some(pause)) = (
        state_env,
        std::env::var_os("PEERIX_CRASH_PUT_SRC"),
        std::env::var("PEERIX_CRASH_PUT_PAUSE").ok(),
    ) {
        put_child(Path::new(&state), Path::new(&src), pause.parse().unwrap());
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let state = t.path().join("state");
    let src = t.path().join("src.nar");
    let bytes = data(99, 24 << 20);
    std::fs::write(&src, &bytes).unwrap();
    let hash = Sha256Hash::digest(&bytes);
    let mut killed = 0;
    for round in 0..4 {
        let child = put_child_cmd(&state, &src, 3 + 5 * round)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        if let Some(durable) = kill_after_pause(child, 2) {
            killed += 1;
            let cs = ChunkStore::open(&state.join("chunks"), Options::default()).unwrap();
            assert!(cs.nar_reader(&hash).is_err(), "a partial NAR is visible");
            // The download's record is durable from its start.
            let m = cs
                .partial_manifest(&hash)
                .unwrap()
                .expect("download record");
            let distinct: std::collections::HashSet<_> = m.chunks.iter().map(|c| c.id).collect();
            let missing: std::collections::HashSet<_> =
                cs.missing(&m).unwrap().iter().map(|c| c.id).collect();
            let kept = distinct.len() - missing.len();
            eprintln!(
                "round {round}: {kept} of {} chunks kept, {} put before the pause",
                distinct.len(),
                durable.len()
            );
            // Every chunk put before the pause (flushed by then) survived the kill; puts of
            // the last moments before it may be forgotten, never kept wrong.
            for id in &durable {
                let c = m.chunks.iter().find(|c| c.id.to_string() == *id).unwrap();
                assert!(!missing.contains(&c.id), "chunk {id} was put and lost");
            }
            assert!(kept >= durable.len(), "{kept} kept, {} put", durable.len());
            assert!(kept < distinct.len(), "the kill came after the last put");
            for (off, c) in m.offsets() {
                if !missing.contains(&c.id) {
                    let off = off as usize;
                    let got = cs.read_chunk(&c.id).unwrap();
                    assert!(
                        got == bytes[off..off + c.len as usize],
                        "chunk {} reads back wrong",
                        c.id
                    );
                }
            }
        }
        assert_fsck_clean(&state);
    }
    assert!(killed > 0, "no put was ever killed mid-way");
    // Resuming the download completes it.
    let child = put_child_cmd(&state, &src, usize::MAX).output().unwrap();
    assert!(child.status.success());
    let cs = ChunkStore::open(&state.join("chunks"), Options::default()).unwrap();
    let mut v = vec![];
    cs.nar_reader(&hash).unwrap().read_to_end(&mut v).unwrap();
    assert!(v == bytes);
    assert!(cs.fsck(true).unwrap().is_clean());
}
