//! The multi-peer downloader between real libp2p nodes over loopback.

use bytes::Bytes;
use peerix_chunkstore::Manifest;
use peerix_swarm::download::{download, DownloadConfig, DownloadError, DownloadReport};
use peerix_swarm::ServeLimits;
use peerix_test_support::fixtures::store_path;
use peerix_test_support::swarm::*;
use tokio::sync::mpsc;

/// Run a download while a consumer collects the output; `on_chunk` runs after each chunk.
async fn fetch(
    leecher: &Node,
    m: &Manifest,
    peers: &[&Node],
    cfg: DownloadConfig,
    out_capacity: usize,
    mut on_chunk: impl FnMut(usize) + Send,
) -> (Result<DownloadReport, DownloadError>, Vec<u8>) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(out_capacity);
    let dl = download(
        leecher.client(),
        leecher.store.clone(),
        m.clone(),
        peers.iter().map(|p| p.peer).collect(),
        cfg,
        tx,
    );
    let consume = async {
        let mut got = vec![];
        while let Some(b) = rx.recv().await {
            got.extend_from_slice(&b);
            on_chunk(got.len());
        }
        got
    };
    let (outcome, got) = tokio::join!(dl, consume);
    (outcome.into_result(), got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_seeders_share_the_load() {
    init_tracing();
    let (leecher, mut seeders) = cluster(3).await;
    let data = nar_bytes(10, 8 << 20);
    let mut m = None;
    for s in &mut seeders {
        let sm = s.ingest(&data);
        s.serve_sharing(&sm);
        m = Some(sm);
    }
    let m = m.unwrap();
    let peers: Vec<&Node> = seeders.iter().collect();
    let (r, got) = fetch(&leecher, &m, &peers, small_runs(), 4, |_| {}).await;
    let report = r.unwrap();
    assert!(got == data, "output differs from the NAR");
    for s in &seeders {
        let n = report.bytes_per_peer.get(&s.peer).copied().unwrap_or(0);
        assert!(n > 0, "seeder {} served nothing: {report:?}", s.peer);
    }
    let total: u64 = report.bytes_per_peer.values().sum();
    assert_eq!(total - report.duplicate_bytes, data.len() as u64);
    assert_eq!(report.bytes_local, 0);
    assert!(report.bad_peers.is_empty());
    // The leecher now holds the NAR for good.
    assert!(leecher.store.manifest(&m.nar_hash).unwrap().is_some());
    assert!(leecher
        .store
        .partial_manifest(&m.nar_hash)
        .unwrap()
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_spread_so_that_no_peer_has_them_all() {
    init_tracing();
    let origin = Node::new().await;
    let data = nar_bytes(11, 4 << 20);
    let m = origin.ingest(&data);
    let (leecher, mut seeders) = cluster(3).await;
    // Seeder k lacks every third chunk starting at k: each chunk is on two seeders.
    hold_in_part(&seeders, &m, &data, |k, i, _| i % 3 != k);
    for s in &mut seeders {
        assert!(!s.store.missing(&m).unwrap().is_empty());
        s.serve_sharing(&m);
    }
    let peers: Vec<&Node> = seeders.iter().collect();
    let (r, got) = fetch(&leecher, &m, &peers, small_runs(), 4, |_| {}).await;
    let report = r.unwrap();
    assert!(got == data);
    assert!(report.bytes_per_peer.len() >= 2, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_mid_download() {
    init_tracing();
    let (leecher, mut seeders) = cluster(3).await;
    let data = nar_bytes(12, 6 << 20);
    let mut m = None;
    for s in &mut seeders {
        let sm = s.ingest(&data);
        s.serve_sharing(&sm);
        m = Some(sm);
    }
    let m = m.unwrap();
    let victim_handle = seeders[0].handle.clone().unwrap();
    let peers: Vec<&Node> = seeders.iter().collect();
    // A small window and a one-slot output keep the download in step with the consumer, so
    // it is still running when the victim goes.
    let cfg = DownloadConfig {
        run_bytes: 128 * 1024,
        window_bytes: 512 * 1024,
        ..DownloadConfig::default()
    };
    let (kill_tx, mut kill_rx) = mpsc::unbounded_channel();
    let mut asked = false;
    let mut killed_at = None;
    let dl = fetch(&leecher, &m, &peers, cfg, 1, |n| {
        if !asked && victim_handle.bytes_served().values().sum::<u64>() > 0 {
            asked = true;
            killed_at = Some(n);
            kill_tx.send(()).unwrap();
        }
    });
    let victim = &seeders[0];
    let killer = async {
        if kill_rx.recv().await.is_some() {
            victim.kill();
        }
    };
    let ((r, got), ()) = tokio::join!(dl, killer);
    let report = r.unwrap();
    assert!(got == data);
    let at = killed_at.expect("the victim served something");
    assert!(at < data.len(), "killed only after the end");
    let others: u64 = seeders[1..]
        .iter()
        .map(|s| report.bytes_per_peer.get(&s.peer).copied().unwrap_or(0))
        .sum();
    assert!(others > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_sending_corrupt_chunks_is_banned() {
    init_tracing();
    let (leecher, mut seeders) = cluster(3).await;
    let data = nar_bytes(13, 4 << 20);
    let mut m = None;
    for s in &mut seeders {
        m = Some(s.ingest(&data));
    }
    let m = m.unwrap();
    seeders[0].serve_sharing(&m);
    seeders[1].serve_sharing(&m);
    serve_rogue(&mut seeders[2], Rogue::Corrupt);
    let peers: Vec<&Node> = seeders.iter().collect();
    let (r, got) = fetch(&leecher, &m, &peers, small_runs(), 4, |_| {}).await;
    let report = r.unwrap();
    assert!(got == data);
    assert_eq!(report.bad_peers, vec![seeders[2].peer]);
    assert_eq!(report.bytes_per_peer.get(&seeders[2].peer), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_manifest_is_caught_before_the_last_chunk() {
    init_tracing();
    let (leecher, mut seeders) = cluster(3).await;
    let real = nar_bytes(14, 2 << 20);
    let other = nar_bytes(15, 3 << 20);
    let real_hash = peerix_nix::Sha256Hash::digest(&real);
    let mut other_m = None;
    for s in &mut seeders[..2] {
        let om = s.ingest(&other);
        s.serve_sharing(&om);
        other_m = Some(om);
    }
    seeders[2].ingest(&other);
    serve_rogue(&mut seeders[2], Rogue::LyingManifest(other_m.unwrap()));
    // The liar claims its manifest is that of `real`.
    let m = leecher
        .client()
        .manifest(seeders[2].peer, real_hash)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.nar_hash, real_hash);
    let peers: Vec<&Node> = seeders.iter().collect();
    let (r, got) = fetch(&leecher, &m, &peers, small_runs(), 4, |_| {}).await;
    match r {
        Err(DownloadError::NarHashMismatch { expected, .. }) => assert_eq!(expected, real_hash),
        other => panic!("expected a NarHash mismatch, got {other:?}"),
    }
    let last = u64::from(m.chunks.last().unwrap().len);
    assert_eq!(
        got.len() as u64,
        m.nar_size - last,
        "the last chunk went out"
    );
    assert!(leecher
        .store
        .partial_manifest(&real_hash)
        .unwrap()
        .is_none());
    assert!(leecher.store.manifest(&real_hash).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_missing_chunks_cross_the_wire() {
    init_tracing();
    let (leecher, mut seeders) = cluster(2).await;
    let v1 = nar_bytes(16, 4 << 20);
    let mut v2 = v1.clone();
    // A few local edits: most chunks stay the same.
    for at in [100_000usize, 2_000_000, 3_500_000] {
        for b in &mut v2[at..at + 100] {
            *b ^= 0x5a;
        }
    }
    leecher.ingest(&v1);
    let mut m = None;
    for s in &mut seeders {
        let sm = s.ingest(&v2);
        s.serve_sharing(&sm);
        m = Some(sm);
    }
    let m = m.unwrap();
    let missing: u64 = leecher
        .store
        .missing(&m)
        .unwrap()
        .iter()
        .map(|c| u64::from(c.len))
        .sum();
    assert!(missing > 0 && missing < m.nar_size / 2, "missing {missing}");
    let peers: Vec<&Node> = seeders.iter().collect();
    let (r, got) = fetch(&leecher, &m, &peers, small_runs(), 4, |_| {}).await;
    let report = r.unwrap();
    assert!(got == v2);
    let wire: u64 = report.bytes_per_peer.values().sum();
    assert_eq!(wire - report.duplicate_bytes, missing);
    assert_eq!(report.bytes_local + missing, m.nar_size);
}

/// The output reads chunks from the store ahead of the one it hands on: chunks held before the
/// download, chunks that arrived past `ARRIVALS_IN_MEMORY` while the output waited for a slow
/// peer, and chunks that occur twice in the NAR all come out in NAR order, and what was held
/// is counted as local.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_output_reads_ahead_held_and_stored_chunks_in_order() {
    init_tracing();
    let (a, b, c) = (
        nar_bytes(21, 2 << 20),
        nar_bytes(22, 14 << 20),
        nar_bytes(23, 1 << 20),
    );
    // A held part, a new part larger than the arrivals kept in memory, the held part again.
    let data = [&a[..], &b, &a, &c].concat();
    let origin = Node::new().await;
    let m = origin.ingest(&data);
    let (leecher, mut seeders) = cluster(2).await;
    leecher.ingest(&[&a[..], &c].concat());
    let missing = leecher.store.missing(&m).unwrap();
    let missing_bytes: u64 = missing.iter().map(|c| u64::from(c.len)).sum();
    assert!(missing_bytes >= 14 << 20, "missing {missing_bytes}");
    // The first new chunks only from a slow seeder (0), the rest from a fast one (1): the fast
    // one's chunks arrive far ahead of the output, which waits for the slow one's.
    let slow: std::collections::HashSet<_> = missing.iter().take(2).map(|c| c.id).collect();
    hold_in_part(&seeders, &m, &data, |k, i, _| {
        (k == 0) == slow.contains(&m.chunks[i].id)
    });
    for (s, rate) in seeders.iter_mut().zip([128 << 10, 64 << 20]) {
        let limits = ServeLimits {
            max_upload_rate: std::num::NonZeroU32::new(rate),
            ..ServeLimits::default()
        };
        s.serve(catalog(&[narinfo(store_path(0), &m)]), limits);
    }
    let peers: Vec<&Node> = seeders.iter().collect();
    // Bounded only so that an output that waits for a read never started fails the test.
    let (r, got) = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        fetch(&leecher, &m, &peers, small_runs(), 4, |_| {}),
    )
    .await
    .expect("the download hung");
    let report = r.unwrap();
    assert!(got == data, "output differs from the NAR");
    assert_eq!(report.bytes_local + missing_bytes, m.nar_size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_nobody_has_is_unavailable() {
    init_tracing();
    let origin = Node::new().await;
    let data = nar_bytes(17, 1 << 20);
    let m = origin.ingest(&data);
    let (leecher, mut seeders) = cluster(1).await;
    seeders[0].store.begin_download(&m).unwrap();
    seeders[0]
        .store
        .put_chunk(&m.chunks[0].id, &data[..m.chunks[0].len as usize])
        .unwrap();
    seeders[0].serve_sharing(&m);
    let peers: Vec<&Node> = seeders.iter().collect();
    let (r, got) = fetch(&leecher, &m, &peers, small_runs(), 4, |_| {}).await;
    assert!(matches!(r, Err(DownloadError::Unavailable { .. })), "{r:?}");
    assert!(got.is_empty());
}

/// The endgame: once every run is assigned, an idle peer races the requests still in flight.
/// One seeder takes its requests and never answers; with request timeouts far beyond the
/// test's deadline, only racing those runs on the honest seeder can finish the download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endgame_races_a_peer_that_never_answers() {
    init_tracing();
    let (leecher, mut seeders) = cluster(2).await;
    let data = nar_bytes(18, 2 << 20);
    let mut m = None;
    for s in &mut seeders {
        m = Some(s.ingest(&data));
    }
    let m = m.unwrap();
    seeders[0].serve_sharing(&m);
    serve_rogue(&mut seeders[1], Rogue::Stall);
    let hour = std::time::Duration::from_secs(3600);
    let cfg = DownloadConfig {
        min_timeout: hour,
        timeout_per_mib: hour,
        ..small_runs()
    };
    // The client's own request timeouts too, or they would requeue the silent peer's runs.
    let client = peerix_swarm::Client::with_config(
        leecher.control.clone(),
        peerix_swarm::ClientConfig {
            min_timeout: hour,
            per_mib: hour,
        },
    );
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let dl = download(
        client,
        leecher.store.clone(),
        m.clone(),
        seeders.iter().map(|s| s.peer).collect(),
        cfg,
        tx,
    );
    let consume = async {
        let mut got = vec![];
        while let Some(b) = rx.recv().await {
            got.extend_from_slice(&b);
        }
        got
    };
    let (outcome, got) = tokio::time::timeout(std::time::Duration::from_secs(120), async {
        tokio::join!(dl, consume)
    })
    .await
    .expect("the download waited on the silent peer");
    let r = outcome.into_result();
    let report = r.unwrap();
    assert!(got == data);
    assert_eq!(report.bytes_per_peer.get(&seeders[1].peer), None);
    assert!(report.bad_peers.is_empty(), "silence is no lie: {report:?}");
}

/// A raced run is split between the two peers, not sent twice: the racer asks for the run
/// from its end, and the run is done where the two requests meet. Seeders A and B, capped
/// alike, hold the first 8 MiB of the NAR: two runs (a request asks for at most 64 chunks),
/// A takes the first, B the second, and B, done first with the shorter one, races A's. Only C
/// holds the last 2 MiB, capped so low that the download is still going when A and B meet,
/// and would still be going had they each sent the whole run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raced_run_is_split_between_the_peers_not_sent_twice() {
    init_tracing();
    let origin = Node::new().await;
    let data = nar_bytes(19, 10 << 20);
    let m = origin.ingest(&data);
    let (leecher, mut seeders) = cluster(3).await;
    // A and B (0 and 1) hold the first 8 MiB, C the rest.
    let split = 8 << 20;
    hold_in_part(&seeders, &m, &data, |k, _, off| (off < split) == (k < 2));
    let first: u64 = m
        .offsets()
        .filter(|&(off, _)| off < split)
        .map(|(_, c)| u64::from(c.len))
        .sum();
    for (s, rate) in seeders.iter_mut().zip([8 << 20, 8 << 20, 1 << 20]) {
        let limits = ServeLimits {
            max_upload_rate: std::num::NonZeroU32::new(rate),
            ..ServeLimits::default()
        };
        s.serve(catalog(&[narinfo(store_path(0), &m)]), limits);
    }
    let cfg = DownloadConfig {
        run_bytes: 16 << 20,
        ..DownloadConfig::default()
    };
    let peers: Vec<&Node> = seeders.iter().collect();
    let (r, got) = fetch(&leecher, &m, &peers, cfg, 4, |_| {}).await;
    let report = r.unwrap();
    assert!(got == data, "output differs from the NAR");
    for s in &seeders[..2] {
        let n = report.bytes_per_peer.get(&s.peer).copied().unwrap_or(0);
        assert!(
            n >= first / 4,
            "seeder {} sent {n} of the {first} bytes A and B hold: {report:?}",
            s.peer
        );
    }
    // Only what both were sending when they met can come twice.
    let largest = m.chunks.iter().map(|c| u64::from(c.len)).max().unwrap();
    assert!(
        report.duplicate_bytes <= 2 * largest,
        "{} bytes came twice (largest chunk {largest}): {report:?}",
        report.duplicate_bytes
    );
    let total: u64 = report.bytes_per_peer.values().sum();
    assert_eq!(total - report.duplicate_bytes, data.len() as u64);
}

/// A seeder capped at 2 MiB/s serves two leechers at once: together they get no more than the
/// cap (beyond the bucket's first 200 KiB), and neither waits for the other to finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cap_holds_and_is_shared_between_peers() {
    init_tracing();
    const RATE: u32 = 2 << 20;
    let mut seeder = Node::new().await;
    let data = nar_bytes(12, 6 << 20);
    let m = seeder.ingest(&data);
    let limits = ServeLimits {
        max_upload_rate: std::num::NonZeroU32::new(RATE),
        ..ServeLimits::default()
    };
    seeder.serve(catalog(&[narinfo(store_path(0), &m)]), limits);
    let (a, b) = (Node::new().await, Node::new().await);
    a.connect(&seeder).await;
    b.connect(&seeder).await;
    let started = tokio::time::Instant::now();
    let leech = |n| leech_timed(n, &m, &seeder, &data, started);
    let (ta, tb) = tokio::join!(leech(&a), leech(&b));
    let (first, last) = (ta.min(tb), ta.max(tb));
    // 12 MiB at 2 MiB/s, the first 200 KiB free: never faster than this, however idle the
    // machine (a busy one only makes it slower).
    let least = (12.0 * 1048576.0 - 204800.0) / f64::from(RATE);
    assert!(
        last.as_secs_f64() >= least,
        "12 MiB went out in {last:?}, faster than the cap allows ({least:.1} s)"
    );
    // Shared: the one that finished first did not have the link to itself.
    assert!(
        first.as_secs_f64() >= 0.6 * last.as_secs_f64(),
        "one finished at {first:?}, the other at {last:?}"
    );
}

/// The upload cap spares peers on the LAN: a LAN peer's download goes out unpaced, a peer
/// beyond it is paced, byte for byte; and with `cap_lan` the LAN peer is paced too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upload_cap_spares_lan_peers_unless_told() {
    init_tracing();
    for cap_lan in [false, true] {
        let mut seeder = Node::new().await;
        let data = nar_bytes(13, 2 << 20);
        let m = seeder.ingest(&data);
        let (lan, wan) = (Node::new().await, Node::new().await);
        let lan_peer = lan.peer;
        let limits = ServeLimits {
            max_upload_rate: std::num::NonZeroU32::new(16 << 20),
            cap_lan,
            ..ServeLimits::default()
        };
        seeder.serve_with_lan(catalog(&[narinfo(store_path(0), &m)]), limits, move |p| {
            *p == lan_peer
        });
        lan.connect(&seeder).await;
        wan.connect(&seeder).await;
        let handle = seeder.handle.clone().unwrap();
        let started = tokio::time::Instant::now();
        leech_timed(&lan, &m, &seeder, &data, started).await;
        let after_lan = handle.capped_bytes();
        leech_timed(&wan, &m, &seeder, &data, started).await;
        let after_wan = handle.capped_bytes();
        let n = data.len() as u64;
        if cap_lan {
            assert!(
                after_lan >= n,
                "cap_lan: {after_lan} bytes paced for {n} sent"
            );
        } else {
            assert_eq!(after_lan, 0, "the LAN peer's chunks were paced");
        }
        assert!(
            after_wan - after_lan >= n,
            "only {} bytes paced for the {n} sent beyond the LAN",
            after_wan - after_lan
        );
    }
}

/// Download `m` from `seeder` whole; the time since `started` when it ended.
async fn leech_timed(
    n: &Node,
    m: &Manifest,
    seeder: &Node,
    data: &[u8],
    started: tokio::time::Instant,
) -> std::time::Duration {
    let (r, got) = fetch(n, m, &[seeder], small_runs(), 4, |_| {}).await;
    r.expect("the download completes under the cap");
    assert!(got == data, "output differs from the NAR");
    started.elapsed()
}
