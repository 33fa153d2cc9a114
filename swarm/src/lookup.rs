//! Who holds a store path, and may we believe them: connected peers and DHT providers are asked
//! in parallel under one deadline, and the first answer that passes the caller's trust check
//! wins — not merely the first answer, so a fast untrusted peer cannot hide a trusted one.

use std::collections::HashSet;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{BoxStream, FuturesUnordered, StreamExt};
use libp2p::PeerId;
use lru::LruCache;
use peerix_nix::{NarInfo, Sha256Hash, StorePathHash};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::client::{Client, ClientError};
use crate::node::Node;

/// Decides whether a peer's narinfo may be handed to Nix (a signature by a trusted key, or the
/// same NarHash as the upstream cache). Checks run concurrently, one per answering peer (the
/// first narinfo for the path asked; a peer's others are ignored).
pub trait TrustCheck: Send + Sync {
    fn check<'a>(&'a self, info: &'a NarInfo) -> BoxFuture<'a, bool>;
}

/// Where candidates come from. The node implements it; tests may narrow it.
pub trait PeerSource: Send + Sync {
    fn connected(&self) -> BoxFuture<'_, Vec<PeerId>>;
    /// Providers of `key` as the DHT finds them, until its lookup ends or `timeout` passes.
    /// A stream, not a list: a lookup that waits on an unreachable peer (a QUIC handshake to
    /// a NATed address takes seconds to fail) must not hold back the providers found already.
    fn providers(&self, key: StorePathHash, timeout: Duration) -> BoxStream<'_, PeerId>;
}

impl PeerSource for Node {
    fn connected(&self) -> BoxFuture<'_, Vec<PeerId>> {
        Box::pin(self.connected_peers())
    }
    fn providers(&self, key: StorePathHash, timeout: Duration) -> BoxStream<'_, PeerId> {
        Box::pin(self.find_providers(&key, timeout))
    }
}

/// A trusted answer.
#[derive(Clone, Debug)]
pub struct Found {
    pub info: NarInfo,
    /// The peer whose answer passed the check.
    pub peer: PeerId,
    /// Other peers that answered with the same NarHash before the lookup ended.
    pub holders: Vec<PeerId>,
    /// Peers whose answers failed the trust check.
    pub untrusted: Vec<PeerId>,
}

pub struct Lookup {
    peers: Arc<dyn PeerSource>,
    client: Client,
    trust: Arc<dyn TrustCheck>,
    misses: Mutex<LruCache<StorePathHash, Instant>>,
    miss_ttl: Duration,
}

enum Event {
    Answer(PeerId, Result<Vec<NarInfo>, ClientError>),
    Checked(PeerId, Box<NarInfo>, bool),
}

impl Lookup {
    /// `miss_ttl`: how long "nobody has it" is remembered; short, since a peer may get the
    /// path any moment, but long enough that Nix's repeated queries cost no network.
    pub fn new(
        peers: Arc<dyn PeerSource>,
        client: Client,
        trust: Arc<dyn TrustCheck>,
        miss_ttl: Duration,
    ) -> Self {
        Self {
            peers,
            client,
            trust,
            misses: Mutex::new(LruCache::new(NonZeroUsize::new(65536).expect("non-zero"))),
            miss_ttl,
        }
    }

    fn recent_miss(&self, hash: &StorePathHash) -> bool {
        let mut m = self.misses.lock().expect("miss cache");
        match m.get(hash) {
            Some(t) if t.elapsed() < self.miss_ttl => true,
            Some(_) => {
                m.pop(hash);
                false
            }
            None => false,
        }
    }

    /// Forget a remembered miss (a peer just announced the path).
    pub fn forget_miss(&self, hash: &StorePathHash) {
        self.misses.lock().expect("miss cache").pop(hash);
    }

    /// The first trusted answer for `hash` within `deadline`, or None.
    pub async fn find(&self, hash: StorePathHash, deadline: Duration) -> Option<Found> {
        if self.recent_miss(&hash) {
            debug!(%hash, "lookup: recent miss");
            return None;
        }
        let until = Instant::now() + deadline;
        let found = tokio::time::timeout_at(until, self.race(hash, deadline))
            .await
            .ok()
            .flatten();
        if found.is_none() {
            self.misses
                .lock()
                .expect("miss cache")
                .put(hash, Instant::now());
        }
        found
    }

    async fn race(&self, hash: StorePathHash, deadline: Duration) -> Option<Found> {
        let ask = |peer: PeerId| -> BoxFuture<'_, Event> {
            Box::pin(async move { Event::Answer(peer, self.client.lookup(peer, &[hash]).await) })
        };
        let mut tasks: FuturesUnordered<BoxFuture<'_, Event>> = FuturesUnordered::new();
        let mut asked = HashSet::new();
        for p in self.peers.connected().await {
            if asked.insert(p) {
                tasks.push(ask(p));
            }
        }
        // The DHT walk gets most of the deadline; what it finds still has time to answer, and
        // each provider is asked as soon as it is found.
        let dht_time = deadline.mul_f64(0.6);
        let mut providers = self.peers.providers(hash, dht_time).fuse();
        let mut answers: Vec<(PeerId, Sha256Hash)> = vec![];
        let mut untrusted = vec![];
        loop {
            let ev = tokio::select! {
                Some(p) = providers.next() => {
                    if asked.insert(p) {
                        tasks.push(ask(p));
                    }
                    continue;
                }
                Some(ev) = tasks.next() => ev,
                else => break,
            };
            match ev {
                Event::Answer(peer, Ok(infos)) => {
                    // One path was asked, so one answer is checked: a reply may hold up to
                    // MAX_LOOKUP narinfos, and each check may cost signature verifications
                    // or an upstream request.
                    let total = infos.len();
                    let Some(info) = infos.into_iter().find(|i| i.store_path.hash() == hash) else {
                        continue;
                    };
                    if total > 1 {
                        debug!(%peer, total, "lookup: several narinfos for one path; only the first is checked");
                    }
                    answers.push((peer, info.nar_hash));
                    let trust = self.trust.clone();
                    tasks.push(Box::pin(async move {
                        let ok = trust.check(&info).await;
                        Event::Checked(peer, Box::new(info), ok)
                    }));
                }
                Event::Answer(peer, Err(e)) => debug!(%peer, error = %e, "lookup: peer failed"),
                Event::Checked(peer, info, true) => {
                    let holders = answers
                        .iter()
                        .filter(|(p, h)| *p != peer && *h == info.nar_hash)
                        .map(|(p, _)| *p)
                        .collect();
                    return Some(Found {
                        info: *info,
                        peer,
                        holders,
                        untrusted,
                    });
                }
                Event::Checked(peer, info, false) => {
                    warn!(%peer, path = %info.store_path, "lookup: answer failed the trust check");
                    untrusted.push(peer);
                }
            }
        }
        None
    }
}
