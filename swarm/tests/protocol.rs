//! The peer protocol between real libp2p nodes over loopback.

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use peerix_chunkstore::{ChunkId, ChunkRef};
use peerix_swarm::client::ClientError;
use peerix_swarm::protocol::{Kind, NarState, MAX_CHUNKS_PER_REQUEST};
use peerix_swarm::server::{ServeLimits, ServerEvent};
use peerix_swarm::PROTOCOL;
use peerix_test_support::fixtures::store_path;
use peerix_test_support::swarm::*;

/// A bound on every wait, so a broken test fails instead of hanging.
const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_manifest_have_chunks_round_trip() {
    init_tracing();
    let mut a = Node::new().await;
    let b = Node::new().await;
    let data = nar_bytes(1, 3 << 20);
    let m = a.ingest(&data);
    assert!(m.chunks.len() > 20, "{} chunks", m.chunks.len());
    let info = narinfo(store_path(1), &m);
    a.serve(catalog(std::slice::from_ref(&info)), ServeLimits::default());
    b.connect(&a).await;
    let c = b.client();

    // Lookup: only what the catalog shares.
    let found = c
        .lookup(a.peer, &[store_path(1).hash(), store_path(2).hash()])
        .await
        .unwrap();
    assert_eq!(found, vec![info.clone()]);

    // Manifest.
    assert_eq!(
        c.manifest(a.peer, m.nar_hash).await.unwrap(),
        Some(m.clone())
    );
    assert_eq!(c.manifest(a.peer, unknown_hash(1)).await.unwrap(), None);

    // Have, including a download in progress on the other side.
    let stranger = ChunkId([9; 32]);
    let ids = [m.chunks[0].id, stranger, m.chunks[5].id];
    let r = c
        .have(a.peer, &ids, &[m.nar_hash, unknown_hash(1)])
        .await
        .unwrap();
    assert_eq!(r.chunks, vec![true, false, true]);
    assert_eq!(r.nars, vec![NarState::Complete, NarState::None]);
    b.store.begin_download(&m).unwrap();
    b.store
        .put_chunk(&m.chunks[0].id, &data[..m.chunks[0].len as usize])
        .unwrap();
    let mut bb = b;
    // A download in progress is offered for what the node shares: the path being fetched.
    bb.serve(catalog(std::slice::from_ref(&info)), ServeLimits::default());
    a.connect(&bb).await;
    let r = a.client().have(bb.peer, &ids, &[m.nar_hash]).await.unwrap();
    assert_eq!(r.chunks, vec![true, false, false]);
    assert_eq!(r.nars, vec![NarState::Partial]);

    // Chunks, in batches, reassembled into the NAR.
    let mut got = vec![];
    for batch in m.chunks.chunks(MAX_CHUNKS_PER_REQUEST) {
        let mut s = Box::pin(c.fetch_chunks(a.peer, batch.to_vec()));
        let mut n = 0;
        while let Some(item) = s.next().await {
            let (id, bytes) = item.unwrap().into_parts();
            assert_eq!(id, batch[n].id);
            got.extend_from_slice(&bytes);
            n += 1;
        }
        assert_eq!(n, batch.len());
    }
    assert_eq!(got, data);
    let served: u64 = a.handle.as_ref().unwrap().bytes_served().values().sum();
    assert_eq!(served, data.len() as u64);

    // A chunk the server does not have: reported, and the rest still comes.
    let refs = vec![
        ChunkRef {
            id: stranger,
            len: 10,
        },
        m.chunks[1],
    ];
    let items: Vec<_> = c.fetch_chunks(a.peer, refs).collect().await;
    assert!(
        matches!(items[0], Err(ClientError::Missing { .. })),
        "{:?}",
        items[0]
    );
    assert_eq!(*items[1].as_ref().unwrap().id(), m.chunks[1].id);
}

/// Send raw bytes on a fresh stream and read until the server resets or closes it.
async fn raw(node: &Node, to: &Node, bytes: &[u8]) -> usize {
    let mut control = node.control.clone();
    let mut s = control.open_stream(to.peer, PROTOCOL).await.unwrap();
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    let mut buf = vec![];
    let _ = s.read_to_end(&mut buf).await;
    buf.len()
}

async fn next_offence(events: &mut tokio::sync::broadcast::Receiver<ServerEvent>) -> ServerEvent {
    next_event(
        events,
        |e| matches!(e, ServerEvent::Offence { .. }),
        "an offence",
    )
    .await
}

/// The next server event that `want` accepts, or a panic after WAIT.
async fn next_event(
    events: &mut tokio::sync::broadcast::Receiver<ServerEvent>,
    want: impl Fn(&ServerEvent) -> bool,
    what: &str,
) -> ServerEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(e)) if want(&e) => return e,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("server events ended waiting for {what}: {e}"),
            Err(_) => panic!("no {what} within {WAIT:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_counted_and_offenders_refused() {
    init_tracing();
    let mut a = Node::new().await;
    let evil = Node::new().await;
    let good = Node::new().await;
    let m = a.ingest(&nar_bytes(2, 1 << 20));
    a.serve(
        catalog(&[narinfo(store_path(2), &m)]),
        ServeLimits::default(),
    );
    evil.connect(&a).await;
    good.connect(&a).await;
    let h = a.handle.clone().unwrap();
    let mut events = h.subscribe();

    // Garbage: an unknown frame type.
    assert_eq!(raw(&evil, &a, b"\x00\x00\x00\x05GARBAGE!").await, 0);
    next_offence(&mut events).await;
    assert_eq!(h.offences(&evil.peer), 1);

    // The others are still served.
    assert!(good
        .client()
        .manifest(a.peer, m.nar_hash)
        .await
        .unwrap()
        .is_some());

    // A length prefix far beyond what a Chunks request can be.
    assert_eq!(
        raw(&evil, &a, &[0x7f, 0xff, 0xff, 0xff, Kind::Chunks as u8]).await,
        0
    );
    next_offence(&mut events).await;
    assert_eq!(h.offences(&evil.peer), 2);
    assert!(h.offenders().is_empty());

    // Too many hashes in a lookup.
    let mut body = vec![];
    body.extend_from_slice(&2000u16.to_be_bytes());
    body.extend(std::iter::repeat_n(0u8, 20 * 2000));
    let mut frame = ((body.len() + 1) as u32).to_be_bytes().to_vec();
    frame.push(Kind::Lookup as u8);
    frame.extend_from_slice(&body);
    raw(&evil, &a, &frame).await;
    next_offence(&mut events).await;
    let offender = next_event(
        &mut events,
        |e| matches!(e, ServerEvent::Offender { .. }),
        "an offender",
    )
    .await;
    assert!(
        matches!(offender, ServerEvent::Offender { peer } if peer == evil.peer),
        "{offender:?}"
    );
    assert_eq!(h.offenders(), vec![evil.peer]);

    // The offender is refused even well-formed requests; the others are still served.
    let e = evil
        .client()
        .manifest(a.peer, m.nar_hash)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Protocol { .. }), "{e}");
    assert!(good
        .client()
        .manifest(a.peer, m.nar_hash)
        .await
        .unwrap()
        .is_some());

    // The client refuses to send oversized requests at all.
    let e = good
        .client()
        .have(a.peer, &vec![ChunkId([0; 32]); 9000], &[])
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::TooLarge(_)), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_answers_busy() {
    init_tracing();
    let mut a = Node::new().await;
    let hog = Node::new().await;
    let other = Node::new().await;
    let m = a.ingest(&nar_bytes(3, 4 << 20));
    a.serve(
        catalog(&[narinfo(store_path(3), &m)]),
        ServeLimits {
            max_chunk_requests: 1,
            queue_timeout: std::time::Duration::ZERO,
            ..ServeLimits::default()
        },
    );
    hog.connect(&a).await;
    other.connect(&a).await;

    // The hog asks for many chunks and reads only the first: the server, blocked on flow
    // control, keeps the one upload slot.
    let mut control = hog.control.clone();
    let mut s = control.open_stream(a.peer, PROTOCOL).await.unwrap();
    let ids = m
        .chunks
        .iter()
        .take(MAX_CHUNKS_PER_REQUEST)
        .map(|c| c.id)
        .collect();
    peerix_swarm::protocol::write_request(
        &mut s,
        &peerix_swarm::protocol::ChunksRequest::raw(ids).into(),
    )
    .await
    .unwrap();
    let first = peerix_swarm::protocol::read_frame(&mut s).await.unwrap();
    assert_eq!(first.kind, Kind::Chunk);

    let c = other.client();
    let items: Vec<_> = c.fetch_chunks(a.peer, vec![m.chunks[0]]).collect().await;
    assert!(
        matches!(items[..], [Err(ClientError::Busy { .. })]),
        "{items:?}"
    );

    // The slot comes back when the hog goes.
    drop(s);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upload slot never came back"
        );
        let items: Vec<_> = c.fetch_chunks(a.peer, vec![m.chunks[0]]).collect().await;
        match &items[..] {
            [Ok(chunk)] => {
                assert_eq!(*chunk.id(), m.chunks[0].id);
                break;
            }
            // The server may not yet have noticed the reset.
            [Err(ClientError::Busy { .. })] => tokio::task::yield_now().await,
            other => panic!("{other:?}"),
        }
    }
}

/// What a node shares, switchable: the NAR `m` until `stop` is called.
struct Switch {
    info: peerix_nix::NarInfo,
    shared: std::sync::atomic::AtomicBool,
}

impl peerix_swarm::Catalog for Switch {
    fn lookup(&self, hash: &peerix_nix::StorePathHash) -> Option<peerix_nix::NarInfo> {
        (self.shared.load(std::sync::atomic::Ordering::SeqCst)
            && *hash == self.info.store_path.hash())
        .then(|| self.info.clone())
    }
    fn shares_nar(&self, nar_hash: &peerix_nix::Sha256Hash) -> bool {
        self.shared.load(std::sync::atomic::Ordering::SeqCst) && *nar_hash == self.info.nar_hash
    }
    fn shared_nars(&self) -> Vec<peerix_nix::Sha256Hash> {
        if self.shared.load(std::sync::atomic::Ordering::SeqCst) {
            vec![self.info.nar_hash]
        } else {
            vec![]
        }
    }
    fn generation(&self) -> u64 {
        u64::from(!self.shared.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// A chunk id is no oracle for private files: `have` and `chunks` answer only for chunks of
/// NARs the node shares right now, so a peer that guesses a private file's chunk id (a small
/// NAR is one chunk, named by the BLAKE3 of the whole NAR) learns nothing and gets nothing,
/// and a peer that saw a manifest before a path was unshared cannot fetch its chunks after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_of_unshared_nars_are_neither_confirmed_nor_served() {
    init_tracing();
    let mut a = Node::new().await;
    let b = Node::new().await;
    let private = a.ingest(&nar_bytes(40, 10_000));
    assert_eq!(private.chunks.len(), 1);
    let public = a.ingest(&nar_bytes(41, 1 << 20));
    let switch = std::sync::Arc::new(Switch {
        info: narinfo(store_path(41), &public),
        shared: true.into(),
    });
    a.serve(switch.clone(), ServeLimits::default());
    b.connect(&a).await;
    let c = b.client();
    let guess = private.chunks[0].id;
    let shared = public.chunks[0].id;

    let r = c.have(a.peer, &[guess, shared], &[]).await.unwrap();
    assert_eq!(r.chunks, vec![false, true]);
    let items: Vec<_> = c
        .fetch_chunks(a.peer, vec![private.chunks[0], public.chunks[0]])
        .collect()
        .await;
    assert!(
        matches!(items[0], Err(ClientError::Missing { .. })),
        "{items:?}"
    );
    assert!(items[1].is_ok(), "{items:?}");

    // Unshared: what was public is no longer confirmed nor served.
    switch
        .shared
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let r = c.have(a.peer, &[shared], &[public.nar_hash]).await.unwrap();
    assert_eq!(r.chunks, vec![false]);
    assert_eq!(r.nars, vec![NarState::None]);
    let items: Vec<_> = c
        .fetch_chunks(a.peer, vec![public.chunks[0]])
        .collect()
        .await;
    assert!(
        matches!(items[..], [Err(ClientError::Missing { .. })]),
        "{items:?}"
    );
}

/// `have` is rate-limited per peer: past its budget a peer hears Busy, others are not hurt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn have_requests_past_their_budget_are_answered_busy() {
    init_tracing();
    let mut a = Node::new().await;
    let greedy = Node::new().await;
    let other = Node::new().await;
    let m = a.ingest(&nar_bytes(42, 1 << 20));
    a.serve(
        catalog(&[narinfo(store_path(42), &m)]),
        ServeLimits {
            have_rate: 1,
            have_burst: 100,
            ..ServeLimits::default()
        },
    );
    greedy.connect(&a).await;
    other.connect(&a).await;
    let ids = vec![m.chunks[0].id; 60];
    greedy.client().have(a.peer, &ids, &[]).await.unwrap();
    let e = greedy.client().have(a.peer, &ids, &[]).await.unwrap_err();
    assert!(matches!(e, ClientError::Busy { .. }), "{e}");
    other.client().have(a.peer, &ids, &[]).await.unwrap();
}
