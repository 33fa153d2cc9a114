//! What a node shares with its peers. By default only what is safe: paths whose NarHash equals
//! the upstream cache's (already public), paths signed by this node's own key (deliberately
//! published), and pinned paths (a seed pins only what is public or signed by a trusted key,
//! unless told `--share-private-paths`). Everything else stays private unless the operator opts
//! in, and deny patterns keep secrets out whatever else says.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use peerix_chunkstore::ChunkStore;
use peerix_nix::upstream::UpstreamCache;
use peerix_nix::{
    LocalStore, NarInfo, PathInfo, PublicKey, SecretKey, Sha256Hash, StorePath, StorePathHash,
};
use peerix_swarm::Catalog;

use crate::seed::record::Seed;
use tracing::{debug, info, warn};

/// Store-path names never shared, whatever else says so (an own signature, a seed, a pin,
/// `--share-all`): system closures and the parts of them that NixOS and common modules put
/// configuration and secrets into. Globs over the name after the hash (`*` and `?`); every entry
/// is tested against the store names it is here for (`tests::every_deny_entry_catches_what_it_is_for`).
pub const DEFAULT_DENY: &[&str] = &[
    // The system closure's top and its configuration-specific parts.
    "nixos-system-*",
    "etc",
    "etc-*",
    "*-etc",
    "user-environment",
    "*-user-environment",
    "home-manager-generation",
    "home-manager-files",
    "activate",
    "*-activation-script*",
    // users.users: hashedPassword, initialPassword and password, as JSON.
    "users-groups.json",
    // systemd units and their scripts: Environment= lines, inlined keys (WireGuard's
    // privateKey in its start script, mount options with password=).
    "unit-script-*",
    "unit-*.service",
    "unit-*.mount",
    "unit-*.netdev",
    "unit-*.network",
    // nix.settings (access-tokens), netrc files.
    "nix.conf",
    "netrc",
    "*.netrc",
    // Wi-Fi passphrases: networking.wireless before it moved to /etc, hostapd, NetworkManager.
    "wpa_supplicant*.conf",
    "hostapd*.conf",
    "*.nmconnection",
    // Key files written as Nix paths (`privateKeyFile = ./peerix.sec;`): Nix signing keys
    // (ours and `nix-store --generate-binary-cache-key`'s), TLS, SSH and other keys.
    "*.sec",
    "*.key",
    "*-key",
    "*_key",
    "*-keys",
    "*.pem",
    "*.p12",
    "*.pfx",
    "*.keytab",
    "*.psk",
    "id_rsa",
    "id_ecdsa",
    "id_ed25519",
    "id_dsa",
    "*.ovpn",
    "*.env",
    // Anything that says what it is.
    "*secret*",
    "*password*",
    "*passwd*",
    "*shadow*",
    "*token*",
    "*credentials*",
];

#[derive(Clone, Debug)]
pub struct ShareConfig {
    /// Share every valid path not denied (an explicit opt-in).
    pub share_all: bool,
    pub deny: Vec<String>,
    /// Keys besides the node's own whose signatures let a seed share a path without
    /// `--share-private-paths` (`peerix serve --trusted-key`).
    pub trusted_keys: Vec<PublicKey>,
    /// Upstream checks in flight at once during a scan.
    pub upstream_concurrency: usize,
}

impl Default for ShareConfig {
    fn default() -> Self {
        Self {
            share_all: false,
            deny: DEFAULT_DENY.iter().map(|s| s.to_string()).collect(),
            trusted_keys: vec![],
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

/// Whether one of the path's signatures verifies under one of `keys`.
fn signed_by_any(info: &PathInfo, keys: &[PublicKey]) -> bool {
    if keys.is_empty() || info.sigs.is_empty() {
        return false;
    }
    let fp = NarInfo::for_uncompressed(info).fingerprint();
    info.sigs
        .iter()
        .filter_map(|s| s.parse().ok())
        .any(|s| keys.iter().any(|k| k.verify(fp.as_bytes(), &s)))
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

    /// Whether a seed may pin (and so share) a path without `--share-private-paths`: no deny
    /// pattern matches it, and it is public or vouched for: the daemon shares it anyway (its
    /// NarHash is upstream's, it is signed by this node's key, or `--share-all`), or it is signed
    /// by a key this node trusts. Anything else may be a machine's own configuration or secret.
    pub async fn seedable(&self, info: &PathInfo) -> bool {
        if self.denied(info.path.name()) {
            return false;
        }
        if self.decide_locally(info, false).is_some() || signed_by_any(info, &self.cfg.trusted_keys)
        {
            return true;
        }
        self.upstream_has(info).await
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

    /// The decision that needs no network. `pinned`: the path is pinned, and the pin alone
    /// is reason enough (see [`Sharing::scan`]).
    fn decide_locally(&self, info: &PathInfo, pinned: bool) -> Option<Reason> {
        if let Some(k) = &self.own_key {
            if signed_by_any(info, std::slice::from_ref(&k.public_key())) {
                return Some(Reason::OwnSignature);
            }
        }
        if pinned {
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
        // A pin shares a path by itself only when its seed shared it by choice
        // (`--share-private-paths`) or a trusted key signed it. Any other pinned path is shared
        // only if it is public or own-signed anyway, so pins recorded before seeds told the two
        // apart share nothing private.
        let store = self.store.clone();
        let opted: HashSet<StorePathHash> = tokio::task::spawn_blocking(move || Seed::all(&store))
            .await??
            .into_iter()
            .flat_map(|s| s.private)
            .collect();
        let pin_shares = |info: &PathInfo| {
            opted.contains(&info.path.hash()) || signed_by_any(info, &self.cfg.trusted_keys)
        };
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
        // Undecided paths, with the reason they are shared for if upstream has them.
        let mut undecided = vec![];
        let mut decided = vec![];
        for info in infos {
            let pin = pinned.contains(info.path.base_name()) && pin_shares(&info);
            if self.denied(info.path.name()) {
                rep.denied += 1;
            } else if let Some(r) = self.decide_locally(&info, pin) {
                decided.push((info, r));
            } else {
                undecided.push((info, Reason::Upstream));
            }
        }
        for info in gone {
            if self.denied(info.path.name()) {
                rep.denied += 1;
            } else if self.decide_locally(&info, pin_shares(&info)).is_some() {
                decided.push((info, Reason::Pinned));
            } else {
                // Served from packs, as a pin, if it is public.
                undecided.push((info, Reason::Pinned));
            }
        }
        let checked: Vec<(PathInfo, Reason, bool)> = stream::iter(undecided)
            .map(|(info, r)| async move {
                let ok = self.upstream_has(&info).await;
                (info, r, ok)
            })
            .buffer_unordered(self.cfg.upstream_concurrency.max(1))
            .collect()
            .await;
        for (info, r, ok) in checked {
            if ok {
                decided.push((info, r));
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
        // All at once: chunks these shared with paths still in the store are handed over in
        // one pass over the local NARs.
        let gone: Vec<(Sha256Hash, StorePath)> = sources
            .into_iter()
            .filter(|(nar, path)| valid.get(&path.hash()) != Some(nar))
            .collect();
        if !gone.is_empty() {
            let nars: Vec<Sha256Hash> = gone.iter().map(|(n, _)| *n).collect();
            match self.store.blocking(move |cs| cs.detach_locals(&nars)).await {
                Ok(ds) => {
                    for ((_, path), d) in gone.iter().zip(ds) {
                        rep.left_store += 1;
                        debug!(%path, chunks = d.chunks, dropped = d.manifest_dropped, "path left the local store");
                    }
                }
                Err(e) => {
                    warn!(paths = gone.len(), error = %e, "cannot forget paths that left the local store")
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

    /// Scan now, then every `interval`, forever; with no interval, scan once.
    pub async fn run(self: Arc<Self>, interval: Option<Duration>, on_scan: impl Fn(&Self)) {
        loop {
            if let Err(e) = self.scan().await {
                warn!(error = %e, "scan of the local store failed");
            }
            on_scan(&self);
            match interval {
                Some(i) => tokio::time::sleep(i).await,
                None => {
                    debug!("no periodic rescans (scan interval 0)");
                    return;
                }
            }
        }
    }

    /// The store path whose NAR this is, and the NAR's size, among the paths shared now.
    pub fn path_of_nar(&self, nar_hash: &Sha256Hash) -> Option<(String, u64)> {
        let s = self.shared.read().expect("shared");
        if !s.nars.contains(nar_hash) {
            return None;
        }
        s.paths
            .values()
            .find(|(i, _)| i.nar_hash == *nar_hash)
            .map(|(i, _)| (i.path.to_string(), i.nar_size))
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

    /// Each scan bumps the generation: none has finished while it is 0.
    fn ready(&self) -> bool {
        self.generation() > 0
    }
}

#[cfg(test)]
mod tests;
