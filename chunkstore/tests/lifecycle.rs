//! The chunk store over a machine's life: a disk budget kept by evicting least recently used
//! NARs, GC that runs beside reads and downloads, downloads that are interrupted and resumed
//! or reclaimed.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use peerix_chunkstore::{ChunkStore, ChunkerParams, Manifest, Options};
use peerix_nix::StorePath;
use peerix_test_support::fixtures::{make_tree, nar_of};
use peerix_test_support::rng::Rng;
use peerix_test_support::store::{none, open, read_all};

/// A NAR of `size` bytes that shares nothing with the others, ingested into packs.
fn ingest(cs: &ChunkStore, seed: u64, size: usize) -> (Manifest, Vec<u8>) {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("t");
    make_tree(&tree, seed, size);
    let nar = nar_of(&tree);
    let m = cs
        .ingest_nar(nar.as_slice(), None, None, &mut none)
        .unwrap();
    (m, nar)
}

/// A chunk store over a Nix store of its own, and that store's directory.
fn open_with_nix_store(t: &tempfile::TempDir) -> (ChunkStore, PathBuf) {
    let root = t.path().join("root");
    let store_dir = root.join("nix/store");
    std::fs::create_dir_all(&store_dir).unwrap();
    (open(&t.path().join("s"), Some(&root)), store_dir)
}

/// The store path `name`, made in `store_dir` with `size` bytes of files from `seed`.
fn make_store_path(store_dir: &Path, name: &str, seed: u64, size: usize) -> StorePath {
    make_tree(&store_dir.join(name), seed, size);
    StorePath::from_base_name(name).unwrap()
}

#[test]
fn the_budget_evicts_least_recently_used_nars_and_never_a_pinned_one() {
    let t = tempfile::tempdir().unwrap();
    let cs = open(&t.path().join("s"), None);
    // Noise-like data: zstd cannot shrink it, so stored bytes are about the NAR sizes.
    let nars: Vec<_> = (0..4).map(|i| ingest(&cs, 1001 + 2 * i, 2 << 20)).collect();
    let one = cs.packed_live_bytes().unwrap() / 4;
    // Use them in the order 2, 0, 3, 1: 2 is the least recently used.
    for i in [2, 0, 3, 1] {
        cs.mark_used(&nars[i].0.nar_hash).unwrap();
    }
    let budget = one * 3 + one / 2;
    let st = cs.gc_within(Some(budget), &mut |_| {}).unwrap();
    let gone: Vec<usize> = (0..4)
        .filter(|&i| cs.manifest(&nars[i].0.nar_hash).unwrap().is_none())
        .collect();
    assert_eq!(gone, [2], "evicted {} NARs", st.nars_evicted);
    for i in [0, 1, 3] {
        assert_eq!(read_all(&cs, &nars[i].0.nar_hash).unwrap(), nars[i].1);
    }
    assert!(cs.packed_live_bytes().unwrap() <= budget);
    assert!(
        cs.pack_file_bytes().unwrap() <= budget,
        "GC compacted the packs down to the budget"
    );
    let rep = cs.fsck(true).unwrap();
    assert!(rep.is_clean(), "{:?}", rep.problems);

    // A budget smaller than anything: everything goes that is not pinned.
    let st = cs.gc_within(Some(1), &mut |_| {}).unwrap();
    assert_eq!(st.nars_evicted, 3);
    assert_eq!(cs.stats().unwrap().manifests, 0);
    assert_eq!(cs.pack_file_bytes().unwrap(), 0);
    assert!(cs.fsck(true).unwrap().is_clean());
}

/// Dead bytes spread thin: a removed NAR left less than a tenth of its pack dead, the live
/// bytes fit the budget and the file does not. GC shrinks the file to the budget rather than
/// leave the store over it for good (the churn test of `tests/lifecycle.rs` met it after a
/// SIGKILL: a pack 4 % over its budget that no GC would compact), and evicts nothing.
#[test]
fn packs_over_the_budget_with_a_little_dead_in_each_are_compacted_to_it() {
    let t = tempfile::tempdir().unwrap();
    let cs = open(&t.path().join("s"), None);
    let kept: Vec<_> = (0..4).map(|i| ingest(&cs, 2001 + 2 * i, 2 << 20)).collect();
    let (gone, _) = ingest(&cs, 2011, 512 << 10);
    assert!(cs.remove_manifest(&gone.nar_hash).unwrap());
    // A GC without a budget sweeps its chunks and leaves the pack, mostly live, as it is.
    let st = cs.gc(&mut |_| {}).unwrap();
    assert_eq!(st.packs_compacted, 0);
    let file = cs.pack_file_bytes().unwrap();
    let budget = file - (128 << 10);
    assert!(cs.packed_live_bytes().unwrap() <= budget);
    let st = cs.gc_within(Some(budget), &mut |_| {}).unwrap();
    assert_eq!(st.nars_evicted, 0, "a NAR evicted while the live bytes fit");
    assert!(
        cs.pack_file_bytes().unwrap() <= budget,
        "packs of {} bytes left over a budget of {budget} ({file} before GC)",
        cs.pack_file_bytes().unwrap()
    );
    for (m, nar) in &kept {
        assert_eq!(&read_all(&cs, &m.nar_hash).unwrap(), nar);
    }
    assert!(cs.fsck(true).unwrap().is_clean());
}

/// Live bytes over the budget (a pinned NAR is never evicted): no compaction can make the
/// files fit, so a pack with a little dead in it is left as it is, not rewritten by every GC.
#[test]
fn a_budget_the_live_bytes_exceed_does_not_rewrite_packs_for_a_little_dead() {
    let t = tempfile::tempdir().unwrap();
    let (cs, store_dir) = open_with_nix_store(&t);
    let path = make_store_path(
        &store_dir,
        "2c6kzph7l0dcbyl8cvq3q7zryzqal1va-pinned",
        4001,
        2 << 20,
    );
    cs.ingest_local(&path, None, &mut none).unwrap();
    cs.pin(&path.hash()).unwrap();
    let (gone, _) = ingest(&cs, 4003, 96 << 10);
    assert!(cs.remove_manifest(&gone.nar_hash).unwrap());
    let file = cs.pack_file_bytes().unwrap();
    let st = cs.gc_within(Some(1 << 20), &mut |_| {}).unwrap();
    assert_eq!(st.nars_evicted, 0);
    assert!(st.chunks_deleted > 0, "the dead NAR's chunks were swept");
    assert_eq!(
        st.packs_compacted, 0,
        "a mostly live pack rewritten to no avail"
    );
    assert_eq!(cs.pack_file_bytes().unwrap(), file);
    assert!(cs.fsck(true).unwrap().is_clean());
}

/// A NAR downloaded into packs, then imported by Nix (the scan reads it in place): its pack
/// copies are GC's to release, and the budget counts them no more. A NAR held only in packs is
/// not evicted to make room that releasing them makes anyway.
#[test]
fn pack_copies_about_to_be_released_do_not_evict_another_nar() {
    let t = tempfile::tempdir().unwrap();
    let (cs, store_dir) = open_with_nix_store(&t);
    let (kept, kept_nar) = ingest(&cs, 3001, 2 << 20);
    let path = make_store_path(
        &store_dir,
        "1c6kzph7l0dcbyl8cvq3q7zryzqal1va-imported",
        3003,
        2 << 20,
    );
    let nar = nar_of(&store_dir.join(path.base_name()));
    let downloaded = cs
        .ingest_nar(nar.as_slice(), None, None, &mut none)
        .unwrap();
    cs.mark_used(&kept.nar_hash).unwrap();
    cs.mark_used(&downloaded.nar_hash).unwrap();
    let local = cs.ingest_local(&path, None, &mut none).unwrap();
    assert_eq!(local.nar_hash, downloaded.nar_hash);
    // Room for one NAR of the two the packs hold.
    let budget = cs.pack_file_bytes().unwrap() * 3 / 4;
    let st = cs.gc_within(Some(budget), &mut |_| {}).unwrap();
    assert_eq!(
        st.nars_evicted, 0,
        "a NAR evicted for room the release made anyway"
    );
    assert!(st.pack_copies_released > 0);
    assert_eq!(read_all(&cs, &kept.nar_hash).unwrap(), kept_nar);
    assert!(cs.pack_file_bytes().unwrap() <= budget);
    assert!(cs.fsck(true).unwrap().is_clean());
}

#[test]
fn pinned_and_local_nars_are_never_evicted() {
    let t = tempfile::tempdir().unwrap();
    let (cs, store_dir) = open_with_nix_store(&t);
    // A path of the local store, indexed in place, then pinned (its chunks copied to packs).
    let path = make_store_path(
        &store_dir,
        "0c6kzph7l0dcbyl8cvq3q7zryzqal1va-pinned",
        5,
        1 << 20,
    );
    let pinned = cs.ingest_local(&path, None, &mut none).unwrap();
    cs.pin(&path.hash()).unwrap();
    let (other, _) = ingest(&cs, 6, 1 << 20);
    cs.gc_within(Some(1), &mut |_| {}).unwrap();
    assert!(cs.manifest(&pinned.nar_hash).unwrap().is_some());
    assert!(cs.manifest(&other.nar_hash).unwrap().is_none());
    assert!(cs.fsck(true).unwrap().is_clean());
}

/// GC sweeps in batches: a reader hammering the store while GC deletes tens of thousands of
/// records never fails and never waits for more than a batch.
#[test]
fn gc_runs_beside_reads_and_reports_its_longest_pause() {
    let t = tempfile::tempdir().unwrap();
    // Tiny chunks: many records from little data.
    let cs = ChunkStore::open(
        &t.path().join("s"),
        Options {
            chunker: ChunkerParams::new(256, 1024, 4096).unwrap(),
            store_root: None,
        },
    )
    .unwrap();
    let (keep, keep_nar) = ingest(&cs, 42, 1 << 20);
    // Many small dead chunks: a NAR of tiny files, cut small, then forgotten.
    let mut dead = vec![];
    let mut r = Rng(9);
    for i in 0..6 {
        let tree = t.path().join(format!("d{i}"));
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("f"), r.bytes(2 << 20)).unwrap();
        let nar = nar_of(&tree);
        dead.push(
            cs.ingest_nar(nar.as_slice(), None, None, &mut none)
                .unwrap(),
        );
    }
    let records = cs.stats().unwrap().chunks;
    assert!(
        records > 2 * peerix_chunkstore::SWEEP_BATCH as u64,
        "{records} records: too few to sweep in several batches"
    );
    for m in &dead {
        cs.remove_manifest(&m.nar_hash).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (cs, stop, reads, keep) = (cs.clone(), stop.clone(), reads.clone(), keep.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for c in &keep.chunks {
                    cs.read_chunk(&c.id).expect("a live chunk reads during GC");
                    reads.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    // The reader is reading before GC starts.
    while reads.load(Ordering::SeqCst) == 0 {
        std::thread::yield_now();
    }
    let st = cs.gc(&mut |_| {}).unwrap();
    let during = reads.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    assert!(st.chunks_deleted as usize > 2 * peerix_chunkstore::SWEEP_BATCH);
    assert!(during > 0);
    eprintln!(
        "gc: {} records deleted, longest pause {:?}, {} reads alongside",
        st.chunks_deleted, st.longest_pause, during
    );
    assert_eq!(read_all(&cs, &keep.nar_hash).unwrap(), keep_nar);
    assert!(cs.fsck(true).unwrap().is_clean());
}

/// A download that stopped keeps what it stored for a retry, which then needs only the rest;
/// one left idle (or found on start) is reclaimed and GC frees its chunks.
#[test]
fn interrupted_downloads_resume_and_are_reclaimed_when_idle() {
    let t = tempfile::tempdir().unwrap();
    let src = open(&t.path().join("src"), None);
    let (m, nar) = ingest(&src, 77, 2 << 20);
    let dst_dir = t.path().join("dst");
    let dst = open(&dst_dir, None);
    let unique: HashSet<_> = m.chunks.iter().map(|c| c.id).collect();

    dst.begin_download(&m).unwrap();
    let half = m.chunks.len() / 2;
    for c in &m.chunks[..half] {
        dst.put_chunk(&c.id, &src.read_chunk(&c.id).unwrap())
            .unwrap();
    }
    dst.suspend_download(&m.nar_hash).unwrap();
    // Not idle long enough: kept, through GC.
    assert_eq!(dst.reclaim_partials(Duration::from_secs(600)).unwrap(), 0);
    dst.gc(&mut |_| {}).unwrap();
    // The retry needs only what the first attempt did not get.
    dst.begin_download(&m).unwrap();
    let missing = dst.missing(&m).unwrap();
    assert!(
        missing.len() < unique.len(),
        "nothing was kept for the retry"
    );
    // While it runs, nothing reclaims it.
    assert_eq!(dst.reclaim_partials(Duration::ZERO).unwrap(), 0);
    for c in &missing {
        dst.put_chunk(&c.id, &src.read_chunk(&c.id).unwrap())
            .unwrap();
    }
    dst.finish_download(&m.nar_hash, None).unwrap();
    assert_eq!(read_all(&dst, &m.nar_hash).unwrap(), nar);

    // A second NAR interrupted, then the process "restarts": reclaimed on start, GC frees it.
    let (m2, _) = ingest(&src, 78, 2 << 20);
    dst.begin_download(&m2).unwrap();
    for c in &m2.chunks[..m2.chunks.len() / 2] {
        dst.put_chunk(&c.id, &src.read_chunk(&c.id).unwrap())
            .unwrap();
    }
    drop(dst);
    let dst = open(&dst_dir, None);
    assert!(dst.has_partial(&m2.nar_hash).unwrap());
    assert_eq!(dst.reclaim_partials(Duration::ZERO).unwrap(), 1);
    let st = dst.gc(&mut |_| {}).unwrap();
    assert!(st.chunks_deleted > 0);
    assert!(!dst.has_partial(&m2.nar_hash).unwrap());
    assert_eq!(read_all(&dst, &m.nar_hash).unwrap(), nar);
    assert!(dst.fsck(true).unwrap().is_clean());
}

/// A NAR of more distinct chunks than one index transaction takes (1,024) is committed in
/// batches, read back, ingested again, and removed in batches,
/// and fsck finds every refcount right after each step.
#[test]
fn a_nar_of_thousands_of_chunks_is_committed_and_removed_in_batches() {
    let t = tempfile::tempdir().unwrap();
    let opts = Options {
        chunker: ChunkerParams::new(256, 1024, 4096).unwrap(),
        store_root: None,
    };
    let cs = ChunkStore::open(&t.path().join("s"), opts).unwrap();
    let (m, nar) = ingest(&cs, 4242, 4 << 20);
    let distinct: HashSet<_> = m.chunks.iter().map(|c| c.id).collect();
    assert!(distinct.len() > 3 * 1024, "{} chunks", distinct.len());
    let clean = |cs: &ChunkStore, what: &str| {
        let r = cs.fsck(true).unwrap();
        assert!(
            r.is_clean(),
            "{what}: {:?}",
            &r.problems[..r.problems.len().min(3)]
        );
    };
    clean(&cs, "after the ingest");
    assert_eq!(read_all(&cs, &m.nar_hash).unwrap(), nar);
    // The same NAR again: it is there already, nothing is counted twice.
    let again = cs
        .ingest_nar(nar.as_slice(), None, None, &mut none)
        .unwrap();
    assert_eq!(again, m);
    clean(&cs, "after a second commit");
    assert!(cs.remove_manifest(&m.nar_hash).unwrap());
    clean(&cs, "after the removal");
    let st = cs.gc(&mut |_| {}).unwrap();
    assert_eq!(st.chunks_deleted as usize, distinct.len());
    clean(&cs, "after GC");
}
