//! Compress once, serve many: the frames a node recompresses for the wire are smaller than
//! the packs' fast zstd, always decompress to their chunk (a bad one is dropped, never
//! returned), stay within their budget and leave with their chunks.

use peerix_chunkstore::{ChunkStore, Manifest, RECOMPRESS_LEVEL};
use peerix_test_support::fixtures::nar_of;
use peerix_test_support::rng::{data, Rng};
use peerix_test_support::store::{none, open};

/// A NAR of text-like files (compressible, as most of a NAR is), ingested into packs.
fn ingest_text(cs: &ChunkStore, seed: u64, files: usize) -> Manifest {
    let t = tempfile::tempdir().unwrap();
    let mut r = Rng(seed | 1);
    let words = [
        "let", "in", "inherit", "lib", "mkOption", "types", "=", ";", "{", "}",
    ];
    for i in 0..files {
        let text: String = (0..40_000)
            .map(|_| words[(r.next() % words.len() as u64) as usize])
            .collect::<Vec<_>>()
            .join(" ");
        std::fs::write(t.path().join(format!("f{i}.nix")), text).unwrap();
    }
    cs.ingest_nar(nar_of(t.path()).as_slice(), None, None, &mut none)
        .unwrap()
}

#[test]
fn frames_are_smaller_verified_bounded_and_leave_with_their_chunks() {
    let t = tempfile::tempdir().unwrap();
    let cs = open(&t.path().join("s"), None);
    let m = ingest_text(&cs, 7, 8);
    let r = cs
        .recompress_nar(&m.nar_hash, RECOMPRESS_LEVEL, u64::MAX, 1.0)
        .unwrap();
    assert!(r.chunks > 0 && !r.full, "{r:?}");
    assert!(r.frame_bytes < r.raw_bytes / 3, "{r:?}");
    assert_eq!(cs.recompressed_bytes().unwrap(), r.frame_bytes);
    for c in &m.chunks {
        let stored = cs.read_chunk_stored(&c.id).unwrap();
        let Some(frame) = cs.recompressed(&c.id, &stored.raw).unwrap() else {
            continue;
        };
        // Smaller than what the pack holds (level 1).
        assert!(frame.len() < stored.zstd.as_ref().map_or(stored.raw.len(), Vec::len));
        assert_eq!(
            zstd::bulk::decompress(&frame, stored.raw.len()).unwrap(),
            stored.raw
        );
    }
    // A second pass does nothing more.
    let again = cs
        .recompress_nar(&m.nar_hash, RECOMPRESS_LEVEL, u64::MAX, 1.0)
        .unwrap();
    assert_eq!(again.chunks, 0);

    // A frame that does not decompress to its chunk is dropped, not returned.
    let c = m.chunks[0];
    let stored = cs.read_chunk_stored(&c.id).unwrap();
    let mut wrong = stored.raw.clone();
    wrong[0] ^= 1;
    assert_eq!(cs.recompressed(&c.id, &wrong).unwrap(), None);
    assert!(cs.recompressed(&c.id, &stored.raw).unwrap().is_none());
    assert!(cs.recompressed_bytes().unwrap() < r.frame_bytes);

    // The budget stops a pass; frames of chunks the store let go are pruned.
    let other = ingest_text(&cs, 8, 8);
    let held = cs.recompressed_bytes().unwrap();
    let r = cs
        .recompress_nar(&other.nar_hash, RECOMPRESS_LEVEL, held + 1, 1.0)
        .unwrap();
    assert!(r.full && r.chunks <= 1, "{r:?}");
    assert!(cs.remove_manifest(&m.nar_hash).unwrap());
    cs.gc(&mut |_| {}).unwrap();
    assert!(cs.prune_recompressed().unwrap() > 0);
    assert!(cs.recompressed_bytes().unwrap() <= r.frame_bytes);
}

#[test]
fn incompressible_chunks_are_marked_without_a_try() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let name = "0c6kzph7l0dcbyl8cvq3q7zryzqal1va-firmware";
    let tree = root.join("nix/store").join(name);
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("blob.zst"), data(11, 3 << 20)).unwrap();
    let cs = open(&t.path().join("s"), Some(&root));
    // Read in place: no pack has tried it, a sample of each chunk decides.
    let path = peerix_nix::StorePath::from_base_name(name).unwrap();
    let local = cs.ingest_local(&path, None, &mut none).unwrap();
    let sampled = local
        .chunks
        .iter()
        .filter(|c| c.len as usize >= 16 * peerix_chunkstore::codec::SAMPLE_SLICE)
        .count() as u64;
    assert!(sampled > 0);
    let pass = cs
        .recompress_nar(&local.nar_hash, RECOMPRESS_LEVEL, u64::MAX, 1.0)
        .unwrap();
    assert_eq!((pass.chunks, pass.skipped), (0, sampled), "{pass:?}");
    // In packs: the pack's own failed try marks every chunk.
    let nar = data(12, 2 << 20);
    let packed = cs
        .ingest_nar(nar.as_slice(), None, None, &mut none)
        .unwrap();
    let pass = cs
        .recompress_nar(&packed.nar_hash, RECOMPRESS_LEVEL, u64::MAX, 1.0)
        .unwrap();
    let n = packed.chunks.len() as u64;
    assert_eq!((pass.chunks, pass.skipped), (0, n), "{pass:?}");
    // Marked: a second pass has nothing left to try, and nothing is held.
    for m in [&local, &packed] {
        let again = cs
            .recompress_nar(&m.nar_hash, RECOMPRESS_LEVEL, u64::MAX, 1.0)
            .unwrap();
        assert_eq!((again.chunks, again.skipped), (0, 0));
    }
    assert_eq!(cs.recompressed_bytes().unwrap(), 0);
}
