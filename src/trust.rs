//! What a node accepts from peers: a narinfo signed by a trusted key, or one whose NarHash
//! equals the upstream cache's. And what it then hands Nix, so that Nix accepts it too.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use futures::future::{BoxFuture, FutureExt, Shared};
use peerix_nix::upstream::UpstreamCache;
use peerix_nix::{NarInfo, PublicKey, SecretKey, Signature, StorePathHash};
use peerix_swarm::TrustCheck;
use tracing::debug;

/// Most signatures of one narinfo checked against the trusted keys: those named like a
/// trusted key, in the narinfo's order. An honest narinfo has one per key that signed it; a
/// peer that pads one with hundreds of fake signatures under a trusted key's name gets its
/// answer turned down rather than costing a verification each.
pub const MAX_SIGNATURE_CHECKS: usize = 8;

/// An upstream narinfo request that every check of the same path shares.
type UpstreamAnswer = Shared<BoxFuture<'static, Option<NarInfo>>>;

pub struct Trust {
    keys: Arc<Vec<PublicKey>>,
    upstream: Option<Arc<UpstreamCache>>,
    own_key: Option<SecretKey>,
    /// Upstream requests in flight, by path: answers for one path (many peers, or one peer
    /// repeating itself) wait for one request instead of starting one each.
    in_flight: Arc<Mutex<HashMap<StorePathHash, UpstreamAnswer>>>,
}

/// The signatures on `info` that a trusted key made, checking at most
/// [`MAX_SIGNATURE_CHECKS`] of them. CPU-bound: run it off the async workers.
pub fn trusted_signatures(keys: &[PublicKey], info: &NarInfo) -> BTreeSet<String> {
    let candidates: Vec<(&String, Signature)> = info
        .sigs
        .iter()
        .filter_map(|s| Some((s, s.parse::<Signature>().ok()?)))
        .filter(|(_, sig)| keys.iter().any(|k| k.name() == sig.name))
        .take(MAX_SIGNATURE_CHECKS)
        .collect();
    if candidates.is_empty() {
        return BTreeSet::new();
    }
    let fp = info.fingerprint();
    candidates
        .into_iter()
        .filter(|(_, sig)| keys.iter().any(|k| k.verify(fp.as_bytes(), sig)))
        .map(|(s, _)| s.clone())
        .collect()
}

impl Trust {
    pub fn new(
        keys: Vec<PublicKey>,
        upstream: Option<Arc<UpstreamCache>>,
        own_key: Option<SecretKey>,
    ) -> Self {
        Self {
            keys: Arc::new(keys),
            upstream,
            own_key,
            in_flight: Arc::default(),
        }
    }

    /// The signatures by trusted keys, verified on a blocking thread when there is any to
    /// verify (an ed25519 verification is tens of microseconds of CPU).
    async fn verified_signatures(&self, info: &NarInfo) -> BTreeSet<String> {
        let named = info.sigs.iter().any(|s| {
            s.split_once(':')
                .is_some_and(|(name, _)| self.keys.iter().any(|k| k.name() == name))
        });
        if !named {
            return BTreeSet::new();
        }
        let keys = self.keys.clone();
        let info = info.clone();
        tokio::task::spawn_blocking(move || trusted_signatures(&keys, &info))
            .await
            .unwrap_or_default()
    }

    /// Upstream's narinfo for `hash`: one request at a time per path, whoever asks.
    async fn upstream_narinfo(&self, hash: StorePathHash) -> Option<NarInfo> {
        let up = self.upstream.clone()?;
        let answer = {
            let mut m = self.in_flight.lock().expect("in-flight upstream requests");
            m.entry(hash)
                .or_insert_with(|| {
                    // A task, not a future polled by whoever waits: the request finishes (and
                    // its entry goes) even if every lookup waiting for it gave up.
                    let in_flight = self.in_flight.clone();
                    let task = tokio::spawn(async move {
                        let r = match up.narinfo(&hash).await {
                            Ok(r) => r,
                            Err(e) => {
                                debug!(%hash, error = %e, "upstream check failed");
                                None
                            }
                        };
                        in_flight
                            .lock()
                            .expect("in-flight upstream requests")
                            .remove(&hash);
                        r
                    });
                    async move { task.await.ok().flatten() }.boxed().shared()
                })
                .clone()
        };
        answer.await
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
        let good = self.verified_signatures(info).await;
        let mut out = if !good.is_empty() {
            let mut n = info.clone();
            n.sigs = good;
            n
        } else {
            let theirs = self.upstream_narinfo(info.store_path.hash()).await?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use peerix_nix::upstream::UpstreamConfig;
    use peerix_nix::{Sha256Hash, StorePath};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn info() -> NarInfo {
        let h = peerix_nix::base32::encode(&[7; 20]);
        let p = StorePath::from_base_name(&format!("{h}-trust-test")).unwrap();
        NarInfo::uncompressed(p, Sha256Hash::digest(b"nar"), 1000)
    }

    #[tokio::test]
    async fn a_narinfo_padded_with_fake_signatures_costs_a_bounded_number_of_checks() {
        let key = SecretKey::generate("trusted-1").unwrap();
        let trust = Trust::new(vec![key.public_key()], None, None);
        let mut n = info();
        n.sign(&key);
        let other = SecretKey::generate("other-1").unwrap();
        n.sigs
            .insert(other.sign(n.fingerprint().as_bytes()).to_string());
        let presented = trust.present(&n).await.expect("signed by a trusted key");
        // Only the trusted key's signature is handed on.
        assert_eq!(presented.sigs.len(), 1);
        assert!(presented.sigs.iter().all(|s| s.starts_with("trusted-1:")));

        // Hundreds of signatures named like the trusted key, ordered before the real one: only
        // the first MAX_SIGNATURE_CHECKS are verified, so the answer is turned down.
        for i in 0..600u32 {
            let mut bytes = [0xf8u8; 64];
            bytes[1..5].copy_from_slice(&i.to_be_bytes());
            let fake = Signature {
                name: "trusted-1".into(),
                bytes,
            };
            assert!(fake.to_string().starts_with("trusted-1:+"));
            n.sigs.insert(fake.to_string());
        }
        assert!(trusted_signatures(&[key.public_key()], &n).is_empty());
        assert!(trust.present(&n).await.is_none());
        // Signatures by keys nobody trusts are never verified at all.
        let mut n2 = info();
        n2.sign(&other);
        assert!(trust.present(&n2).await.is_none());
    }

    /// An upstream cache that answers 404 to everything after `delay`, counting requests.
    async fn slow_upstream(delay: std::time::Duration) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let c = c.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                        )
                        .await;
                });
            }
        });
        (url, count)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn upstream_checks_of_one_path_are_single_flight() {
        let (url, requests) = slow_upstream(std::time::Duration::from_millis(300)).await;
        let config = UpstreamConfig {
            cache_capacity: 0,
            ..UpstreamConfig::default()
        };
        let up = Arc::new(UpstreamCache::new(&url, config).unwrap());
        let trust = Arc::new(Trust::new(vec![], Some(up), None));
        let n = info();
        let checks: Vec<_> = (0..200)
            .map(|_| {
                let (trust, n) = (trust.clone(), n.clone());
                tokio::spawn(async move { trust.present(&n).await })
            })
            .collect();
        for c in checks {
            assert!(c.await.unwrap().is_none());
        }
        assert_eq!(
            requests.load(Ordering::SeqCst),
            1,
            "one request for 200 checks"
        );
        assert!(trust.in_flight.lock().unwrap().is_empty());
        // Done, it is forgotten: a later check asks again (the upstream client's own cache is
        // off here).
        assert!(trust.present(&n).await.is_none());
        assert_eq!(requests.load(Ordering::SeqCst), 2);
    }
}
