//! Data frame bodies reused (the patched copy in `vendor/yamux`, `src/bodies.rs`): the next
//! frame is read into a body a reader consumed, without zeroing it first. What a reader gets
//! must still be exactly what was sent, whatever the sizes of the frames before.

use futures::future::poll_fn;
use futures::{AsyncReadExt, AsyncWriteExt};
use tokio_util::compat::TokioAsyncReadCompatExt;

/// Drive a connection (its frames flow only while it is polled) until it ends.
fn drive<T>(mut conn: yamux::Connection<T>)
where
    T: futures::AsyncRead + futures::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move { while poll_fn(|cx| conn.poll_next_inbound(cx)).await.is_some() {} });
}

/// Writes of every size around a frame's (64 KiB) and the pool's bounds (16 and 256 KiB), each
/// of its own bytes, in an order where a large body follows small ones and a small one large
/// ones, arrive byte for byte.
#[tokio::test]
async fn frames_read_into_reused_bodies_arrive_exactly_as_sent() {
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut client =
        yamux::Connection::new(a.compat(), yamux::Config::default(), yamux::Mode::Client);
    let mut server =
        yamux::Connection::new(b.compat(), yamux::Config::default(), yamux::Mode::Server);
    let sizes: Vec<usize> = [
        100,
        20_000,
        70_000,
        16 << 10,
        3_000,
        64 << 10,
        200_000,
        17_000,
        300_000,
        65_000,
        1,
        40_000,
        256 << 10,
        90_000,
    ]
    .repeat(3);
    let sent: Vec<u8> = sizes
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| (0..n).map(move |j| (i * 31 + j * 7 + j / 251) as u8))
        .collect();
    let total = sent.len();

    let mut out = poll_fn(|cx| client.poll_new_outbound(cx))
        .await
        .expect("a stream");
    drive(client);
    let writer = tokio::spawn({
        let sent = sent.clone();
        let sizes = sizes.clone();
        async move {
            let mut at = 0;
            for n in sizes {
                out.write_all(&sent[at..at + n]).await.expect("a write");
                out.flush().await.expect("a flush");
                at += n;
            }
            out.close().await.expect("a close");
        }
    });
    let mut inbound = poll_fn(|cx| server.poll_next_inbound(cx))
        .await
        .expect("a stream")
        .expect("no error");
    drive(server);
    // Read in pieces of another size than the writes', so that bodies are consumed across
    // several reads and given back at their last.
    let mut got = Vec::with_capacity(total);
    let mut buf = vec![0u8; 50_000];
    loop {
        let n = inbound.read(&mut buf).await.expect("a read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    writer.await.unwrap();
    assert_eq!(got.len(), total);
    let first_bad = got.iter().zip(&sent).position(|(g, s)| g != s);
    assert_eq!(first_bad, None, "the bytes read differ from those sent");
}
