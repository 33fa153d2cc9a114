//! The Chunks request and the Chunk frames that answer it.
//!
//! A Chunks request is the chunk ids, optionally followed by what the requester accepts
//! ([`Want`]): `u8` flags (1: zstd as stored, 2: compress on the fly, 4: deltas), and with
//! the delta flag the NarHash the chunks belong to and `u8` n ≤ [`MAX_DELTA_NARS`] NarHashes
//! of older versions of that path the requester holds whole. A request without the flags
//! byte wants raw chunks.
//!
//! Each Chunk frame is the 32-byte id and a [`ChunkBody`]:
//!
//! | tag | body |
//! |-----|------|
//! | 0 | raw bytes |
//! | 1 | (missing: the server does not have it) |
//! | 2 | `u32` raw length, one zstd frame |
//! | 3 | `u8` n ≤ [`MAX_DELTA_BASES`], n × 32-byte base chunk id, `u32` raw length, one zstd frame compressed with the bases, concatenated in that order, as its prefix |
//!
//! A server sends a compressed body only when it is smaller than the raw bytes, so a Chunk
//! frame is never much larger than the largest chunk.

use bytes::Bytes;
use futures::{AsyncWrite, AsyncWriteExt};
use peerix_chunkstore::{ChunkId, MAX_CHUNK};
use peerix_nix::Sha256Hash;
use std::io::IoSlice;

use super::{check_count, expect, frame_header, Cursor, Frame, Kind, ProtocolError};
use super::{Request, MAX_CHUNKS_PER_REQUEST};

/// Most older NARs a requester may offer as delta bases.
pub const MAX_DELTA_NARS: usize = 4;
/// Most base chunks one delta may be computed against.
pub const MAX_DELTA_BASES: usize = 8;

const WANT_ZSTD: u8 = 1;
const WANT_COMPRESS: u8 = 2;
const WANT_DELTA: u8 = 4;

/// What a requester accepts besides raw chunks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Want {
    /// Chunks the server stores compressed may come as they are stored (zstd).
    pub zstd: bool,
    /// The server should compress raw chunks (the link is slower than compression).
    pub compress: bool,
    /// The server may send chunks as deltas against chunks of these older NARs.
    pub delta: Option<DeltaAsk>,
}

/// The NAR a delta request's chunks belong to and the older versions the requester holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaAsk {
    pub nar: Sha256Hash,
    pub bases: Vec<Sha256Hash>,
}

impl Want {
    /// The most bytes the flags and their fields take.
    pub const MAX_ENCODED: usize = 1 + 32 + 1 + 32 * MAX_DELTA_NARS;

    /// Everything a current peer understands.
    pub fn all(delta: Option<DeltaAsk>) -> Self {
        Self {
            zstd: true,
            compress: true,
            delta,
        }
    }

    fn is_raw(&self) -> bool {
        !self.zstd && !self.compress && self.delta.is_none()
    }
}

/// A Chunks request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunksRequest {
    pub ids: Vec<ChunkId>,
    pub want: Want,
}

impl ChunksRequest {
    /// Raw chunks, as the first version of the protocol sent them.
    pub fn raw(ids: Vec<ChunkId>) -> Self {
        Self {
            ids,
            want: Want::default(),
        }
    }

    pub(super) fn check(&self) -> Result<(), ProtocolError> {
        check_count("chunks", self.ids.len(), MAX_CHUNKS_PER_REQUEST)?;
        if let Some(d) = &self.want.delta {
            check_count("delta base NARs", d.bases.len(), MAX_DELTA_NARS)?;
        }
        Ok(())
    }

    pub(super) fn encode(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&(self.ids.len() as u16).to_be_bytes());
        for c in &self.ids {
            b.extend_from_slice(&c.0);
        }
        let w = &self.want;
        if w.is_raw() {
            return;
        }
        let bit = |on: bool, flag: u8| if on { flag } else { 0 };
        let flags = bit(w.zstd, WANT_ZSTD)
            | bit(w.compress, WANT_COMPRESS)
            | bit(w.delta.is_some(), WANT_DELTA);
        b.push(flags);
        if let Some(d) = &w.delta {
            b.extend_from_slice(&d.nar.0);
            b.push(d.bases.len() as u8);
            for n in &d.bases {
                b.extend_from_slice(&n.0);
            }
        }
    }

    pub(super) fn decode(c: &mut Cursor<'_>) -> Result<Self, ProtocolError> {
        let n = c.u16("chunks request")?;
        check_count("chunks", n, MAX_CHUNKS_PER_REQUEST)?;
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(ChunkId(c.arr32("chunks request")?));
        }
        let mut want = Want::default();
        if c.0.is_empty() {
            return Ok(Self { ids, want });
        }
        let flags = c.u8("chunks request flags")?;
        // No flags are sent as no byte at all: one encoding per request.
        if flags == 0 || flags & !(WANT_ZSTD | WANT_COMPRESS | WANT_DELTA) != 0 {
            return Err(ProtocolError::Malformed("chunks request flags"));
        }
        want.zstd = flags & WANT_ZSTD != 0;
        want.compress = flags & WANT_COMPRESS != 0;
        if flags & WANT_DELTA != 0 {
            let nar = Sha256Hash(c.arr32("delta request")?);
            let nb = c.u8("delta request")? as usize;
            check_count("delta base NARs", nb, MAX_DELTA_NARS)?;
            let mut bases = Vec::with_capacity(nb);
            for _ in 0..nb {
                bases.push(Sha256Hash(c.arr32("delta request")?));
            }
            want.delta = Some(DeltaAsk { nar, bases });
        }
        Ok(Self { ids, want })
    }
}

impl From<ChunksRequest> for Request {
    fn from(r: ChunksRequest) -> Self {
        Request::Chunks(r)
    }
}

/// A chunk as it travels. Nothing in it is verified: [`crate::compress::decode`] turns it into
/// checked bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkBody {
    Raw(Bytes),
    Missing,
    Zstd {
        raw_len: u32,
        data: Bytes,
    },
    Delta {
        bases: Vec<ChunkId>,
        raw_len: u32,
        data: Bytes,
    },
}

/// Raw bytes, or missing when there are none.
impl<B: Into<Bytes>> From<Option<B>> for ChunkBody {
    fn from(d: Option<B>) -> Self {
        d.map_or(Self::Missing, |d| Self::Raw(d.into()))
    }
}

const TAG_RAW: u8 = 0;
const TAG_MISSING: u8 = 1;
const TAG_ZSTD: u8 = 2;
const TAG_DELTA: u8 = 3;

impl ChunkBody {
    /// The largest body after the id: a tag, the delta's bases and length, and at most a
    /// chunk's worth of bytes.
    pub const MAX_ENCODED: usize = 1 + 1 + 32 * MAX_DELTA_BASES + 4 + MAX_CHUNK;

    /// The length of the chunk it carries, as stated (None when missing).
    pub fn raw_len(&self) -> Option<usize> {
        match self {
            Self::Raw(d) => Some(d.len()),
            Self::Missing => None,
            Self::Zstd { raw_len, .. } | Self::Delta { raw_len, .. } => Some(*raw_len as usize),
        }
    }

    /// The bytes this body puts on the wire after the id.
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Self::Raw(d) => d.len(),
            Self::Missing => 0,
            Self::Zstd { data, .. } => 4 + data.len(),
            Self::Delta { bases, data, .. } => 1 + 32 * bases.len() + 4 + data.len(),
        }
    }
}

/// Write one Chunk frame: the bytes go straight from the body to the stream, never copied
/// into a frame buffer.
pub async fn write_chunk<W: AsyncWrite + Unpin>(
    w: &mut W,
    id: &ChunkId,
    body: &ChunkBody,
) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(5 + 33 + 1 + 32 * MAX_DELTA_BASES + 4);
    head.extend_from_slice(&frame_header(Kind::Chunk, 32 + body.encoded_len()));
    head.extend_from_slice(&id.0);
    let data = match body {
        ChunkBody::Raw(d) => {
            head.push(TAG_RAW);
            Some(d)
        }
        ChunkBody::Missing => {
            head.push(TAG_MISSING);
            None
        }
        ChunkBody::Zstd { raw_len, data } => {
            head.push(TAG_ZSTD);
            head.extend_from_slice(&raw_len.to_be_bytes());
            Some(data)
        }
        ChunkBody::Delta {
            bases,
            raw_len,
            data,
        } => {
            head.push(TAG_DELTA);
            head.push(bases.len() as u8);
            for b in bases {
                head.extend_from_slice(&b.0);
            }
            head.extend_from_slice(&raw_len.to_be_bytes());
            Some(data)
        }
    };
    // The head and the first of the data in one write: over yamux (patched, `vendor/yamux`)
    // that is one frame, so a chunk does not cost a small frame, TLS record and system call of
    // its own for its head.
    let data: &[u8] = data.map_or(&[], |d| &d[..]);
    let n = w
        .write_vectored(&[IoSlice::new(&head), IoSlice::new(data)])
        .await?;
    if n < head.len() {
        w.write_all(&head[n..]).await?;
        w.write_all(data).await
    } else {
        w.write_all(&data[n - head.len()..]).await
    }
}

/// A decoded Chunk frame: the id and its body, neither verified nor decompressed. Stated raw
/// lengths are bounded by the largest chunk.
pub fn decode_chunk(f: Frame) -> Result<(ChunkId, ChunkBody), ProtocolError> {
    expect(&f, Kind::Chunk, "a chunk")?;
    let mut c = Cursor(&f.body);
    let id = ChunkId(c.arr32("chunk record")?);
    let tag = c.u8("chunk record")?;
    let raw_len = |c: &mut Cursor<'_>| -> Result<u32, ProtocolError> {
        let n = c.u32("chunk record")?;
        if n > MAX_CHUNK {
            return Err(ProtocolError::TooLarge {
                kind: Kind::Chunk,
                len: n,
                max: MAX_CHUNK,
            });
        }
        Ok(n as u32)
    };
    let body = match tag {
        TAG_RAW => ChunkBody::Raw(Bytes::new()),
        TAG_MISSING => {
            c.end("missing chunk record (trailing bytes)")?;
            ChunkBody::Missing
        }
        TAG_ZSTD => ChunkBody::Zstd {
            raw_len: raw_len(&mut c)?,
            data: Bytes::new(),
        },
        TAG_DELTA => {
            let n = c.u8("delta record")? as usize;
            if n == 0 {
                return Err(ProtocolError::Malformed("delta without a base"));
            }
            check_count("delta bases", n, MAX_DELTA_BASES)?;
            let mut bases = Vec::with_capacity(n);
            for _ in 0..n {
                bases.push(ChunkId(c.arr32("delta record")?));
            }
            ChunkBody::Delta {
                bases,
                raw_len: raw_len(&mut c)?,
                data: Bytes::new(),
            }
        }
        _ => return Err(ProtocolError::Malformed("chunk record tag")),
    };
    // The payload is the rest of the frame, handed on without a copy.
    let start = f.body.len() - c.0.len();
    let rest = || peerix_chunkstore::buffers::into_bytes(f.body).split_off(start);
    Ok((
        id,
        match body {
            ChunkBody::Raw(_) => ChunkBody::Raw(rest()),
            ChunkBody::Missing => ChunkBody::Missing,
            ChunkBody::Zstd { raw_len, .. } => ChunkBody::Zstd {
                raw_len,
                data: rest(),
            },
            ChunkBody::Delta { bases, raw_len, .. } => ChunkBody::Delta {
                bases,
                raw_len,
                data: rest(),
            },
        },
    ))
}
