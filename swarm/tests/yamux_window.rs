//! The window a new outbound stream opens with (the patched copy in `vendor/yamux`): sized
//! from its connection's round trip, the least of its pings (the first four sent back to back
//! as the connection opens), not the latest one. On a loaded machine one ping can
//! take tens of milliseconds over loopback; a window sized from it let a fast peer fill a slow
//! reader's buffers, and a greedy peer crowd out a modest one's upload slots
//! (`fairness.rs`). And on a short path, the window a stream is raised to while it is answered
//! (two of a connection's streams at once).
//!
//! The remote is this test: it reads the client's frames and answers its pings, each after a
//! delay it chooses, so the round trips the client measures are the script's.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::poll_fn;
use futures::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

/// A socket whose remote is the test: what the client writes goes to `out`, what the test
/// sends on `input`'s sender is what the client reads.
struct Scripted {
    out: mpsc::UnboundedSender<Vec<u8>>,
    input: mpsc::UnboundedReceiver<Vec<u8>>,
    pending: Vec<u8>,
}

impl AsyncRead for Scripted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.pending.is_empty() {
            match self.input.poll_recv(cx) {
                Poll::Ready(Some(b)) => self.pending = b,
                Poll::Ready(None) => return Poll::Ready(Ok(0)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = buf.len().min(self.pending.len());
        buf[..n].copy_from_slice(&self.pending[..n]);
        self.pending.drain(..n);
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for Scripted {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let _ = self.out.send(buf.to_vec());
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

const HEADER: usize = 12;
const DATA: u8 = 0;
const WINDOW_UPDATE: u8 = 1;
const PING: u8 = 2;
const SYN: u16 = 1;
const ACK: u16 = 2;
/// yamux's window before any update: 256 KiB.
const DEFAULT_CREDIT: u32 = 256 * 1024;
/// The rate a first window is sized for over the round trip (`INITIAL_WINDOW_RATE`): 1 Gbit/s.
const RATE: f64 = 125_000_000.0;
/// The most a first window is (`MAX_INITIAL_STREAM_WINDOW`).
const MAX_WINDOW: u32 = 4 << 20;

#[derive(Debug)]
struct Header {
    kind: u8,
    flags: u16,
    stream: u32,
    len: u32,
}

/// Reads the client's frames from what it wrote.
struct Frames {
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
    bytes: Vec<u8>,
}

impl Frames {
    async fn next(&mut self) -> Header {
        loop {
            if self.bytes.len() >= HEADER {
                let h = &self.bytes[..HEADER];
                let header = Header {
                    kind: h[1],
                    flags: u16::from_be_bytes([h[2], h[3]]),
                    stream: u32::from_be_bytes(h[4..8].try_into().unwrap()),
                    len: u32::from_be_bytes(h[8..12].try_into().unwrap()),
                };
                let body = if header.kind == DATA { header.len } else { 0 } as usize;
                if self.bytes.len() >= HEADER + body {
                    self.bytes.drain(..HEADER + body);
                    return header;
                }
            }
            let more = self.rx.recv().await.expect("the client's socket closed");
            self.bytes.extend(more);
        }
    }
}

fn pong(id: u32) -> Vec<u8> {
    let mut f = vec![0, PING];
    f.extend(ACK.to_be_bytes());
    f.extend(0u32.to_be_bytes());
    f.extend(id.to_be_bytes());
    f
}

/// A yamux client over a socket whose remote is the test: the client's frames as it writes
/// them, and the sender of what it reads.
fn scripted_client() -> (
    yamux::Connection<Scripted>,
    Frames,
    mpsc::UnboundedSender<Vec<u8>>,
) {
    let (out, rx) = mpsc::unbounded_channel();
    let (to_client, input) = mpsc::unbounded_channel();
    let socket = Scripted {
        out,
        input,
        pending: Vec::new(),
    };
    let conn = yamux::Connection::new(socket, yamux::Config::default(), yamux::Mode::Client);
    let frames = Frames {
        rx,
        bytes: Vec::new(),
    };
    (conn, frames, to_client)
}

/// A client connection whose remote answers ping `i` after `delays[i]` (pings past the list
/// are not answered). Once the client sent ping 3, which it does only once it had pong 2, it
/// opens a stream and writes a byte on it. Returns the stream's first frame: a window update
/// granting more than the default (with SYN), or the data with SYN when the stream opens with
/// yamux's default window.
async fn first_frame_of_a_stream(delays: &[Duration]) -> Header {
    let (mut conn, mut frames, to_client) = scripted_client();
    let (open_tx, mut open_rx) = mpsc::unbounded_channel::<()>();
    let mut stream = None;
    let mut wrote = false;
    // The connection sends its pings and the stream's frames while it is polled.
    let drive = poll_fn(|cx| {
        if stream.is_none() && open_rx.poll_recv(cx).is_ready() {
            match conn.poll_new_outbound(cx) {
                Poll::Ready(s) => stream = Some(s.expect("a new stream")),
                Poll::Pending => panic!("no room for a first stream"),
            }
        }
        if let (Some(s), false) = (&mut stream, wrote) {
            if let Poll::Ready(r) = Pin::new(s).poll_write(cx, b"x") {
                r.expect("a write");
                wrote = true;
            }
        }
        match conn.poll_next_inbound(cx) {
            Poll::Ready(r) => panic!("the connection ended: {:?}", r.map(|r| r.map(|_| ()))),
            Poll::Pending => Poll::<()>::Pending,
        }
    });
    let script = async {
        loop {
            let h = frames.next().await;
            if h.kind == PING && h.flags & SYN != 0 {
                if h.len == 3 {
                    open_tx.send(()).unwrap();
                }
                if let Some(d) = delays.get(h.len as usize) {
                    let to_client = to_client.clone();
                    let d = *d;
                    // The delay is the path's latency, what the client measures with its
                    // clock; nothing waits on it for order: the stream opens on ping 3's
                    // arrival.
                    tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        let _ = to_client.send(pong(h.len));
                    });
                }
            } else if h.stream != 0 {
                assert_eq!(h.stream, 1, "the client's first stream");
                return h;
            }
        }
    };
    // Without its first pings back to back, the client's second ping would wait ten seconds.
    tokio::time::timeout(Duration::from_secs(5), async {
        tokio::select! {
            () = drive => unreachable!(),
            h = script => h,
        }
    })
    .await
    .expect("the client sent its first pings and opened the stream")
}

/// The credit a stream's first frame grants beyond the default.
fn extra_credit(h: &Header) -> u32 {
    assert_ne!(h.flags & SYN, 0, "a stream's first frame opens it: {h:?}");
    match h.kind {
        WINDOW_UPDATE => h.len,
        DATA => 0,
        _ => panic!("a stream's first frame: {h:?}"),
    }
}

/// A short path with one slow ping among its first (a loaded machine's scheduling delay, not
/// the path's): the stream opens with yamux's default window, not one for 30 ms.
#[tokio::test]
async fn a_slow_ping_among_fast_ones_does_not_size_a_streams_first_window() {
    let ms = Duration::from_millis;
    let h = first_frame_of_a_stream(&[ms(0), ms(30), ms(30), ms(30)]).await;
    assert_eq!(
        extra_credit(&h),
        0,
        "a stream on a short path opened with more than yamux's default window: {h:?}"
    );
}

/// A long path (every ping 30 ms): the stream opens with the bandwidth-delay product of
/// 1 Gbit/s over that round trip, so a request of a few MiB needs one round trip, not four.
#[tokio::test]
async fn over_a_long_round_trip_a_stream_opens_with_a_window_for_it() {
    let rtt = Duration::from_millis(30);
    let h = first_frame_of_a_stream(&[rtt; 4]).await;
    let window = DEFAULT_CREDIT + extra_credit(&h);
    let bdp = (rtt.as_secs_f64() * RATE) as u32;
    assert!(
        (bdp..=MAX_WINDOW).contains(&window),
        "a first window of {window} bytes over a {rtt:?} round trip (bandwidth-delay product {bdp})"
    );
}

/// The window a stream being answered on a short path is raised to (`ANSWER_WINDOW`).
const ANSWER_WINDOW: u32 = 1 << 20;

/// What the test asks of the client's side of the connection.
enum Ask {
    /// Open a stream and write a byte on it (its request).
    Open,
    /// Read what comes in on stream `i` (in opening order); how many bytes is sent back.
    Read(usize),
    /// Drop stream `i`, as a finished request's reader does.
    Drop(usize),
}

/// The remote's side: the client's frames, pings answered at once, and data to send it.
struct Remote {
    frames: Frames,
    to_client: mpsc::UnboundedSender<Vec<u8>>,
    asks: mpsc::UnboundedSender<Ask>,
    reads: mpsc::UnboundedReceiver<usize>,
}

impl Remote {
    /// The client's next frame that is not a ping (those are answered).
    async fn next(&mut self) -> Header {
        loop {
            let h = self.frames.next().await;
            if h.kind == PING && h.flags & SYN != 0 {
                let _ = self.to_client.send(pong(h.len));
                continue;
            }
            return h;
        }
    }

    fn send(&self, stream: u32, flags: u16, len: usize) {
        let mut f = vec![0, DATA];
        f.extend(flags.to_be_bytes());
        f.extend(stream.to_be_bytes());
        f.extend((len as u32).to_be_bytes());
        f.resize(HEADER + len, 7);
        self.to_client.send(f).unwrap();
    }

    /// Has the client read stream `i`, and returns how much it read.
    async fn read(&mut self, i: usize) -> usize {
        self.asks.send(Ask::Read(i)).unwrap();
        self.reads.recv().await.unwrap()
    }
}

/// A short path (every ping answered at once): a stream opens with yamux's default window and
/// is raised to 1 MiB once its answer flows and its reader reads, so a peer answering it need
/// not wait for the receiver's turnaround every 128 KiB; but only two of a connection's streams
/// hold the larger window at once, so streams whose readers stall (on their disk) cannot make
/// the receiver hold 1 MiB each. A third is raised once one of the two is dropped.
#[tokio::test]
async fn on_a_short_path_two_streams_being_answered_get_a_larger_window() {
    let (mut conn, frames, to_client) = scripted_client();
    let (ask_tx, mut ask_rx) = mpsc::unbounded_channel::<Ask>();
    let (read_tx, read_rx) = mpsc::unbounded_channel::<usize>();
    let mut streams: Vec<Option<yamux::Stream>> = Vec::new();
    let mut opening = 0;
    // A read asked for and not yet done: it stays pending while the other asks go on.
    let mut reading: Option<usize> = None;
    let drive = poll_fn(|cx| {
        while let Poll::Ready(Some(a)) = ask_rx.poll_recv(cx) {
            match a {
                Ask::Open => opening += 1,
                Ask::Read(i) => {
                    assert!(reading.is_none(), "one read at a time");
                    reading = Some(i);
                }
                Ask::Drop(i) => streams[i] = None,
            }
        }
        while opening > 0 {
            let Poll::Ready(s) = conn.poll_new_outbound(cx) else {
                break;
            };
            let mut s = s.expect("a new stream");
            match Pin::new(&mut s).poll_write(cx, b"x") {
                Poll::Ready(r) => assert_eq!(r.expect("a write"), 1),
                Poll::Pending => panic!("a new stream has no room for a byte"),
            }
            streams.push(Some(s));
            opening -= 1;
        }
        if let Some(i) = reading {
            let s = streams[i].as_mut().expect("an open stream");
            let mut buf = vec![0u8; 1 << 20];
            if let Poll::Ready(r) = Pin::new(s).poll_read(cx, &mut buf) {
                read_tx.send(r.expect("a read")).unwrap();
                reading = None;
            }
        }
        match conn.poll_next_inbound(cx) {
            Poll::Ready(r) => panic!("the connection ended: {:?}", r.map(|r| r.map(|_| ()))),
            Poll::Pending => Poll::<()>::Pending,
        }
    });
    let mut remote = Remote {
        frames,
        to_client,
        asks: ask_tx,
        reads: read_rx,
    };
    // A client's streams have odd ids: 1, 3, 5.
    let script = async {
        // The round trip is known before the streams open: the client's second ping goes out
        // once the first pong came in.
        loop {
            let h = remote.frames.next().await;
            assert_eq!(h.kind, PING, "a frame before any stream: {h:?}");
            let _ = remote.to_client.send(pong(h.len));
            if h.len == 1 {
                break;
            }
        }
        for _ in 0..3 {
            remote.asks.send(Ask::Open).unwrap();
        }
        for _ in 0..3 {
            let h = remote.next().await;
            assert_eq!(
                h.kind, DATA,
                "a request on a short path opens with its data: {h:?}"
            );
            assert_eq!(h.flags & SYN, SYN, "{h:?}");
        }
        // Streams 1 and 3 are answered and read: each is raised to 1 MiB.
        for (i, id) in [(0, 1u32), (1, 3)] {
            remote.send(id, ACK, 64 << 10);
            assert_eq!(remote.read(i).await, 64 << 10);
            let h = remote.next().await;
            assert_eq!((h.kind, h.stream), (WINDOW_UPDATE, id), "{h:?}");
            assert_eq!(
                h.len,
                ANSWER_WINDOW - DEFAULT_CREDIT,
                "stream {id}, being answered, was not raised to 1 MiB"
            );
        }
        // Stream 5 is sent its whole default window and reads it, while 1 and 3 hold theirs:
        // what it grants is yamux's own update (doubled at most, by auto-tuning), not a raise.
        remote.send(5, ACK, 128 << 10);
        remote.send(5, 0, 128 << 10);
        let mut got = 0;
        while got < 256 << 10 {
            got += remote.read(2).await;
        }
        // The next read sends the update, and waits.
        remote.asks.send(Ask::Read(2)).unwrap();
        let h = remote.next().await;
        assert_eq!((h.kind, h.stream), (WINDOW_UPDATE, 5), "{h:?}");
        assert!(
            h.len <= 2 * DEFAULT_CREDIT,
            "a third stream was raised while two held the larger window: {} bytes granted",
            h.len
        );
        // Stream 1 ends: its reader drops it, which closes it and gives its window back.
        // Stream 5 is raised at its next read.
        remote.asks.send(Ask::Drop(0)).unwrap();
        let h = remote.next().await;
        assert_eq!(h.stream, 1, "stream 1's close: {h:?}");
        remote.send(5, 0, 64 << 10);
        assert_eq!(remote.reads.recv().await.unwrap(), 64 << 10);
        remote.asks.send(Ask::Read(2)).unwrap();
        let h = remote.next().await;
        assert_eq!((h.kind, h.stream), (WINDOW_UPDATE, 5), "{h:?}");
        assert!(
            h.len >= ANSWER_WINDOW - 2 * DEFAULT_CREDIT,
            "stream 5 was not raised once stream 1 gave its window back: {} bytes granted",
            h.len
        );
    };
    tokio::time::timeout(Duration::from_secs(5), async {
        tokio::select! {
            () = drive => unreachable!(),
            () = script => {},
        }
    })
    .await
    .expect("the client answered as the script expects");
}
