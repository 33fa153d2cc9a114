//! The window a new outbound stream opens with (the patched copy in `vendor/yamux`): sized
//! from its connection's round trip, the least of its pings (the first four sent back to back
//! as the connection opens), not the latest one. On a loaded machine one ping can
//! take tens of milliseconds over loopback; a window sized from it let a fast peer fill a slow
//! reader's buffers, and a greedy peer crowd out a modest one's upload slots
//! (`fairness.rs`).
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

/// A client connection whose remote answers ping `i` after `delays[i]` (pings past the list
/// are not answered). Once the client sent ping 3, which it does only once it had pong 2, it
/// opens a stream and writes a byte on it. Returns the stream's first frame: a window update
/// granting more than the default (with SYN), or the data with SYN when the stream opens with
/// yamux's default window.
async fn first_frame_of_a_stream(delays: &[Duration]) -> Header {
    let (out, rx) = mpsc::unbounded_channel();
    let (to_client, input) = mpsc::unbounded_channel();
    let socket = Scripted {
        out,
        input,
        pending: Vec::new(),
    };
    let mut conn = yamux::Connection::new(socket, yamux::Config::default(), yamux::Mode::Client);
    let mut frames = Frames {
        rx,
        bytes: Vec::new(),
    };
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
