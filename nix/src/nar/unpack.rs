//! Unpacking an untrusted NAR onto disk, through the streaming reader's checks.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::error::NarError;
use super::layout::IO_BUF;
use super::read::{parse, NarLimits, NarSink};

/// Unpack the NAR from `reader` at `dest`, which must not exist yet (its parent must). Returns
/// the NAR's size. On error, whatever was unpacked so far is left in place for the caller to
/// remove.
///
/// Nothing can be written outside `dest`: names are checked to be single path components
/// (not empty, `.` or `..`, no `/` or NUL) before we see them, every node is created fresh
/// (`create_dir`, `create_new`, `symlink` all fail on an existing path, so a symlink is never
/// opened or written through), and an entry's parent is always a directory we created
/// ourselves moments before, because entry names within a directory are unique. A symlink in
/// the NAR can therefore point anywhere without being followed.
pub fn unpack(reader: impl Read, limits: &NarLimits, dest: &Path) -> Result<u64, NarError> {
    match fs::symlink_metadata(dest) {
        Ok(_) => return Err(NarError::DestinationExists { path: dest.into() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(NarError::io("inspecting", dest, e)),
    }
    let mut sink = Unpacker {
        dest,
        buf: vec![0; IO_BUF],
    };
    parse(reader, limits, &mut sink)
}

struct Unpacker<'a> {
    dest: &'a Path,
    buf: Vec<u8>,
}

impl Unpacker<'_> {
    fn at(&self, rel: &Path) -> PathBuf {
        if rel.as_os_str().is_empty() {
            self.dest.to_owned()
        } else {
            self.dest.join(rel)
        }
    }
}

impl NarSink for Unpacker<'_> {
    fn directory(&mut self, path: &Path) -> Result<(), NarError> {
        let p = self.at(path);
        fs::create_dir(&p).map_err(|e| NarError::io("creating directory", p, e))
    }

    fn symlink(&mut self, path: &Path, target: &[u8]) -> Result<(), NarError> {
        let p = self.at(path);
        std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(target), &p)
            .map_err(|e| NarError::io("creating symlink", p, e))
    }

    fn file(
        &mut self,
        path: &Path,
        executable: bool,
        _size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), NarError> {
        let p = self.at(path);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(if executable { 0o755 } else { 0o644 })
            .open(&p)
            .map_err(|e| NarError::io("creating file", &p, e))?;
        loop {
            let n = match contents.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The parser replaces this with its own error saying what was wrong.
                Err(e) => return Err(NarError::io("reading NAR contents for", p, e)),
            };
            f.write_all(&self.buf[..n])
                .map_err(|e| NarError::io("writing", &p, e))?;
        }
        Ok(())
    }
}
