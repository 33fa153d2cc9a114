//! What a node shares, as the server and the delta planner ask it: the application (the
//! daemon's `share` module) implements it.

use std::collections::HashMap;

use peerix_nix::{NarInfo, Sha256Hash, StorePathHash};

/// Decides what this node may share: the narinfo of a store path it offers to peers.
pub trait Catalog: Send + Sync {
    fn lookup(&self, hash: &StorePathHash) -> Option<NarInfo>;
    /// Whether the NAR with this hash belongs to a path this node shares. Manifests (and so
    /// the chunk ids of a NAR) are only given out for those: a private path's NAR stays
    /// private even from a peer that learned its NarHash.
    fn shares_nar(&self, nar_hash: &Sha256Hash) -> bool;
    /// Every NAR shared right now. Chunks are only served, and `have` only confirms them, when
    /// they belong to one of these: a chunk id must not reveal or hand out a private file.
    fn shared_nars(&self) -> Vec<Sha256Hash>;
    /// A number that changes whenever what is shared changes; the server rebuilds its index of
    /// shareable chunks when it does. A catalog that never changes keeps the default.
    fn generation(&self) -> u64 {
        0
    }
    /// False until the catalog knows what is shared (a daemon's first scan of its store after
    /// a start): meanwhile chunk and `have` requests are answered Busy, so a peer waits a
    /// moment instead of concluding that chunks this node holds are gone.
    fn ready(&self) -> bool {
        true
    }
}

impl Catalog for HashMap<StorePathHash, NarInfo> {
    fn lookup(&self, hash: &StorePathHash) -> Option<NarInfo> {
        self.get(hash).cloned()
    }
    fn shares_nar(&self, nar_hash: &Sha256Hash) -> bool {
        self.values().any(|n| n.nar_hash == *nar_hash)
    }
    fn shared_nars(&self) -> Vec<Sha256Hash> {
        self.values().map(|n| n.nar_hash).collect()
    }
}
