//! zstd for chunks, with one compression and one decompression context per thread, kept.
//!
//! A context made for each chunk allocates its tables and clears them every time: for a
//! 256 KiB chunk at level 3 that is most of a megabyte, and with the page faults of fresh
//! memory it cost a seeder more than compressing the chunk (an incompressible chunk's zstd
//! took 63 µs with a new context and 32 µs with a kept one). Kept contexts are reset between
//! frames, so nothing of one chunk reaches the next. The threads that compress are the
//! runtime's blocking threads, which end when idle, taking their contexts with them.

use std::cell::RefCell;
use std::io;

use zstd::bulk::{Compressor, Decompressor};

thread_local! {
    static COMPRESSOR: RefCell<Option<Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

/// A compressed form is worth storing or sending only when it saves at least an eighth.
pub fn pays(compressed: usize, raw: usize) -> bool {
    compressed < raw - raw / 8
}

/// Slices of a chunk tried before the whole is compressed: four of this size, spread over it.
pub const SAMPLE_SLICE: usize = 4 << 10;
/// The level the sample is tried at: the fast one chunks are compressed at on the fly.
const SAMPLE_LEVEL: i32 = 3;

/// Whether compressing `raw` is worth a try: four slices spread over it must compress
/// together by an eighth at a fast level. zstd gives up on incompressible bytes quickly at
/// fast levels, but not for free, and slowly at high ones (level 19: 17 ms per 256 KiB of
/// random bytes here, against 0.14 ms at level 3); compressed files (firmware, archives,
/// images, `.ko.xz` modules) are common in store paths. The sample costs a sixteenth of a
/// 256 KiB chunk's fast try. A chunk whose sampled slices are incompressible but whose rest is
/// not is judged by its sample: on real files cut into 256 KiB pieces that cost 0.00-0.13 %
/// more bytes than trying every piece (README, "Multi-peer download").
pub fn worth_compressing(raw: &[u8]) -> bool {
    if raw.len() < 16 * SAMPLE_SLICE {
        return true;
    }
    let mut sample = Vec::with_capacity(4 * SAMPLE_SLICE);
    for i in 0..4 {
        let at = raw.len() / 4 * i;
        sample.extend_from_slice(&raw[at..at + SAMPLE_SLICE]);
    }
    compress(&sample, SAMPLE_LEVEL).is_ok_and(|z| pays(z.len(), sample.len()))
}

/// `raw` as one zstd frame at `level`.
pub fn compress(raw: &[u8], level: i32) -> io::Result<Vec<u8>> {
    COMPRESSOR.with_borrow_mut(|c| {
        let c = match c {
            Some(c) => {
                c.set_compression_level(level)?;
                c
            }
            None => c.insert(Compressor::new(level)?),
        };
        c.compress(raw)
    })
}

/// The content of one zstd frame, which must fit in `capacity` bytes (zstd fails rather than
/// write past it).
pub fn decompress(frame: &[u8], capacity: usize) -> io::Result<Vec<u8>> {
    DECOMPRESSOR.with_borrow_mut(|d| {
        let d = match d {
            Some(d) => d,
            None => d.insert(Decompressor::new()?),
        };
        d.decompress(frame, capacity)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_one_chunk_leaves_nothing_in_the_next() {
        let text: Vec<u8> = (0..200_000u32)
            .map(|i| b"abcde"[(i % 5) as usize])
            .collect();
        let other: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for level in [1, 3, 1] {
            for raw in [&text, &other] {
                let z = compress(raw, level).unwrap();
                assert_eq!(
                    z,
                    zstd::bulk::compress(raw, level).unwrap(),
                    "level {level}"
                );
                assert_eq!(&decompress(&z, raw.len()).unwrap(), raw);
            }
        }
        let z = compress(&text, 3).unwrap();
        assert!(decompress(&z, text.len() - 1).is_err(), "no room: an error");
        assert!(decompress(b"not zstd", 100).is_err());
        // A frame a peer got wrong leaves the kept contexts as good as new.
        let z = compress(&other, 3).unwrap();
        assert_eq!(decompress(&z, other.len()).unwrap(), other);
    }
}
