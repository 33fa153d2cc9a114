//! SHA-256 hashes as Nix writes them: `sha256:<nix-base32>` in narinfo files, `sha256:<hex>` in
//! the store database, `sha256-<base64>` (SRI) in `nix path-info --json`.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use sha2::Digest;
use thiserror::Error;

use crate::base32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum HashError {
    #[error("unsupported hash algorithm {0:?} (only sha256 is used for NAR and file hashes)")]
    UnsupportedAlgorithm(String),
    #[error("hash {0:?} has no algorithm prefix")]
    NoAlgorithm(String),
    #[error("hash digest {0:?} is not valid nix-base32, hex or base64 for sha256")]
    BadDigest(String),
}

/// A SHA-256 digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Hash(pub [u8; 32]);

impl Sha256Hash {
    pub fn digest(data: &[u8]) -> Self {
        Self(sha2::Sha256::digest(data).into())
    }

    /// `sha256:<nix-base32>`, the narinfo form.
    pub fn to_nix_string(&self) -> String {
        format!("sha256:{}", base32::encode(&self.0))
    }

    /// The bare nix-base32 digest, as in `nar/<digest>.nar`.
    pub fn to_base32(&self) -> String {
        base32::encode(&self.0)
    }

    /// `sha256:<hex>`, the store database form.
    pub fn to_hex_string(&self) -> String {
        let mut s = String::with_capacity(7 + 64);
        s.push_str("sha256:");
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }

    /// `sha256-<base64>`, the SRI form of `nix path-info --json`.
    pub fn to_sri(&self) -> String {
        format!(
            "sha256-{}",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }

    /// Parse a bare digest in any of the encodings Nix uses for sha256.
    pub fn parse_digest(d: &str) -> Result<Self, HashError> {
        let bad = || HashError::BadDigest(truncate(d));
        match d.len() {
            52 => base32::decode_array::<32>(d).map(Self).map_err(|_| bad()),
            64 => {
                let mut out = [0u8; 32];
                for (i, o) in out.iter_mut().enumerate() {
                    *o = u8::from_str_radix(d.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                        .map_err(|_| bad())?;
                }
                Ok(Self(out))
            }
            44 => {
                let v = base64::engine::general_purpose::STANDARD
                    .decode(d)
                    .map_err(|_| bad())?;
                v.try_into().map(Self).map_err(|_| bad())
            }
            _ => Err(bad()),
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

impl FromStr for Sha256Hash {
    type Err = HashError;

    /// Accepts `sha256:<base32|hex|base64>` and `sha256-<base64>`.
    fn from_str(s: &str) -> Result<Self, HashError> {
        let (algo, digest) = match (s.split_once(':'), s.split_once('-')) {
            (Some(p), _) => p,
            (None, Some(p)) => p,
            (None, None) => return Err(HashError::NoAlgorithm(truncate(s))),
        };
        if algo != "sha256" {
            return Err(HashError::UnsupportedAlgorithm(truncate(algo)));
        }
        Self::parse_digest(digest)
    }
}

impl fmt::Display for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

impl fmt::Debug for Sha256Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nix_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_agree() {
        let h = Sha256Hash::digest(b"");
        for s in [
            h.to_nix_string(),
            h.to_hex_string(),
            h.to_sri(),
            "sha256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=".into(),
        ] {
            assert_eq!(s.parse::<Sha256Hash>().unwrap(), h, "{s}");
        }
        assert_eq!(
            h.to_nix_string(),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }

    #[test]
    fn rejects() {
        assert!(matches!(
            "md5:abc".parse::<Sha256Hash>(),
            Err(HashError::UnsupportedAlgorithm(_))
        ));
        assert!(matches!(
            "sha256:xyz".parse::<Sha256Hash>(),
            Err(HashError::BadDigest(_))
        ));
        assert!(matches!(
            "nohash".parse::<Sha256Hash>(),
            Err(HashError::NoAlgorithm(_))
        ));
        // Multi-byte UTF-8 must not make slicing panic.
        let s = format!("sha256:{}", "é".repeat(32));
        assert!("sha256:".len() + 64 == s.len());
        assert!(s.parse::<Sha256Hash>().is_err());
    }
}
