//! The order in which a peer's chunks requests are answered, between real libp2p nodes over
//! loopback: a server answers one peer's requests for runs of chunks one after the other, in
//! the order they came, while a request for a single chunk goes beside them and a stalled run
//! gives up its turn; and a download
//! sends a peer one request until that peer's first chunk is in, so that its requests reach the
//! peer in NAR order.

use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use peerix_chunkstore::Manifest;
use peerix_swarm::download::{download, DownloadConfig, DownloadError, Peers};
use peerix_swarm::{Client, ClientConfig, ServeLimits};
use peerix_test_support::fixtures::store_path;
use peerix_test_support::swarm::*;
use tokio::sync::mpsc;

/// A bound on every wait here: what is asserted never comes near it.
const BOUND: Duration = Duration::from_secs(120);

/// A server of one NAR of `mib` MiB whose uplink is capped at `cap` bytes a second (none: no
/// cap), writes allowed to wait an hour; and a client node connected to it.
async fn serving(seed: u64, mib: usize, cap: Option<u32>) -> (Node, Node, Manifest) {
    let mut server = Node::new().await;
    let m = server.ingest(&nar_bytes(seed, mib << 20));
    server.serve(
        catalog(&[narinfo(store_path(seed as u8), &m)]),
        ServeLimits {
            max_upload_rate: cap.map(|c| NonZeroU32::new(c).unwrap()),
            write_timeout: Duration::from_secs(3600),
            ..ServeLimits::default()
        },
    );
    let client = Node::new().await;
    client.connect(&server).await;
    (server, client, m)
}

/// Two requests for runs of chunks, the second sent while the first is being answered: every
/// chunk of the first arrives before any of the second. Chunks are paced by the server's
/// upload cap, so that side by side the second's would come between the first's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peers_runs_are_answered_one_after_the_other() {
    init_tracing();
    let (server, client_node, m) = serving(60, 8, Some(2 << 20)).await;
    let client = client_node.client();
    let (a_refs, b_refs) = (m.chunks[..6].to_vec(), m.chunks[6..8].to_vec());
    // Fused: the loop below polls a stream that has ended again.
    let mut a = Box::pin(client.fetch_chunks(server.peer, a_refs).fuse());
    let mut b = Box::pin(client.fetch_chunks(server.peer, b_refs).fuse());
    let order = tokio::time::timeout(BOUND, async {
        a.next()
            .await
            .unwrap()
            .expect("the first run's first chunk");
        let mut order = vec!['a'];
        // The first run is read first whenever a chunk of it is in: a chunk of the second
        // is taken only when the first has none ready.
        loop {
            let next = tokio::select! {
                biased;
                Some(r) = a.next() => ('a', r),
                Some(r) = b.next() => ('b', r),
                else => break,
            };
            next.1.expect("a chunk");
            order.push(next.0);
        }
        order
    })
    .await
    .expect("both answers within the bound");
    let order: String = order.into_iter().collect();
    assert_eq!(order, "aaaaaabb", "the order chunks arrived in");
}

/// A peer's run held up (its requester reads no further than the first chunk, so the server's
/// writes wait on the stream's window, here for up to an hour) holds up only itself: that
/// peer's request for a single chunk, as a small store path is, is answered beside it, and its
/// next run once the stalled one has taken no chunk for the server's queue timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_run_holds_up_only_itself() {
    init_tracing();
    let (server, client_node, m) = serving(61, 8, None).await;
    // Timeouts of our own far beyond the bound: only the server's turn may end the wait.
    let hour = Duration::from_secs(3600);
    let client = Client::with_config(
        client_node.control.clone(),
        ClientConfig {
            min_timeout: hour,
            per_mib: hour,
        },
    );
    let mut run = Box::pin(client.fetch_chunks(server.peer, m.chunks[..16].to_vec()));
    let mut one = Box::pin(client.fetch_chunks(server.peer, m.chunks[20..21].to_vec()));
    let mut next = Box::pin(client.fetch_chunks(server.peer, m.chunks[24..26].to_vec()));
    tokio::time::timeout(BOUND, async {
        run.next().await.unwrap().expect("the run's first chunk");
        let c = one.next().await.unwrap().expect("the single chunk");
        assert_eq!(*c.id(), m.chunks[20].id);
        for want in &m.chunks[24..26] {
            let c = next.next().await.unwrap().expect("the next run's chunks");
            assert_eq!(*c.id(), want.id);
        }
    })
    .await
    .expect("the single chunk and the next run within the bound");
    drop(run);
}

/// At the start of a download from one peer that answers in turn, the first run is asked
/// alone, and the next only once a chunk of it is in: sent together, the two requests could
/// reach the peer in either order, and the output would then wait for the second run to be
/// sent whole before the first began. Checked over several downloads, each by a fresh node,
/// at the moment the first bytes come out: nothing past the first run has arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_asks_a_peer_for_one_run_until_it_answers() {
    init_tracing();
    let (server, _, m) = serving(62, 8, Some(8 << 20)).await;
    let cfg = DownloadConfig::default();
    // Runs are cut from the NAR's start: chunks while they fit in `run_bytes`.
    let mut first_run = 0;
    let mut bytes = 0u64;
    for c in &m.chunks {
        if first_run > 0 && bytes + u64::from(c.len) > cfg.run_bytes {
            break;
        }
        bytes += u64::from(c.len);
        first_run += 1;
    }
    for round in 0..6 {
        let leecher = Node::new().await;
        leecher.connect(&server).await;
        let (tx, mut rx) = mpsc::channel::<Bytes>(1);
        let peers = Peers {
            whole: vec![server.peer],
            some: vec![],
        };
        let dl = tokio::spawn(download(
            leecher.client(),
            leecher.store.clone(),
            m.clone(),
            peers,
            cfg.clone(),
            tx,
        ));
        tokio::time::timeout(BOUND, rx.recv())
            .await
            .expect("the first bytes within the bound")
            .expect("the first bytes");
        let early: Vec<usize> = (first_run..m.chunks.len())
            .filter(|&i| leecher.store.has_chunk(&m.chunks[i].id).unwrap())
            .collect();
        assert!(
            early.is_empty(),
            "download {round}: chunks {early:?}, past the first run ({first_run} chunks), \
             arrived before the first bytes came out"
        );
        drop(rx);
        let outcome = dl.await.unwrap();
        assert!(matches!(
            outcome.into_result(),
            Err(DownloadError::OutputClosed)
        ));
        leecher.kill();
    }
}
