//! Chunks on the wire: as stored, compressed when the link is slower than compression, or as a
//! delta against chunks of an older version the requester holds. The server picks the
//! smallest form the request allows; the requester bounds every decompression by the length
//! the frame states (at most a chunk) and checks the result against the chunk id, so a
//! compressed frame can neither expand past its size nor smuggle in other bytes.

use bytes::Bytes;
use peerix_chunkstore::{
    buffers, codec, ChunkId, ChunkStore, DeltaPlan, StoredChunk, VerifiedChunk,
};
use thiserror::Error;
use zstd::zstd_safe::{self, CParameter};

use crate::protocol::{ChunkBody, Want};

/// zstd level for chunks compressed on the fly: fast enough to keep up with a gigabit link on
/// one core, and most of what the higher levels would save.
pub const LEVEL: i32 = 3;
/// zstd level for deltas: they are made only for the chunks an update changed, and a higher
/// level finds far more of the old bytes (Pillow 10.3 → 10.4, `zstd --patch-from` over the
/// whole NAR: a quarter smaller than level 3, in a twelfth of level 19's time).
pub const DELTA_LEVEL: i32 = 12;
/// Window for deltas: the base (at most [`peerix_chunkstore::DELTA_BASE_BYTES`]) and the chunk
/// must both be in reach.
const DELTA_WINDOW_LOG: u32 = 23;

/// How a chunk travelled, for the byte counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Raw,
    Zstd,
    Delta,
}

/// A chunk as received: verified, with what it cost on the wire.
#[derive(Debug, Clone)]
pub struct Received {
    pub chunk: VerifiedChunk,
    /// Bytes of the Chunk frame after the id.
    pub wire_len: u32,
    pub sent: Sent,
}

#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("the chunk does not decompress to the {raw_len} bytes its frame states: {why}")]
    BadCompression { raw_len: u32, why: String },
    #[error("the decompressed bytes do not match the chunk id")]
    BadChunk,
}

/// The body a server sends for a chunk it holds. `delta` is the base chunk ids and their bytes
/// concatenated, when the requester asked for deltas and an older version holds a similar
/// place.
pub fn encode(
    stored: StoredChunk,
    want: &Want,
    delta: Option<(Vec<ChunkId>, Vec<u8>)>,
) -> ChunkBody {
    let raw_len = stored.raw.len() as u32;
    let mut best: Option<ChunkBody> = None;
    let mut best_len = stored.raw.len();
    if let Some((bases, prefix)) = delta.filter(|_| want.delta.is_some()) {
        if let Ok(data) = compress_with_prefix(&stored.raw, &prefix) {
            if codec::pays(data.len(), stored.raw.len()) {
                best_len = data.len();
                best = Some(ChunkBody::Delta {
                    bases,
                    raw_len,
                    data: data.into(),
                });
            }
        }
    }
    // A chunk stored compressed goes out as it is stored, never compressed again.
    let zstd = match stored.zstd {
        Some(z) if want.zstd || want.compress => Some(z),
        _ if want.compress && !stored.incompressible && codec::worth_compressing(&stored.raw) => {
            codec::compress(&stored.raw, LEVEL).ok()
        }
        _ => None,
    };
    if let Some(z) = zstd.filter(|z| codec::pays(z.len(), stored.raw.len()) && z.len() < best_len) {
        best = Some(ChunkBody::Zstd {
            raw_len,
            data: buffers::into_bytes(z),
        });
    }
    best.unwrap_or_else(|| ChunkBody::Raw(buffers::into_bytes(stored.raw)))
}

/// Read a chunk we hold and encode it for a request: as [`encode`], with the bases the plan
/// names for it read from the store.
pub fn encode_stored(
    cs: &ChunkStore,
    id: &ChunkId,
    want: &Want,
    plan: Option<&DeltaPlan>,
) -> peerix_chunkstore::Result<ChunkBody> {
    let mut stored = cs.read_chunk_stored(id)?;
    // A frame recompressed once at a high level beats both the pack's and one made now.
    if want.zstd || want.compress {
        if let Some(frame) = cs.recompressed(id, &stored.raw)? {
            stored.zstd = Some(frame);
        }
    }
    let bases = plan.and_then(|p| p.bases(id)).map(<[ChunkId]>::to_vec);
    // A base that can no longer be read (its release collected since the plan was made)
    // means no delta, not a missing chunk: the chunk still goes, compressed or raw.
    let delta = match bases {
        Some(bases) if want.delta.is_some() => {
            let mut prefix = vec![];
            let read = bases
                .iter()
                .try_for_each(|b| cs.read_chunk(b).map(|d| prefix.extend_from_slice(&d)));
            read.ok().map(|()| (bases, prefix))
        }
        _ => None,
    };
    Ok(encode(stored, want, delta))
}

fn compress_with_prefix(raw: &[u8], prefix: &[u8]) -> Result<Vec<u8>, String> {
    let mut cx = zstd_safe::CCtx::create();
    let err = |c: usize| zstd_safe::get_error_name(c).to_string();
    cx.set_parameter(CParameter::CompressionLevel(DELTA_LEVEL))
        .map_err(err)?;
    cx.set_parameter(CParameter::WindowLog(DELTA_WINDOW_LOG))
        .map_err(err)?;
    cx.ref_prefix(prefix).map_err(err)?;
    let mut out = Vec::with_capacity(zstd_safe::compress_bound(raw.len()));
    cx.compress2(&mut out, raw).map_err(err)?;
    Ok(out)
}

/// Turn a received body into the chunk it stands for. `prefix` is the delta's bases, read
/// from our store and concatenated in the order the frame names them.
pub fn decode(
    id: ChunkId,
    body: ChunkBody,
    prefix: Option<&[u8]>,
) -> Result<Option<Received>, DecodeError> {
    let wire_len = body.encoded_len() as u32;
    let (data, sent) = match body {
        ChunkBody::Missing => return Ok(None),
        ChunkBody::Raw(d) => (d, Sent::Raw),
        ChunkBody::Zstd { raw_len, data } => (decompress(&data, raw_len, None)?, Sent::Zstd),
        ChunkBody::Delta { raw_len, data, .. } => (
            decompress(&data, raw_len, Some(prefix.unwrap_or_default()))?,
            Sent::Delta,
        ),
    };
    let chunk = VerifiedChunk::new(id, data).ok_or(DecodeError::BadChunk)?;
    Ok(Some(Received {
        chunk,
        wire_len,
        sent,
    }))
}

/// Decompress into a buffer of exactly `raw_len` bytes (at most a chunk, checked when the
/// frame was read): zstd fails rather than write past it.
fn decompress(data: &[u8], raw_len: u32, prefix: Option<&[u8]>) -> Result<Bytes, DecodeError> {
    let bad = |why: String| DecodeError::BadCompression { raw_len, why };
    let out = match prefix {
        None => codec::decompress(data, raw_len as usize).map_err(|e| bad(e.to_string()))?,
        // Deltas are rare next to plain frames, and their windows large: a context of their own.
        Some(p) => {
            let mut dx = zstd_safe::DCtx::create();
            dx.ref_prefix(p)
                .map_err(|c| bad(zstd_safe::get_error_name(c).into()))?;
            let mut out = Vec::with_capacity(raw_len as usize);
            dx.decompress(&mut out, data)
                .map_err(|c| bad(zstd_safe::get_error_name(c).into()))?;
            out
        }
    };
    if out.len() != raw_len as usize {
        return Err(bad(format!("it gave {} bytes", out.len())));
    }
    Ok(out.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::DeltaAsk;
    use peerix_nix::Sha256Hash;

    fn text(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..n)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                if i % 7 == 0 {
                    b' '
                } else {
                    b'a' + (x >> 60) as u8
                }
            })
            .collect()
    }

    fn stored(raw: Vec<u8>) -> StoredChunk {
        StoredChunk {
            raw,
            zstd: None,
            incompressible: false,
        }
    }

    fn delta_want() -> Want {
        Want::all(Some(DeltaAsk {
            nar: Sha256Hash([1; 32]),
            bases: vec![Sha256Hash([2; 32])],
        }))
    }

    #[test]
    fn each_form_round_trips_and_the_smallest_wins() {
        let old = text(200_000, 1);
        let mut new = old.clone();
        new[1000..1010].copy_from_slice(b"0123456789");
        let id = ChunkId::of(&new);
        let raw = encode(stored(new.clone()), &Want::default(), None);
        assert!(matches!(raw, ChunkBody::Raw(_)));
        let z = encode(stored(new.clone()), &Want::all(None), None);
        assert!(matches!(z, ChunkBody::Zstd { .. }), "{z:?}");
        let base = ChunkId::of(&old);
        let d = encode(
            stored(new.clone()),
            &delta_want(),
            Some((vec![base], old.clone())),
        );
        let ChunkBody::Delta { data, .. } = &d else {
            panic!("{d:?}")
        };
        assert!(
            data.len() < 200,
            "a ten-byte change costs {} bytes",
            data.len()
        );
        for (body, prefix) in [(raw, None), (z, None), (d, Some(&old[..]))] {
            let r = decode(id, body, prefix).unwrap().unwrap();
            assert_eq!(&r.chunk.data()[..], &new[..]);
        }
    }

    /// Bytes zstd cannot shrink.
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_chunk_is_compressed_on_the_fly_only_when_its_sample_pays() {
        let n = 256 << 10;
        let z = |raw: Vec<u8>| encode(stored(raw), &Want::all(None), None);
        assert!(matches!(z(noise(n, 3)), ChunkBody::Raw(_)));
        assert!(matches!(z(text(n, 3)), ChunkBody::Zstd { .. }));
        // Text with noise where the slices are sampled: judged by its sample, sent raw.
        let mut mixed = text(n, 4);
        for i in 0..4 {
            let at = n / 4 * i;
            mixed[at..at + codec::SAMPLE_SLICE]
                .copy_from_slice(&noise(codec::SAMPLE_SLICE, i as u64 + 5));
        }
        assert!(matches!(z(mixed.clone()), ChunkBody::Raw(_)));
        // Noise with text where the slices are sampled: tried whole, and not worth it.
        let mut other = noise(n, 6);
        for i in 0..4 {
            let at = n / 4 * i;
            other[at..at + codec::SAMPLE_SLICE]
                .copy_from_slice(&text(codec::SAMPLE_SLICE, i as u64 + 7));
        }
        assert!(matches!(z(other), ChunkBody::Raw(_)));
        // A small chunk is tried whole: the sample would be most of it.
        let mut small = text(32 << 10, 8);
        small[..codec::SAMPLE_SLICE].copy_from_slice(&noise(codec::SAMPLE_SLICE, 9));
        assert!(matches!(z(small), ChunkBody::Zstd { .. }));
    }

    #[test]
    fn a_frame_that_expands_past_its_stated_size_is_refused() {
        let raw = text(100_000, 2);
        let id = ChunkId::of(&raw);
        let data: Bytes = zstd::bulk::compress(&raw, 3).unwrap().into();
        for raw_len in [99_999, 1000, 0] {
            let e = decode(
                id,
                ChunkBody::Zstd {
                    raw_len,
                    data: data.clone(),
                },
                None,
            )
            .unwrap_err();
            assert!(matches!(e, DecodeError::BadCompression { .. }), "{e}");
        }
        // Stated longer than it is: the length check, not the id, refuses it.
        let e = decode(
            id,
            ChunkBody::Zstd {
                raw_len: 100_001,
                data,
            },
            None,
        )
        .unwrap_err();
        assert!(matches!(e, DecodeError::BadCompression { .. }), "{e}");
    }

    /// The older release the plan named was collected (Nix GC on the sender) before a chunk
    /// went out: the chunk still goes, as zstd, never as missing.
    #[test]
    fn a_base_gone_since_the_plan_means_no_delta_not_no_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ChunkStore::open(dir.path(), peerix_chunkstore::Options::default()).unwrap();
        let old_bytes = text(300_000, 5);
        let mut new_bytes = old_bytes.clone();
        new_bytes[100] ^= 1;
        let old = cs
            .ingest_nar(&old_bytes[..], None, None, &mut |_| {})
            .unwrap();
        let new = cs
            .ingest_nar(&new_bytes[..], None, None, &mut |_| {})
            .unwrap();
        let plan = cs
            .delta_plan(&new.nar_hash, &old.nar_hash)
            .unwrap()
            .unwrap();
        let id = new.chunks[0].id;
        assert!(plan.bases(&id).is_some());
        let body = encode_stored(&cs, &id, &delta_want(), Some(&plan)).unwrap();
        assert!(matches!(body, ChunkBody::Delta { .. }), "{body:?}");
        assert!(cs.remove_manifest(&old.nar_hash).unwrap());
        cs.gc(&mut |_| {}).unwrap();
        let body = encode_stored(&cs, &id, &delta_want(), Some(&plan)).unwrap();
        assert!(matches!(body, ChunkBody::Zstd { .. }), "{body:?}");
        let got = decode(id, body, None).unwrap().unwrap();
        assert_eq!(got.chunk.id(), &id);
    }

    #[test]
    fn a_delta_decoded_against_other_bytes_is_refused() {
        let old = text(100_000, 3);
        let mut new = old.clone();
        new[5] ^= 1;
        let id = ChunkId::of(&new);
        let body = encode(
            stored(new),
            &delta_want(),
            Some((vec![ChunkId::of(&old)], old)),
        );
        assert!(matches!(body, ChunkBody::Delta { .. }));
        let other = text(100_000, 4);
        assert!(decode(id, body.clone(), Some(&other)).is_err());
        assert!(decode(id, body, None).is_err());
    }
}
