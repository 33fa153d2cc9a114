//! Chunk-sized buffers, reused across chunks.
//!
//! `peerix serve` fixes glibc's mmap threshold at 128 KiB so that freed chunk buffers go back
//! to the OS and a multi-GiB download's memory stays flat (src/main.rs). The price is that
//! every chunk buffer is a fresh mapping: an mmap, a page fault for each 4 KiB, the kernel
//! zeroing each page, and an munmap. A download moves each chunk through one such buffer on the
//! seeder (read from a pack or a store path) and one on the receiver (the frame it arrives in),
//! and on loopback that cost ~1.2 CPU s per GiB, a third more than everything else together.
//!
//! So the buffers of chunks read and received come from a small process-wide pool and go back
//! to it when the last [`bytes::Bytes`] made of one drops ([`into_bytes`]). The pool holds at
//! most [`POOL_BYTES`]; past that, and for buffers smaller than [`MIN_POOLED`] (which malloc
//! serves from its heap anyway), buffers are freed as usual.

use std::sync::Mutex;

use bytes::Bytes;

/// What the pool keeps at most: a few chunks' worth at the average chunk size (256 KiB), as
/// many as a download allocates and frees in the time one chunk takes to pass through.
pub const POOL_BYTES: usize = 4 << 20;

/// Buffers below this are not pooled: under glibc's mmap threshold, they are cut from the heap.
pub const MIN_POOLED: usize = 128 << 10;

/// A bounded set of buffers to reuse. The process has one ([`for_overwrite`], [`with_capacity`],
/// [`give`] and [`into_bytes`] use it); tests make their own.
pub struct Pool {
    budget: usize,
    inner: Mutex<Bufs>,
}

struct Bufs {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

static POOL: Pool = Pool::new(POOL_BYTES);

/// A buffer of `len` bytes that the caller overwrites whole before anything reads it: a pooled
/// one keeps the bytes it held (zeroing it was a pass over every chunk received or read), a
/// new one is zeroed.
pub fn for_overwrite(len: usize) -> Vec<u8> {
    POOL.for_overwrite(len)
}

/// An empty buffer with room for `cap` bytes.
pub fn with_capacity(cap: usize) -> Vec<u8> {
    POOL.with_capacity(cap)
}

/// Give a buffer back, to be reused if the pool has room for it.
pub fn give(v: Vec<u8>) {
    POOL.give(v)
}

/// `v` as [`Bytes`] that give it back to the pool when the last of them drops.
pub fn into_bytes(v: Vec<u8>) -> Bytes {
    POOL.into_bytes(v)
}

impl Pool {
    pub const fn new(budget: usize) -> Self {
        Self {
            budget,
            inner: Mutex::new(Bufs {
                bufs: Vec::new(),
                bytes: 0,
            }),
        }
    }

    pub fn for_overwrite(&self, len: usize) -> Vec<u8> {
        if len >= MIN_POOLED {
            if let Some(mut v) = self.take(len) {
                if v.len() >= len {
                    v.truncate(len);
                } else {
                    v.resize(len, 0);
                }
                return v;
            }
        }
        vec![0; len]
    }

    pub fn with_capacity(&self, cap: usize) -> Vec<u8> {
        if cap >= MIN_POOLED {
            if let Some(mut v) = self.take(cap) {
                v.clear();
                return v;
            }
        }
        Vec::with_capacity(cap)
    }

    /// The pooled buffer with the least room that holds `cap` bytes.
    fn take(&self, cap: usize) -> Option<Vec<u8>> {
        let mut b = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (i, _) = b
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= cap)
            .min_by_key(|(_, v)| v.capacity())?;
        let v = b.bufs.swap_remove(i);
        b.bytes -= v.capacity();
        Some(v)
    }

    pub fn give(&self, v: Vec<u8>) {
        let cap = v.capacity();
        if cap < MIN_POOLED {
            return;
        }
        let mut b = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if b.bytes + cap <= self.budget {
            b.bytes += cap;
            b.bufs.push(v);
        }
    }

    pub fn into_bytes(&'static self, v: Vec<u8>) -> Bytes {
        if v.capacity() < MIN_POOLED {
            return Bytes::from(v);
        }
        Bytes::from_owner(Pooled(v, self))
    }
}

struct Pooled(Vec<u8>, &'static Pool);

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.1.give(std::mem::take(&mut self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_and_the_pool_stays_bounded() {
        static POOL: Pool = Pool::new(1 << 20);
        // A new buffer is zeroed.
        let mut a = POOL.for_overwrite(300 << 10);
        assert!(a.iter().all(|&b| b == 0) && a.len() == 300 << 10);
        a.fill(7);
        let p = a.as_ptr();
        let bytes = POOL.into_bytes(a);
        let part = bytes.slice(10..20);
        drop(bytes);
        // Still held by the slice.
        let other = POOL.with_capacity(300 << 10);
        assert!(other.as_ptr() != p);
        drop(other);
        drop(part);
        // Back: the next buffer that fits is the same memory, as long as asked for and not
        // zeroed again (its caller overwrites it whole)...
        let b = POOL.for_overwrite(200 << 10);
        assert_eq!((b.as_ptr(), b.len()), (p, 200 << 10));
        assert!(b.iter().all(|&x| x == 7));
        POOL.give(b);
        // ...but for what it did not hold: zeroes past its old length.
        let b = POOL.for_overwrite(250 << 10);
        assert_eq!((b.as_ptr(), b.len()), (p, 250 << 10));
        assert!(b[..200 << 10].iter().all(|&x| x == 7));
        assert!(b[200 << 10..].iter().all(|&x| x == 0));
        POOL.give(b);
        // A buffer for appending starts empty.
        assert!(POOL.with_capacity(200 << 10).is_empty());
        // Never more than the budget, and small buffers not at all.
        for _ in 0..64 {
            POOL.give(Vec::with_capacity(MIN_POOLED));
            POOL.give(Vec::with_capacity(1024));
        }
        let b = POOL.inner.lock().unwrap();
        assert!(b.bytes <= 1 << 20, "{}", b.bytes);
        assert!(b.bufs.iter().all(|v| v.capacity() >= MIN_POOLED));
        assert_eq!(b.bytes, b.bufs.iter().map(Vec::capacity).sum::<usize>());
    }
}
