//! The wire format of [`crate::PROTOCOL`].
//!
//! One request per substream: the requester opens a stream, writes one request frame and reads
//! the response; yamux multiplexes many such streams over one connection, so parallel requests
//! need no ids and a slow answer never blocks another.
//!
//! A frame is a big-endian `u32` length (of what follows it), a one-byte type and the body.
//! Each type has its own maximum body size, checked against the length prefix before anything
//! is allocated, so a peer can make us hold at most one bounded frame per stream.
//!
//! | type | message | body |
//! |------|---------|------|
//! | 0x01 | Lookup | `u16` n ≤ 1024, n × 20-byte store path hash |
//! | 0x02 | Manifest | 32-byte NarHash |
//! | 0x03 | Have | `u16` c ≤ 8192, `u16` n ≤ 1024, c × 32-byte chunk id, n × 32-byte NarHash |
//! | 0x04 | Chunks | `u16` n ≤ 64, n × 32-byte chunk id, then optionally [`Want`] (see `chunk.rs`) |
//! | 0x81 | LookupReply | `u16` n, n × (`u32` len, narinfo text) |
//! | 0x82 | ManifestReply | `u8` 0 (none) or 1, then NarHash and [`Manifest::encode`] |
//! | 0x83 | HaveReply | chunk bitmap (LSB first), one [`NarState`] byte per NAR |
//! | 0x84 | Chunk | 32-byte id, then a [`ChunkBody`]: raw, missing, zstd or a zstd delta (see `chunk.rs`) |
//! | 0xff | Refused | `u8` [`Refusal`] |
//!
//! A Chunks request is answered by one Chunk frame per requested id, in request order, each
//! written as soon as it is read from the store.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use peerix_chunkstore::{ChunkId, Manifest};
use peerix_nix::{NarInfo, Sha256Hash, StorePathHash};
use thiserror::Error;

/// Most store path hashes in one Lookup.
pub const MAX_LOOKUP: usize = 1024;
/// Most chunk ids in one Have.
pub const MAX_HAVE_CHUNKS: usize = 8192;
/// Most NarHashes in one Have.
pub const MAX_HAVE_NARS: usize = 1024;
/// Most chunks in one Chunks request.
pub const MAX_CHUNKS_PER_REQUEST: usize = 64;
/// Most chunk bytes one Chunks request may ask for (the server stops serving beyond it).
pub const MAX_CHUNK_BYTES_PER_REQUEST: usize = 16 * 1024 * 1024;
/// A LookupReply larger than this is cut short: the requester asks again for the rest.
pub const MAX_LOOKUP_REPLY: usize = 8 * 1024 * 1024;
/// Bounds the manifests that can be fetched: ~466k chunks, a 114 GiB NAR at the default
/// chunk size.
pub const MAX_MANIFEST_REPLY: usize = 16 * 1024 * 1024;

const LEN_PREFIX: usize = 4;

mod chunk;
pub use chunk::{
    decode_chunk, write_chunk, ChunkBody, ChunksRequest, DeltaAsk, Want, MAX_DELTA_BASES,
    MAX_DELTA_NARS,
};

/// Frame types: requests below 0x80, replies above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Lookup = 0x01,
    Manifest = 0x02,
    Have = 0x03,
    Chunks = 0x04,
    LookupReply = 0x81,
    ManifestReply = 0x82,
    HaveReply = 0x83,
    Chunk = 0x84,
    Refused = 0xff,
}

impl Kind {
    const ALL: [Kind; 9] = [
        Kind::Lookup,
        Kind::Manifest,
        Kind::Have,
        Kind::Chunks,
        Kind::LookupReply,
        Kind::ManifestReply,
        Kind::HaveReply,
        Kind::Chunk,
        Kind::Refused,
    ];

    /// The frame type a byte names; None for an unknown one.
    pub fn from_byte(b: u8) -> Option<Kind> {
        Self::ALL.into_iter().find(|k| *k as u8 == b)
    }

    /// The largest body a frame of this type may have.
    pub fn max_body(self) -> usize {
        match self {
            Kind::Lookup => 2 + 20 * MAX_LOOKUP,
            Kind::Manifest => 32,
            Kind::Have => 4 + 32 * (MAX_HAVE_CHUNKS + MAX_HAVE_NARS),
            Kind::Chunks => 2 + 32 * MAX_CHUNKS_PER_REQUEST + Want::MAX_ENCODED,
            Kind::LookupReply => MAX_LOOKUP_REPLY,
            Kind::ManifestReply => MAX_MANIFEST_REPLY,
            Kind::HaveReply => MAX_HAVE_CHUNKS.div_ceil(8) + MAX_HAVE_NARS,
            Kind::Chunk => 32 + ChunkBody::MAX_ENCODED,
            Kind::Refused => 1,
        }
    }
}

#[derive(Debug, Error)]
pub enum ProtocolError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the stream ended before a frame")]
    Eof,
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("a {got:?} frame where {expected} was expected")]
    UnexpectedType { expected: &'static str, got: Kind },
    #[error("a {kind:?} frame claims {len} bytes, more than the {max} allowed")]
    TooLarge { kind: Kind, len: usize, max: usize },
    #[error("{what}: {n} is more than the {max} allowed")]
    TooMany {
        what: &'static str,
        n: usize,
        max: usize,
    },
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("bad narinfo: {0}")]
    BadNarInfo(#[source] Box<peerix_nix::narinfo::NarInfoError>),
    #[error("bad manifest: {0}")]
    BadManifest(#[source] Box<peerix_chunkstore::Error>),
}

impl ProtocolError {
    /// True when the peer sent something no correct peer sends (as opposed to the stream
    /// failing or ending, which happens to honest peers too).
    pub fn is_offence(&self) -> bool {
        !matches!(self, Self::Io(_) | Self::Eof)
    }
}

/// A raw frame: its type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub body: Vec<u8>,
}

/// Read one frame, refusing one of an unknown type or larger than its type allows before
/// allocating its body. A stream that ends cleanly before the first byte is [`ProtocolError::Eof`].
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Frame, ProtocolError> {
    let mut head = [0u8; LEN_PREFIX + 1];
    let mut got = 0;
    while got < head.len() {
        let n = r.read(&mut head[got..]).await?;
        if n == 0 {
            return Err(if got == 0 {
                ProtocolError::Eof
            } else {
                std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()
            });
        }
        got += n;
    }
    let len = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let k = Kind::from_byte(head[4]).ok_or(ProtocolError::UnknownType(head[4]))?;
    let max = k.max_body();
    if len == 0 {
        return Err(ProtocolError::Malformed("frame without a type"));
    }
    let body_len = len - 1;
    if body_len > max {
        return Err(ProtocolError::TooLarge {
            kind: k,
            len: body_len,
            max,
        });
    }
    // A chunk frame's buffer comes from the pool and goes back to it once the chunk is done.
    let mut body = peerix_chunkstore::buffers::for_overwrite(body_len);
    r.read_exact(&mut body).await?;
    Ok(Frame { kind: k, body })
}

/// Write one frame (the caller flushes).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    k: Kind,
    body: &[u8],
) -> std::io::Result<()> {
    w.write_all(&frame_header(k, body.len())).await?;
    w.write_all(body).await
}

pub(crate) fn frame_header(k: Kind, body_len: usize) -> [u8; 5] {
    let mut h = [0u8; 5];
    h[..4].copy_from_slice(&(body_len as u32 + 1).to_be_bytes());
    h[4] = k as u8;
    h
}

/// A request: the first and only frame a requester writes on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Lookup(Vec<StorePathHash>),
    Manifest(Sha256Hash),
    Have {
        chunks: Vec<ChunkId>,
        nars: Vec<Sha256Hash>,
    },
    Chunks(ChunksRequest),
}

/// What a peer holds of a NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NarState {
    None = 0,
    /// A download in progress: some of its chunks are there.
    Partial = 1,
    Complete = 2,
}

/// The answer to [`Request::Have`], in request order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HaveReply {
    pub chunks: Vec<bool>,
    pub nars: Vec<NarState>,
}

/// Why a server did not answer a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// All upload slots are taken: try again later or elsewhere.
    Busy = 1,
    /// The server refuses this peer for a while.
    Banned = 2,
}

pub(crate) fn check_count(what: &'static str, n: usize, max: usize) -> Result<(), ProtocolError> {
    if n > max {
        return Err(ProtocolError::TooMany { what, n, max });
    }
    Ok(())
}

pub(crate) struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        if self.0.len() < n {
            return Err(ProtocolError::Malformed(what));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.take(1, what)?[0])
    }
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<usize, ProtocolError> {
        Ok(u16::from_be_bytes(self.take(2, what)?.try_into().expect("2")) as usize)
    }
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<usize, ProtocolError> {
        Ok(u32::from_be_bytes(self.take(4, what)?.try_into().expect("4")) as usize)
    }
    pub(crate) fn arr32(&mut self, what: &'static str) -> Result<[u8; 32], ProtocolError> {
        Ok(self.take(32, what)?.try_into().expect("32"))
    }
    pub(crate) fn end(&self, what: &'static str) -> Result<(), ProtocolError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ProtocolError::Malformed(what))
        }
    }
}

impl Request {
    /// The frame type and body.
    pub fn encode(&self) -> (Kind, Vec<u8>) {
        let mut b = vec![];
        let k = match self {
            Request::Lookup(hs) => {
                b.extend_from_slice(&(hs.len() as u16).to_be_bytes());
                for h in hs {
                    b.extend_from_slice(&h.0);
                }
                Kind::Lookup
            }
            Request::Manifest(h) => {
                b.extend_from_slice(&h.0);
                Kind::Manifest
            }
            Request::Have { chunks, nars } => {
                b.extend_from_slice(&(chunks.len() as u16).to_be_bytes());
                b.extend_from_slice(&(nars.len() as u16).to_be_bytes());
                for c in chunks {
                    b.extend_from_slice(&c.0);
                }
                for n in nars {
                    b.extend_from_slice(&n.0);
                }
                Kind::Have
            }
            Request::Chunks(r) => {
                r.encode(&mut b);
                Kind::Chunks
            }
        };
        (k, b)
    }

    /// Check the counts the wire format allows before a request goes out.
    pub fn check(&self) -> Result<(), ProtocolError> {
        match self {
            Request::Lookup(hs) => check_count("lookup hashes", hs.len(), MAX_LOOKUP),
            Request::Manifest(_) => Ok(()),
            Request::Have { chunks, nars } => {
                check_count("have chunks", chunks.len(), MAX_HAVE_CHUNKS)?;
                check_count("have nars", nars.len(), MAX_HAVE_NARS)
            }
            Request::Chunks(r) => r.check(),
        }
    }

    pub fn decode(f: &Frame) -> Result<Self, ProtocolError> {
        let mut c = Cursor(&f.body);
        let req = match f.kind {
            Kind::Lookup => {
                let n = c.u16("lookup")?;
                check_count("lookup hashes", n, MAX_LOOKUP)?;
                let mut hs = Vec::with_capacity(n);
                for _ in 0..n {
                    hs.push(StorePathHash(c.take(20, "lookup")?.try_into().expect("20")));
                }
                Request::Lookup(hs)
            }
            Kind::Manifest => Request::Manifest(Sha256Hash(c.arr32("manifest request")?)),
            Kind::Have => {
                let nc = c.u16("have")?;
                let nn = c.u16("have")?;
                check_count("have chunks", nc, MAX_HAVE_CHUNKS)?;
                check_count("have nars", nn, MAX_HAVE_NARS)?;
                let mut chunks = Vec::with_capacity(nc);
                for _ in 0..nc {
                    chunks.push(ChunkId(c.arr32("have")?));
                }
                let mut nars = Vec::with_capacity(nn);
                for _ in 0..nn {
                    nars.push(Sha256Hash(c.arr32("have")?));
                }
                Request::Have { chunks, nars }
            }
            Kind::Chunks => Request::Chunks(ChunksRequest::decode(&mut c)?),
            k => {
                return Err(ProtocolError::UnexpectedType {
                    expected: "a request",
                    got: k,
                })
            }
        };
        c.end("request (trailing bytes)")?;
        Ok(req)
    }
}

/// Read the request that opens a stream.
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Result<Request, ProtocolError> {
    Request::decode(&read_frame(r).await?)
}

/// Write a request and flush it.
pub async fn write_request<W: AsyncWrite + Unpin>(
    w: &mut W,
    req: &Request,
) -> Result<(), ProtocolError> {
    req.check()?;
    let (k, b) = req.encode();
    write_frame(w, k, &b).await?;
    w.flush().await?;
    Ok(())
}

/// A reply: the one frame a server writes to a Lookup, Manifest or Have request, or a refusal
/// of any request. (A Chunks request is answered by Chunk frames instead, see `chunk.rs`.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The narinfos of those paths asked about that the server shares.
    Lookup(Vec<NarInfo>),
    /// The manifest of the NAR asked about, if the server shares it.
    Manifest(Option<Manifest>),
    Have(HaveReply),
    Refused(Refusal),
}

impl Reply {
    /// The frame type and body. Narinfos past the LookupReply's bound are left out (the
    /// requester asks again for what it misses); a manifest too large for a ManifestReply
    /// (see [`manifest_fits`]) is sent as not held.
    pub fn encode(&self) -> (Kind, Vec<u8>) {
        match self {
            Reply::Lookup(infos) => {
                let mut b = vec![0, 0];
                let mut n = 0u16;
                for s in infos.iter().take(MAX_LOOKUP).map(NarInfo::render) {
                    if s.len() > NarInfo::MAX_SIZE || b.len() + 4 + s.len() > MAX_LOOKUP_REPLY {
                        continue;
                    }
                    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
                    b.extend_from_slice(s.as_bytes());
                    n += 1;
                }
                b[..2].copy_from_slice(&n.to_be_bytes());
                (Kind::LookupReply, b)
            }
            Reply::Manifest(Some(m)) if manifest_fits(m) => {
                let enc = m.encode();
                let mut b = Vec::with_capacity(33 + enc.len());
                b.push(1);
                b.extend_from_slice(&m.nar_hash.0);
                b.extend_from_slice(&enc);
                (Kind::ManifestReply, b)
            }
            Reply::Manifest(_) => (Kind::ManifestReply, vec![0]),
            Reply::Have(r) => {
                let mut b = vec![0u8; r.chunks.len().div_ceil(8)];
                for (i, &h) in r.chunks.iter().enumerate() {
                    if h {
                        b[i / 8] |= 1 << (i % 8);
                    }
                }
                b.extend(r.nars.iter().map(|&s| s as u8));
                (Kind::HaveReply, b)
            }
            Reply::Refused(why) => (Kind::Refused, vec![*why as u8]),
        }
    }

    /// Decode the reply to `req`: a refusal, or the reply of that request's kind that answers
    /// it (narinfos only for paths asked about, the manifest of the NAR asked about, one answer
    /// per chunk and NAR asked about); anything else is malformed.
    pub fn decode(f: &Frame, req: &Request) -> Result<Self, ProtocolError> {
        if let Some(why) = Refusal::of(f) {
            return Ok(Reply::Refused(why));
        }
        match req {
            Request::Lookup(asked) => decode_lookup(f, asked).map(Reply::Lookup),
            Request::Manifest(h) => decode_manifest(f, h).map(Reply::Manifest),
            Request::Have { chunks, nars } => {
                decode_have(f, chunks.len(), nars.len()).map(Reply::Have)
            }
            Request::Chunks(_) => Err(ProtocolError::UnexpectedType {
                expected: "chunk frames",
                got: f.kind,
            }),
        }
    }
}

/// True when a ManifestReply can carry `m`.
pub fn manifest_fits(m: &Manifest) -> bool {
    33 + m.encoded_len() <= MAX_MANIFEST_REPLY
}

fn decode_lookup(f: &Frame, asked: &[StorePathHash]) -> Result<Vec<NarInfo>, ProtocolError> {
    expect(f, Kind::LookupReply, "a lookup reply")?;
    let mut c = Cursor(&f.body);
    let n = c.u16("lookup reply")?;
    check_count("narinfos", n, MAX_LOOKUP)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let len = c.u32("lookup reply")?;
        if len > NarInfo::MAX_SIZE {
            return Err(ProtocolError::TooLarge {
                kind: f.kind,
                len,
                max: NarInfo::MAX_SIZE,
            });
        }
        let text = c.take(len, "lookup reply")?;
        let info =
            NarInfo::parse_bytes(text).map_err(|e| ProtocolError::BadNarInfo(Box::new(e)))?;
        if !asked.contains(&info.store_path.hash()) {
            return Err(ProtocolError::Malformed(
                "lookup reply with a path not looked up",
            ));
        }
        out.push(info);
    }
    c.end("lookup reply (trailing bytes)")?;
    Ok(out)
}

fn decode_manifest(f: &Frame, nar_hash: &Sha256Hash) -> Result<Option<Manifest>, ProtocolError> {
    expect(f, Kind::ManifestReply, "a manifest reply")?;
    let mut c = Cursor(&f.body);
    match c.u8("manifest reply")? {
        0 => {
            c.end("manifest reply (trailing bytes)")?;
            Ok(None)
        }
        1 => {
            let h = Sha256Hash(c.arr32("manifest reply")?);
            if h != *nar_hash {
                return Err(ProtocolError::Malformed("manifest reply for another NAR"));
            }
            let m =
                Manifest::decode(h, c.0).map_err(|e| ProtocolError::BadManifest(Box::new(e)))?;
            Ok(Some(m))
        }
        _ => Err(ProtocolError::Malformed("manifest reply flag")),
    }
}

fn decode_have(f: &Frame, n_chunks: usize, n_nars: usize) -> Result<HaveReply, ProtocolError> {
    expect(f, Kind::HaveReply, "a have reply")?;
    let bitmap = n_chunks.div_ceil(8);
    if f.body.len() != bitmap + n_nars {
        return Err(ProtocolError::Malformed("have reply length"));
    }
    let chunks = (0..n_chunks)
        .map(|i| f.body[i / 8] & (1 << (i % 8)) != 0)
        .collect();
    let nars = f.body[bitmap..]
        .iter()
        .map(|&s| match s {
            0 => Ok(NarState::None),
            1 => Ok(NarState::Partial),
            2 => Ok(NarState::Complete),
            _ => Err(ProtocolError::Malformed("have reply NAR state")),
        })
        .collect::<Result<_, _>>()?;
    Ok(HaveReply { chunks, nars })
}

/// Write a reply and flush it.
pub async fn write_reply<W: AsyncWrite + Unpin>(w: &mut W, reply: &Reply) -> std::io::Result<()> {
    let (k, b) = reply.encode();
    write_frame(w, k, &b).await?;
    w.flush().await
}

impl Refusal {
    /// The refusal a frame carries, if it is one.
    pub fn of(f: &Frame) -> Option<Refusal> {
        if f.kind != Kind::Refused {
            return None;
        }
        Some(match f.body.first() {
            Some(2) => Refusal::Banned,
            _ => Refusal::Busy,
        })
    }
}

pub(crate) fn expect(f: &Frame, k: Kind, what: &'static str) -> Result<(), ProtocolError> {
    if f.kind != k {
        return Err(ProtocolError::UnexpectedType {
            expected: what,
            got: f.kind,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
