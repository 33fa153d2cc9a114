//! Which peer holds which chunks, and the runs cut from that.
//!
//! Peers that said they hold the whole NAR get runs at once. The others are asked which chunks
//! they hold, and each answer adds its peer to the runs it can serve whenever it comes: one
//! slow or silent peer never holds up the start of a download. A run left with no peer to ask
//! (its holders lacked chunks, failed or lied) is cut again from what the answers say, once
//! they are all in.

use std::collections::HashSet;

use peerix_chunkstore::ChunkId;
use tracing::debug;

use super::{Event, Run, Scheduler, Want};
use crate::client::ClientError;
use crate::download::DownloadError;
use crate::protocol::{MAX_CHUNKS_PER_REQUEST, MAX_HAVE_CHUNKS};

/// What is known of the chunks one peer holds.
#[derive(Default)]
pub(super) struct Holdings {
    /// It said it holds the whole NAR.
    pub(super) whole: bool,
    /// Its answer to `have`, about every wanted chunk in order; `None` until it comes.
    pub(super) answer: Option<Vec<bool>>,
    /// Chunks it was asked for and did not have.
    pub(super) lacks: HashSet<Want>,
}

impl Scheduler {
    /// Ask the peers not known to hold the whole NAR which chunks they hold, and cut the
    /// missing chunks into runs: at once when some peer holds the whole NAR, else once the
    /// answers are in.
    pub(super) async fn plan(&mut self) -> Result<(), DownloadError> {
        for p in 0..self.peers.len() {
            if !self.peers[p].holds.whole {
                self.ask(p);
            }
        }
        while self.asking > 0 && !self.peers.iter().any(|p| p.holds.whole && !p.gone) {
            // We hold a sender, so the channel never closes.
            if let Some(ev) = self.events.recv().await {
                self.on_event(ev)?;
            }
        }
        self.cut(self.wanted.all().collect())?;
        debug!(
            runs = self.runs.len(),
            chunks = self.wanted.len(),
            asking = self.asking,
            "download planned"
        );
        Ok(())
    }

    fn ask(&mut self, p: usize) {
        let client = self.client.clone();
        let peer = self.peers[p].id;
        let wanted = self.wanted.clone();
        let tx = self.events_tx.clone();
        self.asking += 1;
        self.tasks.spawn(async move {
            let ask = async {
                let mut held = Vec::with_capacity(wanted.len());
                let all: Vec<Want> = wanted.all().collect();
                for batch in all.chunks(MAX_HAVE_CHUNKS) {
                    let ids: Vec<ChunkId> = batch.iter().map(|&k| wanted.chunk(k).id).collect();
                    // The reply decodes to a flag for each id asked about.
                    held.extend(client.have(peer, &ids, &[]).await?.chunks);
                }
                Ok(held)
            };
            let _ = tx.send(Event::Have {
                peer: p,
                result: ask.await,
            });
        });
    }

    /// A peer's answer: it joins every run it holds all of.
    pub(super) fn on_have(&mut self, p: usize, result: Result<Vec<bool>, ClientError>) {
        self.asking -= 1;
        // The last answer may leave a run nobody holds for certain.
        self.orphans_possible = true;
        let answer = match result {
            Ok(a) => a,
            Err(e) => {
                debug!(peer = %self.peers[p].id, error = %e, "have failed; not using peer");
                if e.is_misbehaviour() && !self.report.bad_peers.contains(&self.peers[p].id) {
                    self.report.bad_peers.push(self.peers[p].id);
                }
                self.peers[p].gone = true;
                return;
            }
        };
        self.peers[p].holds.answer = Some(answer);
        for r in 0..self.runs.len() {
            let run = &self.runs[r];
            if !run.done
                && !run.holders.contains(&p)
                && run.chunks.iter().all(|&k| self.holds(p, k))
            {
                self.runs[r].holders.push(p);
            }
        }
    }

    /// Whether `p` can be asked for chunk `k`, as far as we know.
    fn holds(&self, p: usize, k: Want) -> bool {
        let peer = &self.peers[p];
        let h = &peer.holds;
        let said = h.whole
            || h.answer
                .as_ref()
                .is_some_and(|a| a.get(k as usize).copied().unwrap_or(false));
        !peer.gone && said && !h.lacks.contains(&k)
    }

    /// `p` did not have the chunks of `run` still missing after its request: it is asked for
    /// them no more, and the run is cut again if nobody else holds it.
    pub(super) fn lacks(&mut self, p: usize, run: usize) {
        // Called before the run sheds what arrived: what it did send is not lacking.
        let missing: Vec<Want> = self.runs[run]
            .chunks
            .iter()
            .copied()
            .filter(|&k| !self.received.get(k))
            .collect();
        self.peers[p].holds.lacks.extend(missing);
        self.runs[run].holders.retain(|&h| h != p);
        self.orphans_possible = true;
    }

    /// Cut again every waiting run that no usable peer holds, once no answer is still to
    /// come that could name one.
    pub(super) fn recut_orphans(&mut self) -> Result<(), DownloadError> {
        if self.asking > 0 || !std::mem::take(&mut self.orphans_possible) {
            return Ok(());
        }
        let orphans: Vec<usize> = self
            .pending
            .iter()
            .map(|&(_, r)| r)
            .filter(|&r| !self.runs[r].holders.iter().any(|&p| !self.peers[p].gone))
            .collect();
        for run in orphans {
            let chunks = std::mem::take(&mut self.runs[run].chunks);
            self.finish_run(run);
            self.cut(chunks)?;
        }
        Ok(())
    }

    /// Cut `chunks` (in NAR order) into runs of at most `run_bytes`, each of chunks that the
    /// same peers hold.
    fn cut(&mut self, chunks: Vec<Want>) -> Result<(), DownloadError> {
        let mut cur: Vec<Want> = vec![];
        let mut cur_holders: Vec<usize> = vec![];
        let mut cur_bytes = 0u64;
        for k in chunks {
            let c = self.wanted.chunk(k);
            let h: Vec<usize> = (0..self.peers.len())
                .filter(|&p| self.holds(p, k))
                .collect();
            if h.is_empty() {
                return Err(DownloadError::Unavailable {
                    chunk: c.id,
                    missing: self.wanted.len() - self.received.count(),
                });
            }
            let common: Vec<usize> = cur_holders
                .iter()
                .copied()
                .filter(|p| h.contains(p))
                .collect();
            if !cur.is_empty()
                && (common.is_empty()
                    || cur_bytes + u64::from(c.len) > self.cfg.run_bytes
                    || cur.len() >= MAX_CHUNKS_PER_REQUEST)
            {
                let run = std::mem::take(&mut cur);
                self.push_run(run, std::mem::take(&mut cur_holders));
                cur_bytes = 0;
            }
            cur_holders = if cur.is_empty() { h } else { common };
            cur.push(k);
            cur_bytes += u64::from(c.len);
        }
        if !cur.is_empty() {
            self.push_run(cur, cur_holders);
        }
        Ok(())
    }

    fn push_run(&mut self, chunks: Vec<Want>, holders: Vec<usize>) {
        let offset = self.wanted.offset(chunks[0]);
        self.runs.push(Run {
            chunks,
            offset,
            holders,
            requests: vec![],
            done: false,
        });
        self.queue(self.runs.len() - 1);
    }
}
