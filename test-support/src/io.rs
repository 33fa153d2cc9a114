//! Sinks for tests that look at a stream without keeping it.

use std::io::{self, Write};

use sha2::{Digest, Sha256};

/// Hashes (SHA-256) and counts what is written to it.
pub struct HashingWriter {
    pub sha: Sha256,
    pub len: u64,
}

impl HashingWriter {
    pub fn new() -> Self {
        Self {
            sha: Sha256::new(),
            len: 0,
        }
    }
}

impl Default for HashingWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Write for HashingWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sha.update(buf);
        self.len += buf.len() as u64;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
