//! peerix: data frame bodies, reused.
//!
//! Upstream reads every data frame into a new `vec![0; len]`: an allocation, and a pass of
//! zeroes over bytes the socket then overwrites, for every byte received. The bodies a stream's
//! reader has consumed come back here instead, and the next frame is read into one of them
//! as it is: what it held is overwritten before anything reads it (a frame is handed on only
//! once its whole body has been read; a body whose read fails is dropped).

use parking_lot::Mutex;

/// What the pool keeps at most: sixteen frames of the 64 KiB peerix sends.
const POOL_BYTES: usize = 1 << 20;
/// Bodies below this are not kept (the allocator serves them cheaply), nor above the other.
const MIN_KEPT: usize = 16 << 10;
const MAX_KEPT: usize = 256 << 10;

struct Pool {
    bodies: Vec<Vec<u8>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    bodies: Vec::new(),
    bytes: 0,
});

/// A buffer of `len` bytes for a frame body that is about to be read into it, whole.
pub(crate) fn take(len: usize) -> Vec<u8> {
    if (MIN_KEPT..=MAX_KEPT).contains(&len) {
        let got = {
            let mut p = POOL.lock();
            let i = p.bodies.iter().position(|b| b.capacity() >= len);
            i.map(|i| {
                let b = p.bodies.swap_remove(i);
                p.bytes -= b.capacity();
                b
            })
        };
        if let Some(mut b) = got {
            // Within what it held, its old bytes stay until the read overwrites them.
            if b.len() >= len {
                b.truncate(len);
            } else {
                b.resize(len, 0);
            }
            return b;
        }
    }
    vec![0; len]
}

/// A body its reader has consumed, kept if the pool has room for it.
pub(crate) fn give(b: Vec<u8>) {
    let cap = b.capacity();
    if !(MIN_KEPT..=MAX_KEPT).contains(&cap) {
        return;
    }
    let mut p = POOL.lock();
    if p.bytes + cap <= POOL_BYTES {
        p.bytes += cap;
        p.bodies.push(b);
    }
}
