//! A streaming reader for untrusted NARs: every length is bounded before anything is
//! allocated for it, the structure is checked as strictly as Nix checks it (sorted unique
//! entries, zero padding, valid names), and nothing after the root node is accepted.

use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::{show, NarError};
use super::layout::IO_BUF;
use super::{padding, MAX_NAME_LEN, MAX_TARGET_LEN, NAR_MAGIC};
use crate::Sha256Hash;

/// Bounds on what a NAR may contain. A peer's NAR should be read with `max_nar_size` set to
/// the size its narinfo announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarLimits {
    /// Total size of the NAR in bytes.
    pub max_nar_size: u64,
    /// Directories below the root (the root is depth 0).
    pub max_depth: usize,
    /// Directory entries in the whole NAR.
    pub max_entries: u64,
}

impl Default for NarLimits {
    fn default() -> Self {
        NarLimits {
            max_nar_size: 64 << 30,
            max_depth: 256,
            max_entries: 1 << 22,
        }
    }
}

/// Receives the nodes of a NAR in order, each with its path relative to the root (the empty
/// path for the root itself). A directory is announced before its entries.
pub trait NarSink {
    fn directory(&mut self, path: &Path) -> Result<(), NarError>;
    fn symlink(&mut self, path: &Path, target: &[u8]) -> Result<(), NarError>;
    /// `contents` yields exactly `size` bytes; whatever the sink leaves unread is skipped.
    fn file(
        &mut self,
        path: &Path,
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), NarError>;
}

/// What [`validate`] learned about a NAR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarStats {
    pub nar_size: u64,
    pub nar_hash: Sha256Hash,
    pub files: u64,
    pub directories: u64,
    pub symlinks: u64,
}

/// Parse the NAR from `reader` (to its end: trailing bytes are an error), feeding its nodes to
/// `sink`. Returns the NAR's size.
pub fn parse(
    reader: impl Read,
    limits: &NarLimits,
    sink: &mut impl NarSink,
) -> Result<u64, NarError> {
    let mut p = Parser {
        r: reader,
        buf: vec![0; IO_BUF].into_boxed_slice(),
        pos: 0,
        filled: 0,
        offset: 0,
        limits,
        entries: 0,
        stashed: None,
    };
    p.nar(sink)?;
    Ok(p.offset)
}

/// Check that `reader` holds a well-formed NAR within `limits` and hash it.
pub fn validate(reader: impl Read, limits: &NarLimits) -> Result<NarStats, NarError> {
    let mut hashing = HashingReader {
        inner: reader,
        hasher: Sha256::new(),
    };
    let mut counts = Counts::default();
    let nar_size = parse(&mut hashing, limits, &mut counts)?;
    Ok(NarStats {
        nar_size,
        nar_hash: Sha256Hash(hashing.hasher.finalize().into()),
        files: counts.files,
        directories: counts.directories,
        symlinks: counts.symlinks,
    })
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[derive(Default)]
struct Counts {
    files: u64,
    directories: u64,
    symlinks: u64,
}

impl NarSink for Counts {
    fn directory(&mut self, _: &Path) -> Result<(), NarError> {
        self.directories += 1;
        Ok(())
    }
    fn symlink(&mut self, _: &Path, _: &[u8]) -> Result<(), NarError> {
        self.symlinks += 1;
        Ok(())
    }
    fn file(&mut self, _: &Path, _: bool, _: u64, _: &mut dyn Read) -> Result<(), NarError> {
        self.files += 1;
        Ok(())
    }
}

/// Longest token the grammar has ("nix-archive-1"); a longer string where a token is expected
/// is rejected without reading it.
const MAX_TOKEN_LEN: u64 = 16;

struct Parser<'l, R> {
    r: R,
    buf: Box<[u8]>,
    pos: usize,
    filled: usize,
    /// NAR bytes consumed so far.
    offset: u64,
    limits: &'l NarLimits,
    entries: u64,
    /// An input error met while the sink was reading file contents; it explains the sink's
    /// failure better than the sink can.
    stashed: Option<NarError>,
}

impl<R: Read> Parser<'_, R> {
    /// Make sure there is buffered input; false at end of input.
    fn fill(&mut self) -> Result<bool, NarError> {
        if self.pos < self.filled {
            return Ok(true);
        }
        // Framing alone can also grow a NAR; this bounds it to one buffer past the limit, and
        // the check at the end makes the limit exact.
        self.check_size()?;
        loop {
            match self.r.read(&mut self.buf) {
                Ok(n) => {
                    self.pos = 0;
                    self.filled = n;
                    return Ok(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(NarError::Read {
                        offset: self.offset,
                        source,
                    })
                }
            }
        }
    }

    fn read_exact(&mut self, out: &mut [u8]) -> Result<(), NarError> {
        let mut done = 0;
        while done < out.len() {
            if !self.fill()? {
                return Err(NarError::UnexpectedEof {
                    offset: self.offset,
                });
            }
            let n = (self.filled - self.pos).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
            self.pos += n;
            self.offset += n as u64;
            done += n;
        }
        Ok(())
    }

    fn u64(&mut self) -> Result<u64, NarError> {
        let mut b = [0u8; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn padding(&mut self, len: u64) -> Result<(), NarError> {
        let mut pad = [0u8; 8];
        let n = padding(len) as usize;
        let at = self.offset;
        self.read_exact(&mut pad[..n])?;
        match pad[..n].iter().position(|&b| b != 0) {
            Some(i) => Err(NarError::NonZeroPadding {
                offset: at + i as u64,
            }),
            None => Ok(()),
        }
    }

    /// Read a string of at most `max` bytes; a longer length is handed to `too_long` along with
    /// the offset, before anything is allocated.
    fn string(
        &mut self,
        max: u64,
        too_long: impl FnOnce(u64, u64) -> NarError,
    ) -> Result<Vec<u8>, NarError> {
        let at = self.offset;
        let len = self.u64()?;
        if len > max {
            return Err(too_long(at, len));
        }
        // `len <= max`, which callers keep small.
        let mut s = vec![0u8; len as usize];
        self.read_exact(&mut s)?;
        self.padding(len)?;
        Ok(s)
    }

    /// Read one of `expected` tokens, returning its index.
    fn token(&mut self, expected: &[&'static str], what: &'static str) -> Result<usize, NarError> {
        let at = self.offset;
        let s = self.string(MAX_TOKEN_LEN, |offset, len| NarError::UnexpectedToken {
            offset,
            expected: what,
            found: format!("<string of {len} bytes>"),
        })?;
        expected
            .iter()
            .position(|t| t.as_bytes() == s)
            .ok_or_else(|| NarError::UnexpectedToken {
                offset: at,
                expected: what,
                found: show(&s),
            })
    }

    fn expect(&mut self, token: &'static str) -> Result<(), NarError> {
        self.token(&[token], token).map(drop)
    }

    fn nar(&mut self, sink: &mut impl NarSink) -> Result<(), NarError> {
        let magic = self.string(MAX_TOKEN_LEN, |offset, len| NarError::BadMagic {
            offset,
            found: format!("<string of {len} bytes>"),
        });
        match magic {
            Ok(m) if m == NAR_MAGIC => {}
            Ok(m) => {
                return Err(NarError::BadMagic {
                    offset: 0,
                    found: show(&m),
                })
            }
            // Too short to even hold the magic, or garbage padding: not a NAR at all.
            Err(NarError::UnexpectedEof { .. } | NarError::NonZeroPadding { .. }) => {
                return Err(NarError::BadMagic {
                    offset: 0,
                    found: String::new(),
                })
            }
            Err(e) => return Err(e),
        }

        let mut path = PathBuf::new();
        // One entry per open directory: the previous entry name in it, for the order check.
        let mut open: Vec<Option<Vec<u8>>> = Vec::new();
        'node: loop {
            if self.node(&path, sink)? {
                open.push(None);
            } else if open.is_empty() {
                break;
            } else {
                self.expect(")")?;
                path.pop();
            }
            // Inside a directory: its next entry, or its end.
            loop {
                let at = self.offset;
                if self.token(&["entry", ")"], "\"entry\" or \")\"")? == 1 {
                    open.pop();
                    if open.is_empty() {
                        break 'node;
                    }
                    self.expect(")")?;
                    path.pop();
                    continue;
                }
                self.entries += 1;
                if self.entries > self.limits.max_entries {
                    return Err(NarError::TooManyEntries {
                        offset: at,
                        max: self.limits.max_entries,
                    });
                }
                if open.len() > self.limits.max_depth {
                    return Err(NarError::TooDeep {
                        offset: at,
                        max: self.limits.max_depth,
                    });
                }
                self.expect("(")?;
                self.expect("name")?;
                let at = self.offset;
                let name =
                    self.string(MAX_NAME_LEN as u64, |offset, len| NarError::NameTooLong {
                        offset,
                        len,
                        max: MAX_NAME_LEN,
                    })?;
                check_name(&name, at)?;
                // `open` is non-empty: we are inside a directory.
                if let Some(previous) = open.last_mut() {
                    if let Some(prev) = previous.as_deref() {
                        if name.as_slice() == prev {
                            return Err(NarError::DuplicateEntry {
                                offset: at,
                                name: show(&name),
                            });
                        }
                        if name.as_slice() < prev {
                            return Err(NarError::UnsortedEntries {
                                offset: at,
                                previous: show(prev),
                                name: show(&name),
                            });
                        }
                    }
                    path.push(std::ffi::OsStr::from_bytes(&name));
                    *previous = Some(name);
                }
                self.expect("node")?;
                continue 'node;
            }
        }

        let at = self.offset;
        if self.fill()? {
            return Err(NarError::TrailingData { offset: at });
        }
        self.check_size()
    }

    fn check_size(&self) -> Result<(), NarError> {
        if self.offset > self.limits.max_nar_size {
            return Err(NarError::NarTooLarge {
                offset: self.offset,
                max: self.limits.max_nar_size,
            });
        }
        Ok(())
    }

    /// Parse one node up to its closing ")", or for a directory up to its first entry.
    /// Returns whether it was a directory.
    fn node(&mut self, path: &Path, sink: &mut impl NarSink) -> Result<bool, NarError> {
        self.expect("(")?;
        self.expect("type")?;
        let kind = self.token(
            &["regular", "symlink", "directory"],
            "\"regular\", \"symlink\" or \"directory\"",
        )?;
        match kind {
            0 => {
                let mut executable = false;
                if self.token(
                    &["executable", "contents"],
                    "\"executable\" or \"contents\"",
                )? == 0
                {
                    executable = true;
                    self.expect("")?;
                    self.expect("contents")?;
                }
                let at = self.offset;
                let size = self.u64()?;
                let max = self.limits.max_nar_size;
                if size > max.saturating_sub(self.offset) {
                    return Err(NarError::TooLarge {
                        offset: at,
                        size,
                        max,
                    });
                }
                let mut contents = Contents {
                    p: self,
                    remaining: size,
                };
                let res = sink.file(path, executable, size, &mut contents);
                let remaining = contents.remaining;
                if let Some(e) = self.stashed.take() {
                    return Err(e);
                }
                res?;
                self.skip(remaining)?;
                self.padding(size)?;
                self.expect(")")?;
                Ok(false)
            }
            1 => {
                self.expect("target")?;
                let at = self.offset;
                let target = self.string(MAX_TARGET_LEN as u64, |offset, len| {
                    NarError::TargetTooLong {
                        offset,
                        len,
                        max: MAX_TARGET_LEN,
                    }
                })?;
                if target.is_empty() {
                    return Err(NarError::EmptyTarget { offset: at });
                }
                if target.contains(&0) {
                    return Err(NarError::NulInTarget { offset: at });
                }
                sink.symlink(path, &target)?;
                self.expect(")")?;
                Ok(false)
            }
            _ => {
                sink.directory(path)?;
                Ok(true)
            }
        }
    }

    fn skip(&mut self, mut n: u64) -> Result<(), NarError> {
        while n > 0 {
            if !self.fill()? {
                return Err(NarError::UnexpectedEof {
                    offset: self.offset,
                });
            }
            let k = ((self.filled - self.pos) as u64).min(n);
            // `k` is at most the buffered amount, a usize.
            self.pos += k as usize;
            self.offset += k;
            n -= k;
        }
        Ok(())
    }
}

fn check_name(name: &[u8], offset: u64) -> Result<(), NarError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name == b"." || name == b".." {
        "`.` and `..` are not entries"
    } else if name.contains(&b'/') {
        "contains `/`"
    } else if name.contains(&0) {
        "contains NUL"
    } else {
        return Ok(());
    };
    Err(NarError::InvalidName {
        offset,
        name: show(name),
        reason,
    })
}

/// A file's contents, read straight from the parser's input.
struct Contents<'p, 'l, R> {
    p: &'p mut Parser<'l, R>,
    remaining: u64,
}

impl<R: Read> Read for Contents<'_, '_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 || out.is_empty() {
            return Ok(0);
        }
        let p = &mut *self.p;
        let want = usize::try_from(self.remaining).map_or(out.len(), |r| r.min(out.len()));
        let n = if p.pos == p.filled && want >= p.buf.len() {
            // Large reads bypass our buffer, like BufReader does.
            match p.r.read(&mut out[..want]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
                Err(source) => {
                    return Err(self.stash(NarError::Read {
                        offset: self.p.offset,
                        source,
                    }))
                }
            }
        } else {
            match p.fill() {
                Ok(true) => {
                    let n = (p.filled - p.pos).min(want);
                    out[..n].copy_from_slice(&p.buf[p.pos..p.pos + n]);
                    p.pos += n;
                    n
                }
                Ok(false) => 0,
                Err(e) => return Err(self.stash(e)),
            }
        };
        if n == 0 {
            let offset = self.p.offset;
            return Err(self.stash(NarError::UnexpectedEof { offset }));
        }
        self.p.offset += n as u64;
        self.remaining -= n as u64;
        Ok(n)
    }
}

impl<R> Contents<'_, '_, R> {
    fn stash(&mut self, e: NarError) -> io::Error {
        let io = io::Error::new(io::ErrorKind::UnexpectedEof, e.to_string());
        self.p.stashed = Some(e);
        io
    }
}

#[cfg(test)]
mod tests;
