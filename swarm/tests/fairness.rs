//! Two claims of the README, between real libp2p nodes over loopback: upload slots are shared
//! fairly between requesting peers, and the downloader keeps requests in flight to each peer
//! in proportion to the rate it measures. Every assertion is a ratio or a count, never a time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use libp2p::PeerId;
use peerix_chunkstore::Manifest;
use peerix_swarm::download::{download, DownloadConfig, DownloadReport};
use peerix_swarm::protocol::{self, Request};
use peerix_swarm::server::ServeLimits;
use peerix_swarm::{ClientError, PROTOCOL};
use peerix_test_support::fixtures::store_path;
use peerix_test_support::swarm::*;
use tokio::sync::mpsc;

/// Download `m` from `peers` into `leecher`, the output drained as it comes.
async fn fetch(
    leecher: Arc<Node>,
    m: Manifest,
    peers: Vec<PeerId>,
    cfg: DownloadConfig,
) -> DownloadReport {
    let (tx, mut rx) = mpsc::channel::<Bytes>(8);
    let drain = tokio::spawn(async move {
        let mut n = 0usize;
        while let Some(b) = rx.recv().await {
            n += b.len();
        }
        n
    });
    let outcome = download(
        leecher.client(),
        leecher.store.clone(),
        m.clone(),
        peers.into(),
        cfg,
        tx,
    )
    .await;
    let report = outcome.into_result().expect("download");
    assert_eq!(drain.await.unwrap() as u64, m.nar_size);
    report
}

/// A peer that keeps `depth` chunks requests open at a server and reads every answer at the
/// same slow pace, so the bytes it gets are in proportion to the upload slots it holds.
/// Stops once `stop` is set; returns how many requests were answered Busy.
async fn paced_reader(
    node: Arc<Node>,
    server: PeerId,
    m: Manifest,
    depth: usize,
    done: Arc<tokio::sync::watch::Sender<usize>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    let busy = Arc::new(AtomicUsize::new(0));
    let mut lanes = vec![];
    for lane in 0..depth {
        let (client, m, done, stop, busy) = (
            node.client(),
            m.clone(),
            done.clone(),
            stop.clone(),
            busy.clone(),
        );
        lanes.push(tokio::spawn(async move {
            let mut at = lane * 16;
            while !stop.load(Ordering::SeqCst) {
                let refs: Vec<_> = (0..16)
                    .map(|i| m.chunks[(at + i) % m.chunks.len()])
                    .collect();
                at += 16 * depth;
                let mut answer = Box::pin(client.fetch_chunks(server, refs));
                while let Some(item) = answer.next().await {
                    match item {
                        // The reader's own pace (a slow consumer), not a wait for anything:
                        // it makes the bytes a peer gets follow the slots it holds.
                        Ok(_) => tokio::time::sleep(Duration::from_millis(2)).await,
                        Err(ClientError::Busy { .. }) => {
                            busy.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                        // A stream that failed under it: asked again.
                        Err(ClientError::Protocol { .. }) => break,
                        Err(e) => panic!("{e}"),
                    }
                }
                done.send_modify(|n| *n += 1);
            }
        }));
    }
    for l in lanes {
        l.await.unwrap();
    }
    busy.load(Ordering::SeqCst)
}

/// One server with 4 upload slots; a greedy peer keeping 48 requests open and a modest one
/// keeping 2, both reading at the same pace. Fair shares are 2 slots each while both ask; of
/// those, a peer's requests for runs are answered one at a time (`answer_chunks`), the other
/// waiting its turn. Measured here: the modest peer is served 1.23–1.30 × the greedy one's
/// bytes with the fair share, 0.08–0.14 × without it (every slot up for grabs, most of them
/// won by the greedy peer's many waiting requests, and the modest one answered Busy). Before
/// runs were answered in turn, bytes followed the slots each held: 0.52–0.77 with the fair
/// share, 0.17–0.23 without. A peer that holds no slot and has no request waiting, even for
/// the moment between two requests, is not counted as asking, and the slots it gave up go to
/// the others until their requests end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_slots_are_shared_between_requesting_peers() {
    init_tracing();
    let mut server = Node::new().await;
    let m = server.ingest(&nar_bytes(40, 16 << 20));
    server.serve(
        catalog(&[narinfo(store_path(40), &m)]),
        ServeLimits {
            max_chunk_requests: 4,
            ..ServeLimits::default()
        },
    );
    let greedy = Arc::new(Node::new().await);
    let modest = Arc::new(Node::new().await);
    greedy.connect(&server).await;
    modest.connect(&server).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (g_done, mut g_count) = tokio::sync::watch::channel(0usize);
    let (g_done, m_done) = (
        Arc::new(g_done),
        Arc::new(tokio::sync::watch::channel(0usize).0),
    );
    let g = tokio::spawn(paced_reader(
        greedy.clone(),
        server.peer,
        m.clone(),
        12,
        g_done.clone(),
        stop.clone(),
    ));
    let md = tokio::spawn(paced_reader(
        modest.clone(),
        server.peer,
        m.clone(),
        2,
        m_done.clone(),
        stop.clone(),
    ));
    // Both ask all along; the measure is taken after a fixed amount of the greedy one's work.
    g_count.wait_for(|n| *n >= 240).await.unwrap();
    let served = server.handle.as_ref().unwrap().bytes_served();
    stop.store(true, Ordering::SeqCst);
    let (g_busy, m_busy) = (g.await.unwrap(), md.await.unwrap());
    let gb = served.get(&greedy.peer).copied().unwrap_or(0) as f64;
    let mb = served.get(&modest.peer).copied().unwrap_or(0) as f64;
    let ratio = mb / gb;
    eprintln!(
        "served: greedy {gb} ({g_busy} busy), modest {mb} ({m_busy} busy), modest/greedy {ratio:.2}"
    );
    // Fair shares gave 0.39–0.77 on a loaded 2-core machine (1.23–1.30 since runs are
    // answered in turn); without the per-peer share the modest peer got 0.08–0.23.
    assert!(
        ratio >= 0.3,
        "unfair shares: greedy {gb} bytes, modest {mb} bytes"
    );
}

/// Counts the chunks requests a test server is answering at once.
#[derive(Default)]
struct InFlight {
    now: AtomicUsize,
    peak: AtomicUsize,
}

struct Open(Arc<InFlight>);

impl Open {
    fn new(c: &Arc<InFlight>) -> Open {
        let n = c.now.fetch_add(1, Ordering::SeqCst) + 1;
        c.peak.fetch_max(n, Ordering::SeqCst);
        Open(c.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An honest server on the raw protocol whose uplink carries `bytes_per_sec` in all (every
/// chunk waits for its turn on one shared link), counting the chunks requests open at once.
fn serve_paced(node: &mut Node, bytes_per_sec: f64) -> Arc<InFlight> {
    let counts = Arc::new(InFlight::default());
    let link = Arc::new(tokio::sync::Mutex::new(tokio::time::Instant::now()));
    let mut control = node.control.clone();
    let store = node.store.clone();
    let mut incoming = control.accept(PROTOCOL).unwrap();
    let c = counts.clone();
    // The task ends with the test's runtime.
    tokio::spawn(async move {
        while let Some((_, mut s)) = incoming.next().await {
            let (store, link, counts) = (store.clone(), link.clone(), c.clone());
            tokio::spawn(async move {
                use futures::AsyncWriteExt;
                let Ok(req) = protocol::read_request(&mut s).await else {
                    return;
                };
                match req {
                    Request::Have { chunks, nars } => {
                        let r = protocol::HaveReply {
                            chunks: chunks.iter().map(|c| store.has_chunk(c).unwrap()).collect(),
                            nars: nars.iter().map(|_| protocol::NarState::None).collect(),
                        };
                        let _ = protocol::write_reply(&mut s, &protocol::Reply::Have(r)).await;
                    }
                    Request::Chunks(protocol::ChunksRequest { ids, .. }) => {
                        let _open = Open::new(&counts);
                        for id in ids {
                            let d = store.read_chunk(&id).ok();
                            let len = d.as_ref().map_or(0, Vec::len) as f64;
                            let turn = {
                                let mut next = link.lock().await;
                                let start = (*next).max(tokio::time::Instant::now());
                                *next = start + Duration::from_secs_f64(len / bytes_per_sec);
                                *next
                            };
                            tokio::time::sleep_until(turn).await;
                            if protocol::write_chunk(&mut s, &id, &d.into()).await.is_err() {
                                return;
                            }
                        }
                    }
                    _ => return,
                }
                let _ = s.close().await;
            });
        }
    });
    counts
}

/// Two seeders of the same NAR, one with a 32 times faster uplink. The downloader measures
/// each and keeps its requests in flight in proportion: many to the fast one, few to the
/// slow one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_follow_each_peers_rate() {
    init_tracing();
    let data = nar_bytes(41, 32 << 20);
    let leecher = Arc::new(Node::new().await);
    let mut fast = Node::new().await;
    let mut slow = Node::new().await;
    let m = fast.ingest(&data);
    slow.ingest(&data);
    let fast_count = serve_paced(&mut fast, 8.0 * 1024.0 * 1024.0);
    let slow_count = serve_paced(&mut slow, 256.0 * 1024.0);
    leecher.connect(&fast).await;
    leecher.connect(&slow).await;
    // One request to start with, so that any second one to the slow peer is min_in_flight's.
    let cfg = DownloadConfig {
        run_bytes: 256 * 1024,
        initial_in_flight: 1,
        ..DownloadConfig::default()
    };
    let report = fetch(leecher.clone(), m, vec![fast.peer, slow.peer], cfg).await;
    let per: HashMap<PeerId, u64> = report.bytes_per_peer.clone();
    let (fb, sb) = (
        per.get(&fast.peer).copied().unwrap_or(0),
        per.get(&slow.peer).copied().unwrap_or(0),
    );
    let (fp, sp) = (
        fast_count.peak.load(Ordering::SeqCst),
        slow_count.peak.load(Ordering::SeqCst),
    );
    eprintln!("bytes: fast {fb}, slow {sb}; most requests at once: fast {fp}, slow {sp}");
    assert!(sb > 0, "the slow peer was never used: {report:?}");
    assert!(fb >= 8 * sb, "fast {fb} bytes, slow {sb} bytes");
    // The server counts a request open until it notices the requester dropped it, so the slow
    // peer's peak includes endgame races and their aborted losers: compare, do not pin. With
    // the target pinned at the maximum both peers saw 16; pinned at the start, the fast one
    // saw no more than the slow one.
    assert!(
        fp >= 2 * sp,
        "{fp} requests at once to the fast peer, {sp} to the slow one"
    );
    // Even the slow peer, whose rate warrants less than one run in flight, has its next run
    // on the way while one arrives (`min_in_flight`), so no round trip leaves it idle.
    assert!(sp >= 2, "at most {sp} request at once to the slow peer");
}

/// Requests that arrive together are all answered: none is dropped before the server sees
/// it. libp2p-stream 0.5.0-alpha as published hands inbound streams to the server through one
/// `mpsc::channel(0)` per protocol (room for one stream, whatever the connection) and drops a
/// stream that finds it taken ("Channel is full, dropping inbound stream"), so a burst (the
/// downloader then sent up to 16 requests at once when a peer's target grew) lost 11 and 21 of
/// 160 here; the requester saw "connection is closed" and counted a failure, and three in a
/// row dropped the peer from that download. peerix builds a copy with room for a burst
/// (vendor/libp2p-stream/PEERIX.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_requests_is_answered_in_full() {
    init_tracing();
    let mut server = Node::new().await;
    let m = server.ingest(&nar_bytes(42, 4 << 20));
    server.serve_sharing(&m);
    let leecher = Node::new().await;
    leecher.connect(&server).await;
    let client = leecher.client();
    let mut dropped = 0;
    for round in 0..10 {
        let asks = (0..16).map(|i| {
            let refs = vec![m.chunks[(round * 16 + i) % m.chunks.len()]];
            let mut answer = Box::pin(client.fetch_chunks(server.peer, refs));
            async move { answer.next().await.unwrap() }
        });
        for r in futures::future::join_all(asks).await {
            match r {
                Ok(_) => {}
                Err(ClientError::Protocol { .. }) => dropped += 1,
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert_eq!(dropped, 0, "{dropped} of 160 requests dropped");
}
