//! The chunk store on real disk: sled, pack files, trees read in place.

use peerix_test_support::fixtures::{fake_store_path, make_tree, nar_of};
use peerix_test_support::rng::{data, Rng};
use peerix_test_support::store::{none, open, read_all, sha};

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use peerix_chunkstore::{Error, Manifest, Progress};

#[test]
fn round_trips_many_nars() {
    let t = tempfile::tempdir().unwrap();
    let cs = open(&t.path().join("cs"), None);
    let mut nars = vec![];
    for (i, size) in [0usize, 1, 100, 5_000, 70_000, 300_000, 1_500_000, 3_000_000]
        .into_iter()
        .enumerate()
    {
        let tree = t.path().join(format!("t{i}"));
        if size == 0 {
            std::fs::write(&tree, b"").unwrap();
        } else {
            make_tree(&tree, i as u64 + 7, size);
        }
        let nar = nar_of(&tree);
        let m = cs
            .ingest_nar(
                nar.as_slice(),
                None,
                Some((sha(&nar), nar.len() as u64)),
                &mut none,
            )
            .unwrap();
        assert_eq!(m.nar_size, nar.len() as u64);
        nars.push((m, nar));
    }
    // Reopen: everything was durable.
    drop(cs);
    let cs = open(&t.path().join("cs"), None);
    for (m, nar) in &nars {
        assert_eq!(&read_all(&cs, &m.nar_hash).unwrap(), nar);
        assert!(cs.missing(m).unwrap().is_empty());
    }
    let r = cs.fsck(true).unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
    // A wrong expected hash is refused and leaves nothing visible.
    let before = cs.stats().unwrap().manifests;
    let e = cs
        .ingest_nar(&b"not the nar"[..], None, Some((sha(b"x"), 11)), &mut none)
        .unwrap_err();
    assert!(matches!(e, Error::NarHashMismatch { .. }), "{e}");
    assert_eq!(cs.stats().unwrap().manifests, before);
}

#[test]
fn an_edit_costs_about_the_chunks_it_touches() {
    let t = tempfile::tempdir().unwrap();
    let cs = open(&t.path().join("cs"), None);
    let v1 = t.path().join("v1");
    make_tree(&v1, 42, 8 << 20);
    let v2 = t.path().join("v2");
    make_tree(&v2, 42, 8 << 20);
    // An in-place edit in one file and an insertion in another.
    let f = v2.join("lib/f0");
    let mut b = std::fs::read(&f).unwrap();
    let mid = b.len() / 2;
    b[mid..mid + 100].fill(b'X');
    std::fs::write(&f, b).unwrap();
    let g = v2.join("lib/sub/f1");
    let mut b = std::fs::read(&g).unwrap();
    b.splice(10..10, b"inserted bytes".iter().copied());
    std::fs::write(&g, b).unwrap();

    let n1 = nar_of(&v1);
    let n2 = nar_of(&v2);
    cs.ingest_nar(n1.as_slice(), None, None, &mut none).unwrap();
    let mut last = Progress::default();
    let m2 = cs
        .ingest_nar(n2.as_slice(), None, None, &mut |p| last = *p)
        .unwrap();
    println!(
        "v2: {} bytes in {} chunks; new: {} bytes in {} chunks",
        last.bytes, last.chunks, last.new_bytes, last.new_chunks
    );
    // Two edits touch at most two chunks each (plus a boundary shift), of at most 256 KiB.
    assert!(last.new_chunks <= 6, "{last:?}");
    assert!(last.new_bytes < n2.len() as u64 / 10, "{last:?}");
    let s = cs.stats().unwrap();
    assert!(s.dedup_ratio() > 1.8, "{s:?}");
    assert_eq!(read_all(&cs, &m2.nar_hash).unwrap(), n2);
}

fn pack_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir.join("packs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn a_corrupt_chunk_on_disk_is_detected_reported_and_never_returned() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("cs");
    let cs = open(&dir, None);
    let tree = t.path().join("t");
    make_tree(&tree, 5, 2 << 20);
    let nar = nar_of(&tree);
    let m = cs
        .ingest_nar(nar.as_slice(), None, None, &mut none)
        .unwrap();
    // Flip one byte inside the first record's data.
    let pack = &pack_files(&dir)[0];
    let mut b = std::fs::read(pack).unwrap();
    b[48 + 100] ^= 0x55;
    std::fs::write(pack, b).unwrap();

    let first = m.chunks[0].id;
    let e = cs.read_chunk(&first).unwrap_err();
    assert!(matches!(e, Error::CorruptChunk { .. }), "{e}");
    // The whole-NAR reader fails rather than hand out bad bytes.
    assert!(read_all(&cs, &m.nar_hash).is_err());
    // The bad copy was dropped: the chunk is now missing, and fsck says so.
    assert_eq!(cs.missing(&m).unwrap()[0].id, first);
    let r = cs.fsck(true).unwrap();
    assert!(!r.is_clean());
    // Putting the right bytes back repairs it; wrong bytes are refused.
    let good = &nar[..m.chunks[0].len as usize];
    assert!(matches!(
        cs.put_chunk(&first, b"wrong"),
        Err(Error::ChunkMismatch { .. })
    ));
    assert!(cs.put_chunk(&first, good).unwrap());
    assert_eq!(read_all(&cs, &m.nar_hash).unwrap(), nar);
    cs.gc(&mut |_| {}).unwrap();
    let r = cs.fsck(true).unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
}

#[test]
fn local_store_paths_are_read_in_place_and_changes_detected() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let sp = fake_store_path(&root, "pkg-1.0", 9, 3 << 20);
    let real = root.join("nix/store").join(sp.base_name());
    let nar = nar_of(&real);
    let cs = open(&t.path().join("cs"), Some(&root));
    let m = cs
        .ingest_local(&sp, Some((sha(&nar), nar.len() as u64)), &mut none)
        .unwrap();
    let s = cs.stats().unwrap();
    assert_eq!(s.packed_bytes, 0, "no second copy of the store");
    assert_eq!(s.pack_file_bytes, 0);
    assert!(s.local_bytes > 0);
    assert_eq!(cs.path_nar(&sp.hash()).unwrap().unwrap().0, m.nar_hash);
    assert_eq!(read_all(&cs, &m.nar_hash).unwrap(), nar);
    assert!(cs.fsck(true).unwrap().is_clean());

    // A file changed in the store (same size): detected, never served.
    let f = real.join("lib/f0");
    let mut b = std::fs::read(&f).unwrap();
    b[0] ^= 1;
    std::fs::write(&f, b).unwrap();
    assert!(read_all(&cs, &m.nar_hash).is_err());
    assert!(!cs.missing(&m).unwrap().is_empty());
    // A wrong expected NarHash is refused at ingest.
    let e = cs
        .ingest_local(&sp, Some((sha(&nar), nar.len() as u64)), &mut none)
        .unwrap_err();
    assert!(matches!(e, Error::NarHashMismatch { .. }), "{e}");
}

#[test]
fn pinned_paths_outlive_the_local_store_and_unpinned_copies_are_released() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let a = fake_store_path(&root, "a", 11, 1 << 20);
    let b = fake_store_path(&root, "b", 12, 1 << 20);
    let cs = open(&t.path().join("cs"), Some(&root));
    let ma = cs.ingest_local(&a, None, &mut none).unwrap();
    let nar_a = read_all(&cs, &ma.nar_hash).unwrap();
    cs.pin(&a.hash()).unwrap();
    assert_eq!(cs.pins().unwrap(), vec![a.base_name().to_owned()]);
    std::fs::remove_dir_all(root.join("nix/store").join(a.base_name())).unwrap();
    assert_eq!(read_all(&cs, &ma.nar_hash).unwrap(), nar_a);

    // b arrives as a download (packs), then becomes valid locally: GC releases its copies.
    let real_b = root.join("nix/store").join(b.base_name());
    let nar_b = nar_of(&real_b);
    let other = open(&t.path().join("cs2"), None);
    let mb = other
        .ingest_nar(nar_b.as_slice(), Some(&b), None, &mut none)
        .unwrap();
    drop(other);
    let before = cs.stats().unwrap();
    cs.begin_download(&mb).unwrap();
    let mut off = 0usize;
    for c in &mb.chunks {
        cs.put_chunk(&c.id, &nar_b[off..off + c.len as usize])
            .unwrap();
        off += c.len as usize;
    }
    cs.finish_download(&mb.nar_hash, Some(&b)).unwrap();
    let mid = cs.stats().unwrap();
    assert!(mid.packed_bytes >= before.packed_bytes + nar_b.len() as u64 - 4096);
    cs.ingest_local(&b, None, &mut none).unwrap();
    let g = cs.gc(&mut |_| {}).unwrap();
    assert!(g.pack_copies_released > 0);
    let after = cs.stats().unwrap();
    assert_eq!(after.packed_bytes, before.packed_bytes, "{after:?}");
    assert_eq!(read_all(&cs, &mb.nar_hash).unwrap(), nar_b);
    assert_eq!(read_all(&cs, &ma.nar_hash).unwrap(), nar_a);
    assert!(cs.fsck(true).unwrap().is_clean());
}

#[test]
fn downloads_keep_their_chunks_through_gc_until_finished() {
    let t = tempfile::tempdir().unwrap();
    let src = open(&t.path().join("src"), None);
    let tree = t.path().join("t");
    make_tree(&tree, 77, 2 << 20);
    let nar = nar_of(&tree);
    let m = src
        .ingest_nar(nar.as_slice(), None, None, &mut none)
        .unwrap();

    let dst = open(&t.path().join("dst"), None);
    dst.begin_download(&m).unwrap();
    assert_eq!(
        dst.missing(&m).unwrap().len(),
        m.chunks.iter().map(|c| c.id).collect::<HashSet<_>>().len()
    );
    let half = m.chunks.len() / 2;
    for c in &m.chunks[..half] {
        dst.put_chunk(&c.id, &src.read_chunk(&c.id).unwrap())
            .unwrap();
    }
    // Served at once, even mid-download, and kept by GC.
    dst.gc(&mut |_| {}).unwrap();
    for c in &m.chunks[..half] {
        assert!(dst.has_chunk(&c.id).unwrap());
    }
    assert!(matches!(
        dst.finish_download(&m.nar_hash, None),
        Err(Error::MissingChunk(_))
    ));
    assert!(
        dst.nar_reader(&m.nar_hash).is_err(),
        "a partial NAR is invisible"
    );
    for c in &m.chunks[half..] {
        dst.put_chunk(&c.id, &src.read_chunk(&c.id).unwrap())
            .unwrap();
    }
    dst.finish_download(&m.nar_hash, None).unwrap();
    assert_eq!(read_all(&dst, &m.nar_hash).unwrap(), nar);
    assert!(dst.fsck(true).unwrap().is_clean());
}

#[test]
fn an_ingest_commits_over_chunks_a_download_has_just_put() {
    let t = tempfile::tempdir().unwrap();
    let tree = t.path().join("t");
    make_tree(&tree, 78, 1 << 20);
    let nar = nar_of(&tree);
    let src = open(&t.path().join("src"), None);
    let m = src
        .ingest_nar(nar.as_slice(), None, None, &mut none)
        .unwrap();
    let dst = open(&t.path().join("dst"), None);
    dst.begin_download(&m).unwrap();
    // Put, servable, not yet indexed (fewer bytes than a group of puts).
    for c in &m.chunks {
        dst.put_chunk(&c.id, &src.read_chunk(&c.id).unwrap())
            .unwrap();
    }
    // The same NAR arrives another way: its chunks are found, not stored twice.
    let got = dst
        .ingest_nar(nar.as_slice(), None, None, &mut none)
        .unwrap();
    assert_eq!(got, m);
    assert_eq!(read_all(&dst, &m.nar_hash).unwrap(), nar);
    dst.finish_download(&m.nar_hash, None).unwrap();
    assert!(dst.fsck(true).unwrap().is_clean());
}

#[test]
fn a_lying_manifest_is_caught_by_the_nar_hash() {
    let t = tempfile::tempdir().unwrap();
    let cs = open(&t.path().join("cs"), None);
    let tree = t.path().join("t");
    make_tree(&tree, 3, 1 << 20);
    let nar = nar_of(&tree);
    let m = cs
        .ingest_nar(nar.as_slice(), None, None, &mut none)
        .unwrap();
    // Every chunk exists and verifies, but the claimed NarHash is not theirs.
    let liar = Manifest {
        nar_hash: sha(b"something else"),
        ..m.clone()
    };
    cs.begin_download(&liar).unwrap();
    cs.finish_download(&liar.nar_hash, None).unwrap();
    let mut r = cs.nar_reader(&liar.nar_hash).unwrap();
    let mut out = vec![];
    let e = r.read_to_end(&mut out).unwrap_err();
    assert!(e.to_string().contains("NAR hash mismatch"), "{e}");
    // The reader never handed out the last chunk.
    assert!(out.len() < nar.len());
}

#[test]
fn gc_reclaims_space_and_fsck_stays_clean() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("cs");
    let cs = open(&dir, None);
    let mut ms = vec![];
    for i in 0..4 {
        let tree = t.path().join(format!("t{i}"));
        make_tree(&tree, 101 + 2 * i, 2 << 20);
        let nar = nar_of(&tree);
        ms.push((
            cs.ingest_nar(nar.as_slice(), None, None, &mut none)
                .unwrap(),
            nar,
        ));
    }
    let before = cs.stats().unwrap();
    for (m, _) in &ms[..3] {
        assert!(cs.remove_manifest(&m.nar_hash).unwrap());
    }
    let g = cs.gc(&mut |_| {}).unwrap();
    assert!(
        g.chunks_deleted > 0 && g.packs_compacted + g.packs_removed > 0,
        "{g:?}"
    );
    let after = cs.stats().unwrap();
    assert!(
        after.pack_file_bytes < before.pack_file_bytes / 2,
        "{before:?} {after:?}"
    );
    let r = cs.fsck(true).unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
    assert_eq!(r.garbage_bytes, 0);
    assert_eq!(read_all(&cs, &ms[3].0.nar_hash).unwrap(), ms[3].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_ingest_and_read() {
    let t = tempfile::tempdir().unwrap();
    let cs = open(&t.path().join("cs"), None);
    // NARs that share most of their content, so writers race on the same chunks.
    let base = t.path().join("base");
    make_tree(&base, 1, 1 << 20);
    let mut nars = vec![];
    for i in 0..8u64 {
        let tree = t.path().join(format!("t{i}"));
        make_tree(&tree, 1, 1 << 20);
        std::fs::write(tree.join(format!("own{i}")), Rng(i + 50).bytes(300_000)).unwrap();
        nars.push(nar_of(&tree));
    }
    let first = nars[0].clone();
    let m0 = cs
        .blocking(move |cs| cs.ingest_nar(first.as_slice(), None, None, &mut none))
        .await
        .unwrap();
    let mut tasks = vec![];
    for nar in &nars[1..] {
        tasks.push(tokio::spawn({
            let cs = cs.clone();
            let nar = nar.clone();
            async move {
                let n2 = nar.clone();
                let m = cs
                    .blocking(move |cs| cs.ingest_nar(n2.as_slice(), None, None, &mut none))
                    .await
                    .unwrap();
                assert_eq!(m.nar_hash, sha(&nar));
            }
        }));
    }
    for _ in 0..8 {
        let cs = cs.clone();
        let want = nars[0].clone();
        let h = m0.nar_hash;
        tasks.push(tokio::spawn(async move {
            let got = cs
                .blocking(move |cs| {
                    let mut v = vec![];
                    cs.nar_reader(&h)?.read_to_end(&mut v).unwrap();
                    Ok(v)
                })
                .await
                .unwrap();
            assert_eq!(got, want);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    for nar in &nars {
        assert_eq!(&read_all(&cs, &sha(nar)).unwrap(), nar);
    }
    let r = cs.fsck(true).unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
}

#[test]
fn pinned_narinfos_and_named_roots_survive_a_reopen() {
    use peerix_nix::NarInfo;
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let a = fake_store_path(&root, "a", 21, 300_000);
    let b = fake_store_path(&root, "b", 22, 300_000);
    let dir = t.path().join("cs");
    {
        let cs = open(&dir, Some(&root));
        for p in [&a, &b] {
            let m = cs.ingest_local(p, None, &mut none).unwrap();
            let info = NarInfo::parse(&format!(
                "StorePath: {}\nURL: nar/x.nar\nCompression: none\nNarHash: {}\nNarSize: {}\nReferences: {}\n",
                p.to_full_path(),
                m.nar_hash,
                m.nar_size,
                a.base_name()
            ))
            .unwrap();
            let pinned = cs.pin_path(&info).unwrap();
            assert_eq!(pinned.copied_bytes, m.nar_size, "first pin copies it all");
            assert_eq!(cs.pin_path(&info).unwrap().copied_bytes, 0, "then nothing");
        }
        cs.put_root("/run/current-system", b"the application's bytes")
            .unwrap();
        cs.put_root("other", b"replaced").unwrap();
        cs.put_root("other", b"").unwrap();
    }
    let cs = open(&dir, Some(&root));
    let roots = cs.roots().unwrap();
    assert_eq!(
        roots,
        vec![
            (
                "/run/current-system".into(),
                b"the application's bytes".to_vec()
            ),
            ("other".into(), vec![])
        ]
    );
    assert_eq!(
        cs.root("/run/current-system").unwrap(),
        Some(roots[0].1.clone())
    );
    let info = cs.pinned_info(&b.hash()).unwrap().unwrap();
    assert_eq!(info.store_path, b);
    assert!(info.references.contains(&a));
    assert_eq!(cs.pinned_infos().unwrap().len(), 2);
    assert!(cs.unpin(&b.hash()).unwrap());
    assert!(cs.pinned_info(&b.hash()).unwrap().is_none());
    assert!(cs.remove_root("/run/current-system").unwrap());
    assert!(!cs.remove_root("/run/current-system").unwrap());
    assert_eq!(cs.roots().unwrap().len(), 1);
}

/// Packs keep a chunk zstd-compressed only where that saves at least an eighth: text shrinks,
/// incompressible bytes are stored as they are (never larger than they were).
#[test]
fn packs_compress_only_what_shrinks_by_an_eighth() {
    let t = tempfile::tempdir().unwrap();
    let text: Vec<u8> = b"nix store peer chunk lib /bin "
        .iter()
        .copied()
        .cycle()
        .take(2 << 20)
        .collect();
    let noise = data(0x9e37_79b9_7f4a_7c15, 2 << 20);
    for (name, data, compressed) in [("text", &text, true), ("noise", &noise, false)] {
        let cs = open(&t.path().join(name), None);
        cs.ingest_nar(&data[..], None, None, &mut |_| {}).unwrap();
        let st = cs.stats().unwrap();
        assert_eq!(st.packed_bytes, data.len() as u64, "{name}");
        if compressed {
            assert!(
                st.packed_stored_bytes * 8 < st.packed_bytes,
                "{name}: {} stored for {}",
                st.packed_stored_bytes,
                st.packed_bytes
            );
        } else {
            assert_eq!(st.packed_stored_bytes, st.packed_bytes, "{name}");
        }
    }
}

/// Two paths of the local store share chunks (a package and its next version); each shared
/// chunk is read in place from one of them. When Nix collects that one, the other still
/// produces its whole NAR from its own files (they take over those chunks, on the first read
/// that misses them, or when the scan detaches the collected path), with nothing missing in
/// between: a crash at any point of this leaves a clean store.
#[test]
fn a_collected_path_hands_its_shared_chunks_to_another_local_path() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let a = fake_store_path(&root, "pkg-1.0", 21, 2 << 20);
    let b = fake_store_path(&root, "pkg-1.1", 22, 1);
    let store = root.join("nix/store");
    let real_b = store.join(b.base_name());
    std::fs::remove_dir_all(&real_b).unwrap();
    let st = std::process::Command::new("cp")
        .arg("-a")
        .arg(store.join(a.base_name()))
        .arg(&real_b)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::write(real_b.join("zz-version"), b"1.1").unwrap();
    let cs = open(&t.path().join("cs"), Some(&root));
    let ma = cs.ingest_local(&a, None, &mut none).unwrap();
    let mb = cs.ingest_local(&b, None, &mut none).unwrap();
    let ids = |m: &Manifest| m.chunks.iter().map(|c| c.id).collect::<HashSet<_>>();
    assert!(
        ids(&ma).intersection(&ids(&mb)).count() > 2,
        "the two versions share chunks"
    );
    let nar_b = read_all(&cs, &mb.nar_hash).unwrap();

    std::fs::remove_dir_all(store.join(a.base_name())).unwrap();
    // Before the scan notices: b is still read in place whole, from its own files.
    assert_eq!(read_all(&cs, &mb.nar_hash).unwrap(), nar_b);
    let r = cs.fsck(true).unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
    cs.detach_local(&ma.nar_hash).unwrap();
    assert!(cs.manifest(&ma.nar_hash).unwrap().is_none());
    assert!(cs.missing(&mb).unwrap().is_empty(), "b lost chunks with a");
    let r = cs.fsck(true).unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
    assert_eq!(read_all(&cs, &mb.nar_hash).unwrap(), nar_b);
}
