//! Answering a Chunks request: each chunk read from the store (verified) and sent in the
//! smallest form the requester accepts — raw, zstd (as stored, recompressed, or made now) or a
//! delta against an older version it holds (`crate::compress`, `crate::delta`). A peer's
//! requests for runs of chunks are answered in the order they came, one at a time.

use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use futures::stream::{self, StreamExt};
use libp2p::{PeerId, Stream};
use peerix_chunkstore::ChunkId;
use tracing::debug;

use super::{timed, AnswerError, Server};
use crate::compress;
use crate::protocol::{self, write_chunk, write_reply, ChunkBody, ChunksRequest, Refusal, Reply};

impl Server {
    /// Answer one Chunks request on `s`; false when it was answered Busy instead (no slot).
    pub(super) async fn answer_chunks(
        &self,
        peer: PeerId,
        req: ChunksRequest,
        s: &mut Stream,
    ) -> Result<bool, AnswerError> {
        let wt = self.shared.limits.write_timeout;
        let ChunksRequest { ids, want } = req;
        let Some(slot) = self.shared.acquire(peer).await else {
            debug!(%peer, "no upload slot; answering busy");
            timed(wt, write_reply(s, &Reply::Refused(Refusal::Busy))).await?;
            return Ok(false);
        };
        let shareable = self.shareable_chunks().await?;
        // Deltas cost the most CPU: only for a requester whose link is slow enough
        // that it asks for compression.
        let plan = match &want.delta {
            Some(ask) if want.compress => self.deltas.plan(&self.store, &*self.catalog, ask).await,
            _ => None,
        };
        let spared = !self.shared.limits.cap_lan
            && self.shared.lan.as_ref().is_some_and(|is_lan| is_lan(&peer));
        // A peer's requests for several chunks (the runs of a download) are answered one after
        // the other, in the order they came, not side by side. A downloader keeps two or more
        // runs in flight to each peer and hands the NAR on in order: side by side, the run it
        // waits for took as long as all of them, and its window held the other peers back
        // meanwhile. A request for one chunk (a small path) goes beside them, never behind.
        let turn = (ids.len() > 1).then(|| slot.turn.clone());
        // Atomic only to be shared with the reads ahead (a Cell would make the future !Send).
        let budget = AtomicUsize::new(protocol::MAX_CHUNK_BYTES_PER_REQUEST);
        let read = |id: ChunkId| {
            // A chunk of no shared NAR is answered as missing, like one not held.
            let skip = budget.load(Relaxed) == 0 || !shareable.contains(&id);
            let (want, plan) = (want.clone(), plan.clone());
            async move {
                if skip {
                    return (id, ChunkBody::Missing);
                }
                let body = self
                    .store
                    .blocking(move |cs| compress::encode_stored(cs, &id, &want, plan.as_deref()))
                    .await
                    .unwrap_or_else(|e| {
                        debug!(chunk = %id, error = %e, "cannot serve chunk");
                        ChunkBody::Missing
                    });
                (id, body)
            }
        };
        // The next chunk is read while one is written: with one request of a peer answered at
        // a time, that is where reading and sending overlap. A slow reader holds at most two
        // chunks of ours in memory per request.
        let mut bodies = pin!(stream::iter(ids).map(read).buffered(2).peekable());
        let mut in_turn = match turn {
            // Queued for the turn (join! polls the lock first) while the first chunks are read,
            // so that they are at hand when the turn comes and the link does not wait.
            Some(turn) => Some(tokio::join!(turn.lock_owned(), bodies.as_mut().peek()).0),
            None => None,
        };
        while let Some((id, body)) = bodies.next().await {
            let body = match body.raw_len() {
                Some(n) if n > budget.load(Relaxed) => ChunkBody::Missing,
                Some(n) => {
                    budget.fetch_sub(n, Relaxed);
                    body
                }
                None => body,
            };
            if let Some(cap) = &self.shared.upload {
                if !spared {
                    cap.pace(body.encoded_len()).await;
                }
            }
            let write = timed(wt, write_chunk(s, &id, &body));
            let stuck = self.shared.limits.queue_timeout;
            if in_turn.is_some() {
                tokio::pin!(write);
                // A run whose reader takes no chunk for the queue timeout gives up its turn and
                // goes on beside the peer's next: a stalled stream holds up only itself.
                if let Ok(r) = tokio::time::timeout(stuck, &mut write).await {
                    r?;
                } else {
                    in_turn = None;
                    write.await?;
                }
            } else {
                write.await?;
            }
            if body.raw_len().is_some() {
                self.shared.add_served(peer, body.encoded_len() - 1);
            }
        }
        Ok(true)
    }
}
