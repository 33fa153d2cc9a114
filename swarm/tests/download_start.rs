//! How a download starts between real libp2p nodes over loopback: peers that said they hold the
//! whole NAR are asked for runs at once, the others are asked which chunks they hold and join
//! as their answers come.

use std::time::Duration;

use bytes::Bytes;
use peerix_chunkstore::Manifest;
use peerix_swarm::download::{download, DownloadConfig, DownloadReport, Peers};
use peerix_swarm::{Client, ClientConfig, ServeLimits};
use peerix_test_support::fixtures::store_path;
use peerix_test_support::swarm::*;
use tokio::sync::mpsc;

/// A bound on every download here, so a download that waits for an answer never given fails
/// instead of hanging.
const BOUND: Duration = Duration::from_secs(120);

/// Download `m` from `peers` with request timeouts far beyond [`BOUND`], so that nothing but
/// the scheduler itself can get past a silent peer; the report and the output.
async fn fetch(
    leecher: &Node,
    m: &Manifest,
    peers: Peers,
    cfg: DownloadConfig,
) -> (DownloadReport, Vec<u8>) {
    let hour = Duration::from_secs(3600);
    let cfg = DownloadConfig {
        min_timeout: hour,
        timeout_per_mib: hour,
        ..cfg
    };
    let client = Client::with_config(
        leecher.control.clone(),
        ClientConfig {
            min_timeout: hour,
            per_mib: hour,
        },
    );
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let dl = download(client, leecher.store.clone(), m.clone(), peers, cfg, tx);
    let consume = async {
        let mut got = vec![];
        while let Some(b) = rx.recv().await {
            got.extend_from_slice(&b);
        }
        got
    };
    let (outcome, got) = tokio::time::timeout(BOUND, async { tokio::join!(dl, consume) })
        .await
        .expect("the download waited for an answer that never came");
    (outcome.into_result().expect("the download"), got)
}

/// A peer that takes the question of which chunks it holds and never answers does not hold
/// up a download from a peer that holds the whole NAR.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_says_what_it_holds_does_not_hold_up_the_start() {
    init_tracing();
    let (leecher, mut seeders) = cluster(2).await;
    let data = nar_bytes(30, 4 << 20);
    let mut m = None;
    for s in &mut seeders {
        m = Some(s.ingest(&data));
    }
    let m = m.unwrap();
    seeders[0].serve_sharing(&m);
    serve_rogue(&mut seeders[1], Rogue::StallHave);
    let peers = Peers {
        whole: vec![seeders[0].peer],
        some: vec![seeders[1].peer],
    };
    let (report, got) = fetch(&leecher, &m, peers, small_runs()).await;
    assert!(got == data, "output differs from the NAR");
    assert_eq!(report.bytes_per_peer.get(&seeders[1].peer), None);
    assert!(report.bad_peers.is_empty(), "silence is no lie: {report:?}");
}

/// A peer asked which chunks it holds takes runs once it has answered, beside a peer that
/// holds the whole NAR (capped, so that the download is still going then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_answers_takes_runs_beside_the_holders() {
    init_tracing();
    let (leecher, mut seeders) = cluster(2).await;
    let data = nar_bytes(31, 8 << 20);
    let mut m = None;
    for s in &mut seeders {
        m = Some(s.ingest(&data));
    }
    let m = m.unwrap();
    let capped = ServeLimits {
        max_upload_rate: std::num::NonZeroU32::new(2 << 20),
        ..ServeLimits::default()
    };
    seeders[0].serve(catalog(&[narinfo(store_path(0), &m)]), capped);
    seeders[1].serve_sharing(&m);
    let peers = Peers {
        whole: vec![seeders[0].peer],
        some: vec![seeders[1].peer],
    };
    let (report, got) = fetch(&leecher, &m, peers, small_runs()).await;
    assert!(got == data, "output differs from the NAR");
    for s in &seeders {
        let n = report.bytes_per_peer.get(&s.peer).copied().unwrap_or(0);
        assert!(n > 0, "seeder {} served nothing: {report:?}", s.peer);
    }
}

/// A peer that said it holds the whole NAR but lacks every other chunk: what it lacks is cut
/// into runs again and fetched from the peer whose answer says it holds them. Runs of 2 MiB
/// span several chunks (256 KiB on average), so that peer holds no run of the first cut in
/// full and can take none before the cut again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_a_holder_lacks_come_from_the_peers_that_have_them() {
    init_tracing();
    let origin = Node::new().await;
    let data = nar_bytes(32, 4 << 20);
    let m = origin.ingest(&data);
    assert!(m.chunks.len() >= 4, "{} chunks", m.chunks.len());
    let (leecher, mut seeders) = cluster(2).await;
    hold_in_part(&seeders, &m, &data, |k, i, _| i % 2 == k);
    for s in &mut seeders {
        s.serve_sharing(&m);
    }
    let peers = Peers {
        whole: vec![seeders[0].peer],
        some: vec![seeders[1].peer],
    };
    let (report, got) = fetch(&leecher, &m, peers, DownloadConfig::default()).await;
    assert!(got == data, "output differs from the NAR");
    let sent = |k: usize| report.bytes_per_peer.get(&seeders[k].peer).copied();
    let odd: u64 = m
        .chunks
        .iter()
        .skip(1)
        .step_by(2)
        .map(|c| u64::from(c.len))
        .sum();
    assert_eq!(sent(1), Some(odd), "{report:?}");
    assert_eq!(sent(0), Some(m.nar_size - odd), "{report:?}");
    assert!(report.bad_peers.is_empty(), "lacking is no lie: {report:?}");
}
