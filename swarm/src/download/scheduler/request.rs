//! One request: a run of chunks asked of one peer in the forms its link warrants, each chunk
//! stored as it arrives and reported to the scheduler, the whole bounded in time; and the end
//! of a run, whose requests still in flight are then of no use.

use futures::StreamExt;
use tokio::time::Instant;

use super::{Event, Req, Scheduler, TaskError, Want};
use crate::client::ClientError;

impl Scheduler {
    pub(super) fn start(&mut self, run: usize, p: usize) {
        let id = self.next_req;
        self.next_req += 1;
        self.unqueue(run);
        let r = &mut self.runs[run];
        // A race asks for the run from the other end than the request it races: the two meet
        // somewhere in the middle (where depends on the peers' speeds), and the run is done
        // then, with no more than a chunk or two received twice, where racing in the same
        // order would have the faster peer send what the slower one already had. (The request
        // raced may itself be a race whose first request failed.)
        let reversed = r
            .requests
            .first()
            .and_then(|q| self.reqs.get(q))
            .is_some_and(|q| !q.reversed);
        r.requests.push(id);
        let mut ks: Vec<Want> = r
            .chunks
            .iter()
            .copied()
            .filter(|&k| !self.received.get(k))
            .collect();
        if reversed {
            ks.reverse();
        }
        let refs = self.wanted.refs(&ks);
        let bytes: u64 = refs.iter().map(|c| u64::from(c.len)).sum();
        let timeout = self.cfg.min_timeout.max(
            self.cfg
                .timeout_per_mib
                .mul_f64(bytes as f64 / (1024.0 * 1024.0)),
        );
        let peer = &mut self.peers[p];
        peer.in_flight += 1;
        let peer_id = peer.id;
        let want = self
            .cfg
            .wire
            .want(peer.wire_rate, self.bases.as_ref().map(|b| &b.ask));
        let fetch = self
            .client
            .fetch_chunks_as(peer_id, refs, want, self.bases.clone());
        let store = self.store.clone();
        let tx = self.events_tx.clone();
        let abort = self.tasks.spawn(async move {
            let work = async {
                // Each chunk is stored before it is reported, so it can be served to others at
                // once and read back for a later occurrence in the NAR; the next one is read
                // and verified meanwhile (a peer answers one run at a time, so this is where
                // receiving and storing overlap).
                // The peer answers in the order asked (the client holds it to that).
                let stored = fetch
                    .zip(futures::stream::iter(ks))
                    .map(|(item, k)| {
                        let store = store.clone();
                        async move {
                            let got = item?;
                            let c = got.chunk.clone();
                            store.blocking(move |cs| cs.put_verified(&c)).await?;
                            Ok::<_, TaskError>((k, got))
                        }
                    })
                    .buffered(2);
                tokio::pin!(stored);
                let mut missing = false;
                while let Some(item) = stored.next().await {
                    match item {
                        Ok((k, got)) => {
                            let (_, data) = got.chunk.into_parts();
                            let _ = tx.send(Event::Chunk {
                                req: id,
                                peer: p,
                                k,
                                data,
                                wire: got.wire_len,
                                sent: got.sent,
                            });
                        }
                        Err(TaskError::Client(ClientError::Missing { .. })) => missing = true,
                        Err(e) => return Err(e),
                    }
                }
                if missing {
                    Err(TaskError::Missing)
                } else {
                    Ok(())
                }
            };
            let result = match tokio::time::timeout(timeout, work).await {
                Ok(r) => r,
                Err(_) => Err(TaskError::Timeout),
            };
            let _ = tx.send(Event::Done { req: id, result });
        });
        self.reqs.insert(
            id,
            Req {
                peer: p,
                run,
                started: Instant::now(),
                in_flight_at_start: self.peers[p].in_flight,
                bytes: 0,
                wire: 0,
                reversed,
                abort,
            },
        );
    }

    /// Every chunk of `run` is in: the requests for it still in flight (races) are dropped.
    pub(super) fn finish_run(&mut self, run: usize) {
        self.unqueue(run);
        let r = &mut self.runs[run];
        r.done = true;
        r.chunks.clear();
        for q in std::mem::take(&mut r.requests) {
            if let Some(loser) = self.reqs.remove(&q) {
                loser.abort.abort();
                self.peers[loser.peer].in_flight -= 1;
            }
        }
    }
}
