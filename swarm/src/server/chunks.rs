//! Answering a Chunks request: each chunk read from the store (verified) and sent in the
//! smallest form the requester accepts — raw, zstd (as stored, recompressed, or made now) or a
//! delta against an older version it holds (`crate::compress`, `crate::delta`).

use libp2p::{PeerId, Stream};
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
        let Some(_slot) = self.shared.acquire(peer).await else {
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
        let mut budget = protocol::MAX_CHUNK_BYTES_PER_REQUEST;
        for id in ids {
            // A chunk of no shared NAR is answered as missing, like one not held.
            let body = if budget == 0 || !shareable.contains(&id) {
                ChunkBody::Missing
            } else {
                let (want, plan) = (want.clone(), plan.clone());
                self.store
                    .blocking(move |cs| compress::encode_stored(cs, &id, &want, plan.as_deref()))
                    .await
                    .unwrap_or_else(|e| {
                        debug!(chunk = %id, error = %e, "cannot serve chunk");
                        ChunkBody::Missing
                    })
            };
            let body = match body.raw_len() {
                Some(n) if n > budget => ChunkBody::Missing,
                Some(n) => {
                    budget -= n;
                    body
                }
                None => body,
            };
            if let Some(cap) = &self.shared.upload {
                if !spared {
                    cap.pace(body.encoded_len()).await;
                }
            }
            // One chunk at a time: the next is read only once this one is written,
            // so a slow reader holds at most one chunk of ours in memory.
            timed(wt, write_chunk(s, &id, &body)).await?;
            if body.raw_len().is_some() {
                self.shared.add_served(peer, body.encoded_len() - 1);
            }
        }
        Ok(true)
    }
}
