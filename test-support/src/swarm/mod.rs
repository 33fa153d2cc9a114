//! Test nodes: a real libp2p swarm (TCP on loopback, noise, yamux) carrying only the stream
//! behaviour, each with its own chunk store in a tempdir.

mod downloads;
pub mod nodes;

pub use downloads::{cluster, hold_in_part, small_runs};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux, Multiaddr, PeerId};
use peerix_chunkstore::{ChunkStore, Manifest, Options};
use peerix_nix::{NarInfo, Sha256Hash, StorePath, StorePathHash};
use peerix_swarm::client::Client;
use peerix_swarm::protocol::{self, Request};
use peerix_swarm::server::{ServeLimits, Server, ServerHandle};
use peerix_swarm::Catalog;
use peerix_swarm::PROTOCOL;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::fixtures::store_path;
use crate::rng::Star;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Deterministic pseudo-random bytes (xorshift64*); neighbouring seeds give unrelated bytes.
pub fn nar_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut r = Star(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn narinfo(path: StorePath, m: &Manifest) -> NarInfo {
    NarInfo::uncompressed(path, m.nar_hash, m.nar_size)
}

enum Cmd {
    Dial(Multiaddr, PeerId, oneshot::Sender<()>),
    /// Another connection, connected or not.
    DialAgain(Multiaddr, PeerId),
}

pub struct Node {
    pub peer: PeerId,
    pub addr: Multiaddr,
    pub control: libp2p_stream::Control,
    pub store: ChunkStore,
    pub handle: Option<ServerHandle>,
    cmd: mpsc::Sender<Cmd>,
    tasks: Vec<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Node {
    pub async fn new() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(
            &dir.path().join("store"),
            Options {
                chunker: crate::store::small(),
                store_root: None,
            },
        )
        .unwrap();
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(|_| libp2p_stream::Behaviour::new())
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
            .build();
        swarm
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
            .unwrap();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                    break address;
                }
            }
        })
        .await
        .expect("a listen address within 60 s");
        let peer = *swarm.local_peer_id();
        let control = swarm.behaviour().new_control();
        let (cmd, mut rx) = mpsc::channel::<Cmd>(16);
        let task = tokio::spawn(async move {
            let mut waiting: HashMap<PeerId, Vec<oneshot::Sender<()>>> = HashMap::new();
            loop {
                tokio::select! {
                    ev = swarm.select_next_some() => {
                        if let SwarmEvent::ConnectionEstablished { peer_id, .. } = ev {
                            for w in waiting.remove(&peer_id).unwrap_or_default() {
                                let _ = w.send(());
                            }
                        }
                    }
                    c = rx.recv() => match c {
                        Some(Cmd::DialAgain(addr, p)) => {
                            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(p)
                                .addresses(vec![addr])
                                .condition(libp2p::swarm::dial_opts::PeerCondition::Always)
                                .build();
                            let _ = swarm.dial(opts);
                        }
                        Some(Cmd::Dial(addr, p, done)) => {
                            if swarm.is_connected(&p) {
                                let _ = done.send(());
                            } else {
                                waiting.entry(p).or_default().push(done);
                                swarm.dial(addr.with(Protocol::P2p(p))).unwrap();
                            }
                        }
                        None => return,
                    }
                }
            }
        });
        Node {
            peer,
            addr,
            control,
            store,
            handle: None,
            cmd,
            tasks: vec![task],
            _dir: dir,
        }
    }

    pub async fn connect(&self, other: &Node) {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Dial(other.addr.clone(), other.peer, tx))
            .await
            .unwrap();
        rx.await.unwrap();
    }

    /// Connects to any libp2p node by its address (without `/p2p/…`) and id.
    pub async fn connect_to(&self, addr: Multiaddr, peer: PeerId) {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(Cmd::Dial(addr, peer, tx)).await.unwrap();
        rx.await.unwrap();
    }

    /// Opens one more connection to `peer`, however many there are already.
    pub async fn dial_again(&self, addr: Multiaddr, peer: PeerId) {
        self.cmd.send(Cmd::DialAgain(addr, peer)).await.unwrap();
    }

    pub fn serve(&mut self, catalog: Arc<dyn Catalog>, limits: ServeLimits) {
        self.serve_with_lan(catalog, limits, |_| false);
    }

    /// `serve`, with `is_lan` saying which peers are on the LAN (for the upload cap).
    pub fn serve_with_lan(
        &mut self,
        catalog: Arc<dyn Catalog>,
        limits: ServeLimits,
        is_lan: impl Fn(&PeerId) -> bool + Send + Sync + 'static,
    ) {
        let server = Server::new(self.store.clone(), catalog, limits).with_lan_peers(is_lan);
        self.handle = Some(server.handle());
        let control = self.control.clone();
        self.tasks.push(tokio::spawn(server.run(control).unwrap()));
    }

    /// Serve with default limits, sharing the NAR `m` describes (chunks of NARs a node does
    /// not share are never served).
    pub fn serve_sharing(&mut self, m: &Manifest) {
        let info = narinfo(store_path(0), m);
        self.serve(catalog(&[info]), ServeLimits::default());
    }

    pub fn client(&self) -> Client {
        Client::new(self.control.clone())
    }

    pub fn ingest(&self, data: &[u8]) -> Manifest {
        self.store
            .ingest_nar(data, None, None, &mut |_| {})
            .unwrap()
    }

    /// Stop the node: its swarm (and with it every connection) and its server.
    pub fn kill(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A misbehaving server on the raw protocol.
#[derive(Clone)]
pub enum Rogue {
    /// Serves chunks with one byte flipped.
    Corrupt,
    /// Answers every manifest request with this manifest, relabelled to the NarHash asked for.
    LyingManifest(Manifest),
    /// Says it has every chunk it holds, takes chunk requests and never answers them.
    Stall,
    /// Serves chunks honestly, takes `have` requests and never answers them.
    StallHave,
}

pub fn serve_rogue(node: &mut Node, mode: Rogue) {
    let mut control = node.control.clone();
    let store = node.store.clone();
    // Registered before the task starts, so no early stream is refused as unsupported.
    let mut incoming = control.accept(PROTOCOL).unwrap();
    node.tasks.push(tokio::spawn(async move {
        while let Some((_, mut s)) = incoming.next().await {
            let store = store.clone();
            let mode = mode.clone();
            tokio::spawn(async move {
                use futures::AsyncWriteExt;
                let Ok(req) = protocol::read_request(&mut s).await else {
                    return;
                };
                match req {
                    Request::Manifest(h) => {
                        let m = match mode {
                            Rogue::LyingManifest(mut m) => {
                                m.nar_hash = h;
                                Some(m)
                            }
                            Rogue::Corrupt | Rogue::Stall | Rogue::StallHave => {
                                store.manifest(&h).unwrap()
                            }
                        };
                        protocol::write_reply(&mut s, &protocol::Reply::Manifest(m))
                            .await
                            .unwrap();
                    }
                    Request::Have { .. } if matches!(mode, Rogue::StallHave) => {
                        std::future::pending::<()>().await;
                    }
                    Request::Have { chunks, .. } => {
                        let r = protocol::HaveReply {
                            chunks: chunks.iter().map(|c| store.has_chunk(c).unwrap()).collect(),
                            nars: vec![],
                        };
                        let _ = protocol::write_reply(&mut s, &protocol::Reply::Have(r)).await;
                    }
                    Request::Chunks(_) if matches!(mode, Rogue::Stall) => {
                        // Holds the stream open, silent, until the test ends.
                        std::future::pending::<()>().await;
                    }
                    Request::Chunks(protocol::ChunksRequest { ids, .. }) => {
                        for id in ids {
                            let mut d = store.read_chunk(&id).ok();
                            if let (Rogue::Corrupt, Some(d)) = (&mode, d.as_mut()) {
                                d[0] ^= 1;
                            }
                            if protocol::write_chunk(&mut s, &id, &d.into()).await.is_err() {
                                return;
                            }
                        }
                    }
                    Request::Lookup(_) => {
                        let reply = protocol::Reply::Lookup(vec![]);
                        let _ = protocol::write_reply(&mut s, &reply).await;
                    }
                }
                let _ = s.close().await;
            });
        }
    }));
}

pub fn catalog(entries: &[NarInfo]) -> Arc<dyn Catalog> {
    let m: HashMap<StorePathHash, NarInfo> = entries
        .iter()
        .map(|n| (n.store_path.hash(), n.clone()))
        .collect();
    Arc::new(m)
}

pub fn unknown_hash(n: u8) -> Sha256Hash {
    Sha256Hash::digest(&[n; 7])
}
