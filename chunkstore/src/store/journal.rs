//! Changes over a NAR too big for one transaction, made in bounded batches.
//!
//! sled builds a transaction's whole write set in memory, about 1.2 KB per chunk record: one
//! transaction over the ~16k chunks of a 4 GiB NAR held 20 MB at the end of a download, the
//! daemon's peak. So a NAR with more than [`BATCH`] distinct chunks changes its chunk records
//! in transactions of at most [`BATCH`].
//!
//! Where a batch changes refcounts (a commit, a removal), its first transaction writes an
//! intent: the NAR's manifest, and how many of its distinct chunks are done, which every
//! batch advances in the same transaction as its records. A crash leaves the intent, and
//! [`ChunkStore::open`] finishes what it describes: a commit is rolled back (its references
//! dropped, its in-place locations cleared; the NAR was never visible), a removal is rolled
//! forward (the NAR was already gone). So the refcounts are right across a crash at any point,
//! and fsck says so. Changes that only add or drop locations need no intent: each batch leaves
//! a store that is whole on its own.

use std::collections::{HashMap, HashSet};

use peerix_nix::{Sha256Hash, StorePath};
use sled::transaction::Transactional;
use tracing::{info, warn};

use super::{tx_err, ChunkStore, TxError};
use crate::index::{hash_key, ChunkRec};
use crate::{ChunkId, ChunkRef, Error, Manifest, Result};

/// Distinct chunks per transaction: about 1.2 MB of sled's write set.
#[cfg(not(test))]
pub(super) const BATCH: usize = 1024;
/// The crate's tests use NARs of a few hundred chunks: small batches give every commit and
/// removal in them several batches, and the crash tests a crash point between each two.
#[cfg(test)]
pub(super) const BATCH: usize = 16;

/// What an intent was doing, the first byte of its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    /// Rolled back on open.
    Commit = 1,
    /// Rolled forward on open.
    Remove = 2,
}

fn key(kind: Kind, nar: &Sha256Hash) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = kind as u8;
    k[1..].copy_from_slice(&nar.0);
    k
}

fn done_value(n: usize) -> [u8; 8] {
    (n as u64).to_le_bytes()
}

/// Each distinct chunk of `m` once, in NAR order: the order every batch walks, so that the
/// count an intent keeps names exactly the chunks done.
pub(super) fn distinct(m: &Manifest) -> Vec<ChunkRef> {
    let mut seen = HashSet::with_capacity(m.chunks.len());
    m.chunks
        .iter()
        .filter(|c| seen.insert(c.id))
        .copied()
        .collect()
}

/// A chunk record as a commit leaves it: with any location `new_locs` gives it, one reference
/// more when `count`. Fails when the chunk would have no location or another length.
pub(super) fn committed(
    cur: Option<sled::IVec>,
    c: &ChunkRef,
    new_locs: &HashMap<ChunkId, ChunkRec>,
    count: bool,
) -> std::result::Result<ChunkRec, TxError> {
    let mut rec = match cur {
        Some(v) => ChunkRec::decode(&v).map_err(TxError::Abort)?,
        None => ChunkRec {
            len: c.len,
            refs: 0,
            pack: None,
            local: None,
        },
    };
    if let Some(n) = new_locs.get(&c.id) {
        rec.pack = rec.pack.or(n.pack);
        rec.local = rec.local.or(n.local);
    }
    if count {
        rec.refs = rec.refs.saturating_add(1);
    }
    if !rec.has_location() || rec.len != c.len {
        return Err(TxError::Abort(Error::MissingChunk(c.id)));
    }
    Ok(rec)
}

/// Fails the transaction when one of `paths` (keys of the `paths` tree) is pinned.
fn refuse_pinned(
    pins: &sled::transaction::TransactionalTree,
    paths: &[sled::IVec],
) -> std::result::Result<(), TxError> {
    for k in paths {
        if pins.get(k)?.is_some() {
            return Err(TxError::Abort(Error::BadManifest(
                "a pinned path uses this NAR; unpin it first".into(),
            )));
        }
    }
    Ok(())
}

impl ChunkStore {
    /// [`commit`](Self::commit) of a NAR with more than [`BATCH`] distinct chunks.
    pub(super) fn commit_batched(
        &self,
        m: &Manifest,
        unique: &[ChunkRef],
        new_locs: &HashMap<ChunkId, ChunkRec>,
        local: Option<&StorePath>,
        path: Option<&StorePath>,
    ) -> Result<()> {
        let _one = self.inner.journal.lock().expect("journal lock");
        let i = &self.inner;
        let k = key(Kind::Commit, &m.nar_hash);
        let encoded = m.encode();
        // The in-place source is known before any chunk points into it.
        let count = (&i.manifests, &i.intents, &i.intent_done, &i.local)
            .transaction(|(manifests, intents, done, local_t)| {
                let exists = manifests.get(m.nar_hash.0)?.is_some();
                if !exists {
                    intents.insert(&k[..], encoded.as_slice())?;
                    done.insert(&k[..], &done_value(0))?;
                }
                if let Some(l) = local {
                    local_t.insert(&m.nar_hash.0, l.base_name().as_bytes())?;
                }
                Ok(!exists)
            })
            .map_err(tx_err)?;
        let mut end = 0;
        for batch in unique.chunks(BATCH) {
            let start = end;
            end += batch.len();
            let r = (&i.chunks, &i.intent_done)
                .transaction(|(chunks, done)| {
                    for c in batch {
                        let rec = committed(chunks.get(c.id.0)?, c, new_locs, count)?;
                        chunks.insert(&c.id.0, rec.encode())?;
                    }
                    if count {
                        done.insert(&k[..], &done_value(end))?;
                    }
                    Ok(())
                })
                .map_err(tx_err);
            if let Err(e) = r {
                if count {
                    self.roll_back_commit(&m.nar_hash, unique, start)?;
                }
                return Err(e);
            }
            self.batch_done(end)?;
        }
        (
            &i.manifests,
            &i.partial,
            &i.paths,
            &i.intents,
            &i.intent_done,
        )
            .transaction(|(manifests, partial, paths, intents, done)| {
                manifests.insert(&m.nar_hash.0, encoded.as_slice())?;
                partial.remove(&m.nar_hash.0)?;
                if let Some(p) = path {
                    let mut v = m.nar_hash.0.to_vec();
                    v.extend_from_slice(p.base_name().as_bytes());
                    paths.insert(&p.hash().0, v)?;
                }
                intents.remove(&k[..])?;
                done.remove(&k[..])?;
                Ok(())
            })
            .map_err(tx_err)
    }

    /// Undo the first `done` of a commit's distinct chunks: their reference goes, and so does
    /// an in-place location in this NAR, and with it a record left with neither.
    fn roll_back_commit(
        &self,
        nar: &Sha256Hash,
        unique: &[ChunkRef],
        mut done: usize,
    ) -> Result<()> {
        let i = &self.inner;
        let k = key(Kind::Commit, nar);
        while done > 0 {
            let start = done.saturating_sub(BATCH);
            let batch = &unique[start..done];
            (&i.chunks, &i.intent_done)
                .transaction(|(chunks, d)| {
                    for c in batch {
                        let Some(v) = chunks.get(c.id.0)? else {
                            continue;
                        };
                        let mut r = ChunkRec::decode(&v).map_err(TxError::Abort)?;
                        r.refs = r.refs.saturating_sub(1);
                        if r.local.is_some_and(|(h, _)| h == *nar) {
                            r.local = None;
                        }
                        if r.refs == 0 && !r.has_location() {
                            chunks.remove(&c.id.0)?;
                        } else {
                            chunks.insert(&c.id.0, r.encode())?;
                        }
                    }
                    d.insert(&k[..], &done_value(start))?;
                    Ok(())
                })
                .map_err(tx_err)?;
            done = start;
        }
        (&i.manifests, &i.local, &i.intents, &i.intent_done)
            .transaction(|(manifests, local, intents, d)| {
                if manifests.get(nar.0)?.is_none() {
                    local.remove(&nar.0)?;
                }
                intents.remove(&k[..])?;
                d.remove(&k[..])?;
                Ok(())
            })
            .map_err(tx_err)?;
        Ok(())
    }

    /// [`remove_manifest`](Self::remove_manifest) of a NAR with more than [`BATCH`] distinct
    /// chunks: it is gone at once, its references go batch by batch. False when the store
    /// did not hold it.
    pub(super) fn remove_batched(&self, m: &Manifest, stale_paths: &[sled::IVec]) -> Result<bool> {
        let _one = self.inner.journal.lock().expect("journal lock");
        let i = &self.inner;
        let k = key(Kind::Remove, &m.nar_hash);
        let encoded = m.encode();
        let removed = (
            &i.manifests,
            &i.local,
            &i.paths,
            &i.pins,
            &i.intents,
            &i.intent_done,
        )
            .transaction(|(manifests, local, paths, pins, intents, done)| {
                refuse_pinned(pins, stale_paths)?;
                if manifests.remove(&m.nar_hash.0)?.is_none() {
                    return Ok(false);
                }
                local.remove(&m.nar_hash.0)?;
                for p in stale_paths {
                    paths.remove(p)?;
                }
                intents.insert(&k[..], encoded.as_slice())?;
                done.insert(&k[..], &done_value(0))?;
                Ok(true)
            })
            .map_err(tx_err)?;
        if removed {
            self.roll_forward_remove(&m.nar_hash, &distinct(m), 0)?;
        }
        Ok(removed)
    }

    /// Drop the references of a removed NAR's distinct chunks from the `done`th on.
    fn roll_forward_remove(
        &self,
        nar: &Sha256Hash,
        unique: &[ChunkRef],
        done: usize,
    ) -> Result<()> {
        let i = &self.inner;
        let k = key(Kind::Remove, nar);
        let mut end = done;
        for batch in unique[done.min(unique.len())..].chunks(BATCH) {
            end += batch.len();
            (&i.chunks, &i.intent_done)
                .transaction(|(chunks, d)| {
                    for c in batch {
                        if let Some(v) = chunks.get(c.id.0)? {
                            let mut r = ChunkRec::decode(&v).map_err(TxError::Abort)?;
                            r.refs = r.refs.saturating_sub(1);
                            chunks.insert(&c.id.0, r.encode())?;
                        }
                    }
                    d.insert(&k[..], &done_value(end))?;
                    Ok(())
                })
                .map_err(tx_err)?;
            self.batch_done(end)?;
        }
        (&i.intents, &i.intent_done)
            .transaction(|(intents, d)| {
                intents.remove(&k[..])?;
                d.remove(&k[..])?;
                Ok(())
            })
            .map_err(tx_err)?;
        Ok(())
    }

    /// Where a test may stop a change between two batches, as a crash would.
    fn batch_done(&self, done: usize) -> Result<()> {
        let faults = &self.inner.packs.durability.faults;
        faults.at(crate::durable::Event::Batch { done })
    }

    /// Finish what a crash interrupted (see the module's comment). Run by
    /// [`open`](Self::open), before anything else reads the index.
    pub(super) fn recover_intents(&self) -> Result<()> {
        let i = &self.inner;
        let mut found = vec![];
        for kv in i.intents.iter() {
            let (k, v) = kv?;
            let bad = || Error::BadRecord { what: "intent" };
            let (kind, nar) = k.split_first().ok_or_else(bad)?;
            let nar = hash_key(nar)?;
            let m = Manifest::decode(nar, &v)?;
            let done = i
                .intent_done
                .get(&k)?
                .and_then(|v| v.as_ref().try_into().ok().map(u64::from_le_bytes))
                .ok_or_else(bad)? as usize;
            found.push((*kind, m, done));
        }
        for (kind, m, done) in found {
            let unique = distinct(&m);
            if kind == Kind::Commit as u8 {
                warn!(nar = %m.nar_hash, done, "rolling back a commit a crash interrupted");
                self.roll_back_commit(&m.nar_hash, &unique, done.min(unique.len()))?;
            } else if kind == Kind::Remove as u8 {
                info!(nar = %m.nar_hash, done, "finishing a removal a crash interrupted");
                self.roll_forward_remove(&m.nar_hash, &unique, done)?;
            } else {
                return Err(Error::BadRecord { what: "intent" });
            }
        }
        i.db.flush()?;
        Ok(())
    }

    /// Give every chunk of `m` an in-place location in this NAR where it has none, in
    /// batches; `local` names the path first. Returns how many got one.
    pub(super) fn attach_batched(&self, m: &Manifest, path: &StorePath) -> Result<u64> {
        let i = &self.inner;
        i.local.insert(m.nar_hash.0, path.base_name().as_bytes())?;
        let offsets: Vec<(u64, ChunkRef)> = m.offsets().map(|(o, c)| (o, *c)).collect();
        let mut n = 0;
        for batch in offsets.chunks(BATCH) {
            n += i
                .chunks
                .transaction(|chunks| {
                    let mut n = 0u64;
                    for (off, c) in batch {
                        let Some(v) = chunks.get(c.id.0)? else {
                            continue;
                        };
                        let mut r = ChunkRec::decode(&v).map_err(TxError::Abort)?;
                        if r.local.is_none() && r.len == c.len {
                            r.local = Some((m.nar_hash, *off));
                            chunks.insert(&c.id.0, r.encode())?;
                            n += 1;
                        }
                    }
                    Ok(n)
                })
                .map_err(tx_err)?;
        }
        Ok(n)
    }

    /// Chunks read in place from `nar` (whose path left the store) are read from `homes`
    /// from now on, or lose that location; then `nar` is no longer read in place. Returns how
    /// many chunks changed.
    pub(super) fn detach_batched(
        &self,
        nar: &Sha256Hash,
        m: Option<&Manifest>,
        homes: &HashMap<ChunkId, (Sha256Hash, u64)>,
    ) -> Result<u64> {
        let i = &self.inner;
        let mut n = 0;
        for batch in m.map_or(&[][..], |m| &m.chunks).chunks(BATCH) {
            n += i
                .chunks
                .transaction(|chunks| {
                    let mut n = 0u64;
                    for c in batch {
                        let Some(v) = chunks.get(c.id.0)? else {
                            continue;
                        };
                        let mut r = ChunkRec::decode(&v).map_err(TxError::Abort)?;
                        if r.local.is_some_and(|(h, _)| h == *nar) {
                            r.local = homes.get(&c.id).copied();
                            chunks.insert(&c.id.0, r.encode())?;
                            n += 1;
                        }
                    }
                    Ok(n)
                })
                .map_err(tx_err)?;
        }
        i.local.remove(nar.0)?;
        Ok(n)
    }
}
