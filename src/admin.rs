//! The running daemon's admin channel: a Unix socket in the state directory, reachable by
//! whoever may read that directory (root, or the daemon's own user). The daemon holds the
//! chunk store's lock, so `peerix seed`, `unseed` and `status` ask it to do the work.
//!
//! One request per connection, as a JSON line; the answer is JSON lines: progress events, then
//! one final reply.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use futures::Future;
use peerix_swarm::Node;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::seed::{SeedEvent, SeedStatus, SeedSummary, Seeder, Target, UnseedSummary};
use crate::share::Reason;

/// A request is a few store paths; anything longer is not from `peerix`.
const MAX_REQUEST: u64 = 4 * 1024 * 1024;
/// A reply line: a status with a few thousand peers, or a seed event listing names.
const MAX_REPLY_LINE: u64 = 16 * 1024 * 1024;

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("admin.sock")
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Seed {
        targets: Vec<Target>,
        /// `peerix seed --share-private-paths`; a client that does not say is not asking.
        #[serde(default)]
        share_private_paths: bool,
    },
    Unseed {
        which: Vec<String>,
        all: bool,
    },
    Status,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Event(SeedEvent),
    Seeded(SeedSummary),
    Unseeded(UnseedSummary),
    Status(Box<StatusReport>),
    Error(String),
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatusReport {
    /// `None`: no daemon runs on this state directory.
    pub daemon: Option<DaemonStatus>,
    pub seeds: Vec<SeedStatus>,
    pub store: StoreStatus,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub peer_id: String,
    pub http: String,
    pub p2p: Vec<String>,
    pub peers: Vec<PeerStatus>,
    /// Whether peers can dial this node, as AutoNAT last judged.
    pub reachability: String,
    /// Relays this node is reachable through (it holds a reservation on them).
    pub relays: Vec<String>,
    pub nat: NatCounts,
    pub shared: SharedCounts,
    #[serde(default)]
    pub traffic: TrafficStatus,
}

/// What the relay service did for others, and hole punching, since the start.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NatCounts {
    pub relay_reservations: u64,
    pub relay_circuits_active: u64,
    pub relay_circuits_total: u64,
    pub relay_circuits_denied: u64,
    pub hole_punches_succeeded: u64,
    pub hole_punches_failed: u64,
}

impl NatCounts {
    pub fn of(o: &peerix_swarm::Overview) -> NatCounts {
        let (r, h) = (&o.relay_service, &o.hole_punches);
        NatCounts {
            relay_reservations: r.reservations,
            relay_circuits_active: r.circuits_active,
            relay_circuits_total: r.circuits_total,
            relay_circuits_denied: r.circuits_denied,
            hole_punches_succeeded: h.succeeded,
            hole_punches_failed: h.failed,
        }
    }
}

/// A connected peer, and how: directly, or through a relay.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PeerStatus {
    pub id: String,
    pub addr: Option<String>,
    pub relayed: bool,
}

/// Chunk traffic since the daemon started: NAR bytes against the bytes that crossed the wire,
/// and what kept the rest off it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TrafficStatus {
    /// Chunk bytes received from peers (as the NAR holds them) and as they came on the wire.
    pub chunk_bytes_received: u64,
    pub wire_bytes_received: u64,
    pub saved_by_dedup: u64,
    pub saved_by_compression: u64,
    pub saved_by_delta: u64,
    /// Chunk bytes sent to peers, as they went on the wire.
    pub wire_bytes_served: u64,
    /// Bytes of chunks recompressed once to be served small to many.
    pub recompressed_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SharedCounts {
    pub total: usize,
    pub upstream: usize,
    pub own_signature: usize,
    pub pinned: usize,
    pub share_all: usize,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StoreStatus {
    pub nars: u64,
    /// Sum of the NAR sizes held.
    pub logical_bytes: u64,
    /// Distinct chunk bytes.
    pub unique_bytes: u64,
    pub dedup_ratio: f64,
    /// What packs take on disk; NARs of local store paths are read in place and take nothing.
    pub pack_file_bytes: u64,
    pub local_bytes: u64,
    pub pins: u64,
}

impl StoreStatus {
    pub fn of(cs: &peerix_chunkstore::ChunkStore) -> Result<Self> {
        let s = cs.stats()?;
        Ok(Self {
            nars: s.manifests,
            logical_bytes: s.logical_bytes,
            unique_bytes: s.unique_bytes,
            dedup_ratio: s.dedup_ratio(),
            pack_file_bytes: s.pack_file_bytes,
            local_bytes: s.local_bytes,
            pins: s.pins,
        })
    }
}

/// What the admin socket works with.
pub struct Daemon {
    pub seeder: Seeder,
    pub node: Arc<Node>,
    pub http: SocketAddr,
    /// Seeds and unseeds one at a time.
    pub busy: tokio::sync::Mutex<()>,
    /// The traffic figures, read when asked.
    pub traffic: Box<dyn Fn() -> TrafficStatus + Send + Sync>,
    /// Called after a seed or an unseed (the pins changed).
    pub after_seed: Box<dyn Fn() + Send + Sync>,
}

impl Daemon {
    /// Rescan so the shared set includes (or drops) pinned paths, and announce it.
    async fn reannounce(&self) {
        if let Err(e) = self.seeder.sharing.scan().await {
            warn!(error = %e, "rescan after a seed failed");
        }
        self.node.set_provided(self.seeder.sharing.shared_hashes());
        (self.after_seed)();
    }

    async fn status(&self) -> Result<StatusReport> {
        let counts = self.seeder.sharing.counts();
        let n = |r| counts.get(&r).copied().unwrap_or(0);
        let overview = self.node.overview().await;
        let mut peers: Vec<PeerStatus> = overview
            .peers
            .iter()
            .map(|p| PeerStatus {
                id: p.peer.to_string(),
                addr: p.addr.as_ref().map(|a| a.to_string()),
                relayed: p.relayed,
            })
            .collect();
        peers.sort_by(|a, b| a.id.cmp(&b.id));
        let (store, recompressed) = self
            .seeder
            .store
            .blocking(|cs| Ok((StoreStatus::of(cs), cs.recompressed_bytes())))
            .await?;
        let store = store?;
        let traffic = TrafficStatus {
            recompressed_bytes: recompressed?,
            ..(self.traffic)()
        };
        Ok(StatusReport {
            daemon: Some(DaemonStatus {
                peer_id: self.node.peer_id().to_string(),
                http: self.http.to_string(),
                p2p: self
                    .node
                    .listen_addrs()
                    .iter()
                    .map(|a| a.to_string())
                    .collect(),
                peers,
                reachability: overview.reachability.to_string(),
                relays: overview.relays.iter().map(|p| p.to_string()).collect(),
                nat: NatCounts::of(&overview),
                shared: SharedCounts {
                    total: counts.values().sum(),
                    upstream: n(Reason::Upstream),
                    own_signature: n(Reason::OwnSignature),
                    pinned: n(Reason::Pinned),
                    share_all: n(Reason::OptIn),
                },
                traffic,
            }),
            seeds: self.seeder.seeds().await?,
            store,
        })
    }
}

/// Bind the socket (a stale one from a daemon that died is replaced: this process holds the
/// state directory's lock) and return the accept loop.
pub fn listen(state_dir: &Path, d: Arc<Daemon>) -> Result<impl Future<Output = ()>> {
    let path = socket_path(state_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => debug!(path = %path.display(), "stale admin socket removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    let d = d.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(s, d).await {
                            debug!(error = %e, "admin connection ended");
                        }
                    });
                }
                Err(e) => warn!(error = %e, "admin socket accept failed"),
            }
        }
    })
}

async fn send(w: &mut (impl AsyncWriteExt + Unpin), r: &Reply) -> Result<()> {
    let mut line = serde_json::to_vec(r)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    Ok(())
}

/// One request line, at most `limit` bytes with its newline. Public for the fuzz targets.
#[doc(hidden)]
pub async fn read_line(r: impl AsyncRead + Unpin, limit: u64) -> Result<Option<String>> {
    let mut line = String::new();
    let n = BufReader::new(r.take(limit)).read_line(&mut line).await?;
    if n == 0 {
        return Ok(None);
    }
    anyhow::ensure!(
        line.ends_with('\n'),
        "line longer than {limit} bytes or cut short"
    );
    Ok(Some(line))
}

async fn handle(s: UnixStream, d: Arc<Daemon>) -> Result<()> {
    let (r, mut w) = s.into_split();
    let Some(line) = read_line(r, MAX_REQUEST).await? else {
        return Ok(());
    };
    let req: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            return send(&mut w, &Reply::Error(format!("bad request: {e}"))).await;
        }
    };
    let reply = match req {
        Request::Status => d.status().await.map(|s| Reply::Status(Box::new(s))),
        Request::Seed {
            targets,
            share_private_paths,
        } => {
            let _one = d.busy.lock().await;
            let (tx, mut rx) = mpsc::unbounded_channel();
            let d2 = d.clone();
            let work = tokio::spawn(async move {
                let emit = move |e: SeedEvent| {
                    let _ = tx.send(e);
                };
                let r = d2.seeder.seed(&targets, share_private_paths, &emit).await;
                if r.is_ok() {
                    d2.reannounce().await;
                }
                r
            });
            // Events stream while the work goes on; a client that went away does not stop it.
            let mut client_gone = false;
            while let Some(e) = rx.recv().await {
                if !client_gone && send(&mut w, &Reply::Event(e)).await.is_err() {
                    client_gone = true;
                }
            }
            work.await?.map(|mut s| {
                s.announced = true;
                Reply::Seeded(s)
            })
        }
        Request::Unseed { which, all } => {
            let _one = d.busy.lock().await;
            let r = d.seeder.unseed(which, all).await;
            if r.is_ok() {
                d.reannounce().await;
            }
            r.map(Reply::Unseeded)
        }
    };
    let reply = reply.unwrap_or_else(|e| Reply::Error(format!("{e:#}")));
    send(&mut w, &reply).await?;
    w.shutdown().await?;
    Ok(())
}

/// Ask the daemon. `Ok(None)`: no daemon listens on this state directory.
pub async fn request(
    state_dir: &Path,
    req: &Request,
    mut on_event: impl FnMut(SeedEvent),
) -> Result<Option<Reply>> {
    let path = socket_path(state_dir);
    let s = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
    };
    let (r, mut w) = s.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut r = BufReader::new(r);
    loop {
        let mut line = String::new();
        let n = (&mut r)
            .take(MAX_REPLY_LINE)
            .read_line(&mut line)
            .await
            .context("reading the daemon's answer")?;
        anyhow::ensure!(n > 0, "the daemon closed the connection without an answer");
        match serde_json::from_str::<Reply>(&line).context("the daemon's answer")? {
            Reply::Event(e) => on_event(e),
            other => return Ok(Some(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_request_that_does_not_ask_does_not_share_private_paths() {
        // As an older `peerix seed` sends it.
        let r: Request = serde_json::from_str(r#"{"op":"seed","targets":[]}"#).unwrap();
        assert!(matches!(
            r,
            Request::Seed {
                share_private_paths: false,
                ..
            }
        ));
        let r: Request =
            serde_json::from_str(r#"{"op":"seed","targets":[],"share_private_paths":true}"#)
                .unwrap();
        assert!(matches!(
            r,
            Request::Seed {
                share_private_paths: true,
                ..
            }
        ));
    }
}
