//! Lookup across real nodes (discovery, Kademlia, the peer protocol, serving) on loopback.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use libp2p::PeerId;
use peerix_chunkstore::{ChunkStore, Options};
use peerix_nix::{NarInfo, PublicKey, SecretKey, Sha256Hash, StorePath, StorePathHash};
use peerix_swarm::{
    Catalog, Client, Lookup, Node, NodeConfig, NodeEvent, PeerSource, ServeLimits, Server,
    TrustCheck,
};
use peerix_test_support::rng::data;
use tempfile::TempDir;

const WAIT: Duration = Duration::from_secs(60);

/// What a peer shares; `gate`, when set, holds every answer until it is opened, so a test can
/// decide which peer answers first.
#[derive(Default)]
struct TestCatalog {
    items: HashMap<StorePathHash, NarInfo>,
    gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    calls: AtomicUsize,
}

impl Catalog for TestCatalog {
    fn lookup(&self, hash: &StorePathHash) -> Option<NarInfo> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Some(rx) = self.gate.lock().unwrap().take() {
            let _ = rx.recv_timeout(WAIT);
        }
        self.items.get(hash).cloned()
    }
    fn shares_nar(&self, nar_hash: &Sha256Hash) -> bool {
        self.items.values().any(|n| n.nar_hash == *nar_hash)
    }
    fn shared_nars(&self) -> Vec<Sha256Hash> {
        self.items.values().map(|n| n.nar_hash).collect()
    }
}

/// Trusts signatures by `keys`; tells `on_reject` when it turned an answer down.
struct SigTrust {
    keys: Vec<PublicKey>,
    on_reject: Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl TrustCheck for SigTrust {
    fn check<'a>(&'a self, info: &'a NarInfo) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let ok = info.verified_by(&self.keys).is_some();
            if !ok {
                if let Some(tx) = self.on_reject.lock().unwrap().take() {
                    let _ = tx.send(());
                }
            }
            ok
        })
    }
}

struct Peer {
    node: Arc<Node>,
    catalog: Arc<TestCatalog>,
    store: ChunkStore,
    _dir: TempDir,
}

async fn peer(catalog: TestCatalog, peers: Vec<String>, provide: Vec<StorePathHash>) -> Peer {
    let dir = tempfile::tempdir().unwrap();
    let mut c = NodeConfig::new(dir.path().join("node"));
    c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    c.mdns = false;
    c.peers = peers;
    let node = Arc::new(Node::start(c).await.unwrap());
    let store = ChunkStore::open(&dir.path().join("chunks"), Options::default()).unwrap();
    let catalog = Arc::new(catalog);
    let server = Server::new(store.clone(), catalog.clone(), ServeLimits::default());
    tokio::spawn(server.run(node.stream_control()).unwrap());
    node.set_provided(provide);
    Peer {
        node,
        catalog,
        store,
        _dir: dir,
    }
}

fn addr(p: &Peer) -> String {
    p.node.listen_addrs()[0].to_string()
}

async fn wait_connected(node: &Node, n: usize) {
    let mut ev = node.events();
    let deadline = tokio::time::Instant::now() + WAIT;
    while node.connected_peers().await.len() < n {
        match tokio::time::timeout_at(deadline, ev.recv()).await {
            Ok(Ok(NodeEvent::PeerConnected(_))) | Ok(Err(_)) => {}
            Ok(Ok(_)) => {}
            Err(_) => panic!("{} peers never connected", n),
        }
    }
}

fn path(n: u8) -> StorePath {
    let h = peerix_nix::base32::encode(&Sha256Hash::digest(&[n]).0[..20]);
    StorePath::from_base_name(&format!("{h}-lookup-{n}")).unwrap()
}

fn narinfo(p: &StorePath, key: &SecretKey) -> NarInfo {
    let nar_hash = Sha256Hash::digest(p.base_name().as_bytes());
    let mut n = NarInfo {
        store_path: p.clone(),
        url: Some(format!("nar/{}.nar", nar_hash.to_base32())),
        compression: Some("none".into()),
        file_hash: Some(nar_hash),
        file_size: Some(1000),
        nar_hash,
        nar_size: 1000,
        references: BTreeSet::new(),
        deriver: None,
        system: None,
        sigs: BTreeSet::new(),
        ca: None,
    };
    n.sign(key);
    n
}

fn lookup(node: Arc<Node>, trust: SigTrust) -> Lookup {
    let client = Client::new(node.stream_control());
    Lookup::new(node, client, Arc::new(trust), Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fast_untrusted_peer_does_not_hide_a_trusted_one() {
    let trusted = SecretKey::generate("trusted-1").unwrap();
    let impostor = SecretKey::generate("impostor-1").unwrap();
    let p = path(1);
    let leecher = peer(TestCatalog::default(), vec![], vec![]).await;
    let (open_gate, gate) = std::sync::mpsc::channel();
    let slow_trusted = peer(
        TestCatalog {
            items: HashMap::from([(p.hash(), narinfo(&p, &trusted))]),
            gate: Mutex::new(Some(gate)),
            ..TestCatalog::default()
        },
        vec![addr(&leecher)],
        vec![],
    )
    .await;
    let fast_untrusted = peer(
        TestCatalog {
            items: HashMap::from([(p.hash(), narinfo(&p, &impostor))]),
            ..TestCatalog::default()
        },
        vec![addr(&leecher)],
        vec![],
    )
    .await;
    wait_connected(&leecher.node, 2).await;
    // The trusted peer answers only once the untrusted answer has been seen and refused.
    let l = lookup(
        leecher.node.clone(),
        SigTrust {
            keys: vec![trusted.public_key()],
            on_reject: Mutex::new(Some(open_gate)),
        },
    );
    let found = l.find(p.hash(), WAIT).await.expect("the trusted answer");
    assert_eq!(found.peer, slow_trusted.node.peer_id());
    assert_eq!(found.untrusted, vec![fast_untrusted.node.peer_id()]);
    assert!(found.info.verified_by(&[trusted.public_key()]).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_miss_is_answered_and_then_remembered() {
    let leecher = peer(TestCatalog::default(), vec![], vec![]).await;
    let a = peer(TestCatalog::default(), vec![addr(&leecher)], vec![]).await;
    let b = peer(TestCatalog::default(), vec![addr(&leecher)], vec![]).await;
    wait_connected(&leecher.node, 2).await;
    let l = lookup(
        leecher.node.clone(),
        SigTrust {
            keys: vec![],
            on_reject: Mutex::new(None),
        },
    );
    let p = path(2);
    assert!(l.find(p.hash(), Duration::from_secs(5)).await.is_none());
    let asked = |x: &Peer| x.catalog.calls.load(Ordering::SeqCst);
    assert_eq!(
        (asked(&a), asked(&b)),
        (1, 1),
        "every connected peer was asked"
    );
    // Asked again at once: answered from the miss cache, no peer is bothered.
    assert!(l.find(p.hash(), Duration::from_secs(5)).await.is_none());
    assert_eq!((asked(&a), asked(&b)), (1, 1));
    l.forget_miss(&p.hash());
    assert!(l.find(p.hash(), Duration::from_secs(5)).await.is_none());
    assert_eq!((asked(&a), asked(&b)), (2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_holder_found_only_through_the_dht() {
    let key = SecretKey::generate("trusted-1").unwrap();
    let p = path(3);
    let hub = peer(TestCatalog::default(), vec![], vec![]).await;
    let holder = peer(
        TestCatalog {
            items: HashMap::from([(p.hash(), narinfo(&p, &key))]),
            ..TestCatalog::default()
        },
        vec![addr(&hub)],
        vec![],
    )
    .await;
    let mut ev = holder.node.events();
    holder.node.set_provided(vec![p.hash()]);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ev.recv()).await {
            Ok(Ok(NodeEvent::Announced(h))) if h == p.hash() => break,
            Ok(_) => {}
            Err(_) => panic!("the holder never announced the path"),
        }
    }
    let other = peer(TestCatalog::default(), vec![addr(&hub)], vec![]).await;
    let leecher = peer(TestCatalog::default(), vec![addr(&hub)], vec![]).await;
    wait_connected(&hub.node, 3).await;
    // The leecher's own view: the hub identified, so in its routing table.
    wait_connected(&leecher.node, 1).await;
    // The leecher may meet the holder through Kademlia's own walks; to be sure the answer comes
    // through the DHT's provider records, this lookup sees no connected peers at all.
    let client = Client::new(leecher.node.stream_control());
    let l = Lookup::new(
        Arc::new(DhtOnly(leecher.node.clone())),
        client,
        Arc::new(SigTrust {
            keys: vec![key.public_key()],
            on_reject: Mutex::new(None),
        }),
        Duration::from_secs(30),
    );
    let found = l.find(p.hash(), WAIT).await.expect("found through the DHT");
    assert_eq!(found.peer, holder.node.peer_id());
    assert_eq!(other.catalog.calls.load(Ordering::SeqCst), 0);
}

struct DhtOnly(Arc<Node>);

impl PeerSource for DhtOnly {
    fn connected(&self) -> BoxFuture<'_, Vec<PeerId>> {
        Box::pin(async { vec![] })
    }
    fn providers(&self, key: StorePathHash, timeout: Duration) -> BoxStream<'_, PeerId> {
        Box::pin(self.0.find_providers(&key, timeout))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_found_path_downloads_from_every_holder() {
    let key = SecretKey::generate("trusted-1").unwrap();
    let p = path(4);
    let nar = data(4, 12 << 20);
    let nar_hash = Sha256Hash::digest(&nar);
    let mut info = narinfo(&p, &key);
    info.nar_hash = nar_hash;
    info.file_hash = Some(nar_hash);
    info.nar_size = nar.len() as u64;
    info.file_size = Some(info.nar_size);
    info.sigs.clear();
    info.sign(&key);
    let leecher = peer(TestCatalog::default(), vec![], vec![]).await;
    let mut seeders = vec![];
    for _ in 0..3 {
        let s = peer(
            TestCatalog {
                items: HashMap::from([(p.hash(), info.clone())]),
                ..TestCatalog::default()
            },
            vec![addr(&leecher)],
            vec![],
        )
        .await;
        let n = nar.clone();
        let pp = p.clone();
        s.store
            .blocking(move |cs| cs.ingest_nar(n.as_slice(), Some(&pp), None, &mut |_| {}))
            .await
            .unwrap();
        seeders.push(s);
    }
    wait_connected(&leecher.node, 3).await;
    let l = lookup(
        leecher.node.clone(),
        SigTrust {
            keys: vec![key.public_key()],
            on_reject: Mutex::new(None),
        },
    );
    let found = l.find(p.hash(), WAIT).await.expect("found");
    let client = Client::new(leecher.node.stream_control());
    let manifest = client
        .manifest(found.peer, found.info.nar_hash)
        .await
        .unwrap()
        .expect("the holder has the manifest");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(16);
    let collect = tokio::spawn(async move {
        let mut v = Vec::new();
        while let Some(b) = rx.recv().await {
            v.extend_from_slice(&b);
        }
        v
    });
    let report = peerix_swarm::download(
        client,
        leecher.store.clone(),
        manifest,
        leecher.node.connected_peers().await.into(),
        peerix_swarm::DownloadConfig::default(),
        tx,
    )
    .await
    .into_result()
    .unwrap();
    assert!(collect.await.unwrap() == nar, "the NAR differs");
    for s in &seeders {
        let got = report
            .bytes_per_peer
            .get(&s.node.peer_id())
            .copied()
            .unwrap_or(0);
        assert!(
            got > 0,
            "a holder sent nothing: {:?}",
            report.bytes_per_peer
        );
    }
    // Downloaded chunks are at once the leecher's to serve.
    let mut r = leecher.store.nar_reader(&nar_hash).unwrap();
    let mut v = Vec::new();
    std::io::Read::read_to_end(&mut r, &mut v).unwrap();
    assert!(v == nar);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nar_the_catalog_does_not_share_stays_private() {
    let holder = peer(TestCatalog::default(), vec![], vec![]).await;
    let asker = peer(TestCatalog::default(), vec![addr(&holder)], vec![]).await;
    wait_connected(&asker.node, 1).await;
    let nar = data(9, 1 << 20);
    let n = nar.clone();
    let m = holder
        .store
        .blocking(move |cs| cs.ingest_nar(n.as_slice(), None, None, &mut |_| {}))
        .await
        .unwrap();
    let client = Client::new(asker.node.stream_control());
    let peer_id = holder.node.peer_id();
    assert_eq!(client.manifest(peer_id, m.nar_hash).await.unwrap(), None);
    let have = client.have(peer_id, &[], &[m.nar_hash]).await.unwrap();
    assert_eq!(have.nars, vec![peerix_swarm::protocol::NarState::None]);
}

/// Counts the checks it is asked for and trusts nothing.
#[derive(Default)]
struct CountingTrust {
    checks: AtomicUsize,
}

impl TrustCheck for CountingTrust {
    fn check<'a>(&'a self, _: &'a NarInfo) -> BoxFuture<'a, bool> {
        self.checks.fetch_add(1, Ordering::SeqCst);
        Box::pin(async { false })
    }
}

/// A peer that answers every lookup with `copies` copies of one narinfo.
async fn rogue_repeating(info: NarInfo, copies: usize) -> (Arc<Node>, TempDir) {
    use futures::{AsyncWriteExt, StreamExt};
    use peerix_swarm::protocol::{self, Request};
    let dir = tempfile::tempdir().unwrap();
    let mut c = NodeConfig::new(dir.path().join("node"));
    c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    c.mdns = false;
    let node = Arc::new(Node::start(c).await.unwrap());
    let mut incoming = node
        .stream_control()
        .accept(peerix_swarm::PROTOCOL)
        .unwrap();
    tokio::spawn(async move {
        while let Some((_, mut s)) = incoming.next().await {
            let info = info.clone();
            tokio::spawn(async move {
                if let Ok(req @ Request::Lookup(_)) = protocol::read_request(&mut s).await {
                    let reply = protocol::Reply::Lookup(vec![info; copies]);
                    let (kind, body) = reply.encode();
                    let sent = protocol::Reply::decode(
                        &protocol::Frame {
                            kind,
                            body: body.clone(),
                        },
                        &req,
                    );
                    assert_eq!(sent.unwrap(), reply, "every copy fits in the reply");
                    let _ = protocol::write_frame(&mut s, kind, &body).await;
                }
                let _ = s.close().await;
            });
        }
    });
    (node, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reply_of_a_thousand_copies_costs_one_check() {
    let p = path(9);
    let key = SecretKey::generate("untrusted-1").unwrap();
    let (rogue, _dir) =
        rogue_repeating(narinfo(&p, &key), peerix_swarm::protocol::MAX_LOOKUP).await;
    let leecher = peer(
        TestCatalog::default(),
        vec![rogue.listen_addrs()[0].to_string()],
        vec![],
    )
    .await;
    wait_connected(&leecher.node, 1).await;
    let trust = Arc::new(CountingTrust::default());
    let client = Client::new(leecher.node.stream_control());
    let l = Lookup::new(
        leecher.node.clone(),
        client,
        trust.clone(),
        Duration::from_secs(30),
    );
    assert!(l.find(p.hash(), Duration::from_secs(5)).await.is_none());
    assert_eq!(
        trust.checks.load(Ordering::SeqCst),
        1,
        "one answering peer, one check"
    );
}
