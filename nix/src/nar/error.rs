use std::io;
use std::path::PathBuf;

use thiserror::Error;

/// Everything that can go wrong writing, laying out or reading a NAR.
///
/// Reader errors carry the byte offset in the NAR where the problem starts (the start of the
/// offending string's length field, or where the input ended), so a bad NAR from a peer can be
/// diagnosed from the log alone.
#[derive(Debug, Error)]
pub enum NarError {
    /// A filesystem operation on our side failed (walking, reading or unpacking a tree).
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing the NAR: {0}")]
    Write(#[source] io::Error),
    #[error("{path} is neither a regular file, a directory nor a symlink; NARs cannot hold it")]
    UnsupportedFileType { path: PathBuf },
    /// The file no longer matches the layout taken earlier: the store is corrupted or the tree
    /// changed under us. Producing a NAR anyway would serve wrong bytes under a right hash.
    #[error("{path} has {actual} bytes but the NAR layout says {expected}")]
    FileSizeMismatch {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path} was a regular file when the NAR layout was taken but is no longer one")]
    NotAFileAnymore { path: PathBuf },
    #[error("byte range {offset}+{len} lies outside the NAR of {nar_size} bytes")]
    RangeOutOfBounds {
        offset: u64,
        len: u64,
        nar_size: u64,
    },

    #[error("NAR offset {offset}: not a NAR (bad magic {found:?})")]
    BadMagic { offset: u64, found: String },
    #[error("NAR offset {offset}: expected {expected}, found {found:?}")]
    UnexpectedToken {
        offset: u64,
        expected: &'static str,
        found: String,
    },
    #[error("NAR offset {offset}: non-zero padding byte")]
    NonZeroPadding { offset: u64 },
    #[error(
        "NAR offset {offset}: directory entry {name:?} is not after {previous:?} in byte order"
    )]
    UnsortedEntries {
        offset: u64,
        previous: String,
        name: String,
    },
    #[error("NAR offset {offset}: duplicate directory entry {name:?}")]
    DuplicateEntry { offset: u64, name: String },
    #[error("NAR offset {offset}: invalid entry name {name:?}: {reason}")]
    InvalidName {
        offset: u64,
        name: String,
        reason: &'static str,
    },
    #[error("NAR offset {offset}: entry name of {len} bytes exceeds {max}")]
    NameTooLong { offset: u64, len: u64, max: usize },
    #[error("NAR offset {offset}: symlink target of {len} bytes exceeds {max}")]
    TargetTooLong { offset: u64, len: u64, max: usize },
    #[error("NAR offset {offset}: empty symlink target")]
    EmptyTarget { offset: u64 },
    /// No filesystem can hold it: the unpacked link would be another (cut at the NUL) or fail.
    #[error("NAR offset {offset}: symlink target contains a NUL byte")]
    NulInTarget { offset: u64 },
    #[error("NAR offset {offset}: nesting deeper than {max} directories")]
    TooDeep { offset: u64, max: usize },
    #[error("NAR offset {offset}: file of {size} bytes would make the NAR exceed {max} bytes")]
    TooLarge { offset: u64, size: u64, max: u64 },
    #[error("NAR offset {offset}: the NAR exceeds {max} bytes")]
    NarTooLarge { offset: u64, max: u64 },
    #[error("NAR offset {offset}: more than {max} entries")]
    TooManyEntries { offset: u64, max: u64 },
    #[error("NAR offset {offset}: trailing data after the root node")]
    TrailingData { offset: u64 },
    #[error("NAR offset {offset}: unexpected end of input (truncated NAR)")]
    UnexpectedEof { offset: u64 },
    #[error("NAR offset {offset}: reading the NAR: {source}")]
    Read {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("unpack destination {path} already exists")]
    DestinationExists { path: PathBuf },
    /// For [`NarSink`](super::NarSink) implementations outside this crate.
    #[error("NAR sink: {0}")]
    Sink(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl NarError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        NarError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Untrusted bytes for an error message: lossy UTF-8, cut short so a hostile NAR cannot make
/// our logs huge.
pub(crate) fn show(bytes: &[u8]) -> String {
    const MAX: usize = 64;
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)]).into_owned();
    if bytes.len() > MAX {
        format!("{s}…")
    } else {
        s
    }
}
