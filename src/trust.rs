//! What a node accepts from peers: a narinfo signed by a trusted key, or one whose NarHash
//! equals the upstream cache's. And what it then hands Nix, so that Nix accepts it too.

use std::sync::Arc;

use futures::future::BoxFuture;
use peerix_nix::upstream::UpstreamCache;
use peerix_nix::{NarInfo, PublicKey, SecretKey};
use peerix_swarm::TrustCheck;
use tracing::debug;

pub struct Trust {
    keys: Vec<PublicKey>,
    upstream: Option<Arc<UpstreamCache>>,
    own_key: Option<SecretKey>,
}

impl Trust {
    pub fn new(
        keys: Vec<PublicKey>,
        upstream: Option<Arc<UpstreamCache>>,
        own_key: Option<SecretKey>,
    ) -> Self {
        Self {
            keys,
            upstream,
            own_key,
        }
    }

    /// The narinfo to give Nix for a peer's answer, or None when it cannot be trusted.
    ///
    /// - Signed by a trusted key: the peer's narinfo, keeping the signatures that verify (Nix
    ///   accepts them when it trusts the same keys), plus ours.
    /// - Same NarHash and NarSize as upstream: upstream's own metadata (references, deriver,
    ///   CA, and its signatures, which Nix already trusts), so a peer cannot slip in other
    ///   references under a public NarHash; plus ours.
    ///
    /// Either way the URL is ours (`nar/<NarHash>.nar`, uncompressed).
    pub async fn present(&self, info: &NarInfo) -> Option<NarInfo> {
        let mut out = if info.verified_by(&self.keys).is_some() {
            let fp = info.fingerprint();
            let mut n = info.clone();
            n.sigs.retain(|s| {
                s.parse()
                    .is_ok_and(|sig| self.keys.iter().any(|k| k.verify(fp.as_bytes(), &sig)))
            });
            n
        } else {
            let up = self.upstream.as_ref()?;
            let theirs = match up.narinfo(&info.store_path.hash()).await {
                Ok(Some(u)) => u,
                Ok(None) => return None,
                Err(e) => {
                    debug!(path = %info.store_path, error = %e, "upstream check failed");
                    return None;
                }
            };
            if theirs.nar_hash != info.nar_hash || theirs.nar_size != info.nar_size {
                return None;
            }
            theirs
        };
        out.url = Some(format!("nar/{}.nar", out.nar_hash.to_base32()));
        out.compression = Some("none".into());
        out.file_hash = Some(out.nar_hash);
        out.file_size = Some(out.nar_size);
        if let Some(k) = &self.own_key {
            out.sign(k);
        }
        Some(out)
    }
}

impl TrustCheck for Trust {
    fn check<'a>(&'a self, info: &'a NarInfo) -> BoxFuture<'a, bool> {
        Box::pin(async move { self.present(info).await.is_some() })
    }
}
