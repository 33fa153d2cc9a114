//! A round trip for `--mode netns --rtt-ms`: this kernel has no `netem`, so the delay is made
//! in user space. `peerix bench-delay` runs in the leecher's namespace and relays each TCP
//! connection to a seeder (its peer port, and the HTTP baseline's), holding every byte for half
//! the round trip in each direction. Tests of long paths use the same line ([`delay_line`]).
//!
//! What it models, and what not: a credit a receiver grants (yamux's stream windows, TCP's
//! window as the relay's socket buffers fill) takes a whole round trip to reach the sender and
//! come back as data, as over a long path; the seeders' `tc tbf` caps still set the rate. The
//! TCP connections on either side of the relay have no round trip of their own, so TCP's slow
//! start and loss recovery are not part of it: those cost a real path more, for the plain HTTP
//! download as for peerix.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// `peerix bench-delay` (internal): started by `peerix bench --mode netns --rtt-ms`.
#[derive(clap::Args, Debug)]
pub struct DelayArgs {
    /// The round trip to add, in milliseconds (half of it each way).
    #[arg(long)]
    pub rtt_ms: u64,
    /// Where to relay to; for each, in order, `listen <addr>` is printed: the address of this
    /// namespace's loopback that reaches it.
    #[arg(long, value_delimiter = ',', required = true)]
    pub to: Vec<SocketAddr>,
}

/// Reads of at most this many bytes are held, each with the time it may go on.
const READ_BYTES: usize = 64 << 10;
/// At most this many reads held per direction (64 MiB): a bound on the relay's memory, and far
/// above what a capped link holds in flight over any round trip measured here.
const HELD_READS: usize = 1024;

/// Relay to every `--to` until stdin closes (the benchmark lets go of it, or dies).
pub fn run(args: DelayArgs) -> Result<()> {
    let rtt = Duration::from_millis(args.rtt_ms);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            for to in args.to {
                let (at, _) = delay_line(to, rtt).await?;
                println!("listen {at}");
            }
            let mut sink = Vec::new();
            let _ = tokio::io::stdin().read_to_end(&mut sink).await;
            Ok(())
        })
}

/// A delay line to `to`: each connection made to the address returned (on 127.0.0.1) is relayed
/// to `to`, `rtt` added to its round trip, until the task returned is aborted.
pub async fn delay_line(to: SocketAddr, rtt: Duration) -> Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let at = listener.local_addr()?;
    Ok((at, tokio::spawn(accept(listener, to, rtt / 2))))
}

async fn accept(listener: TcpListener, to: SocketAddr, one_way: Duration) {
    // The connections go when the line does (a task of its own each, aborted with it).
    let mut relays = tokio::task::JoinSet::new();
    while let Ok((inbound, _)) = listener.accept().await {
        // A relay that fails (a reset, the other end gone) ends its connection, which both
        // ends see for themselves.
        relays.spawn(async move {
            let _ = relay(inbound, to, one_way).await;
        });
    }
}

async fn relay(inbound: TcpStream, to: SocketAddr, one_way: Duration) -> Result<()> {
    let outbound = TcpStream::connect(to)
        .await
        .with_context(|| format!("connecting to {to}"))?;
    // The delay is the relay's; Nagle's would add its own on small writes.
    inbound.set_nodelay(true)?;
    outbound.set_nodelay(true)?;
    let (in_r, in_w) = inbound.into_split();
    let (out_r, out_w) = outbound.into_split();
    let (up, down) = tokio::join!(pipe(in_r, out_w, one_way), pipe(out_r, in_w, one_way));
    up.and(down)
}

/// Copy `r` to `w`, each read written `delay` after it was read; the end of `r` is passed on
/// (a shutdown of `w`) once everything before it is written.
async fn pipe(mut r: OwnedReadHalf, mut w: OwnedWriteHalf, delay: Duration) -> Result<()> {
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(HELD_READS);
    let read = async move {
        loop {
            let mut buf = BytesMut::with_capacity(READ_BYTES);
            if r.read_buf(&mut buf).await? == 0 {
                return Ok::<_, anyhow::Error>(());
            }
            if tx
                .send((Instant::now() + delay, buf.freeze()))
                .await
                .is_err()
            {
                return Ok(());
            }
        }
    };
    let write = async move {
        while let Some((at, bytes)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            w.write_all(&bytes).await?;
        }
        w.shutdown().await?;
        Ok::<_, anyhow::Error>(())
    };
    let (read, write) = tokio::join!(read, write);
    read.and(write)
}
