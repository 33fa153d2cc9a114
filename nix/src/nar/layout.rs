//! Where every byte of a tree's NAR comes from: framing bytes we generate, or a range of some
//! file's contents. With that map any byte range of the NAR can be produced by seeking into
//! files, without serialising from the start.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::error::NarError;
use super::{padding, NAR_MAGIC};

/// Reads and writes go through a buffer this big: large enough for few syscalls, small enough
/// that memory never grows with file size.
pub(crate) const IO_BUF: usize = 128 * 1024;

/// One piece of a NAR, as returned by [`NarLayout::segments`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment<'a> {
    /// Bytes we generate: tokens, names, lengths, symlink targets, padding.
    Framing(&'a [u8]),
    /// The whole contents of a file, relative to the root the layout was taken of (empty when
    /// the root itself is the file).
    File { rel_path: &'a Path, size: u64 },
}

/// A [`Segment`] and where it starts in the NAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocatedSegment<'a> {
    pub offset: u64,
    pub segment: Segment<'a>,
}

impl LocatedSegment<'_> {
    pub fn len(&self) -> u64 {
        match self.segment {
            Segment::Framing(b) => b.len() as u64,
            Segment::File { size, .. } => size,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone)]
enum Kind {
    /// A range of [`NarLayout::framing`].
    Framing(Range<usize>),
    File {
        rel_path: PathBuf,
        size: u64,
    },
}

#[derive(Debug, Clone)]
struct Seg {
    offset: u64,
    kind: Kind,
}

/// The NAR of a filesystem tree as a list of segments. Framing bytes of all segments share one
/// buffer, so a layout costs little more than the list of file paths.
#[derive(Debug, Clone)]
pub struct NarLayout {
    framing: Vec<u8>,
    segs: Vec<Seg>,
    nar_size: u64,
}

impl NarLayout {
    /// Walk the tree at `path` (never following symlinks) and lay out its NAR.
    pub fn of_path(path: &Path) -> Result<NarLayout, NarError> {
        let mut b = Builder {
            layout: NarLayout {
                framing: Vec::new(),
                segs: Vec::new(),
                nar_size: 0,
            },
            framing_start: 0,
        };
        b.string(NAR_MAGIC);
        let mut rel = PathBuf::new();
        b.node(path, &mut rel)?;
        b.close_framing();
        Ok(b.layout)
    }

    /// Size of the whole NAR in bytes.
    pub fn nar_size(&self) -> u64 {
        self.nar_size
    }

    /// The segments in NAR order, each with its start offset. Empty files appear as
    /// zero-length file segments.
    pub fn segments(&self) -> impl ExactSizeIterator<Item = LocatedSegment<'_>> + '_ {
        self.segs.iter().map(|s| self.located(s))
    }

    fn located<'a>(&'a self, s: &'a Seg) -> LocatedSegment<'a> {
        let segment = match &s.kind {
            Kind::Framing(r) => Segment::Framing(&self.framing[r.clone()]),
            Kind::File { rel_path, size } => Segment::File {
                rel_path,
                size: *size,
            },
        };
        LocatedSegment {
            offset: s.offset,
            segment,
        }
    }

    /// Write bytes `offset..offset + len` of the NAR of the tree at `root` (the tree this
    /// layout was taken of, or an identical copy) to `out`.
    ///
    /// Fails if a file no longer has the size the layout recorded: a store path whose files
    /// changed must not be served as if it were intact.
    pub fn read_range(
        &self,
        root: &Path,
        offset: u64,
        len: u64,
        out: &mut impl Write,
    ) -> Result<(), NarError> {
        let cap = usize::try_from(len).map_or(IO_BUF, |l| l.clamp(1, IO_BUF));
        let mut sink = Buffered {
            out: io::BufWriter::with_capacity(cap, out),
            buf: vec![0u8; cap],
        };
        self.walk_range(root, offset, len, &mut sink)?;
        sink.out.flush().map_err(NarError::Write)
    }

    /// As [`NarLayout::read_range`], appended to `out`: file contents are read straight into
    /// it, with no buffer between (a chunk read in place is one copy from the page cache).
    pub fn read_range_to_vec(
        &self,
        root: &Path,
        offset: u64,
        len: u64,
        out: &mut Vec<u8>,
    ) -> Result<(), NarError> {
        out.reserve(usize::try_from(len).unwrap_or(0).min(IO_BUF * 64));
        self.walk_range(root, offset, len, out)
    }

    fn walk_range(
        &self,
        root: &Path,
        offset: u64,
        len: u64,
        sink: &mut impl Sink,
    ) -> Result<(), NarError> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.nar_size)
            .ok_or(NarError::RangeOutOfBounds {
                offset,
                len,
                nar_size: self.nar_size,
            })?;
        // Segments ending before `offset` contribute nothing; an empty file exactly at
        // `offset` is kept so that its size is still checked.
        let first = self
            .segs
            .partition_point(|s| s.offset + seg_len(s) < offset);
        for s in &self.segs[first..] {
            let s_len = seg_len(s);
            if s.offset > end || (s.offset == end && s_len > 0) {
                break;
            }
            let from = offset.max(s.offset) - s.offset;
            let to = end.min(s.offset + s_len) - s.offset;
            match &s.kind {
                Kind::Framing(r) => {
                    // Both bounds are within `r`, whose length fits in usize.
                    let bytes = &self.framing[r.clone()];
                    sink.bytes(&bytes[from as usize..to as usize])
                        .map_err(NarError::Write)?;
                }
                Kind::File { rel_path, size } => {
                    if from == to && *size > 0 {
                        continue;
                    }
                    let path = file_path(root, rel_path);
                    copy_file_range(&path, *size, from, to, sink)?;
                }
            }
        }
        Ok(())
    }
}

/// Where [`NarLayout::walk_range`] puts a range's bytes.
trait Sink {
    fn bytes(&mut self, b: &[u8]) -> io::Result<()>;
    /// Up to `n` bytes from `f`'s position; how many there were.
    fn file(&mut self, f: &mut File, n: u64, path: &Path) -> Result<u64, NarError>;
}

/// Into a vector, read straight into its spare capacity (no zeroed buffer in between).
impl Sink for Vec<u8> {
    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.extend_from_slice(b);
        Ok(())
    }

    fn file(&mut self, f: &mut File, n: u64, path: &Path) -> Result<u64, NarError> {
        let got = f
            .take(n)
            .read_to_end(self)
            .map_err(|e| NarError::io("reading", path, e))?;
        Ok(got as u64)
    }
}

/// Into any writer, through a buffer of a fixed size.
struct Buffered<W: Write> {
    out: io::BufWriter<W>,
    buf: Vec<u8>,
}

impl<W: Write> Sink for Buffered<W> {
    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)
    }

    fn file(&mut self, f: &mut File, n: u64, path: &Path) -> Result<u64, NarError> {
        let mut done = 0;
        while done < n {
            let want = usize::try_from(n - done).map_or(self.buf.len(), |r| r.min(self.buf.len()));
            let got = read_some(f, &mut self.buf[..want], path)?;
            if got == 0 {
                break;
            }
            self.out
                .write_all(&self.buf[..got])
                .map_err(NarError::Write)?;
            done += got as u64;
        }
        Ok(done)
    }
}

fn seg_len(s: &Seg) -> u64 {
    match &s.kind {
        Kind::Framing(r) => r.len() as u64,
        Kind::File { size, .. } => *size,
    }
}

fn file_path(root: &Path, rel: &Path) -> PathBuf {
    // `root.join("")` would append a slash, which fails for a file.
    if rel.as_os_str().is_empty() {
        root.to_owned()
    } else {
        root.join(rel)
    }
}

/// Copy bytes `from..to` of the file at `path`, which the layout says has `size` bytes.
fn copy_file_range(
    path: &Path,
    size: u64,
    from: u64,
    to: u64,
    sink: &mut impl Sink,
) -> Result<(), NarError> {
    let mut f = File::open(path).map_err(|e| NarError::io("opening", path, e))?;
    let meta = f
        .metadata()
        .map_err(|e| NarError::io("inspecting", path, e))?;
    if !meta.is_file() {
        return Err(NarError::NotAFileAnymore { path: path.into() });
    }
    let mismatch = |actual| NarError::FileSizeMismatch {
        path: path.into(),
        expected: size,
        actual,
    };
    if meta.len() != size {
        return Err(mismatch(meta.len()));
    }
    if from > 0 {
        f.seek(SeekFrom::Start(from))
            .map_err(|e| NarError::io("seeking in", path, e))?;
    }
    let got = sink.file(&mut f, to - from, path)?;
    if got < to - from {
        // Shrunk since the fstat above.
        return Err(mismatch(from + got));
    }
    if to == size {
        // The file may have grown since the fstat; one more read tells.
        let n = read_some(&mut f, &mut [0u8; 1], path)?;
        if n > 0 {
            let now = f.metadata().map_or(size + 1, |m| m.len().max(size + 1));
            return Err(mismatch(now));
        }
    }
    Ok(())
}

fn read_some(f: &mut File, buf: &mut [u8], path: &Path) -> Result<usize, NarError> {
    loop {
        match f.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(NarError::io("reading", path, e)),
        }
    }
}

struct Builder {
    layout: NarLayout,
    /// Start in `layout.framing` of the framing segment being built.
    framing_start: usize,
}

impl Builder {
    fn raw(&mut self, bytes: &[u8]) {
        self.layout.framing.extend_from_slice(bytes);
        self.layout.nar_size += bytes.len() as u64;
    }

    fn string(&mut self, s: &[u8]) {
        self.raw(&(s.len() as u64).to_le_bytes());
        self.raw(s);
        self.pad(s.len() as u64);
    }

    fn pad(&mut self, len: u64) {
        const ZEROS: [u8; 8] = [0; 8];
        self.raw(&ZEROS[..padding(len) as usize]);
    }

    /// End the current framing segment (if it has bytes) so a file segment can follow.
    fn close_framing(&mut self) {
        let end = self.layout.framing.len();
        if end > self.framing_start {
            let len = (end - self.framing_start) as u64;
            self.layout.segs.push(Seg {
                offset: self.layout.nar_size - len,
                kind: Kind::Framing(self.framing_start..end),
            });
            self.framing_start = end;
        }
    }

    fn file(&mut self, rel_path: PathBuf, size: u64) {
        self.close_framing();
        self.layout.segs.push(Seg {
            offset: self.layout.nar_size,
            kind: Kind::File { rel_path, size },
        });
        self.layout.nar_size += size;
    }

    /// Lay out the node at `path`, which is `rel` below the root.
    fn node(&mut self, path: &Path, rel: &mut PathBuf) -> Result<(), NarError> {
        let meta = fs::symlink_metadata(path).map_err(|e| NarError::io("inspecting", path, e))?;
        let ft = meta.file_type();
        self.string(b"(");
        self.string(b"type");
        if ft.is_file() {
            self.string(b"regular");
            // Nix looks at the owner's execute bit only (S_IXUSR).
            if meta.permissions().mode() & 0o100 != 0 {
                self.string(b"executable");
                self.string(b"");
            }
            self.string(b"contents");
            let size = meta.len();
            self.raw(&size.to_le_bytes());
            self.file(rel.clone(), size);
            self.pad(size);
        } else if ft.is_symlink() {
            let target = fs::read_link(path).map_err(|e| NarError::io("reading link", path, e))?;
            self.string(b"symlink");
            self.string(b"target");
            self.string(target.as_os_str().as_bytes());
        } else if ft.is_dir() {
            self.string(b"directory");
            let mut names = Vec::new();
            for entry in fs::read_dir(path).map_err(|e| NarError::io("listing", path, e))? {
                let entry = entry.map_err(|e| NarError::io("listing", path, e))?;
                names.push(entry.file_name());
            }
            // Nix sorts entries as std::string keys of a std::map: bytewise.
            names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            for name in names {
                self.string(b"entry");
                self.string(b"(");
                self.string(b"name");
                self.string(name.as_bytes());
                self.string(b"node");
                rel.push(&name);
                let res = self.node(&path.join(&name), rel);
                rel.pop();
                res?;
                self.string(b")");
            }
        } else {
            return Err(NarError::UnsupportedFileType { path: path.into() });
        }
        self.string(b")");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::write(r.join("a"), b"hello").unwrap();
        fs::write(r.join("empty"), b"").unwrap();
        fs::create_dir(r.join("dir")).unwrap();
        fs::write(r.join("dir/x"), vec![7u8; 100_000]).unwrap();
        fs::set_permissions(r.join("dir/x"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("nowhere", r.join("dangling")).unwrap();
        d
    }

    fn full(layout: &NarLayout, root: &Path) -> Vec<u8> {
        let mut v = Vec::new();
        layout
            .read_range(root, 0, layout.nar_size(), &mut v)
            .unwrap();
        v
    }

    #[test]
    fn segments_are_contiguous_and_cover_the_nar() {
        let d = tree();
        let layout = NarLayout::of_path(d.path()).unwrap();
        let mut at = 0;
        let mut files = Vec::new();
        for s in layout.segments() {
            assert_eq!(s.offset, at);
            at += s.len();
            if let Segment::File { rel_path, size } = s.segment {
                files.push((rel_path.to_owned(), size));
            }
        }
        assert_eq!(at, layout.nar_size());
        assert_eq!(
            files,
            vec![
                (PathBuf::from("a"), 5),
                (PathBuf::from("dir/x"), 100_000),
                (PathBuf::from("empty"), 0)
            ]
        );
    }

    /// A range read both ways, through a writer and into a vector; they must agree, bytes or
    /// error.
    fn read_both(layout: &NarLayout, root: &Path, o: u64, l: u64) -> Result<Vec<u8>, NarError> {
        let mut through = Vec::new();
        let a = layout
            .read_range(root, o, l, &mut io::Cursor::new(&mut through))
            .map(|()| through);
        let mut direct = b"kept".to_vec();
        let b = layout
            .read_range_to_vec(root, o, l, &mut direct)
            .map(|()| direct.split_off(4));
        match (a, b) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b, "{o}+{l}");
                Ok(a)
            }
            (Err(a), Err(b)) => {
                assert_eq!(a.to_string(), b.to_string(), "{o}+{l}");
                Err(a)
            }
            (a, b) => panic!("{o}+{l}: {a:?} against {b:?}"),
        }
    }

    #[test]
    fn every_range_matches_the_full_nar() {
        let d = tree();
        let layout = NarLayout::of_path(d.path()).unwrap();
        let nar = full(&layout, d.path());
        assert_eq!(nar.len() as u64, layout.nar_size());
        let n = nar.len() as u64;
        let mut points: Vec<u64> = layout.segments().map(|s| s.offset).collect();
        points.extend([0, 1, 7, 8, n - 1, n, 50_000]);
        for &a in &points {
            for &b in &points {
                for (a, b) in [(a, b), (a.saturating_sub(1), b), (a, b + 1), (a + 1, b)] {
                    if a <= b && b <= n {
                        let v = read_both(&layout, d.path(), a, b - a).unwrap();
                        assert_eq!(v, &nar[a as usize..b as usize], "{a}..{b}");
                    }
                }
            }
        }
    }

    #[test]
    fn out_of_bounds_range_is_an_error() {
        let d = tree();
        let layout = NarLayout::of_path(d.path()).unwrap();
        let n = layout.nar_size();
        for (o, l) in [(n, 1), (0, n + 1), (u64::MAX, 2)] {
            let err = read_both(&layout, d.path(), o, l).unwrap_err();
            assert!(matches!(err, NarError::RangeOutOfBounds { .. }), "{err}");
        }
    }

    #[test]
    fn changed_files_are_noticed() {
        let d = tree();
        let layout = NarLayout::of_path(d.path()).unwrap();
        let n = layout.nar_size();
        fs::write(d.path().join("dir/x"), vec![7u8; 99_999]).unwrap();
        let err = read_both(&layout, d.path(), 0, n).unwrap_err();
        assert!(
            matches!(
                err,
                NarError::FileSizeMismatch {
                    expected: 100_000,
                    actual: 99_999,
                    ..
                }
            ),
            "{err}"
        );
        fs::write(d.path().join("dir/x"), vec![7u8; 100_000]).unwrap();
        fs::write(d.path().join("empty"), b"!").unwrap();
        let err = read_both(&layout, d.path(), 0, n).unwrap_err();
        assert!(
            matches!(
                err,
                NarError::FileSizeMismatch {
                    expected: 0,
                    actual: 1,
                    ..
                }
            ),
            "{err}"
        );
        fs::remove_file(d.path().join("a")).unwrap();
        fs::create_dir(d.path().join("a")).unwrap();
        let err = read_both(&layout, d.path(), 0, n).unwrap_err();
        assert!(matches!(err, NarError::NotAFileAnymore { .. }), "{err}");
    }

    #[test]
    fn a_single_file_root() {
        let d = tree();
        let layout = NarLayout::of_path(&d.path().join("a")).unwrap();
        let nar = full(&layout, &d.path().join("a"));
        assert!(nar.windows(5).any(|w| w == b"hello"));
        let files: Vec<_> = layout
            .segments()
            .filter_map(|s| match s.segment {
                Segment::File { rel_path, .. } => Some(rel_path.to_owned()),
                Segment::Framing(_) => None,
            })
            .collect();
        assert_eq!(files, vec![PathBuf::new()]);
    }

    #[test]
    fn fifos_are_rejected() {
        let d = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(d.path().join("p"))
            .status()
            .unwrap();
        assert!(status.success());
        let err = NarLayout::of_path(d.path()).unwrap_err();
        assert!(matches!(err, NarError::UnsupportedFileType { .. }), "{err}");
    }
}
