//! Asking peers: one request per stream, every answer bounded and timed.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncWriteExt, Stream};
use libp2p::PeerId;
use peerix_chunkstore::{ChunkId, ChunkRef, ChunkStore, Manifest, VerifiedChunk};
use peerix_nix::{NarInfo, Sha256Hash, StorePathHash};
use thiserror::Error;
use tokio::time::Instant;

use crate::compress::{self, DecodeError, Received};
use crate::protocol::{
    self, decode_chunk, ChunkBody, ChunksRequest, Frame, HaveReply, ProtocolError, Refusal, Reply,
    Request, Want,
};
use crate::PROTOCOL;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("cannot open a stream to {peer}: {why}")]
    Open { peer: PeerId, why: String },
    #[error("{peer}: {source}")]
    Protocol {
        peer: PeerId,
        #[source]
        source: ProtocolError,
    },
    #[error("{peer} did not answer in time")]
    Timeout { peer: PeerId },
    #[error("{peer} is busy")]
    Busy { peer: PeerId },
    #[error("{peer} refuses us")]
    Refused { peer: PeerId },
    #[error("{peer} no longer has chunk {id}")]
    Missing { peer: PeerId, id: ChunkId },
    #[error("{peer} sent bytes that do not match their chunk id")]
    BadChunk { peer: PeerId },
    #[error("{peer} sent a chunk that does not decode: {source}")]
    BadEncoding {
        peer: PeerId,
        #[source]
        source: DecodeError,
    },
    /// The bases of a delta could not be read here (collected since we offered them).
    #[error("cannot read the base of a delta: {0}")]
    Base(#[source] peerix_chunkstore::Error),
    /// The bytes match the chunk id but not the length the manifest gave it: the peer that
    /// sent them is honest, whoever supplied the manifest lied.
    #[error("chunk {id} is {actual} bytes long, the manifest says {claimed}")]
    WrongLength {
        id: ChunkId,
        claimed: u32,
        actual: usize,
    },
    #[error("{peer} answered something we did not ask for: {why}")]
    Unexpected { peer: PeerId, why: &'static str },
    #[error("request too large: {0}")]
    TooLarge(ProtocolError),
}

impl ClientError {
    /// The peer misbehaved, as opposed to being slow, busy or gone.
    pub fn is_misbehaviour(&self) -> bool {
        match self {
            Self::BadChunk { .. } | Self::BadEncoding { .. } | Self::Unexpected { .. } => true,
            Self::Protocol { source, .. } => source.is_offence(),
            _ => false,
        }
    }
}

/// Timeouts: a request may take `min_timeout`, or `per_mib` per MiB it is expected to carry
/// if that is longer.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub min_timeout: Duration,
    pub per_mib: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            min_timeout: Duration::from_secs(4),
            per_mib: Duration::from_secs(4),
        }
    }
}

impl ClientConfig {
    pub fn timeout_for(&self, bytes: u64) -> Duration {
        let per = self.per_mib.mul_f64(bytes as f64 / (1024.0 * 1024.0));
        self.min_timeout.max(per)
    }
}

/// Requests to peers. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    control: libp2p_stream::Control,
    cfg: ClientConfig,
}

/// How often a request is retried when its stream fails before the peer answered anything: a
/// peer that restarted, or a stream that raced the closing of an idle connection. (Streams that
/// arrived in a burst were dropped by libp2p-stream as published; the copy peerix builds has
/// room for them, see vendor/libp2p-stream/PEERIX.md.)
const OPEN_RETRIES: usize = 2;

impl Client {
    pub fn new(control: libp2p_stream::Control) -> Self {
        Self::with_config(control, ClientConfig::default())
    }

    pub fn with_config(control: libp2p_stream::Control, cfg: ClientConfig) -> Self {
        Self { control, cfg }
    }

    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// The narinfos of those `hashes` the peer holds and shares (at most [`protocol::MAX_LOOKUP`]).
    pub async fn lookup(
        &self,
        peer: PeerId,
        hashes: &[StorePathHash],
    ) -> Result<Vec<NarInfo>, ClientError> {
        match self
            .request(peer, &Request::Lookup(hashes.to_vec()), 64 * 1024)
            .await?
        {
            Reply::Lookup(found) => Ok(found),
            _ => Err(another_kind(peer)),
        }
    }

    pub async fn manifest(
        &self,
        peer: PeerId,
        nar_hash: Sha256Hash,
    ) -> Result<Option<Manifest>, ClientError> {
        match self
            .request(peer, &Request::Manifest(nar_hash), 1024 * 1024)
            .await?
        {
            Reply::Manifest(m) => Ok(m),
            _ => Err(another_kind(peer)),
        }
    }

    /// Which of `chunks` the peer holds (downloads in progress included) and what it holds of
    /// each of `nars`.
    pub async fn have(
        &self,
        peer: PeerId,
        chunks: &[ChunkId],
        nars: &[Sha256Hash],
    ) -> Result<HaveReply, ClientError> {
        let req = Request::Have {
            chunks: chunks.to_vec(),
            nars: nars.to_vec(),
        };
        match self.request(peer, &req, 64 * 1024).await? {
            Reply::Have(h) => Ok(h),
            _ => Err(another_kind(peer)),
        }
    }

    async fn open(&self, peer: PeerId, req: &Request) -> Result<libp2p::Stream, ClientError> {
        req.check().map_err(ClientError::TooLarge)?;
        let mut control = self.control.clone();
        let mut s = tokio::time::timeout(self.cfg.min_timeout, control.open_stream(peer, PROTOCOL))
            .await
            .map_err(|_| ClientError::Timeout { peer })?
            .map_err(|e| ClientError::Open {
                peer,
                why: e.to_string(),
            })?;
        protocol::write_request(&mut s, req)
            .await
            .map_err(|source| ClientError::Protocol { peer, source })?;
        Ok(s)
    }

    /// One request, its reply (a refusal is an error), retried if the stream fails before any
    /// answer.
    async fn request(
        &self,
        peer: PeerId,
        req: &Request,
        expect: u64,
    ) -> Result<Reply, ClientError> {
        let mut attempt = 0;
        loop {
            let r = async {
                let mut s = self.open(peer, req).await?;
                let f = read_frame(&mut s, peer).await?;
                let _ = s.close().await;
                Reply::decode(&f, req).map_err(|source| ClientError::Protocol { peer, source })
            };
            match tokio::time::timeout(self.cfg.timeout_for(expect), r).await {
                Err(_) => return Err(ClientError::Timeout { peer }),
                Ok(Err(e)) if is_early_failure(&e) && attempt < OPEN_RETRIES => attempt += 1,
                Ok(r) => return r,
            }
        }
    }

    /// Fetch raw chunks: [`Client::fetch_chunks_as`] with nothing but raw bytes accepted.
    pub fn fetch_chunks(
        &self,
        peer: PeerId,
        refs: Vec<ChunkRef>,
    ) -> impl Stream<Item = Result<VerifiedChunk, ClientError>> + Send + 'static {
        use futures::StreamExt;
        self.fetch_chunks_as(peer, refs, Want::default(), None)
            .map(|r| r.map(|r| r.chunk))
    }

    /// Fetch chunks in the forms `want` allows, yielding each as soon as it arrived, decoded
    /// and matched its id. Deltas may only be against chunks in `bases`. A chunk the peer no
    /// longer has is a [`ClientError::Missing`] item and the stream goes on; any other error
    /// ends it. The whole request times out in proportion to the bytes asked for.
    pub fn fetch_chunks_as(
        &self,
        peer: PeerId,
        refs: Vec<ChunkRef>,
        want: Want,
        bases: Option<Arc<DeltaBases>>,
    ) -> impl Stream<Item = Result<Received, ClientError>> + Send + 'static {
        let total: u64 = refs.iter().map(|r| u64::from(r.len)).sum();
        let state = Fetch {
            client: self.clone(),
            peer,
            want,
            bases,
            refs,
            next: 0,
            stream: None,
            deadline: Instant::now() + self.cfg.timeout_for(total),
            done: false,
        };
        futures::stream::unfold(state, |mut st| async move {
            if st.done || st.next >= st.refs.len() {
                if let Some(mut s) = st.stream.take() {
                    let _ = tokio::time::timeout_at(st.deadline, s.close()).await;
                }
                return None;
            }
            let item = match tokio::time::timeout_at(st.deadline, st.step()).await {
                Err(_) => Err(ClientError::Timeout { peer: st.peer }),
                Ok(r) => r,
            };
            if matches!(&item, Err(e) if !matches!(e, ClientError::Missing { .. })) {
                st.done = true;
                st.stream = None;
            }
            Some((item, st))
        })
    }
}

/// The chunks a requester offers as delta bases (those of the older NARs it named), and the
/// store to read them from.
pub struct DeltaBases {
    pub store: ChunkStore,
    pub chunks: HashSet<ChunkId>,
    /// What the request offers: the NAR wanted and the older NARs these chunks are from.
    pub ask: crate::protocol::DeltaAsk,
}

struct Fetch {
    client: Client,
    peer: PeerId,
    want: Want,
    bases: Option<Arc<DeltaBases>>,
    refs: Vec<ChunkRef>,
    next: usize,
    stream: Option<libp2p::Stream>,
    deadline: Instant,
    done: bool,
}

impl Fetch {
    async fn step(&mut self) -> Result<Received, ClientError> {
        let peer = self.peer;
        let mut attempt = 0;
        let f = loop {
            if self.stream.is_none() {
                let req = Request::Chunks(ChunksRequest {
                    ids: self.refs.iter().map(|r| r.id).collect(),
                    want: self.want.clone(),
                });
                self.stream = Some(self.client.open(peer, &req).await?);
            }
            let s = self.stream.as_mut().expect("just opened");
            match read_frame(s, peer).await {
                Err(e) if self.next == 0 && is_early_failure(&e) && attempt < OPEN_RETRIES => {
                    attempt += 1;
                    self.stream = None;
                }
                r => break r?,
            }
        };
        let want = self.refs[self.next];
        self.next += 1;
        let (id, body) =
            decode_chunk(f).map_err(|source| ClientError::Protocol { peer, source })?;
        if id != want.id {
            return Err(ClientError::Unexpected {
                peer,
                why: "a chunk out of order",
            });
        }
        let prefix = match &body {
            ChunkBody::Delta { bases, .. } => {
                let offered = self.bases.clone().filter(|_| self.want.delta.is_some());
                Some(prefix(peer, offered, bases.clone()).await?)
            }
            _ => None,
        };
        // The id first: only bytes that match it tell whether the length was the lie.
        let got = compress::decode(id, body, prefix.as_deref())
            .map_err(|e| match e {
                DecodeError::BadChunk => ClientError::BadChunk { peer },
                source => ClientError::BadEncoding { peer, source },
            })?
            .ok_or(ClientError::Missing { peer, id })?;
        if got.chunk.data().len() != want.len as usize {
            return Err(ClientError::WrongLength {
                id,
                claimed: want.len,
                actual: got.chunk.data().len(),
            });
        }
        Ok(got)
    }
}

/// The bytes a delta was computed against: chunks we offered, read from our store.
async fn prefix(
    peer: PeerId,
    offered: Option<Arc<DeltaBases>>,
    ids: Vec<ChunkId>,
) -> Result<Vec<u8>, ClientError> {
    let bases = match offered {
        Some(b) if ids.iter().all(|i| b.chunks.contains(i)) => b,
        _ => {
            return Err(ClientError::Unexpected {
                peer,
                why: "a delta against chunks we did not offer",
            })
        }
    };
    bases
        .store
        .blocking(move |cs| {
            let mut out = vec![];
            for id in &ids {
                out.extend_from_slice(&cs.read_chunk(id)?);
            }
            Ok(out)
        })
        .await
        .map_err(ClientError::Base)
}

/// The stream failed before any answer: it could not be opened (among other reasons, on a
/// connection that was closing: seen when one of the two connections a hole punch made was
/// reset a moment later, and the stream had gone to it), or it broke or ended early. Asking
/// again opens a stream on whatever connection is left, or dials.
fn is_early_failure(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Open { .. }
            | ClientError::Protocol {
                source: ProtocolError::Io(_) | ProtocolError::Eof,
                ..
            }
    )
}

/// [`Reply::decode`] gives the reply of the request's kind, or a refusal, which
/// [`read_frame`] has turned into an error already.
fn another_kind(peer: PeerId) -> ClientError {
    ClientError::Unexpected {
        peer,
        why: "a reply of another kind",
    }
}

async fn read_frame(s: &mut libp2p::Stream, peer: PeerId) -> Result<Frame, ClientError> {
    let f = protocol::read_frame(s)
        .await
        .map_err(|source| ClientError::Protocol { peer, source })?;
    match Refusal::of(&f) {
        Some(Refusal::Busy) => Err(ClientError::Busy { peer }),
        Some(Refusal::Banned) => Err(ClientError::Refused { peer }),
        None => Ok(f),
    }
}
