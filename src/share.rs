//! What a node shares with its peers. By default only what is safe: paths whose NarHash equals
//! the upstream cache's (already public), paths signed by this node's own key (deliberately
//! published), and pinned paths. Everything else stays private unless the operator opts in,
//! and deny patterns keep the obvious secrets out even then.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use peerix_chunkstore::ChunkStore;
use peerix_nix::upstream::UpstreamCache;
use peerix_nix::{LocalStore, NarInfo, PathInfo, SecretKey, Sha256Hash, StorePathHash};
use peerix_swarm::Catalog;
use tracing::{debug, info, warn};

/// Store-path names never shared, whatever else says so: system closures and their parts that
/// hold configuration and secrets. Globs over the name after the hash (`*` and `?`).
pub const DEFAULT_DENY: &[&str] = &[
    "nixos-system-*",
    "etc",
    "etc-*",
    "*-etc",
    "user-environment",
    "*-user-environment",
    "home-manager-generation",
    "home-manager-files",
    "*secret*",
    "*password*",
    "*passwd*",
    "*shadow*",
    "*token*",
    "*.key",
    "*-key",
    "*-keys",
    "*.pem",
    "*credentials*",
    "activate",
    "*-activation-script*",
];

#[derive(Clone, Debug)]
pub struct ShareConfig {
    /// Share every valid path not denied (an explicit opt-in).
    pub share_all: bool,
    pub deny: Vec<String>,
    /// Upstream checks in flight at once during a scan.
    pub upstream_concurrency: usize,
}

impl Default for ShareConfig {
    fn default() -> Self {
        Self {
            share_all: false,
            deny: DEFAULT_DENY.iter().map(|s| s.to_string()).collect(),
            upstream_concurrency: 8,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The upstream cache has the same NarHash: already public.
    Upstream,
    /// Signed by this node's own key.
    OwnSignature,
    Pinned,
    /// `share_all`.
    OptIn,
}

#[derive(Clone, Debug, Default)]
pub struct ScanReport {
    pub valid: usize,
    pub shared: usize,
    pub denied: usize,
    pub private: usize,
    pub indexed: usize,
    pub index_errors: usize,
    /// NARs whose path left the local store since the last scan.
    pub left_store: usize,
    /// Held NARs whose path became valid locally (read in place from now on).
    pub attached: usize,
}

/// `*` matches any run of characters, `?` one; everything else itself.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

struct Shared {
    paths: HashMap<StorePathHash, (PathInfo, Reason)>,
    nars: HashSet<Sha256Hash>,
    /// Counts the scans that replaced the shared set.
    generation: u64,
}

pub struct Sharing {
    cfg: ShareConfig,
    local: Arc<LocalStore>,
    store: ChunkStore,
    upstream: Option<Arc<UpstreamCache>>,
    own_key: Option<SecretKey>,
    shared: RwLock<Shared>,
    /// Upstream verdicts by path hash and NarHash, so a rescan asks only about new paths.
    verdicts: Mutex<HashMap<(StorePathHash, Sha256Hash), bool>>,
    /// One scan at a time: the periodic one and those a seed asks for.
    scanning: tokio::sync::Mutex<()>,
}

impl Sharing {
    pub fn new(
        cfg: ShareConfig,
        local: Arc<LocalStore>,
        store: ChunkStore,
        upstream: Option<Arc<UpstreamCache>>,
        own_key: Option<SecretKey>,
    ) -> Self {
        Self {
            cfg,
            local,
            store,
            upstream,
            own_key,
            shared: RwLock::new(Shared {
                paths: HashMap::new(),
                nars: HashSet::new(),
                generation: 0,
            }),
            verdicts: Mutex::new(HashMap::new()),
            scanning: tokio::sync::Mutex::new(()),
        }
    }

    /// Why a path would be shared if it were not pinned; `None`: it would stay private.
    pub async fn reason_unpinned(&self, info: &PathInfo) -> Option<Reason> {
        if self.denied(info.path.name()) {
            return None;
        }
        if let Some(r) = self.decide_locally(info, &HashSet::new()) {
            return Some(r);
        }
        self.upstream_has(info).await.then_some(Reason::Upstream)
    }

    /// How many paths are shared, for each reason.
    pub fn counts(&self) -> HashMap<Reason, usize> {
        let mut m = HashMap::new();
        for (_, r) in self.shared.read().expect("shared").paths.values() {
            *m.entry(*r).or_default() += 1;
        }
        m
    }

    pub fn denied(&self, name: &str) -> bool {
        self.cfg.deny.iter().any(|p| glob_match(p, name))
    }

    /// The decision that needs no network.
    fn decide_locally(&self, info: &PathInfo, pinned: &HashSet<String>) -> Option<Reason> {
        if let Some(k) = &self.own_key {
            let fp = NarInfo::for_uncompressed(info).fingerprint();
            let pk = k.public_key();
            if info
                .sigs
                .iter()
                .filter_map(|s| s.parse().ok())
                .any(|s| pk.verify(fp.as_bytes(), &s))
            {
                return Some(Reason::OwnSignature);
            }
        }
        if pinned.contains(info.path.base_name()) {
            return Some(Reason::Pinned);
        }
        if self.cfg.share_all {
            return Some(Reason::OptIn);
        }
        None
    }

    async fn upstream_has(&self, info: &PathInfo) -> bool {
        let Some(up) = &self.upstream else {
            return false;
        };
        let key = (info.path.hash(), info.nar_hash);
        if let Some(v) = self.verdicts.lock().expect("verdicts").get(&key) {
            return *v;
        }
        let v = match up.narinfo(&info.path.hash()).await {
            Ok(Some(u)) => u.nar_hash == info.nar_hash && u.nar_size == info.nar_size,
            Ok(None) => false,
            Err(e) => {
                // Not remembered: an outage must not make public paths private for good.
                debug!(path = %info.path, error = %e, "upstream check failed");
                return false;
            }
        };
        self.verdicts.lock().expect("verdicts").insert(key, v);
        v
    }

    /// Walk the local store, decide what is shared, and index what is shared into the chunk
    /// store (in place, one path at a time, so the scan's CPU stays bounded).
    pub async fn scan(&self) -> anyhow::Result<ScanReport> {
        let _one = self.scanning.lock().await;
        let local = self.local.clone();
        let infos: Vec<PathInfo> = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let mut v = vec![];
            for p in local.valid_paths()? {
                if let Some(i) = local.query_path_info(&p)? {
                    v.push(i);
                }
            }
            Ok(v)
        })
        .await??;
        let pinned: HashSet<String> = self
            .store
            .blocking(|cs| cs.pins())
            .await?
            .into_iter()
            .collect();
        let mut rep = ScanReport {
            valid: infos.len(),
            ..ScanReport::default()
        };
        self.follow_local_store(&infos, &mut rep).await?;
        // Pinned paths that have left the local store are still served, from packs, as the
        // narinfo kept when they were pinned describes them.
        let valid: HashSet<StorePathHash> = infos.iter().map(|i| i.path.hash()).collect();
        let gone: Vec<PathInfo> = self
            .store
            .blocking(|cs| cs.pinned_infos())
            .await?
            .into_iter()
            .filter(|n| !valid.contains(&n.store_path.hash()))
            .map(|n| PathInfo {
                path: n.store_path,
                nar_hash: n.nar_hash,
                nar_size: n.nar_size,
                references: n.references,
                deriver: n.deriver,
                sigs: n.sigs,
                ca: n.ca,
                registration_time: 0,
                ultimate: false,
            })
            .collect();
        let mut undecided = vec![];
        let mut decided = vec![];
        for info in infos {
            if self.denied(info.path.name()) {
                rep.denied += 1;
            } else if let Some(r) = self.decide_locally(&info, &pinned) {
                decided.push((info, r));
            } else {
                undecided.push(info);
            }
        }
        for info in gone {
            if !self.denied(info.path.name()) {
                decided.push((info, Reason::Pinned));
            }
        }
        let checked: Vec<(PathInfo, bool)> = stream::iter(undecided)
            .map(|info| async move {
                let ok = self.upstream_has(&info).await;
                (info, ok)
            })
            .buffer_unordered(self.cfg.upstream_concurrency.max(1))
            .collect()
            .await;
        for (info, ok) in checked {
            if ok {
                decided.push((info, Reason::Upstream));
            } else {
                rep.private += 1;
            }
        }
        rep.shared = decided.len();
        for (info, _) in decided
            .iter()
            .filter(|(i, _)| valid.contains(&i.path.hash()))
        {
            let (path, nar_hash, nar_size) = (info.path.clone(), info.nar_hash, info.nar_size);
            let res = self
                .store
                .blocking(move |cs| {
                    if cs.has_manifest(&nar_hash)? {
                        return Ok(false);
                    }
                    cs.ingest_local(&path, Some((nar_hash, nar_size)), &mut |_| {})?;
                    Ok(true)
                })
                .await;
            match res {
                Ok(true) => rep.indexed += 1,
                Ok(false) => {}
                Err(e) => {
                    warn!(path = %info.path, error = %e, "cannot index a shared path");
                    rep.index_errors += 1;
                }
            }
            // Yield between paths so that serving Nix never waits behind a scan.
            tokio::task::yield_now().await;
        }
        let mut s = self.shared.write().expect("shared");
        s.generation += 1;
        s.nars = decided.iter().map(|(i, _)| i.nar_hash).collect();
        s.paths = decided
            .into_iter()
            .map(|(i, r)| (i.path.hash(), (i, r)))
            .collect();
        info!(
            valid = rep.valid,
            shared = rep.shared,
            private = rep.private,
            denied = rep.denied,
            indexed = rep.indexed,
            left_store = rep.left_store,
            attached = rep.attached,
            "local store scanned"
        );
        Ok(rep)
    }

    /// The Nix store is the truth. A NAR whose path left it is no longer read in place (and
    /// no longer held at all unless pack copies keep it whole); a NAR the chunk store holds
    /// whose path is valid is read in place from then on, so GC can release its pack copies
    /// (a download Nix has imported stops taking disk twice).
    async fn follow_local_store(
        &self,
        infos: &[PathInfo],
        rep: &mut ScanReport,
    ) -> anyhow::Result<()> {
        let valid: HashMap<StorePathHash, Sha256Hash> =
            infos.iter().map(|i| (i.path.hash(), i.nar_hash)).collect();
        let sources = self.store.blocking(|cs| cs.local_sources()).await?;
        for (nar, path) in sources {
            if valid.get(&path.hash()) == Some(&nar) {
                continue;
            }
            match self.store.blocking(move |cs| cs.detach_local(&nar)).await {
                Ok(d) => {
                    rep.left_store += 1;
                    debug!(%path, chunks = d.chunks, dropped = d.manifest_dropped, "path left the local store");
                }
                Err(e) => {
                    warn!(%path, error = %e, "cannot forget a path that left the local store")
                }
            }
        }
        for info in infos {
            let (path, nar, size) = (info.path.clone(), info.nar_hash, info.nar_size);
            let res = self
                .store
                .blocking(move |cs| {
                    let Some(m) = cs.manifest(&nar)? else {
                        return Ok(false);
                    };
                    if cs.local_source(&nar)?.as_ref() == Some(&path) && cs.missing(&m)?.is_empty()
                    {
                        return Ok(false);
                    }
                    cs.attach_local(&path, &nar, size)?;
                    Ok(true)
                })
                .await;
            match res {
                Ok(true) => rep.attached += 1,
                Ok(false) => {}
                Err(e) => warn!(path = %info.path, error = %e, "cannot read a held NAR in place"),
            }
        }
        Ok(())
    }

    pub fn shared_hashes(&self) -> Vec<StorePathHash> {
        self.shared
            .read()
            .expect("shared")
            .paths
            .keys()
            .copied()
            .collect()
    }

    pub fn reason(&self, hash: &StorePathHash) -> Option<Reason> {
        self.shared
            .read()
            .expect("shared")
            .paths
            .get(hash)
            .map(|(_, r)| *r)
    }

    /// Rescan every `interval`, forever.
    pub async fn run(self: Arc<Self>, interval: Duration, on_scan: impl Fn(&Self)) {
        loop {
            if let Err(e) = self.scan().await {
                warn!(error = %e, "scan of the local store failed");
            }
            on_scan(&self);
            tokio::time::sleep(interval).await;
        }
    }
}

impl Catalog for Sharing {
    fn lookup(&self, hash: &StorePathHash) -> Option<NarInfo> {
        let s = self.shared.read().expect("shared");
        let (info, _) = s.paths.get(hash)?;
        let mut n = NarInfo::for_uncompressed(info);
        if let Some(k) = &self.own_key {
            n.sign(k);
        }
        Some(n)
    }

    fn shares_nar(&self, nar_hash: &Sha256Hash) -> bool {
        self.shared.read().expect("shared").nars.contains(nar_hash)
    }

    fn shared_nars(&self) -> Vec<Sha256Hash> {
        let s = self.shared.read().expect("shared");
        s.nars.iter().copied().collect()
    }

    fn generation(&self) -> u64 {
        self.shared.read().expect("shared").generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("nixos-system-*", "nixos-system-host-24.05"));
        assert!(glob_match("*secret*", "my-secrets"));
        assert!(glob_match("etc", "etc"));
        assert!(!glob_match("etc", "etcd-3.5"));
        assert!(glob_match("*.key", "host.key"));
        assert!(glob_match("a?c", "abc"));
        assert!(!glob_match("a?c", "ac"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("*-etc", "hello-2.12"));
    }
}
