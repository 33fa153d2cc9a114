//! Small deterministic generators: the same seed gives the same bytes on every run, so a
//! failure can be replayed.

/// xorshift64 (shifts 13, 7, 17). The state must not be zero.
pub struct Rng(pub u64);

// `next` is the generator's step, never-ending: not an `Iterator`.
#[allow(clippy::should_implement_trait)]
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (not exactly uniform; plenty for tests).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Package-like bytes: compressible text runs and binary runs, like a package's files.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        while v.len() < n {
            let x = self.next();
            if x.is_multiple_of(3) {
                // Compressible text.
                let words: [&[u8]; 6] =
                    [b"nix ", b"store ", b"peer ", b"chunk\n", b"lib", b"/bin "];
                v.extend_from_slice(words[(x >> 8) as usize % 6]);
            } else {
                v.extend_from_slice(&x.to_le_bytes());
            }
        }
        v.truncate(n);
        v
    }
}

/// `n` incompressible bytes: xorshift64 from `seed | 1`, eight bytes a step.
pub fn data(seed: u64, n: usize) -> Vec<u8> {
    let mut r = Rng(seed | 1);
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(n);
    v
}

/// `len` bytes that neither compress nor dedup: xorshift64 from `seed` (not zero), the low
/// byte of each step.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    (0..len).map(|_| r.next() as u8).collect()
}

/// splitmix64: any seed, zero too, and well spread from one seed to the next.
pub struct SplitMix(pub u64);

#[allow(clippy::should_implement_trait)]
impl SplitMix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// xorshift64*: the state must not be zero.
pub struct Star(pub u64);

#[allow(clippy::should_implement_trait)]
impl Star {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
