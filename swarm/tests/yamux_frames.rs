//! How a yamux frame leaves (the patched copy in `vendor/yamux`): header and body in one write.
//! Over TLS, which peerix nodes speak to each other, every write becomes a record sent at once,
//! so a header written on its own cost a record, a system call and (with `TCP_NODELAY`) a
//! packet of its own for every frame of data.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::future::poll_fn;
use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use peerix_chunkstore::ChunkId;
use peerix_swarm::protocol::{decode_chunk, read_frame, write_chunk, ChunkBody};
use tokio::sync::watch;

/// A socket that records the bytes of each write call; the remote never says anything.
struct Recording {
    writes: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Bytes recorded so far, for the test to wait on.
    total: watch::Sender<usize>,
    /// At most this many bytes per call, as a socket with a full buffer takes part of a write.
    max_write: usize,
    /// Whether a vectored write is taken as one call (TLS, TCP) or only its first buffer (the
    /// trait's default).
    vectored: bool,
}

impl Recording {
    fn take(&mut self, bufs: &[&[u8]]) -> usize {
        let mut call = Vec::new();
        for b in bufs {
            let room = self.max_write - call.len();
            call.extend_from_slice(&b[..b.len().min(room)]);
        }
        let n = call.len();
        self.writes.lock().unwrap().push(call);
        self.total.send_modify(|t| *t += n);
        n
    }
}

impl AsyncRead for Recording {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Pending
    }
}

impl AsyncWrite for Recording {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(self.take(&[buf])))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let bufs: Vec<&[u8]> = bufs
            .iter()
            .map(|b| &**b)
            .filter(|b| !b.is_empty())
            .collect();
        let n = if self.vectored {
            self.take(&bufs)
        } else {
            self.take(&bufs[..1.min(bufs.len())])
        };
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

const HEADER: usize = 12;
/// The most data a frame carries (`DEFAULT_SPLIT_SEND_SIZE` in `vendor/yamux`).
const FRAME: usize = 64 * 1024;
const DATA: u8 = 0;

/// One frame as it went out: where its header starts in the byte stream, its type, the bytes
/// it carries (data frames only) and the write calls it was spread over.
struct Sent {
    kind: u8,
    body: Vec<u8>,
    calls: usize,
}

/// What goes on the stream.
enum What<'a> {
    Bytes(&'a [u8]),
    /// A Chunk frame of the peer protocol, as a peer answering a request writes it.
    Chunk(&'a ChunkId, &'a ChunkBody),
}

/// Writes `what` on one outbound stream of a client connection over a socket taking at most
/// `max_write` bytes a call (and only the first buffer of a vectored write unless `vectored`),
/// and parses what the socket received into frames.
async fn send(what: What<'_>, max_write: usize, vectored: bool) -> Vec<Sent> {
    let len = match &what {
        What::Bytes(data) => data.len(),
        // The frame's length and type, the id, then the body.
        What::Chunk(_, body) => 5 + 32 + body.encoded_len(),
    };
    let writes = Arc::new(Mutex::new(Vec::new()));
    let (total, mut written) = watch::channel(0);
    let socket = Recording {
        writes: writes.clone(),
        total,
        max_write,
        vectored,
    };
    let mut conn = yamux::Connection::new(socket, yamux::Config::default(), yamux::Mode::Client);
    let mut stream = poll_fn(|cx| conn.poll_new_outbound(cx)).await.unwrap();
    let write = async {
        match what {
            What::Bytes(data) => stream.write_all(data).await.unwrap(),
            What::Chunk(id, body) => write_chunk(&mut stream, id, body).await.unwrap(),
        }
        stream.flush().await.unwrap();
    };
    // The connection writes the stream's frames while it is polled; it ends only on an error.
    let drive = poll_fn(|cx| match conn.poll_next_inbound(cx) {
        Poll::Ready(r) => panic!("the connection ended: {:?}", r.map(|r| r.map(|_| ()))),
        Poll::Pending => Poll::Pending,
    });
    let all_out = async {
        write.await;
        // Every data byte with a header per frame; the SYN's window update or a ping may come
        // first.
        written
            .wait_for(|&n| n >= len + HEADER * len.div_ceil(FRAME))
            .await
            .unwrap();
    };
    tokio::select! {
        () = drive => unreachable!(),
        () = all_out => {}
    }
    let writes = writes.lock().unwrap().clone();
    parse(&writes)
}

fn parse(writes: &[Vec<u8>]) -> Vec<Sent> {
    // The call each byte of the stream came in.
    let call_of: Vec<usize> = writes
        .iter()
        .enumerate()
        .flat_map(|(i, w)| std::iter::repeat_n(i, w.len()))
        .collect();
    let bytes = writes.concat();
    let mut frames = Vec::new();
    let mut at = 0;
    while at + HEADER <= bytes.len() {
        let h = &bytes[at..at + HEADER];
        let kind = h[1];
        let len = u32::from_be_bytes(h[8..12].try_into().unwrap()) as usize;
        let body_len = if kind == DATA { len } else { 0 };
        let end = at + HEADER + body_len;
        assert!(end <= bytes.len(), "a frame cut short");
        frames.push(Sent {
            kind,
            body: bytes[at + HEADER..end].to_vec(),
            calls: call_of[end - 1] - call_of[at] + 1,
        });
        at = end;
    }
    assert_eq!(at, bytes.len(), "bytes after the last whole frame");
    frames
}

fn payload() -> Vec<u8> {
    // Three whole frames and a short one, each byte telling where it is.
    (0..3 * FRAME as u32 + 100)
        .map(|i: u32| (i % 251) as u8)
        .collect()
}

#[tokio::test]
async fn every_data_frame_leaves_in_one_write() {
    let data = payload();
    let frames = send(What::Bytes(&data), usize::MAX, true).await;
    let data_frames: Vec<&Sent> = frames.iter().filter(|f| f.kind == DATA).collect();
    assert_eq!(data_frames.len(), 4, "64 KiB per frame");
    assert!(data_frames[..3].iter().all(|f| f.body.len() == FRAME));
    for (i, f) in data_frames.iter().enumerate() {
        assert_eq!(
            f.calls,
            1,
            "data frame {i} ({} bytes) took {} writes",
            f.body.len(),
            f.calls
        );
    }
    let sent: Vec<u8> = data_frames.iter().flat_map(|f| f.body.clone()).collect();
    assert_eq!(sent, data);
}

/// A socket that takes a few bytes per call, and only the first buffer of a vectored write,
/// still gets every frame whole and in order.
#[tokio::test]
async fn a_socket_taking_part_of_each_write_gets_every_byte_in_order() {
    let data = payload();
    let frames = send(What::Bytes(&data), 5, false).await;
    let sent: Vec<u8> = frames
        .iter()
        .filter(|f| f.kind == DATA)
        .flat_map(|f| f.body.clone())
        .collect();
    assert_eq!(sent, data);
}

/// A chunk's head (its frame's length, type, id and tag) leaves in the same yamux frame as the
/// chunk's bytes, not in a small frame of its own.
#[tokio::test]
async fn a_chunk_leaves_with_its_head_in_one_frame() {
    let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    let id = ChunkId::of(&data);
    let body = ChunkBody::Raw(data.clone().into());
    let frames = send(What::Chunk(&id, &body), usize::MAX, true).await;
    let data_frames: Vec<&Sent> = frames.iter().filter(|f| f.kind == DATA).collect();
    assert_eq!(
        data_frames.iter().map(|f| f.body.len()).collect::<Vec<_>>(),
        [5 + 32 + 1 + data.len()],
        "the chunk's yamux frames"
    );
    let frame = read_frame(&mut &data_frames[0].body[..]).await.unwrap();
    let (got_id, got) = decode_chunk(frame).unwrap();
    assert_eq!(got_id, id);
    assert_eq!(got, body);
}
