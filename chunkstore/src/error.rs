use std::path::PathBuf;

use peerix_nix::Sha256Hash;
use thiserror::Error;

use crate::ChunkId;

#[derive(Debug, Error)]
pub enum Error {
    #[error("I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the chunk store at {0} is in use by another process (is `peerix serve` running?)")]
    Locked(PathBuf),
    #[error("chunk index: {0}")]
    Index(#[from] sled::Error),
    #[error("chunk index holds a malformed {what} record")]
    BadRecord { what: &'static str },
    #[error("chunk {0} is not in the store")]
    MissingChunk(ChunkId),
    #[error("chunk {id} is corrupt ({why}); it was not returned and its bad copy was dropped")]
    CorruptChunk { id: ChunkId, why: String },
    #[error("chunk bytes do not hash to {expected} (got {got})")]
    ChunkMismatch { expected: ChunkId, got: ChunkId },
    #[error("chunk of {0} bytes is larger than the {max} allowed", max = crate::MAX_CHUNK)]
    ChunkTooLarge(usize),
    #[error("no NAR with hash {0} in the store")]
    MissingNar(Sha256Hash),
    #[error("NAR hash mismatch: expected {expected}, got {got}")]
    NarHashMismatch {
        expected: Sha256Hash,
        got: Sha256Hash,
    },
    #[error("NAR size mismatch: expected {expected}, got {got}")]
    NarSizeMismatch { expected: u64, got: u64 },
    #[error("manifest: {0}")]
    BadManifest(String),
    #[error("NAR of {path}: {source}")]
    Nar {
        path: String,
        #[source]
        source: peerix_nix::nar::NarError,
    },
    #[error("local store: {0}")]
    LocalStore(#[from] peerix_nix::store::StoreError),
    #[error("{0} is not valid in the local Nix store")]
    NotInLocalStore(String),
    #[error("no local Nix store is configured")]
    NoLocalStore,
    #[error("chunking: {0}")]
    Chunking(#[source] fastcdc::v2020::Error),
    #[error("the blocking task failed: {0}")]
    Join(#[source] tokio::task::JoinError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.into(),
            source,
        })
    }
}
