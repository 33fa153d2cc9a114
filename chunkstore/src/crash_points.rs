//! Fault injection at every point of the write path (see [`crate::durable`]): the index must
//! never point at pack bytes that were not synced, and a crash at any point, followed by a
//! power loss that keeps only what was synced, must leave a store that opens, passes fsck,
//! reads back every chunk it lists and shows no half NAR.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::{Arc, Mutex};

use peerix_nix::{Sha256Hash, StorePath};

use crate::durable::Event;
use crate::index::ChunkRec;
use crate::pack::HEADER;
use crate::{ChunkId, ChunkStore, ChunkerParams, Error, Manifest, Options};

fn data(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
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

fn injected() -> Error {
    Error::Io {
        path: "fault injection".into(),
        source: std::io::Error::other("injected crash"),
    }
}

/// What a power loss would leave of the packs, from the events: per pack, the synced length.
#[derive(Default)]
struct Model {
    synced: HashMap<u32, u64>,
    events: Vec<Event>,
    violations: Vec<String>,
    /// Set at the crash: the synced lengths then. Every later event fails.
    crashed: Option<HashMap<u32, u64>>,
}

/// A hook that checks the index against what was synced at every event and crashes (fails
/// this and every later event) at event number `crash_at`.
fn watch(cs: &ChunkStore, crash_at: Option<usize>) -> Arc<Mutex<Model>> {
    let model = Arc::new(Mutex::new(Model::default()));
    let (m, chunks) = (model.clone(), cs.index_trees().1);
    cs.set_fault_hook(Arc::new(move |e| {
        if e == Event::Lookup {
            return Ok(());
        }
        let mut m = m.lock().unwrap();
        let n = m.events.len();
        m.events.push(e);
        if m.crashed.is_some() {
            return Err(injected());
        }
        // The index as it is now: sled may have flushed any of it already.
        for kv in chunks.iter() {
            let (k, v) = kv.unwrap();
            let Some(p) = ChunkRec::decode(&v).unwrap().pack else {
                continue;
            };
            let end = p.offset + HEADER as u64 + u64::from(p.stored_len);
            let synced = m.synced.get(&p.pack).copied();
            if synced.is_none_or(|s| s < end) {
                let v = format!(
                    "at event {n} ({e:?}) the index points chunk {} at pack {} bytes up to {end}, synced: {synced:?}",
                    ChunkId(k.as_ref().try_into().unwrap()),
                    p.pack
                );
                m.violations.push(v);
            }
        }
        if crash_at == Some(n) {
            m.crashed = Some(m.synced.clone());
            return Err(injected());
        }
        if let Event::Synced { pack, len } = e {
            let s = m.synced.entry(pack).or_default();
            *s = (*s).max(len);
        }
        Ok(())
    }));
    model
}

fn small() -> ChunkerParams {
    ChunkerParams::new(16 * 1024, 64 * 1024, 256 * 1024).unwrap()
}

fn open(dir: &Path, root: &Path) -> ChunkStore {
    let opts = Options {
        chunker: small(),
        store_root: Some(root.to_owned()),
    };
    ChunkStore::open(dir, opts).unwrap()
}

/// A local "store path" of incompressible files under `root`.
fn store_path(root: &Path) -> StorePath {
    let sp = StorePath::from_base_name("00000000000000000000000000000000-pinned-1.0").unwrap();
    let dir = root.join("nix/store").join(sp.base_name());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a"), data(3, 700 << 10)).unwrap();
    std::fs::write(dir.join("b"), data(4, 300 << 10)).unwrap();
    sp
}

struct Nars {
    download: (Manifest, Vec<u8>),
    ingested: Vec<u8>,
    local: StorePath,
}

fn nars(root: &Path) -> Nars {
    // Larger than one drain of puts, so puts drain mid-download too.
    let bytes = data(1, 12 << 20);
    let t = tempfile::tempdir().unwrap();
    let m = open(t.path(), root)
        .ingest_nar(bytes.as_slice(), None, None, &mut |_| {})
        .unwrap();
    Nars {
        download: (m, bytes),
        ingested: data(2, 1 << 20),
        local: store_path(root),
    }
}

/// Every path that appends to packs: a download (puts), an ingest, a pin (copies from the
/// local store), a GC that compacts.
fn workload(cs: &ChunkStore, n: &Nars) -> crate::Result<()> {
    let (m, bytes) = &n.download;
    cs.begin_download(m)?;
    for (off, c) in m.offsets() {
        let off = off as usize;
        cs.put_chunk(&c.id, &bytes[off..off + c.len as usize])?;
    }
    cs.finish_download(&m.nar_hash, None)?;
    cs.ingest_nar(n.ingested.as_slice(), None, None, &mut |_| {})?;
    cs.ingest_local(&n.local, None, &mut |_| {})?;
    cs.pin(&n.local.hash())?;
    // Most of the first pack is now the download's: GC compacts it.
    cs.remove_manifest(&m.nar_hash)?;
    cs.gc(&mut |_| {})?;
    Ok(())
}

/// Keep only the synced prefix of every pack, as a power loss may.
fn power_loss(packs: &Path, synced: &HashMap<u32, u64>) {
    for e in std::fs::read_dir(packs).unwrap() {
        let p = e.unwrap().path();
        let id: u32 = p.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        match synced.get(&id) {
            None => std::fs::remove_file(&p).unwrap(),
            Some(&len) => std::fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(len)
                .unwrap(),
        }
    }
}

/// What a user relies on after a crash: the store opens, fsck (reading every chunk) is clean,
/// every chunk the index lists reads back, and every NAR it shows is whole.
fn check_reopened(dir: &Path, root: &Path, what: &str) {
    let cs = open(dir, root);
    let r = cs.fsck(true).unwrap();
    assert!(r.is_clean(), "{what}: fsck: {:?}", r.problems);
    let (_, chunks, manifests) = cs.index_trees();
    let ids: Vec<ChunkId> = chunks
        .iter()
        .keys()
        .map(|k| ChunkId(k.unwrap().as_ref().try_into().unwrap()))
        .collect();
    for id in ids {
        if cs.has_chunk(&id).unwrap() {
            cs.read_chunk(&id)
                .unwrap_or_else(|e| panic!("{what}: chunk {id}: {e}"));
        }
    }
    let hashes: Vec<Sha256Hash> = manifests
        .iter()
        .keys()
        .map(|k| crate::index::hash_key(&k.unwrap()).unwrap())
        .collect();
    for h in hashes {
        let mut v = vec![];
        cs.nar_reader(&h)
            .unwrap()
            .read_to_end(&mut v)
            .unwrap_or_else(|e| panic!("{what}: NAR {h}: {e}"));
        assert_eq!(Sha256Hash::digest(&v), h, "{what}");
    }
}

#[test]
fn the_index_never_points_at_unsynced_bytes() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let n = nars(&root);
    let cs = open(&t.path().join("store"), &root);
    let model = watch(&cs, None);
    workload(&cs, &n).unwrap();
    let m = model.lock().unwrap();
    assert!(m.violations.is_empty(), "{:#?}", m.violations);
    assert!(
        m.events.iter().any(|e| matches!(e, Event::Durable { .. })),
        "{:?}",
        m.events
    );
}

#[test]
fn a_crash_at_any_point_then_a_power_loss_leaves_a_clean_store() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let n = nars(&root);
    let mut crash_at = 0;
    loop {
        let dir = t.path().join(format!("store-{crash_at}"));
        let cs = open(&dir, &root);
        let model = watch(&cs, Some(crash_at));
        let r = workload(&cs, &n);
        // Everything the index holds reaches its disk; the packs keep only what was synced.
        cs.index_trees().0.flush().unwrap();
        drop(cs);
        // The model is read and let go of before the store is opened again: the dropped
        // store's drain thread may still be finishing its last group, and its events go
        // through the model's lock while it holds the index, which the reopen waits for.
        let (what, violations, crashed) = {
            let m = model.lock().unwrap();
            let what = format!("crash at event {crash_at} of {:?}", m.events);
            (what, m.violations.clone(), m.crashed.clone())
        };
        assert!(violations.is_empty(), "{what}: {violations:#?}");
        let Some(synced) = &crashed else {
            // The workload ran to the end: every point has been crashed at.
            r.unwrap();
            assert!(crash_at > 10, "only {crash_at} crash points");
            break;
        };
        assert!(r.is_err(), "{what}: the workload went on after the crash");
        power_loss(&dir.join("packs"), synced);
        check_reopened(&dir, &root, &what);
        std::fs::remove_dir_all(&dir).unwrap();
        crash_at += 1;
    }
}

#[test]
fn puts_are_synced_in_groups_not_one_by_one() {
    let t = tempfile::tempdir().unwrap();
    let cs = ChunkStore::open(t.path(), Options::default()).unwrap();
    let syncs = Arc::new(Mutex::new(0));
    let s = syncs.clone();
    cs.set_fault_hook(Arc::new(move |e| {
        if let Event::Synced { len, .. } = e {
            if len > 0 {
                *s.lock().unwrap() += 1;
                // A slow disk: writers queue up behind this sync.
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        Ok(())
    }));
    let (threads, each) = (4, 16);
    std::thread::scope(|sc| {
        for th in 0..threads {
            let cs = &cs;
            sc.spawn(move || {
                for i in 0..each {
                    let d = data(1000 * th + i, 256 << 10);
                    assert!(cs.put_chunk(&ChunkId::of(&d), &d).unwrap());
                }
            });
        }
    });
    cs.flush().unwrap();
    let syncs = *syncs.lock().unwrap();
    let puts = threads * each;
    // 16 MiB of puts: about one fdatasync per 8 MiB, and never one per put.
    assert!(
        syncs > 0 && syncs * 8 <= puts,
        "{syncs} fdatasyncs for {puts} puts"
    );
}

/// A download's puts go on while a group of them is synced (a put does not wait for the disk),
/// until [`crate::PUT_UNSYNCED_MAX`] bytes are not durable: then a put waits, so a crash
/// forgets no more than that.
#[test]
fn puts_wait_for_the_disk_only_past_the_unsynced_bound() {
    use std::sync::mpsc::{channel, RecvTimeoutError};
    use std::time::Duration;
    let t = tempfile::tempdir().unwrap();
    let cs = ChunkStore::open(t.path(), Options::default()).unwrap();
    // The first sync of put bytes starts, then holds (a disk that is slow right now) until
    // released.
    let (started_tx, started) = channel();
    let (release, released) = channel::<()>();
    let released = Mutex::new(Some(released));
    cs.set_fault_hook(Arc::new(move |e| {
        if let Event::Synced { len, .. } = e {
            if len > 0 {
                if let Some(r) = released.lock().unwrap().take() {
                    let _ = started_tx.send(());
                    let _ = r.recv();
                }
            }
        }
        Ok(())
    }));
    let chunk = 256 << 10;
    let within = (crate::PUT_UNSYNCED_MAX / chunk) as usize;
    let (put_tx, puts) = channel();
    let writer = {
        let cs = cs.clone();
        std::thread::spawn(move || {
            for i in 0..=within {
                let d = data(i as u64 + 1, chunk as usize);
                assert!(cs.put_chunk(&ChunkId::of(&d), &d).unwrap());
                put_tx.send(i).unwrap();
            }
        })
    };
    // Generous bounds, only so that a broken store fails the test rather than hangs it.
    let long = Duration::from_secs(60);
    started
        .recv_timeout(long)
        .expect("no group of puts was synced");
    for i in 0..within {
        assert_eq!(
            puts.recv_timeout(long),
            Ok(i),
            "put {i} waited for the sync of an earlier group"
        );
    }
    // One more put would leave more than the bound unsynced: it waits for the disk.
    assert_eq!(
        puts.recv_timeout(Duration::from_secs(2)),
        Err(RecvTimeoutError::Timeout),
        "a put went on with more than PUT_UNSYNCED_MAX bytes not durable"
    );
    // The wait is counted, for `peerix bench` to show: the one put, for most of the 2 s above
    // so far, and for as long as it goes on.
    let waiting = cs.put_waits();
    assert_eq!(waiting.puts, 1, "{waiting:?}");
    assert!(waiting.stalled >= Duration::from_secs(1), "{waiting:?}");
    release.send(()).unwrap();
    assert_eq!(puts.recv_timeout(long), Ok(within));
    writer.join().unwrap();
    let waited = cs.put_waits();
    assert_eq!(waited.puts, 1, "{waited:?}");
    assert!(
        waited.stalled > waiting.stalled,
        "{waited:?} after {waiting:?}"
    );
    let later = cs.put_waits();
    assert_eq!(later, waited, "a wait that ended still counts");
    // Everything put is durable and indexed once the store is flushed.
    cs.flush().unwrap();
    let (_, chunks, _) = cs.index_trees();
    assert_eq!(chunks.len(), within + 1);
    assert!(cs.fsck(true).unwrap().is_clean());
}

/// A chunk put is found by every lookup from then on, while a drain moves it from the pending
/// puts to the index. A lookup held between its two reads while a drain runs (on this machine,
/// a thread preempted there) once missed it: it read the index before the drain indexed the
/// chunk, and the pending puts after the drain had removed it.
#[test]
fn a_put_chunk_is_found_while_a_drain_indexes_it() {
    use std::sync::mpsc::channel;
    let t = tempfile::tempdir().unwrap();
    let cs = ChunkStore::open(t.path(), Options::default()).unwrap();
    let d = data(7, 64 << 10);
    let id = ChunkId::of(&d);
    assert!(cs.put_chunk(&id, &d).unwrap());
    // The next lookup stops between its two reads until released.
    let (at_tx, at) = channel();
    let (release, released) = channel::<()>();
    let held = Mutex::new(Some((at_tx, released)));
    cs.set_fault_hook(Arc::new(move |e| {
        if e == Event::Lookup {
            if let Some((at, released)) = held.lock().unwrap().take() {
                at.send(()).unwrap();
                released.recv().unwrap();
            }
        }
        Ok(())
    }));
    let looker = {
        let cs = cs.clone();
        std::thread::spawn(move || cs.has_chunk(&id).unwrap())
    };
    at.recv().unwrap();
    // A drain indexes the chunk and removes it from the pending puts meanwhile.
    cs.flush().unwrap();
    release.send(()).unwrap();
    assert!(looker.join().unwrap(), "a lookup missed a chunk put");
}

#[test]
fn after_a_failed_fdatasync_nothing_more_is_indexed() {
    let t = tempfile::tempdir().unwrap();
    let cs = ChunkStore::open(t.path(), Options::default()).unwrap();
    cs.set_fault_hook(Arc::new(|e| match e {
        Event::Synced { len, .. } if len > 0 => Err(injected()),
        _ => Ok(()),
    }));
    let (a, b) = (data(1, 5000), data(2, 5000));
    let (ia, ib) = (ChunkId::of(&a), ChunkId::of(&b));
    let indexed = |cs: &ChunkStore, id: &ChunkId| cs.index_trees().1.contains_key(id.0).unwrap();
    assert!(cs.put_chunk(&ia, &a).unwrap());
    assert!(cs.flush().is_err());
    assert!(!indexed(&cs, &ia));
    cs.set_fault_hook(Arc::new(|_| Ok(())));
    // The failed sync may have lost any page written before it: nothing is made durable, so
    // nothing is indexed, until the store is reopened.
    assert!(cs.put_chunk(&ib, &b).unwrap());
    assert!(cs.flush().is_err());
    assert!(!indexed(&cs, &ia) && !indexed(&cs, &ib));
    drop(cs);
    let cs = ChunkStore::open(t.path(), Options::default()).unwrap();
    assert!(!cs.has_chunk(&ia).unwrap());
    assert!(cs.put_chunk(&ib, &b).unwrap());
    cs.flush().unwrap();
    assert!(indexed(&cs, &ib));
    assert!(cs.fsck(true).unwrap().is_clean());
}
