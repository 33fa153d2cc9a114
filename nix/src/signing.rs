//! Nix binary-cache signing keys and signatures (ed25519), in the formats of
//! `nix-store --generate-binary-cache-key`: `NAME:base64(secret‖public)` and `NAME:base64(public)`.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use thiserror::Error;

/// Key files and signature strings are tiny; anything longer is not one.
const MAX_TEXT: usize = 1024;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("{what} is longer than {MAX_TEXT} bytes")]
    TooLong { what: &'static str },
    #[error("{what} has no `NAME:` prefix")]
    NoName { what: &'static str },
    #[error("{what} has an empty name")]
    EmptyName { what: &'static str },
    #[error("{what} is not valid base64")]
    BadBase64 { what: &'static str },
    #[error("{what} decodes to {got} bytes, expected {expected}")]
    BadLength {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("public key is not a valid ed25519 point, or a weak one (of small order)")]
    BadPoint,
    #[error("secret key's public half does not match its secret half")]
    Mismatch,
}

fn split_named<'a>(s: &'a str, what: &'static str) -> Result<(&'a str, &'a str), KeyError> {
    if s.len() > MAX_TEXT {
        return Err(KeyError::TooLong { what });
    }
    let (name, data) = s.split_once(':').ok_or(KeyError::NoName { what })?;
    if name.is_empty() {
        return Err(KeyError::EmptyName { what });
    }
    Ok((name, data))
}

fn decode<const N: usize>(data: &str, what: &'static str) -> Result<[u8; N], KeyError> {
    let v = B64.decode(data).map_err(|_| KeyError::BadBase64 { what })?;
    let got = v.len();
    v.try_into().map_err(|_| KeyError::BadLength {
        what,
        got,
        expected: N,
    })
}

/// A secret signing key with its name.
#[derive(Clone)]
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    pub fn generate(name: &str) -> Result<Self, KeyError> {
        if name.is_empty() {
            return Err(KeyError::EmptyName { what: "key name" });
        }
        if name.contains(':') || name.len() > 255 {
            return Err(KeyError::NoName { what: "key name" });
        }
        Ok(Self {
            name: name.to_owned(),
            key: SigningKey::generate(&mut rand_core::OsRng),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            name: self.name.clone(),
            key: self.key.verifying_key(),
        }
    }

    pub fn sign(&self, msg: &[u8]) -> Signature {
        Signature {
            name: self.name.clone(),
            bytes: self.key.sign(msg).to_bytes(),
        }
    }
}

impl FromStr for SecretKey {
    type Err = KeyError;
    /// Surrounding whitespace (a trailing newline from an editor) is ignored.
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let what = "secret key";
        let (name, data) = split_named(s.trim(), what)?;
        let bytes: [u8; 64] = decode(data, what)?;
        let mut seed = [0u8; 32];
        seed.copy_from_slice(&bytes[..32]);
        let key = SigningKey::from_bytes(&seed);
        if key.verifying_key().as_bytes() != &bytes[32..] {
            return Err(KeyError::Mismatch);
        }
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }
}

/// Renders the key file's contents (Nix writes no trailing newline).
impl fmt::Display for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}",
            self.name,
            B64.encode(self.key.to_keypair_bytes())
        )
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}:…)", self.name)
    }
}

/// A public key with its name, as in `trusted-public-keys`.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    name: String,
    key: VerifyingKey,
}

impl PublicKey {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True when `sig` is by this key (same name) over `msg`.
    pub fn verify(&self, msg: &[u8], sig: &Signature) -> bool {
        sig.name == self.name
            && self
                .key
                // Strict, as libsodium: no small-order keys or R, no non-canonical encodings.
                .verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig.bytes))
                .is_ok()
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let what = "public key";
        let (name, data) = split_named(s.trim(), what)?;
        let bytes: [u8; 32] = decode(data, what)?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| KeyError::BadPoint)?;
        // A point of small order verifies forged signatures (all zeros, for one); libsodium,
        // which Nix verifies with, refuses such keys too.
        if key.is_weak() {
            return Err(KeyError::BadPoint);
        }
        Ok(Self {
            name: name.to_owned(),
            key,
        })
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.key.as_bytes()))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A signature `NAME:base64(64 bytes)`, as on a narinfo `Sig:` line.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Signature {
    pub name: String,
    pub bytes: [u8; 64],
}

impl FromStr for Signature {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let what = "signature";
        let (name, data) = split_named(s, what)?;
        Ok(Self {
            name: name.to_owned(),
            bytes: decode(data, what)?,
        })
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, B64.encode(self.bytes))
    }
}

impl fmt::Debug for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signature({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Found by fuzzing: the all-zero key is a point of small order, and an all-zero
    /// signature verified under it for some messages. Such keys are refused.
    #[test]
    fn weak_public_keys_are_refused() {
        let zero = format!("name:{}", B64.encode([0u8; 32]));
        assert!(matches!(zero.parse::<PublicKey>(), Err(KeyError::BadPoint)));
        // The identity point, another small-order key.
        let mut id = [0u8; 32];
        id[0] = 1;
        let id = format!("name:{}", B64.encode(id));
        assert!(matches!(id.parse::<PublicKey>(), Err(KeyError::BadPoint)));
    }

    #[test]
    fn round_trip_and_verify() {
        let sk = SecretKey::generate("test-1").unwrap();
        let sk2: SecretKey = sk.to_string().parse().unwrap();
        let pk: PublicKey = sk2.public_key().to_string().parse().unwrap();
        let sig = sk.sign(b"hello");
        let sig2: Signature = sig.to_string().parse().unwrap();
        assert!(pk.verify(b"hello", &sig2));
        assert!(!pk.verify(b"hellp", &sig2));
        let other = SecretKey::generate("test-1").unwrap().public_key();
        assert!(!other.verify(b"hello", &sig2));
        let renamed = Signature {
            name: "test-2".into(),
            ..sig2
        };
        assert!(!pk.verify(b"hello", &renamed));
    }

    #[test]
    fn rejects_mismatched_secret() {
        let a = SecretKey::generate("a").unwrap();
        let b = SecretKey::generate("a").unwrap();
        let mut bytes = a.key.to_keypair_bytes();
        bytes[32..].copy_from_slice(b.key.verifying_key().as_bytes());
        let s = format!("a:{}", B64.encode(bytes));
        assert_eq!(s.parse::<SecretKey>().unwrap_err(), KeyError::Mismatch);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in "\\PC{0,200}") {
            let _ = s.parse::<SecretKey>();
            let _ = s.parse::<PublicKey>();
            let _ = s.parse::<Signature>();
        }
    }
}
