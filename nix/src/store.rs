//! Read-only access to a local Nix store's database (`/nix/var/nix/db/db.sqlite` under a root).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::{Sha256Hash, StorePath};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store database {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store database holds a bad row for {path}: {what}")]
    BadRow { path: String, what: String },
}

/// What the store database knows about one valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Sha256Hash,
    pub nar_size: u64,
    /// Full set of references, possibly including the path itself.
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    /// Signatures as stored: `name:base64`.
    pub sigs: BTreeSet<String>,
    /// Content address, as rendered by Nix (`fixed:r:sha256:…`, `text:sha256:…`).
    pub ca: Option<String>,
    /// Seconds since the epoch.
    pub registration_time: i64,
    pub ultimate: bool,
}

/// A local Nix store, opened read-only.
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// `root` is `/` for the system store, or a chroot store's root (`--store /tmp/x`).
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// Where the files of `path` are on this machine.
    pub fn real_path(&self, path: &StorePath) -> PathBuf {
        self.root
            .join(crate::STORE_DIR.trim_start_matches('/'))
            .join(path.base_name())
    }

    pub fn query_path_info(&self, _path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        unimplemented!()
    }
}
