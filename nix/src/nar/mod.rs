//! The NAR (Nix ARchive) format: writing, its layout, and reading untrusted NARs.
//!
//! A NAR is `"nix-archive-1"` followed by one node; every string is a little-endian u64 length,
//! the bytes, and zero padding to a multiple of 8. Nodes are regular files (optionally
//! executable), symlinks, or directories whose entries are sorted bytewise by name.
//!
//! There is a single serialiser, [`NarLayout`]: it records where every file's contents sit in
//! the NAR, so [`dump_path`] streams a whole NAR from it and a chunk store can serve any byte
//! range by seeking into the files ([`NarLayout::read_range`]). [`parse`] is the streaming
//! reader for NARs we did not write ourselves, with [`validate`] and [`unpack`] on top.

mod error;
mod layout;
mod read;
mod unpack;
mod write;

pub use error::NarError;
pub use layout::{LocatedSegment, NarLayout, Segment};
pub use read::{parse, validate, NarLimits, NarSink, NarStats};
pub use unpack::unpack;
pub use write::dump_path;

/// The magic string every NAR starts with.
pub const NAR_MAGIC: &[u8] = b"nix-archive-1";

/// Longest directory entry name accepted when reading (Linux's NAME_MAX).
pub const MAX_NAME_LEN: usize = 255;

/// Longest symlink target accepted when reading (Linux's PATH_MAX minus the NUL).
pub const MAX_TARGET_LEN: usize = 4095;

/// Bytes of zero padding after a string or file contents of `len` bytes.
pub(crate) fn padding(len: u64) -> u64 {
    (8 - len % 8) % 8
}
