//! The keep-alive protocol: an idle stream that holds a connection open, for explicit peers
//! (see `explicit.rs`), which nothing else would find again once the connection idled out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::{PeerId, StreamProtocol};

/// An idle stream on this protocol holds a connection to an explicit peer open: they are
/// there because nothing else finds them, and letting the connection idle out would only have
/// us redial a minute later, over and over. Both ends hold the stream, since either end
/// closes a connection it considers idle.
pub(super) const KEEPALIVE_PROTOCOL: StreamProtocol = StreamProtocol::new("/peerix/keepalive/1");

/// Keep-alive streams held for one peer at once (one per connection is what peerix opens; a
/// redial may open the next before the old one is gone). More are reset: each held stream is
/// a task and buffers, and a peer could otherwise open them without end.
const KEEPALIVES_PER_PEER: usize = 4;

/// Holds the keep-alive streams peers open to us, a few per peer, until the node stops.
pub(super) async fn hold_inbound_keepalives(mut incoming: libp2p_stream::IncomingStreams) {
    use futures::StreamExt;
    let held: Arc<Mutex<HashMap<PeerId, usize>>> = Arc::default();
    while let Some((peer, stream)) = incoming.next().await {
        {
            let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
            let n = held.entry(peer).or_default();
            if *n >= KEEPALIVES_PER_PEER {
                tracing::debug!(%peer, "too many keep-alive streams from the peer; resetting one");
                continue;
            }
            *n += 1;
        }
        tracing::trace!(%peer, "holding a connection open for the peer");
        let held = held.clone();
        tokio::spawn(async move {
            hold_stream(stream).await;
            let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = held.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&peer);
                }
            }
        });
    }
}

/// Keeps a keep-alive stream open until the other end or the connection goes away.
pub(super) async fn hold_stream(mut stream: libp2p::Stream) {
    use futures::AsyncReadExt;
    let mut buf = [0u8; 64];
    // Nothing is ever sent; any bytes are ignored.
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}
