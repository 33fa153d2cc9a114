//! In-process nodes on 127.0.0.1, each with its own state directory.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::pnet::PreSharedKey;
use libp2p::Multiaddr;
use peerix_nix::StorePathHash;
use peerix_swarm::node::{read_swarm_key, Discovery, Node, NodeConfig, NodeEvent};
use tempfile::TempDir;

use peerix_test_support::swarm::init_tracing;
use peerix_test_support::swarm::nodes::{
    find_provider, keys, tcp_addr, wait_connected, wait_event, WAIT,
};

fn config(dir: &Path) -> NodeConfig {
    let mut c = NodeConfig::new(dir);
    c.listen = vec![
        "/ip4/127.0.0.1/tcp/0".parse().unwrap(),
        "/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap(),
    ];
    c.mdns = false;
    c
}

async fn start(dir: &TempDir, tweak: impl FnOnce(&mut NodeConfig)) -> Node {
    let mut c = config(dir.path());
    tweak(&mut c);
    Node::start(c).await.expect("node starts")
}

fn tcp_port(node: &Node) -> u16 {
    tcp_addr(node)
        .iter()
        .find_map(|p| match p {
            Protocol::Tcp(port) => Some(port),
            _ => None,
        })
        .unwrap()
}

#[tokio::test]
async fn identity_persists_across_restarts() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let node = start(&dir, |_| {}).await;
    let id = node.peer_id();
    assert!(!node.listen_addrs().is_empty());
    node.shutdown().await;

    let node = start(&dir, |_| {}).await;
    assert_eq!(node.peer_id(), id);
    node.shutdown().await;

    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("identity.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let other = tempfile::tempdir().unwrap();
    let node = start(&other, |_| {}).await;
    assert_ne!(node.peer_id(), id);
    node.shutdown().await;
}

#[tokio::test]
async fn listen_addrs_resolve_port_zero_and_carry_the_peer_id() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let node = start(&dir, |_| {}).await;
    let addrs = node.listen_addrs();
    assert_eq!(addrs.len(), 2, "{addrs:?}");
    for a in &addrs {
        assert_eq!(a.iter().last(), Some(Protocol::P2p(node.peer_id())));
        assert!(!a
            .iter()
            .any(|p| p == Protocol::Tcp(0) || p == Protocol::Udp(0)));
    }
    node.shutdown().await;
}

#[tokio::test]
async fn quic_dial_works() {
    init_tracing();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(&da, |_| {}).await;
    let b = start(&db, |_| {}).await;
    let quic = a
        .listen_addrs()
        .into_iter()
        .find(|x| x.iter().any(|p| p == Protocol::QuicV1))
        .unwrap();
    b.dial(quic).await.expect("QUIC dial");
    wait_connected(&a, b.peer_id()).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn explicit_peers_connect_by_multiaddr_and_host_port() {
    init_tracing();
    let dirs: Vec<TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(&dirs[0], |_| {}).await;
    let by_multiaddr = tcp_addr(&a).to_string();
    let by_host_port = format!("127.0.0.1:{}", tcp_port(&a));
    let b = start(&dirs[1], |c| c.peers = vec![by_multiaddr]).await;
    let c = start(&dirs[2], |c| c.peers = vec![by_host_port]).await;
    // Subscribed straight away: the dial has round trips to make before it can report.
    let mut c_events = c.events();

    wait_connected(&b, a.peer_id()).await;
    wait_connected(&c, a.peer_id()).await;
    wait_connected(&a, b.peer_id()).await;
    wait_connected(&a, c.peer_id()).await;

    // C only had "host:port", yet learnt who is there.
    let found = wait_event(&mut c_events, |e| {
        *e == NodeEvent::Discovered {
            peer: a.peer_id(),
            via: Discovery::Explicit,
        }
    })
    .await;
    assert!(found.is_some(), "C reports A as an explicit discovery");

    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn explicit_peers_are_redialled_after_a_restart() {
    init_tracing();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(&da, |_| {}).await;
    let port = tcp_port(&a);
    let a_id = a.peer_id();
    let b = start(&db, |c| c.peers = vec![format!("127.0.0.1:{port}")]).await;
    wait_connected(&b, a_id).await;

    let mut events = b.events();
    a.shutdown().await;
    assert!(
        wait_event(&mut events, |e| *e == NodeEvent::PeerDisconnected(a_id))
            .await
            .is_some(),
        "B notices A going away"
    );
    let a = start(&da, |c| {
        c.listen = vec![format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()]
    })
    .await;
    assert_eq!(a.peer_id(), a_id);
    assert!(
        wait_event(&mut events, |e| *e == NodeEvent::PeerConnected(a_id))
            .await
            .is_some(),
        "B redials A"
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn dht_finds_a_provider_never_introduced() {
    init_tracing();
    let dirs: Vec<TempDir> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(&dirs[0], |_| {}).await;
    let bootstrap = tcp_addr(&a).to_string();
    let mut others = Vec::new();
    for d in &dirs[1..] {
        others.push(start(d, |c| c.peers = vec![bootstrap.clone()]).await);
    }
    for n in &others {
        wait_connected(n, a.peer_id()).await;
    }
    let (d, e) = (&others[2], &others[3]);
    let k = keys(2, 7);
    d.set_provided(k.clone());

    assert!(
        find_provider(e, &k[0], d.peer_id()).await,
        "E finds D as a provider of h1"
    );
    e.connect(d.peer_id()).await.expect("E connects to D");
    assert!(e.connected_peers().await.contains(&d.peer_id()));
    assert!(find_provider(e, &k[1], d.peer_id()).await);

    // A key nobody provides yields nobody, and promptly once the lookup ends.
    let nobody = keys(1, 99)[0];
    assert!(e
        .providers(&nobody, Duration::from_secs(10))
        .await
        .is_empty());

    // Dropped keys stop being served by D itself.
    d.set_provided(vec![k[1]]);
    assert!(
        !d.providers(&k[0], Duration::from_secs(2))
            .await
            .contains(&d.peer_id()),
        "a node does not list itself"
    );

    a.shutdown().await;
    for n in others {
        n.shutdown().await;
    }
}

/// Two nodes that know only a bootstrap node (not an explicit peer: not held connected), and
/// not each other, find each other's paths in the DHT and connect.
#[tokio::test]
async fn the_dht_works_with_only_a_bootstrap_node_in_common() {
    init_tracing();
    let dirs: Vec<TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let x = start(&dirs[0], |_| {}).await;
    let entry = tcp_addr(&x);
    let a = start(&dirs[1], |c| c.bootstrap = vec![entry.clone()]).await;
    let b = start(&dirs[2], |c| c.bootstrap = vec![entry.clone()]).await;
    let k = keys(1, 11);
    a.set_provided(k.clone());
    assert!(
        find_provider(&b, &k[0], a.peer_id()).await,
        "B finds A through the bootstrap node"
    );
    b.connect(a.peer_id()).await.expect("B reaches A");

    // An entry point must name its peer.
    let mut bare = entry.clone();
    bare.pop();
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.bootstrap = vec![bare];
    assert!(matches!(
        Node::start(c).await,
        Err(peerix_swarm::NodeError::BootstrapWithoutPeerId(_))
    ));
    for n in [x, a, b] {
        n.shutdown().await;
    }
}

/// A hundred thousand provided keys really announced, at the pace the set's size sets: the
/// whole set once per `provide_interval`. The interval is shortened to 1,000 s, so the pace is
/// 100,000 / 1,000 s = 100 keys a second (a set cut short, say at kad's default limit of 1,024
/// keys, would go at the floor of 10); for ten seconds the announcements must keep to it, from
/// all over the set. And they reach the DHT: C, which may talk to B only, finds A as the
/// provider of keys A announced, so B holds A's records. (That the pacer walks a whole set once
/// per interval is its unit tests' business.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providing_a_hundred_thousand_paths() {
    const N: usize = 100_000;
    const INTERVAL: Duration = Duration::from_secs(1_000);
    const WINDOW: Duration = Duration::from_secs(10);
    let rate = N as f64 / INTERVAL.as_secs_f64();
    init_tracing();
    let dirs: Vec<TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(&dirs[0], |c| c.provide_interval = INTERVAL).await;
    let b = start(&dirs[1], |c| c.peers = vec![tcp_addr(&a).to_string()]).await;
    wait_connected(&a, b.peer_id()).await;
    let a_id = a.peer_id();

    let k = keys(N, 1);
    let index: std::collections::HashMap<StorePathHash, usize> =
        k.iter().enumerate().map(|(i, h)| (*h, i)).collect();
    let mut events = a.events();
    let started = tokio::time::Instant::now();
    a.set_provided(k.clone());
    let mut announced = vec![];
    let mut seen = HashSet::new();
    loop {
        match tokio::time::timeout_at(started + WINDOW, events.recv()).await {
            Ok(Ok(NodeEvent::Announced(h))) => {
                let i = *index.get(&h).expect("an announced key is one of the set");
                assert!(seen.insert(i), "key {i} announced twice");
                announced.push(i);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("A's events: {e}"),
            Err(_) => break,
        }
        // The pacer allows one second's burst, and never more than the rate after it.
        let t = started.elapsed().as_secs_f64();
        assert!(
            announced.len() as f64 <= rate * (t + 1.0) + 1.0,
            "{} keys announced after {t:.2} s: faster than {rate} a second",
            announced.len()
        );
    }
    let t = started.elapsed().as_secs_f64();
    eprintln!("{} keys announced in {t:.2} s", announced.len());
    assert!(
        announced.len() as f64 >= 0.5 * rate * t,
        "{} keys announced in {t:.2} s: the pace for {N} keys is {rate} a second",
        announced.len()
    );
    assert!(
        announced.iter().filter(|&&i| i >= 50_000).count() > announced.len() / 4,
        "the announcements come from the first half of the set only"
    );

    // The records live in the DHT, not only in A's own store: C's allow-list keeps it from
    // asking A itself.
    let c = start(&dirs[2], |c| {
        c.peers = vec![tcp_addr(&b).to_string()];
        c.allowed_peers = Some([b.peer_id()].into());
    })
    .await;
    wait_connected(&c, b.peer_id()).await;
    let last = announced.len() - 1;
    for i in [announced[0], announced[last / 2], announced[last]] {
        assert!(
            find_provider(&c, &k[i], a_id).await,
            "key {i}: announced by A, but B does not hold the record"
        );
    }
    assert!(!c.connected_peers().await.contains(&a_id));
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

fn psk(byte: u8) -> PreSharedKey {
    PreSharedKey::new([byte; 32])
}

#[tokio::test]
async fn swarm_key_file_roundtrip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("swarm.key");
    let key = PreSharedKey::new([0x5a; 32]);
    std::fs::write(&path, key.to_key_file()).unwrap();
    assert_eq!(
        read_swarm_key(&path).unwrap().fingerprint().to_string(),
        key.fingerprint().to_string()
    );
    std::fs::write(&path, "/key/swarm/psk/1.0.0/\n/base16/\nnothex\n").unwrap();
    assert!(read_swarm_key(&path).is_err());
    assert!(read_swarm_key(&dir.path().join("missing")).is_err());
}

#[tokio::test]
async fn private_swarm_keeps_outsiders_out() {
    init_tracing();
    let dirs: Vec<TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(&dirs[0], |c| c.swarm_key = Some(psk(1))).await;
    // QUIC cannot be protected by pnet, so a private node does not offer it.
    assert!(a
        .listen_addrs()
        .iter()
        .all(|x| !x.iter().any(|p| p == Protocol::QuicV1)));
    let b = start(&dirs[1], |c| c.swarm_key = Some(psk(1))).await;
    let c = start(&dirs[2], |c| c.swarm_key = Some(psk(2))).await;
    let d = start(&dirs[3], |_| {}).await;

    b.dial(tcp_addr(&a)).await.expect("same key connects");
    wait_connected(&a, b.peer_id()).await;

    // A failed pnet handshake only shows when multistream-select times out on the garbled
    // bytes, so the three refusals run side by side.
    let (wrong, none, out) = tokio::join!(
        tokio::time::timeout(WAIT, c.dial(tcp_addr(&a))),
        tokio::time::timeout(WAIT, d.dial(tcp_addr(&a))),
        // Nor can the private node reach out to them.
        tokio::time::timeout(WAIT, a.dial(tcp_addr(&d))),
    );
    assert!(
        matches!(wrong, Ok(Err(_))),
        "wrong key must fail: {wrong:?}"
    );
    assert!(matches!(none, Ok(Err(_))), "no key must fail: {none:?}");
    assert!(matches!(out, Ok(Err(_))), "{out:?}");

    let peers: HashSet<_> = a.connected_peers().await.into_iter().collect();
    assert_eq!(peers, HashSet::from([b.peer_id()]));
    for n in [a, b, c, d] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn allow_list_refuses_everyone_else() {
    init_tracing();
    let dirs: Vec<TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let b = start(&dirs[1], |_| {}).await;
    let c = start(&dirs[2], |_| {}).await;
    let a = start(&dirs[0], |cfg| {
        cfg.allowed_peers = Some(HashSet::from([b.peer_id()]))
    })
    .await;

    b.dial(tcp_addr(&a)).await.expect("allowed peer connects");
    let refused = tokio::time::timeout(WAIT, c.dial(tcp_addr(&a))).await;
    assert!(matches!(refused, Ok(Err(_))), "{refused:?}");
    // Outbound too: A does not reach out to peers outside its list.
    let out = tokio::time::timeout(WAIT, a.dial(tcp_addr(&c))).await;
    assert!(matches!(out, Ok(Err(_))), "{out:?}");

    assert_eq!(a.connected_peers().await, vec![b.peer_id()]);
    assert!(!c.connected_peers().await.contains(&a.peer_id()));
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn ban_disconnects_and_refuses() {
    init_tracing();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(&da, |_| {}).await;
    let b = start(&db, |_| {}).await;
    b.dial(tcp_addr(&a)).await.expect("connects before the ban");
    wait_connected(&a, b.peer_id()).await;

    let mut b_events = b.events();
    a.ban(b.peer_id(), "sent a corrupt chunk").await;
    assert!(
        wait_event(&mut b_events, |e| *e
            == NodeEvent::PeerDisconnected(a.peer_id()))
        .await
        .is_some(),
        "B is disconnected"
    );
    let redial = tokio::time::timeout(WAIT, b.dial(tcp_addr(&a))).await;
    assert!(matches!(redial, Ok(Err(_))), "{redial:?}");
    assert!(!a.connected_peers().await.contains(&b.peer_id()));
    let quic = a
        .listen_addrs()
        .into_iter()
        .find(|x| x.iter().any(|p| p == Protocol::QuicV1))
        .unwrap();
    let redial = tokio::time::timeout(WAIT, b.dial(quic)).await;
    assert!(matches!(redial, Ok(Err(_))), "over QUIC too: {redial:?}");
    a.shutdown().await;
    b.shutdown().await;
}

/// The network-namespace test: it needs root, so it lives in `needs_root` (see TESTING.md).
mod needs_root {
    use super::*;

    const CHILD_PREFIX: &str = "PEERIX-CHILD";

    fn running_as_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
            })
            .unwrap_or(false)
    }

    fn ip(args: &[&str]) -> Result<(), String> {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("ip {args:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Two namespaces joined by a veth pair, addressed from 10.231.0.0/24 inside them only, so
    /// no test traffic can leave them. Deleted on drop, whatever happened.
    struct NetnsPair {
        names: Vec<String>,
    }

    impl NetnsPair {
        fn create() -> Result<NetnsPair, String> {
            let pid = std::process::id();
            let mut pair = NetnsPair { names: Vec::new() };
            for side in ["a", "b"] {
                let name = format!("peerix-test-{side}-{pid}");
                ip(&["netns", "add", &name])?;
                pair.names.push(name);
            }
            let (a, b) = (pair.names[0].clone(), pair.names[1].clone());
            // Created inside the namespaces directly: the pair never exists in ours.
            ip(&[
                "link", "add", "pxa", "netns", &a, "type", "veth", "peer", "name", "pxb", "netns",
                &b,
            ])?;
            for (ns, dev, addr) in [(&a, "pxa", "10.231.0.1/24"), (&b, "pxb", "10.231.0.2/24")] {
                ip(&["-n", ns, "link", "set", "lo", "up"])?;
                ip(&["-n", ns, "addr", "add", addr, "dev", dev])?;
                ip(&["-n", ns, "link", "set", dev, "up"])?;
                ip(&["-n", ns, "route", "add", "224.0.0.0/4", "dev", dev])?;
            }
            Ok(pair)
        }
    }

    impl Drop for NetnsPair {
        fn drop(&mut self) {
            for name in &self.names {
                // Deleting a namespace also deletes the veth end inside it.
                if let Err(e) = ip(&["netns", "del", name]) {
                    eprintln!("cleanup: {e}");
                }
            }
        }
    }

    struct Child {
        proc: tokio::process::Child,
        _state: TempDir,
        lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
        id: Option<String>,
        found: HashSet<String>,
        connected: HashSet<String>,
    }

    fn spawn_child(ns: &str) -> Child {
        use tokio::io::AsyncBufReadExt;
        let state = tempfile::tempdir().unwrap();
        let mut proc = tokio::process::Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(env!("CARGO_BIN_EXE_peerix-swarm-mdns-node"))
            .arg(state.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn a child node");
        let stdout = proc.stdout.take().unwrap();
        Child {
            proc,
            _state: state,
            lines: tokio::io::BufReader::new(stdout).lines(),
            id: None,
            found: HashSet::new(),
            connected: HashSet::new(),
        }
    }

    impl Child {
        fn on_line(&mut self, line: &str) {
            let Some(rest) = line.strip_prefix(CHILD_PREFIX) else {
                return;
            };
            let mut words = rest.split_whitespace();
            match (words.next(), words.next()) {
                (Some("ID"), Some(id)) => self.id = Some(id.to_owned()),
                (Some("MDNS"), Some(peer)) => {
                    self.found.insert(peer.to_owned());
                }
                (Some("CONNECTED"), Some(peer)) => {
                    self.connected.insert(peer.to_owned());
                }
                _ => {}
            }
        }

        fn found(&self, other: &Child) -> bool {
            other.id.as_ref().is_some_and(|id| self.found.contains(id))
        }

        fn connected(&self, other: &Child) -> bool {
            other
                .id
                .as_ref()
                .is_some_and(|id| self.connected.contains(id))
        }
    }

    #[tokio::test]
    async fn mdns_discovers_peers_across_network_namespaces() {
        assert!(
            running_as_root(),
            "this test needs root (it creates network namespaces); scripts/test.sh leaves the \
         needs_root tests out for a normal user and names them"
        );
        let pair = NetnsPair::create().expect("set up network namespaces");
        let mut a = spawn_child(&pair.names[0]);
        let mut b = spawn_child(&pair.names[1]);

        let outcome = tokio::time::timeout(WAIT, async {
            // What a user sees: mDNS found a neighbour and the two are connected. Which side
            // hears of the other first is mDNS timing: the node that started first sent its
            // first queries before the other was there, and the one that starts second finds
            // it at once and dials it.
            while !((a.found(&b) || b.found(&a)) && a.connected(&b) && b.connected(&a)) {
                tokio::select! {
                    line = a.lines.next_line() => match line {
                        Ok(Some(l)) => {
                            eprintln!("[child A] {l}");
                            a.on_line(&l)
                        }
                        other => return Err(format!("child A ended: {other:?}")),
                    },
                    line = b.lines.next_line() => match line {
                        Ok(Some(l)) => {
                            eprintln!("[child B] {l}");
                            b.on_line(&l)
                        }
                        other => return Err(format!("child B ended: {other:?}")),
                    },
                }
            }
            Ok(())
        })
        .await;

        // Closing stdin asks the children to stop.
        drop(a.proc.stdin.take());
        drop(b.proc.stdin.take());
        for c in [&mut a, &mut b] {
            if tokio::time::timeout(WAIT, c.proc.wait()).await.is_err() {
                let _ = c.proc.kill().await;
            }
        }
        drop(pair);

        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => panic!(
                "no mDNS discovery and connection: A={:?} found {:?} connected {:?}, B={:?} \
                 found {:?} connected {:?}",
                a.id, a.found, a.connected, b.id, b.found, b.connected
            ),
        }
    }
}

/// B's view of A: the address of the connection new streams take, and how many of B's
/// connections to A a keep-alive holds open.
async fn path_to(b: &Node, a: &Node) -> (Option<Multiaddr>, usize) {
    let o = b.overview().await;
    o.peers
        .iter()
        .find(|p| p.peer == a.peer_id())
        .map_or((None, 0), |p| (p.addr.clone(), p.held))
}

fn is_tcp(a: &Multiaddr) -> bool {
    a.iter().any(|p| matches!(p, Protocol::Tcp(_)))
}

/// A peer told of by its QUIC address is dialled over TCP too once identified
/// (`swarm/src/node/tcp_too.rs`), and, being an explicit peer, held open over both: the TCP
/// connection, which new streams take, does not idle out between downloads.
#[tokio::test]
async fn an_explicit_peer_reached_over_quic_is_held_over_tcp_too() {
    init_tracing();
    let dirs: Vec<TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let short = |c: &mut NodeConfig| c.idle_timeout = Duration::from_millis(500);
    let a = start(&dirs[0], short).await;
    let quic = a
        .listen_addrs()
        .into_iter()
        .find(|x| x.iter().any(|p| p == Protocol::QuicV1))
        .unwrap();
    let b = start(&dirs[1], |c| {
        short(c);
        c.peers = vec![quic.to_string()];
    })
    .await;
    let c = start(&dirs[2], short).await;
    // The TCP dial follows A's identification over QUIC; once it is held, its connection is
    // the one shown. Subscribed before each look, so no hold goes unseen.
    let mut b_events = b.events();
    loop {
        let (addr, n) = path_to(&b, &a).await;
        if n == 2 && addr.as_ref().is_some_and(is_tcp) {
            break;
        }
        assert!(
            wait_event(&mut b_events, |e| *e
                == NodeEvent::ConnectionHeld(a.peer_id()))
            .await
            .is_some(),
            "B never held A over TCP too: {addr:?}, {n} connections held"
        );
    }
    // C's ordinary connection to A idles out twice over: by then any connection of B's that
    // is not held open has been idle longer than the timeout too.
    let mut c_events = c.events();
    for _ in 0..2 {
        c.dial(tcp_addr(&a)).await.unwrap();
        assert!(wait_event(&mut c_events, |e| *e
            == NodeEvent::PeerDisconnected(a.peer_id()))
        .await
        .is_some());
    }
    // Still held open, both: the QUIC connection B's dial made and the TCP one beside it (a
    // connection that closes leaves the count). Other connections come and go meanwhile
    // (AutoNAT's dial-backs), so the count of all of them says nothing.
    let (addr, n) = path_to(&b, &a).await;
    assert_eq!(n, 2, "B's connections to A held open, {addr:?} shown");
    assert!(addr.as_ref().is_some_and(is_tcp), "{addr:?}");
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test]
async fn explicit_connections_outlive_the_idle_timeout() {
    init_tracing();
    let dirs: Vec<TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let short = |c: &mut NodeConfig| c.idle_timeout = Duration::from_millis(500);
    let a = start(&dirs[0], short).await;
    let b = start(&dirs[1], |c| {
        short(c);
        c.peers = vec![tcp_addr(&a).to_string()];
    })
    .await;
    let c = start(&dirs[2], short).await;
    wait_connected(&b, a.peer_id()).await;
    let mut b_events = b.events();
    let mut c_events = c.events();
    c.dial(tcp_addr(&a)).await.unwrap();

    // C's connection to A, an ordinary one, idles out, twice over: by then any connection of
    // B's without a keep-alive has been idle longer than the timeout too.
    for round in 0..2 {
        if round > 0 {
            c.dial(tcp_addr(&a)).await.unwrap();
        }
        assert!(wait_event(&mut c_events, |e| *e
            == NodeEvent::PeerDisconnected(a.peer_id()))
        .await
        .is_some());
    }
    // ...while B's, to a peer it was told about, stays up all that time.
    assert!(b.connected_peers().await.contains(&a.peer_id()));
    while let Ok(e) = b_events.try_recv() {
        assert_ne!(e, NodeEvent::PeerDisconnected(a.peer_id()));
    }
    for n in [a, b, c] {
        n.shutdown().await;
    }
}
