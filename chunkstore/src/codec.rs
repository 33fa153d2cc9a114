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
    }
}
