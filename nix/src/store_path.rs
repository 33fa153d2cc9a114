//! Store paths: `/nix/store/<32-char nix-base32 hash>-<name>`.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::base32;

/// peerix, like nearly every Nix installation, works with the default store directory; a
/// chroot store keeps the same logical paths under another root.
pub const STORE_DIR: &str = "/nix/store";
pub const HASH_LEN: usize = 32;
pub const MAX_NAME_LEN: usize = 211;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StorePathError {
    #[error("store path {0:?} is not in {STORE_DIR}")]
    NotInStore(String),
    #[error("store path {0:?} is too short to hold a hash part and a name")]
    TooShort(String),
    #[error("store path hash part {0:?} is not 32 nix-base32 characters")]
    BadHash(String),
    #[error("store path {0:?} has an empty name")]
    EmptyName(String),
    #[error("store path name is longer than {MAX_NAME_LEN} characters")]
    NameTooLong,
    #[error("store path name {name:?} contains the illegal character {ch:?}")]
    IllegalChar { name: String, ch: char },
    #[error("store path name {0:?} is not allowed")]
    IllegalName(String),
}

fn clip(s: &str) -> String {
    s.chars().take(300).collect()
}

/// The 20-byte hash part of a store path: the key peers and caches look paths up by.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePathHash(pub [u8; 20]);

impl StorePathHash {
    pub fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }
}

impl FromStr for StorePathHash {
    type Err = StorePathError;
    fn from_str(s: &str) -> Result<Self, StorePathError> {
        if s.len() != HASH_LEN {
            return Err(StorePathError::BadHash(clip(s)));
        }
        base32::decode_array::<20>(s)
            .map(Self)
            .map_err(|_| StorePathError::BadHash(clip(s)))
    }
}

impl fmt::Display for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base32::encode(&self.0))
    }
}

impl fmt::Debug for StorePathHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePathHash({self})")
    }
}

/// A validated store path, kept as its base name (`<hash>-<name>`).
///
/// Ordered by base name, as Nix orders its path sets (narinfo `References:` and signature
/// fingerprints depend on that order); `base` comes first so the derived `Ord` does that.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    base: String,
    hash: StorePathHash,
}

impl StorePath {
    /// Parse a base name `<hash>-<name>` (as in narinfo `References:`).
    pub fn from_base_name(base: &str) -> Result<Self, StorePathError> {
        if base.len() < HASH_LEN + 2 || !base.is_char_boundary(HASH_LEN) {
            return Err(StorePathError::TooShort(clip(base)));
        }
        let (h, rest) = base.split_at(HASH_LEN);
        let hash: StorePathHash = h.parse()?;
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::TooShort(clip(base)))?;
        check_name(name)?;
        Ok(Self {
            hash,
            base: base.to_owned(),
        })
    }

    /// Parse a full path `/nix/store/<hash>-<name>`; nothing may follow the name.
    pub fn from_full_path(p: &str) -> Result<Self, StorePathError> {
        let base = p
            .strip_prefix(STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(clip(p)))?;
        Self::from_base_name(base)
    }

    /// Accepts a full path, or a path inside a store path (`/nix/store/x-y/bin/z` → the store
    /// path), as a user would type it.
    pub fn from_path_prefix(p: &str) -> Result<Self, StorePathError> {
        let base = p
            .strip_prefix(STORE_DIR)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| StorePathError::NotInStore(clip(p)))?;
        Self::from_base_name(base.split('/').next().unwrap_or(""))
    }

    pub fn hash(&self) -> StorePathHash {
        self.hash
    }

    pub fn hash_str(&self) -> &str {
        &self.base[..HASH_LEN]
    }

    pub fn name(&self) -> &str {
        &self.base[HASH_LEN + 1..]
    }

    pub fn base_name(&self) -> &str {
        &self.base
    }

    pub fn to_full_path(&self) -> String {
        format!("{STORE_DIR}/{}", self.base)
    }
}

/// Nix's rule for names: 1 to 211 characters of `[A-Za-z0-9+-._?=]`, and not `.` or `..`,
/// which together with the missing `/` rules out any path traversal.
pub fn check_name(name: &str) -> Result<(), StorePathError> {
    if name.is_empty() {
        return Err(StorePathError::EmptyName(String::new()));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(StorePathError::NameTooLong);
    }
    if let Some(ch) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(c)))
    {
        return Err(StorePathError::IllegalChar {
            name: clip(name),
            ch,
        });
    }
    if name == "." || name == ".." {
        return Err(StorePathError::IllegalName(name.to_owned()));
    }
    Ok(())
}

impl FromStr for StorePath {
    type Err = StorePathError;
    /// A full path or a base name.
    fn from_str(s: &str) -> Result<Self, StorePathError> {
        if s.starts_with('/') {
            Self::from_full_path(s)
        } else {
            Self::from_base_name(s)
        }
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.base)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({})", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P: &str = "/nix/store/inrbbn8pggcp38qhr25j9nvp5f2micmp-top";

    #[test]
    fn parses() {
        let p: StorePath = P.parse().unwrap();
        assert_eq!(p.name(), "top");
        assert_eq!(p.hash_str(), "inrbbn8pggcp38qhr25j9nvp5f2micmp");
        assert_eq!(p.to_string(), P);
        assert_eq!(p.hash().to_string(), p.hash_str());
        let q = StorePath::from_path_prefix(&format!("{P}/bin/x")).unwrap();
        assert_eq!(p, q);
    }

    #[test]
    fn rejects() {
        let h = "inrbbn8pggcp38qhr25j9nvp5f2micmp";
        for bad in [
            format!("/nix/store/{h}-a/b"),
            format!("/nix/store/{h}-.."),
            format!("/nix/store/{h}-."),
            format!("/nix/store/{h}-a\0b"),
            format!("/nix/store/{h}-"),
            format!("/nix/store/{h}"),
            format!("/tmp/{h}-x"),
            "/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x".into(),
            format!("/nix/store/{h}-{}", "a".repeat(212)),
            format!("/nix/store/{h}-a b"),
        ] {
            assert!(bad.parse::<StorePath>().is_err(), "{bad:?}");
        }
        assert!(format!("/nix/store/{h}-{}", "a".repeat(211))
            .parse::<StorePath>()
            .is_ok());
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,300}") {
            let _ = s.parse::<StorePath>();
            let _ = StorePath::from_path_prefix(&s);
            let _ = s.parse::<StorePathHash>();
        }
    }
}
