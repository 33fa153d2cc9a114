//! `.narinfo` files: parse, render byte-for-byte as Nix does, sign and verify.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use thiserror::Error;

use crate::hash::HashError;
use crate::signing::{PublicKey, SecretKey, Signature};
use crate::store_path::StorePathError;
use crate::{Sha256Hash, StorePath};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NarInfoError {
    #[error("narinfo is {0} bytes, more than the {max} allowed", max = NarInfo::MAX_SIZE)]
    TooLarge(usize),
    #[error("narinfo line {line} has no `Key: value` form")]
    BadLine { line: usize },
    #[error("narinfo field {0} appears twice")]
    Duplicate(&'static str),
    #[error("narinfo lacks the required field {0}")]
    Missing(&'static str),
    #[error("narinfo field {field}: {source}")]
    BadPath {
        field: &'static str,
        #[source]
        source: StorePathError,
    },
    #[error("narinfo field {field}: {source}")]
    BadHash {
        field: &'static str,
        #[source]
        source: HashError,
    },
    #[error("narinfo field {field} is not a number: {value:?}")]
    BadNumber { field: &'static str, value: String },
    #[error("narinfo field {field} has a bad value: {value:?}")]
    BadValue { field: &'static str, value: String },
    #[error("narinfo has more than {max} {what}", max = NarInfo::MAX_LIST)]
    TooMany { what: &'static str },
}

/// The metadata of one store path in a binary cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarInfo {
    pub store_path: StorePath,
    pub url: Option<String>,
    pub compression: Option<String>,
    pub file_hash: Option<Sha256Hash>,
    pub file_size: Option<u64>,
    pub nar_hash: Sha256Hash,
    pub nar_size: u64,
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    pub system: Option<String>,
    /// `NAME:base64` strings, kept verbatim (a signature by an unknown key is still passed on).
    pub sigs: BTreeSet<String>,
    pub ca: Option<String>,
}

fn clip(s: &str) -> String {
    s.chars().take(120).collect()
}

fn set<T>(slot: &mut Option<T>, v: T, field: &'static str) -> Result<(), NarInfoError> {
    if slot.replace(v).is_some() {
        return Err(NarInfoError::Duplicate(field));
    }
    Ok(())
}

fn path(field: &'static str, v: &str) -> Result<StorePath, NarInfoError> {
    StorePath::from_full_path(v).map_err(|source| NarInfoError::BadPath { field, source })
}

fn base_path(field: &'static str, v: &str) -> Result<StorePath, NarInfoError> {
    StorePath::from_base_name(v).map_err(|source| NarInfoError::BadPath { field, source })
}

fn hash(field: &'static str, v: &str) -> Result<Sha256Hash, NarInfoError> {
    v.parse()
        .map_err(|source| NarInfoError::BadHash { field, source })
}

fn number(field: &'static str, v: &str) -> Result<u64, NarInfoError> {
    // u64::from_str accepts a leading '+', Nix does not.
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NarInfoError::BadNumber {
            field,
            value: clip(v),
        });
    }
    v.parse().map_err(|_| NarInfoError::BadNumber {
        field,
        value: clip(v),
    })
}

/// Free-text fields end up in HTTP answers and log lines: keep them to printable ASCII.
fn text(field: &'static str, v: &str) -> Result<String, NarInfoError> {
    if v.is_empty() || !v.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err(NarInfoError::BadValue {
            field,
            value: clip(v),
        });
    }
    Ok(v.to_owned())
}

impl NarInfo {
    /// Bigger than any real narinfo (a path with a thousand references is ~60 KiB).
    pub const MAX_SIZE: usize = 64 * 1024;
    /// Bound on references and signatures.
    pub const MAX_LIST: usize = 4096;

    pub fn parse(s: &str) -> Result<Self, NarInfoError> {
        if s.len() > Self::MAX_SIZE {
            return Err(NarInfoError::TooLarge(s.len()));
        }
        let mut store_path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references: Option<BTreeSet<StorePath>> = None;
        let mut deriver = None;
        let mut system = None;
        let mut sigs = BTreeSet::new();
        let mut ca = None;
        for (i, line) in s.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let (k, v) = line
                .split_once(": ")
                .or_else(|| line.strip_suffix(':').map(|k| (k, "")))
                .ok_or(NarInfoError::BadLine { line: i + 1 })?;
            match k {
                "StorePath" => set(&mut store_path, path("StorePath", v)?, "StorePath")?,
                "URL" => set(&mut url, text("URL", v)?, "URL")?,
                "Compression" => set(&mut compression, text("Compression", v)?, "Compression")?,
                "FileHash" => set(&mut file_hash, hash("FileHash", v)?, "FileHash")?,
                "FileSize" => set(&mut file_size, number("FileSize", v)?, "FileSize")?,
                "NarHash" => set(&mut nar_hash, hash("NarHash", v)?, "NarHash")?,
                "NarSize" => set(&mut nar_size, number("NarSize", v)?, "NarSize")?,
                "References" => {
                    let mut refs = BTreeSet::new();
                    for r in v.split(' ').filter(|r| !r.is_empty()) {
                        if refs.len() >= Self::MAX_LIST {
                            return Err(NarInfoError::TooMany { what: "references" });
                        }
                        refs.insert(base_path("References", r)?);
                    }
                    set(&mut references, refs, "References")?
                }
                // Old caches wrote this placeholder instead of leaving the field out.
                "Deriver" if v == "unknown-deriver" => {}
                "Deriver" => set(&mut deriver, base_path("Deriver", v)?, "Deriver")?,
                "System" => set(&mut system, text("System", v)?, "System")?,
                "Sig" => {
                    if sigs.len() >= Self::MAX_LIST {
                        return Err(NarInfoError::TooMany { what: "signatures" });
                    }
                    // Kept verbatim, but it must at least have the form of a signature.
                    v.parse::<Signature>().map_err(|_| NarInfoError::BadValue {
                        field: "Sig",
                        value: clip(v),
                    })?;
                    sigs.insert(v.to_owned());
                }
                "CA" => {
                    let c = text("CA", v)?;
                    if !(c.starts_with("fixed:") || c.starts_with("text:")) {
                        return Err(NarInfoError::BadValue {
                            field: "CA",
                            value: clip(v),
                        });
                    }
                    set(&mut ca, c, "CA")?
                }
                // Nix ignores fields it does not know; so do we.
                _ => {}
            }
        }
        let nar_size = nar_size.ok_or(NarInfoError::Missing("NarSize"))?;
        if nar_size == 0 {
            return Err(NarInfoError::BadValue {
                field: "NarSize",
                value: "0".into(),
            });
        }
        Ok(Self {
            store_path: store_path.ok_or(NarInfoError::Missing("StorePath"))?,
            url,
            compression,
            file_hash,
            file_size,
            nar_hash: nar_hash.ok_or(NarInfoError::Missing("NarHash"))?,
            nar_size,
            references: references.unwrap_or_default(),
            deriver,
            system,
            sigs,
            ca,
        })
    }

    /// Parse from raw bytes (a network body), bounding size before decoding.
    pub fn parse_bytes(b: &[u8]) -> Result<Self, NarInfoError> {
        if b.len() > Self::MAX_SIZE {
            return Err(NarInfoError::TooLarge(b.len()));
        }
        let s = std::str::from_utf8(b).map_err(|e| NarInfoError::BadLine {
            line: b[..e.valid_up_to()].iter().filter(|&&c| c == b'\n').count() + 1,
        })?;
        Self::parse(s)
    }

    /// Render in Nix's field order and format (`NarInfo::to_string` in libstore).
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(512);
        let _ = writeln!(s, "StorePath: {}", self.store_path);
        if let Some(u) = &self.url {
            let _ = writeln!(s, "URL: {u}");
        }
        if let Some(c) = &self.compression {
            let _ = writeln!(s, "Compression: {c}");
        }
        if let Some(h) = &self.file_hash {
            let _ = writeln!(s, "FileHash: {}", h.to_nix_string());
        }
        if let Some(n) = self.file_size {
            let _ = writeln!(s, "FileSize: {n}");
        }
        let _ = writeln!(s, "NarHash: {}", self.nar_hash.to_nix_string());
        let _ = writeln!(s, "NarSize: {}", self.nar_size);
        s.push_str("References:");
        s.push(' ');
        let mut first = true;
        for r in &self.references {
            if !first {
                s.push(' ');
            }
            first = false;
            s.push_str(r.base_name());
        }
        s.push('\n');
        if let Some(d) = &self.deriver {
            let _ = writeln!(s, "Deriver: {}", d.base_name());
        }
        if let Some(sys) = &self.system {
            let _ = writeln!(s, "System: {sys}");
        }
        for sig in &self.sigs {
            let _ = writeln!(s, "Sig: {sig}");
        }
        if let Some(ca) = &self.ca {
            let _ = writeln!(s, "CA: {ca}");
        }
        s
    }

    /// What a signature covers: `1;StorePath;NarHash;NarSize;full,reference,paths`.
    pub fn fingerprint(&self) -> String {
        let refs: Vec<String> = self.references.iter().map(|r| r.to_string()).collect();
        format!(
            "1;{};{};{};{}",
            self.store_path,
            self.nar_hash.to_nix_string(),
            self.nar_size,
            refs.join(",")
        )
    }

    /// Add this key's signature (replacing an older one by the same key name).
    pub fn sign(&mut self, key: &SecretKey) {
        let prefix = format!("{}:", key.name());
        self.sigs.retain(|s| !s.starts_with(&prefix));
        self.sigs
            .insert(key.sign(self.fingerprint().as_bytes()).to_string());
    }

    /// The first of `keys` that signed this narinfo, if any.
    pub fn verified_by<'k>(&self, keys: &'k [PublicKey]) -> Option<&'k PublicKey> {
        let fp = self.fingerprint();
        let sigs: Vec<Signature> = self.sigs.iter().filter_map(|s| s.parse().ok()).collect();
        keys.iter()
            .find(|k| sigs.iter().any(|s| k.verify(fp.as_bytes(), s)))
    }

    /// The narinfo of an uncompressed NAR served as `nar/<narhash>.nar`, as peerix serves it.
    pub fn for_uncompressed(info: &crate::PathInfo) -> Self {
        Self {
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            sigs: info.sigs.clone(),
            ca: info.ca.clone(),
            ..Self::uncompressed(info.path.clone(), info.nar_hash, info.nar_size)
        }
    }

    /// A narinfo for an uncompressed NAR served at `nar/<NarHash>.nar`, with nothing else
    /// known: no references, deriver, signatures or CA.
    pub fn uncompressed(store_path: StorePath, nar_hash: Sha256Hash, nar_size: u64) -> Self {
        Self {
            store_path,
            url: Some(format!("nar/{}.nar", nar_hash.to_base32())),
            compression: Some("none".into()),
            file_hash: Some(nar_hash),
            file_size: Some(nar_size),
            nar_hash,
            nar_size,
            references: BTreeSet::new(),
            deriver: None,
            system: None,
            sigs: BTreeSet::new(),
            ca: None,
        }
    }
}

impl std::str::FromStr for NarInfo {
    type Err = NarInfoError;
    fn from_str(s: &str) -> Result<Self, NarInfoError> {
        Self::parse(s)
    }
}

impl std::fmt::Display for NarInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Written by `nix copy --to file://…?compression=none&secret-key=…` (Nix 2.8).
    const REAL: &str = "StorePath: /nix/store/inrbbn8pggcp38qhr25j9nvp5f2micmp-top
URL: nar/0kdc467rvrm9924cmghf8yyixdb9jbj6f77g9xp0w2srhmz4ri69.nar
Compression: none
FileHash: sha256:0kdc467rvrm9924cmghf8yyixdb9jbj6f77g9xp0w2srhmz4ri69
FileSize: 100984
NarHash: sha256:0kdc467rvrm9924cmghf8yyixdb9jbj6f77g9xp0w2srhmz4ri69
NarSize: 100984
References: 5qn9lblnzjgza2vb23kwaclrcxnska2z-dep i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt
Deriver: 92p02a1wvs9al4m1dmdsjbnhpsnbql4n-top.drv
Sig: test1:Xdg4S161OG3jfQbeMrZkPUNq6QtxE7Zqbxl+1cqhvFIwQjVCUGfFthFg6lp6NrX/4bKHPmXm8r4uTsJRnjy6Cw==
";

    #[test]
    fn round_trips_real_narinfo() {
        let n = NarInfo::parse(REAL).unwrap();
        assert_eq!(n.render(), REAL);
        assert_eq!(n.nar_size, 100984);
        assert_eq!(n.references.len(), 2);
        assert!(n.fingerprint().starts_with(
            "1;/nix/store/inrbbn8pggcp38qhr25j9nvp5f2micmp-top;sha256:0kdc467rvrm9924cmghf8yyixdb9jbj6f77g9xp0w2srhmz4ri69;100984;/nix/store/5qn9lblnzjgza2vb23kwaclrcxnska2z-dep,/nix/store/i9pm"
        ));
    }

    #[test]
    fn empty_references_keep_trailing_space() {
        let s = REAL.replace(
            "References: 5qn9lblnzjgza2vb23kwaclrcxnska2z-dep i9pmrzmpshapij2kin22pff6fc2adavx-hello.txt",
            "References: ",
        );
        let n = NarInfo::parse(&s).unwrap();
        assert!(n.references.is_empty());
        assert_eq!(n.render(), s);
    }

    #[test]
    fn sign_and_verify() {
        let mut n = NarInfo::parse(REAL).unwrap();
        let k = SecretKey::generate("peerix-test-1").unwrap();
        let pk = k.public_key();
        assert!(n.verified_by(std::slice::from_ref(&pk)).is_none());
        n.sign(&k);
        assert_eq!(n.verified_by(std::slice::from_ref(&pk)), Some(&pk));
        let reparsed = NarInfo::parse(&n.render()).unwrap();
        assert!(reparsed.verified_by(std::slice::from_ref(&pk)).is_some());
        let mut edited = reparsed.clone();
        edited.nar_size += 1;
        assert!(edited.verified_by(std::slice::from_ref(&pk)).is_none());
    }

    #[test]
    fn rejects_bad_input() {
        type Check = fn(&NarInfoError) -> bool;
        let cases: Vec<(String, Check)> = vec![
            (REAL.replace("StorePath: ", "StorePath:"), |e| {
                matches!(e, NarInfoError::BadLine { .. })
            }),
            (REAL.replace("NarSize: 100984", "NarSize: -1"), |e| {
                matches!(e, NarInfoError::BadNumber { .. })
            }),
            (REAL.replace("NarSize: 100984", "NarSize: +5"), |e| {
                matches!(e, NarInfoError::BadNumber { .. })
            }),
            (REAL.replace("NarSize: 100984\n", ""), |e| {
                matches!(e, NarInfoError::Missing("NarSize"))
            }),
            (
                format!(
                    "{REAL}NarHash: sha256:0kdc467rvrm9924cmghf8yyixdb9jbj6f77g9xp0w2srhmz4ri69\n"
                ),
                |e| matches!(e, NarInfoError::Duplicate("NarHash")),
            ),
            (REAL.replace("-dep", "-../x"), |e| {
                matches!(e, NarInfoError::BadPath { .. })
            }),
            (REAL.replace("/nix/store/inrbbn", "/etc/inrbbn"), |e| {
                matches!(e, NarInfoError::BadPath { .. })
            }),
            (REAL.replace("Sig: test1:", "Sig: test1"), |e| {
                matches!(e, NarInfoError::BadValue { .. })
            }),
            ("x".repeat(NarInfo::MAX_SIZE + 1), |e| {
                matches!(e, NarInfoError::TooLarge(_))
            }),
        ];
        for (s, ok) in cases {
            let e = NarInfo::parse(&s).unwrap_err();
            assert!(ok(&e), "{e:?}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(b in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = NarInfo::parse_bytes(&b);
        }

        #[test]
        fn mutated_real_never_panics(pos in 0usize..REAL.len(), byte in any::<u8>()) {
            let mut b = REAL.as_bytes().to_vec();
            b[pos] = byte;
            if let Ok(n) = NarInfo::parse_bytes(&b) {
                // Anything we accept renders and reparses to the same value.
                prop_assert_eq!(NarInfo::parse(&n.render()).unwrap(), n);
            }
        }
    }
}
