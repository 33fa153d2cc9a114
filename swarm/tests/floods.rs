//! Floods: rogue libp2p nodes driven by the test attack a real peerix node on loopback (the
//! DHT's provider store, the peer protocol's stream slots and connections, the per-peer
//! tables), while honest peers look up and download from it. Each test asserts what a user
//! would see (the honest lookup and download complete, our announcements go out) and that
//! what the attack grows stays bounded, and prints the peak.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, StreamExt};
use libp2p::kad::{self, store::MemoryStore, store::MemoryStoreConfig};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{noise, tcp, yamux};
use peerix_chunkstore::{ChunkStore, ChunkerParams, Manifest, Options};
use peerix_swarm::node::{
    Node, NodeConfig, NodeEvent, ProviderLimits, ProviderStats, KAD_PROTOCOL,
};
use peerix_swarm::{Client, Multiaddr, PeerId, ServeLimits, Server, ServerEvent, ServerHandle};
use tempfile::TempDir;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

use peerix_test_support::fixtures::store_path;
use peerix_test_support::swarm::nodes::{
    find_provider, keys, tcp_addr, wait_connected, wait_event, WAIT,
};
use peerix_test_support::swarm::{self as support, catalog, init_tracing, nar_bytes, narinfo};

fn config(dir: &Path) -> NodeConfig {
    let mut c = NodeConfig::new(dir);
    c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    c.mdns = false;
    c
}

async fn start(dir: &TempDir, tweak: impl FnOnce(&mut NodeConfig)) -> Node {
    let mut c = config(dir.path());
    tweak(&mut c);
    Node::start(c).await.expect("node starts")
}

/// The address without its `/p2p/…` suffix.
fn bare_addr(node: &Node) -> Multiaddr {
    tcp_addr(node)
        .into_iter()
        .filter(|p| !matches!(p, Protocol::P2p(_)))
        .collect()
}

/// A rogue Kademlia node: announces itself as the provider of ever new keys to `target`
/// (and whoever the target names), `in_flight` at a time, plus keys peerix never uses (32
/// bytes and 1 KiB long), until the task is dropped.
fn spawn_dht_rogue(
    target: Multiaddr,
    target_peer: PeerId,
    seed: u64,
    in_flight: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .unwrap()
            .with_behaviour(|key| {
                let local = key.public().to_peer_id();
                let store = MemoryStore::with_config(
                    local,
                    MemoryStoreConfig {
                        max_provided_keys: usize::MAX,
                        max_records: usize::MAX,
                        ..Default::default()
                    },
                );
                kad::Behaviour::with_config(local, store, kad::Config::new(KAD_PROTOCOL))
            })
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(600)))
            .build();
        swarm.behaviour_mut().add_address(&target_peer, target);
        let mut n: u64 = 0;
        let mut next_key = move || {
            n += 1;
            match n % 20 {
                0 => kad::RecordKey::new(&vec![n as u8; 1024]),
                10 => kad::RecordKey::new(&[n as u8; 32]),
                _ => kad::RecordKey::new(keys(1, seed ^ (n << 20))[0].as_bytes()),
            }
        };
        for _ in 0..in_flight {
            let _ = swarm.behaviour_mut().start_providing(next_key());
        }
        loop {
            if let SwarmEvent::Behaviour(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::StartProviding(_),
                step,
                ..
            }) = swarm.select_next_some().await
            {
                if step.last {
                    let _ = swarm.behaviour_mut().start_providing(next_key());
                }
            }
        }
    })
}

/// A(n honest) peer's DHT lookups and announcements go on while rogues push provider records
/// by the thousand, some with keys peerix never uses: the target's store stays within its
/// quotas (per provider and in all), yet keeps the honest provider's records (the providers
/// holding most give way) and its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dht_flood_stays_within_its_quotas() {
    const PER_PEER: usize = 400;
    const TOTAL: usize = 1000;
    const ROGUES: u64 = 4;
    init_tracing();
    let dirs: Vec<TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Arc::new(
        start(&dirs[0], |c| {
            c.dht_limits = ProviderLimits {
                max_records_per_peer: PER_PEER,
                max_foreign_records: TOTAL,
                ..ProviderLimits::default()
            }
        })
        .await,
    );
    let h = start(&dirs[1], |c| c.peers = vec![tcp_addr(&a).to_string()]).await;
    // C asks A only: what it finds, A's store holds.
    let c = start(&dirs[2], |c| {
        c.peers = vec![tcp_addr(&a).to_string()];
        c.allowed_peers = Some([a.peer_id()].into());
    })
    .await;
    wait_connected(&h, a.peer_id()).await;
    wait_connected(&c, a.peer_id()).await;

    // A's store, watched throughout.
    let (peak_tx, mut peak_rx) =
        watch::channel::<(usize, ProviderStats)>((0, ProviderStats::default()));
    let monitor = {
        let a = a.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(Duration::from_millis(20));
            loop {
                interval.tick().await;
                let s = a.dht_stats().await;
                peak_tx.send_modify(|(peak, last)| {
                    *peak = (*peak).max(s.foreign_records);
                    *last = s;
                });
            }
        })
    };

    let rogues: Vec<_> = (0..ROGUES)
        .map(|i| spawn_dht_rogue(bare_addr(&a), a.peer_id(), 1000 + i, 32))
        .collect();
    // The flood has filled A's store.
    tokio::time::timeout(
        WAIT,
        peak_rx.wait_for(|(_, s)| s.foreign_records >= TOTAL && s.refused > 0),
    )
    .await
    .expect("the rogues fill A's provider store")
    .unwrap();

    // While it goes on: an honest provider's announcements are stored by A and found there,
    // and A's own still go out.
    let kh = keys(5, 7);
    let ka = keys(5, 8);
    let mut a_events = a.events();
    h.set_provided(kh.clone());
    a.set_provided(ka.clone());
    let started = tokio::time::Instant::now();
    for k in &kh {
        assert!(
            find_provider(&c, k, h.peer_id()).await,
            "C (asking A only) finds H as the provider of {k}"
        );
    }
    for k in &ka {
        assert!(
            find_provider(&c, k, a.peer_id()).await,
            "A's own record {k}"
        );
    }
    let mut announced = 0;
    while announced < ka.len() {
        wait_event(
            &mut a_events,
            |e| matches!(e, NodeEvent::Announced(k) if ka.contains(k)),
        )
        .await
        .expect("A's announcements go out under the flood");
        announced += 1;
    }
    let honest = started.elapsed();

    monitor.abort();
    let (peak, last) = *peak_rx.borrow();
    for r in &rogues {
        r.abort();
    }
    eprintln!(
        "DHT flood by {ROGUES} rogues: A's foreign records peaked at {peak} (cap {TOTAL}, \
         {PER_PEER} per provider), {} providers, {} records refused; own keys {}; \
         honest lookups and announcements done in {honest:.2?}",
        last.foreign_providers, last.refused, last.own_keys
    );
    assert!(peak <= TOTAL, "A's store grew to {peak} foreign records");
    assert!(last.own_keys >= ka.len());
    drop((h, c));
}

/// A peerix node serving a NAR from its chunk store.
struct ServingNode {
    node: Node,
    server: ServerHandle,
    manifest: Manifest,
    data: Vec<u8>,
    info: peerix_nix::NarInfo,
    _task: tokio::task::JoinHandle<()>,
    _dirs: (TempDir, TempDir),
}

async fn serving_node(limits: ServeLimits, tweak: impl FnOnce(&mut NodeConfig)) -> ServingNode {
    let node_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(
        store_dir.path(),
        Options {
            chunker: ChunkerParams::new(16 * 1024, 64 * 1024, 256 * 1024).unwrap(),
            store_root: None,
        },
    )
    .unwrap();
    let data = nar_bytes(5, 2 << 20);
    let manifest = store
        .ingest_nar(&data[..], None, None, &mut |_| {})
        .unwrap();
    let info = narinfo(store_path(5), &manifest);
    let node = start(&node_dir, tweak).await;
    let server = Server::new(store, catalog(std::slice::from_ref(&info)), limits);
    let handle = server.handle();
    let task = tokio::spawn(server.run(node.stream_control()).unwrap());
    ServingNode {
        node,
        server: handle,
        manifest,
        data,
        info,
        _task: task,
        _dirs: (node_dir, store_dir),
    }
}

/// What a user of B sees: the path looked up at A and its NAR downloaded whole.
async fn honest_lookup_and_download(b: &Client, a: &ServingNode) {
    let peer = a.node.peer_id();
    let found = b.lookup(peer, &[a.info.store_path.hash()]).await.unwrap();
    assert_eq!(found, vec![a.info.clone()]);
    let m = b
        .manifest(peer, a.manifest.nar_hash)
        .await
        .unwrap()
        .unwrap();
    let mut nar = Vec::new();
    for batch in m.chunks.chunks(16) {
        let mut chunks = std::pin::pin!(b.fetch_chunks(peer, batch.to_vec()));
        while let Some(c) = chunks.next().await {
            nar.extend_from_slice(c.expect("a chunk").data());
        }
    }
    assert!(nar == a.data, "the NAR arrives whole");
}

/// Holds `n` streams to `to` open without ever sending a request, opening another whenever
/// one is closed, until dropped.
fn hold_idle_streams(
    rogue: &support::Node,
    to: PeerId,
    n: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let mut control = rogue.control.clone();
            tokio::spawn(async move {
                loop {
                    let Ok(mut s) = control.open_stream(to, peerix_swarm::PROTOCOL).await else {
                        // Refused (the peer's share, or the rogue is refused): try again.
                        tokio::task::yield_now().await;
                        continue;
                    };
                    let mut buf = [0u8; 64];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                }
            })
        })
        .collect()
}

/// Six rogues try to hold every stream slot of A's server with idle streams (64 each, reopened
/// as soon as they are closed), one opens ten keep-alive streams (six are reset) and one a
/// dozen more connections: an honest peer's lookup and download still complete, before the
/// rogues' streams could be timed out; the slots in use never pass the cap, idling rogues end
/// up refused, and A holds at most 4 connections from one peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_flood_leaves_honest_peers_their_share() {
    const ROGUES: usize = 6;
    init_tracing();
    let limits = ServeLimits::default();
    let a = serving_node(limits.clone(), |_| {}).await;
    let b_dir = tempfile::tempdir().unwrap();
    let b = start(&b_dir, |c| c.peers = vec![tcp_addr(&a.node).to_string()]).await;
    wait_connected(&b, a.node.peer_id()).await;
    let mut events = a.server.subscribe();
    let mut streams = a.server.streams();

    let mut rogues = Vec::new();
    let mut holders = Vec::new();
    for _ in 0..ROGUES {
        let r = support::Node::new().await;
        r.connect_to(bare_addr(&a.node), a.node.peer_id()).await;
        holders.extend(hold_idle_streams(
            &r,
            a.node.peer_id(),
            limits.max_streams_per_peer,
        ));
        rogues.push(r);
    }
    for _ in 0..12 {
        rogues[0]
            .dial_again(bare_addr(&a.node), a.node.peer_id())
            .await;
    }
    tokio::time::timeout(WAIT, streams.wait_for(|s| s.open >= limits.max_streams))
        .await
        .expect("the rogues take every stream slot")
        .unwrap();
    // Keep-alive streams (the other protocol a node accepts from anyone): a few held per
    // peer, the rest reset.
    let (reset_tx, mut reset_rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..10 {
        let mut control = rogues[1].control.clone();
        let to = a.node.peer_id();
        let reset_tx = reset_tx.clone();
        holders.push(tokio::spawn(async move {
            let keepalive = libp2p::StreamProtocol::new("/peerix/keepalive/1");
            if let Ok(mut s) = control.open_stream(to, keepalive).await {
                let mut buf = [0u8; 64];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            }
            let _ = reset_tx.send(());
        }));
    }
    for i in 0..6 {
        tokio::time::timeout(WAIT, reset_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("only {i} of 10 keep-alive streams from one peer reset"));
    }

    let started = tokio::time::Instant::now();
    let client = Client::new(b.stream_control());
    tokio::time::timeout(WAIT, honest_lookup_and_download(&client, &a))
        .await
        .expect("B's lookup and download complete under the flood");
    let honest = started.elapsed();
    // Served at once, not only once the rogues' idle streams timed out and they were refused.
    assert!(
        honest < limits.request_timeout,
        "B waited {honest:?}: as long as the rogues' streams may idle"
    );

    // Idling is counted against the rogues: they end up refused. Read from the server's table,
    // the events only wake this up: every idle stream is an Offence event, hundreds of them,
    // and a broadcast channel drops what a lagging receiver has not read yet, Offender events
    // included (which made this test fail under load).
    let rogue_ids: std::collections::HashSet<PeerId> = rogues.iter().map(|r| r.peer).collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let refused = a.server.offenders();
        assert!(
            refused.iter().all(|p| rogue_ids.contains(p)),
            "only rogues are refused"
        );
        if refused.len() == ROGUES {
            break;
        }
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => {}
            Ok(Err(RecvError::Closed)) | Err(_) => panic!("{} rogues refused", refused.len()),
        }
    }
    assert!(!a.server.offenders().contains(&b.peer_id()));

    // Connections: the dozen extra dials have each been taken or refused by now.
    let deadline = tokio::time::Instant::now() + WAIT;
    let overview = loop {
        let o = a.node.overview().await;
        let held = o.connections.get(&rogues[0].peer).copied().unwrap_or(0);
        if held as u64 + o.connections_denied >= 13 {
            break o;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rogue 0's dials never all arrived: {held} held, {} denied",
            o.connections_denied
        );
        tokio::task::yield_now().await;
    };
    let per_rogue = overview
        .connections
        .get(&rogues[0].peer)
        .copied()
        .unwrap_or(0);

    for h in &holders {
        h.abort();
    }
    let s = *streams.borrow();
    eprintln!(
        "stream flood by {ROGUES} rogues: honest lookup and download in {honest:.2?}; streams \
         peak {} (cap {}), {} refused, {} handed to another peer; rogue 0 holds {per_rogue} \
         connections, {} denied",
        s.peak, limits.max_streams, s.refused, s.preempted, overview.connections_denied
    );
    assert!(s.peak <= limits.max_streams);
    assert!(per_rogue <= 4, "rogue 0 holds {per_rogue} connections");
    b.shutdown().await;
}

/// A rogue mints identities by the hundred, each fetching a chunk and sending malformed
/// requests until it is refused, and gets every one banned at the node: each per-peer table
/// keeps to its bound, the honest peer is still served and tracked, and the latest bans hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minted_identities_do_not_grow_the_tables() {
    const TRACKED: usize = 32;
    const MINTED: usize = 120;
    init_tracing();
    let limits = ServeLimits {
        max_tracked_peers: TRACKED,
        ..ServeLimits::default()
    };
    let a = serving_node(limits.clone(), |c| c.max_bans = TRACKED).await;
    let b_dir = tempfile::tempdir().unwrap();
    let b = start(&b_dir, |c| c.peers = vec![tcp_addr(&a.node).to_string()]).await;
    wait_connected(&b, a.node.peer_id()).await;
    let client = Client::new(b.stream_control());
    let mut events = a.server.subscribe();

    let mut peak = peerix_swarm::TrackedPeers::default();
    let mut last = None;
    for i in 0..MINTED {
        let r = support::Node::new().await;
        r.connect_to(bare_addr(&a.node), a.node.peer_id()).await;
        let c = r.client();
        let mut chunks = Box::pin(c.fetch_chunks(a.node.peer_id(), vec![a.manifest.chunks[0]]));
        chunks
            .next()
            .await
            .unwrap()
            .expect("a chunk for the minted identity");
        drop(chunks);
        for _ in 0..limits.max_offences {
            let mut control = r.control.clone();
            let mut s = control
                .open_stream(a.node.peer_id(), peerix_swarm::PROTOCOL)
                .await
                .unwrap();
            use futures::AsyncWriteExt;
            let _ = s.write_all(b"\x00\x00\x00\x05GARBAGE!").await;
            let _ = s.close().await;
            loop {
                match tokio::time::timeout(WAIT, events.recv()).await {
                    Ok(Ok(ServerEvent::Offence { peer, .. })) if peer == r.peer => break,
                    Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => {}
                    other => panic!("no offence counted for identity {i}: {other:?}"),
                }
            }
        }
        a.node.ban(r.peer, "minted").await;
        let t = a.server.tracked_peers();
        peak.scores = peak.scores.max(t.scores);
        peak.refused = peak.refused.max(t.refused);
        peak.served = peak.served.max(t.served);
        peak.have_budget = peak.have_budget.max(t.have_budget);
        last = Some(r.peer);
        // Every tenth identity, the honest peer is served as usual.
        if i % 10 == 9 {
            tokio::time::timeout(WAIT, honest_lookup_and_download(&client, &a))
                .await
                .expect("B is served while identities are minted");
        }
    }
    let bans = a.node.banned_count();
    eprintln!(
        "{MINTED} minted identities: tables peaked at {peak:?} (bound {TRACKED}), ban list {bans} \
         (bound {TRACKED}); bytes served to forgotten peers {}",
        a.server.bytes_served_to_others()
    );
    assert!(peak.scores <= TRACKED && peak.refused <= TRACKED && peak.served <= TRACKED);
    assert!(bans <= TRACKED);
    assert!(a.node.is_banned(&last.unwrap()), "the latest ban holds");
    assert!(
        a.server.bytes_served().contains_key(&b.peer_id()),
        "the honest peer, served recently, is still tracked"
    );
    assert!(a.server.offenders().contains(&last.unwrap()));
    let total: u64 =
        a.server.bytes_served().values().sum::<u64>() + a.server.bytes_served_to_others();
    assert!(total >= (MINTED as u64) * u64::from(a.manifest.chunks[0].len));
    let _: HashMap<PeerId, u64> = a.server.bytes_served();
    b.shutdown().await;
}
