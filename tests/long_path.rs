//! Requests over a long path (a round trip of hundreds of milliseconds, as between continents),
//! between real libp2p nodes on loopback joined by a delay line: a request costs one round trip,
//! not one for its stream's protocol and one for itself; and a request's stream, on a connection
//! whose round trip is known, starts with a window for that round trip, not yamux's 256 KiB.
//! What is asserted is a count of round trips, measured in time: the round trip is long enough
//! that one more is told apart from the machine's noise.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use peerix_bench::delay::delay_line;
use peerix_chunkstore::ChunkRef;
use peerix_swarm::node::{tcp_socket_of, Node as PeerixNode, NodeConfig};
use peerix_swarm::protocol::MAX_CHUNKS_PER_REQUEST;
use peerix_swarm::{Client, Multiaddr, ServeLimits, Server};
use peerix_test_support::fixtures::store_path;
use peerix_test_support::swarm::*;

/// The round trip the delay line adds.
const RTT: Duration = Duration::from_millis(400);
/// A bound on every wait: what is asserted never comes near it.
const BOUND: Duration = Duration::from_secs(120);

/// A server of one NAR of `mib` MiB, reached through a delay line: the server, its NAR's
/// manifest and the line's address.
async fn far_server(seed: u64, mib: usize) -> (Node, peerix_chunkstore::Manifest, Multiaddr) {
    let mut server = Node::new().await;
    let m = server.ingest(&nar_bytes(seed, mib << 20));
    server.serve(
        catalog(&[narinfo(store_path(seed as u8), &m)]),
        ServeLimits::default(),
    );
    let to = tcp_addr(&server.addr);
    // Detached: the line lives as long as the test's runtime.
    let (at, _) = delay_line(to, RTT).await.expect("a delay line");
    let far: Multiaddr = format!("/ip4/{}/tcp/{}", at.ip(), at.port())
        .parse()
        .unwrap();
    (server, m, far)
}

fn tcp_addr(a: &Multiaddr) -> SocketAddr {
    tcp_socket_of(a).expect("a TCP address")
}

/// How long `f` takes.
async fn timed<T>(f: impl std::future::Future<Output = T>) -> (T, Duration) {
    let t = Instant::now();
    let out = tokio::time::timeout(BOUND, f)
        .await
        .expect("within the bound");
    (out, t.elapsed())
}

/// A peerix node (explicit `peers`, no mDNS) keeping its state in `dir`.
async fn peerix_node(dir: &Path, peers: Vec<String>) -> PeerixNode {
    let mut c = NodeConfig::new(dir.to_owned());
    c.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    c.mdns = false;
    c.peers = peers;
    PeerixNode::start(c).await.expect("a peerix node")
}

/// A lookup of a peerix node over a long path is answered one round trip after it is asked:
/// the request goes out with its stream's protocol proposal (multistream-select's lazy
/// dialer), not a round trip after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_a_long_path_takes_one_round_trip() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let server = peerix_node(&dir.path().join("server"), vec![]).await;
    let store = peerix_test_support::store::open(&dir.path().join("chunks"), None);
    let m = store
        .ingest_nar(&nar_bytes(90, 1 << 20)[..], None, None, &mut |_| {})
        .unwrap();
    let serving = Server::new(
        store,
        catalog(&[narinfo(store_path(90), &m)]),
        ServeLimits::default(),
    )
    .run(server.stream_control())
    .unwrap();
    let serving = tokio::spawn(serving);
    let (at, _) = delay_line(tcp_addr(&server.listen_addrs()[0]), RTT)
        .await
        .expect("a delay line");
    let far = format!(
        "/ip4/{}/tcp/{}/p2p/{}",
        at.ip(),
        at.port(),
        server.peer_id()
    );
    let node = peerix_node(&dir.path().join("client"), vec![far]).await;
    let mut events = node.events();
    tokio::time::timeout(BOUND, async {
        while !node.connected_peers().await.contains(&server.peer_id()) {
            let _ = events.recv().await;
        }
    })
    .await
    .expect("connected within the bound");
    let client = Client::new(node.stream_control());
    let (found, took) = timed(client.lookup(server.peer_id(), &[store_path(90).hash()])).await;
    assert_eq!(found.expect("a lookup answer").len(), 1);
    eprintln!("a lookup over a {RTT:?} round trip took {took:?}");
    // One round trip; without the lazy dialer it took three here (multistream-select's
    // exchange before the request). The bound is halfway between one and three.
    assert!(
        took < RTT * 2,
        "a lookup took {took:?}, a round trip is {RTT:?}: more than one round trip"
    );
    serving.abort();
}

/// Over a long path, a request's stream starts with a window for the connection's round trip,
/// even on a fresh connection that has carried nothing large: a 1.5 MiB answer comes in one
/// round trip after its stream's protocol's (with yamux's 256 KiB to start with, in three, the
/// window doubling each). A download asks a peer for its manifest, or which chunks it holds,
/// before it asks for a run of chunks; that first answer takes a round trip, and by then the
/// connection's first ping, sent as it opened, has measured it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_large_answer_on_a_long_path_comes_in_one_round_trip() {
    init_tracing();
    let (server, m, far) = far_server(91, 8).await;
    let client_node = Node::new().await;
    client_node.connect_to(far, server.peer).await;
    let client: Client = client_node.client();
    let fetch = |refs: Vec<ChunkRef>| {
        let s = client.fetch_chunks(server.peer, refs);
        async move {
            s.map(|r| r.expect("a chunk").data().len())
                .collect::<Vec<_>>()
                .await
        }
    };
    // The NAR's chunks from the `from`th, as many as fit in `bytes` (and in one request).
    let run = |from: usize, bytes: usize| -> Vec<ChunkRef> {
        let mut refs = vec![];
        let mut sum = 0;
        for c in &m.chunks[from..] {
            if sum + c.len as usize > bytes || refs.len() == MAX_CHUNKS_PER_REQUEST {
                break;
            }
            sum += c.len as usize;
            refs.push(*c);
        }
        refs
    };
    // A first small answer, as a download's manifest is: one chunk, within yamux's first
    // window.
    let (got, _) = timed(fetch(m.chunks[..1].to_vec())).await;
    assert_eq!(got.len(), 1);
    let second = run(1, 3 << 19);
    let bytes: usize = second.iter().map(|c| c.len as usize).sum();
    assert!(bytes > 1 << 20, "{bytes} bytes asked for");
    let (got, took) = timed(fetch(second)).await;
    assert_eq!(got.iter().sum::<usize>(), bytes);
    eprintln!("{bytes} bytes over a {RTT:?} round trip took {took:?}");
    // One round trip for the stream's protocol (these test nodes negotiate it as libp2p does by
    // default, not as a peerix node does) and one for the request and its answer; with
    // yamux's 256 KiB to start with, four. The bound is halfway between two and four.
    assert!(
        took < RTT * 3,
        "{bytes} bytes took {took:?}, a round trip is {RTT:?}: the stream's window started small"
    );
}

mod needs_nix {
    //! The same long path between two `peerix serve` daemons on real Nix stores.

    use std::time::Instant;

    use super::{common, RTT};
    use common::pair::{hash_part, sign};
    use common::{http, Daemon, Relay};

    /// Nix asks for every narinfo of a closure before the NARs. B asks the peer that answered a
    /// narinfo for the NAR's manifest as the narinfo comes in, so a NAR asked for afterwards
    /// comes one round trip after it is asked for (its chunks'), not two (its manifest's and
    /// its chunks').
    #[test]
    fn a_nar_asked_for_after_its_narinfo_comes_in_one_round_trip() {
        let a_nix = common::nix();
        let b_nix = common::nix();
        let top = a_nix.build_closure("long-path-prefetch")[0].clone();
        let a_key = a_nix.keys("peer-a-1");
        sign(&a_nix, &a_key.0, &top);
        b_nix.init_store();
        let mut a = Daemon::start("A", &a_nix, &["--private-key", a_key.0.to_str().unwrap()]);
        assert!(a.wait_scan() >= 3);
        // A, reached through the relay.
        let relay = Relay::to(&a.p2p_socket(), RTT);
        let far = relay.p2p_of(&a);
        let mut b = Daemon::start_logging(
            None,
            "B",
            &b_nix,
            &["--trusted-key", &a_key.1, "--peer", &far],
            Some("peerix::serve::prefetch=debug"),
        );
        b.wait_peer(&a);

        let (status, narinfo) = http(&b.http, "GET", &format!("/{}.narinfo", hash_part(&top)));
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&narinfo));
        let narinfo = String::from_utf8(narinfo).unwrap();
        let url = narinfo
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .expect("a URL");
        // The manifest B asked for as the narinfo came in: Nix asks for the NAR later.
        b.wait_for("the manifest ahead", |l| {
            l.contains("manifest in ahead of the NAR request")
        });
        assert_eq!(b.counter("peerix_manifests_prefetched"), 1);
        let t = Instant::now();
        let (status, nar) = http(&b.http, "GET", &format!("/{url}"));
        let took = t.elapsed();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&nar));
        eprintln!(
            "a {}-byte NAR over a {RTT:?} round trip took {took:?}",
            nar.len()
        );
        assert_eq!(b.counter("peerix_manifest_prefetches_used"), 1);
        // Its chunks' round trip; with its manifest's too, two. The bound is halfway.
        assert!(
            took < RTT * 3 / 2,
            "the NAR took {took:?}, a round trip is {RTT:?}: more than its chunks' round trip"
        );
        drop(b);
        drop(relay);
    }
}
