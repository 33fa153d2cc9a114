//! Deltas: which older NARs resemble a new one, and which of their chunks resemble each of its
//! chunks, so that a changed chunk can travel as a delta against bytes both sides hold.

use std::collections::HashMap;
use std::path::Path;

use peerix_nix::nar::{NarLayout, Segment};
use peerix_nix::{Sha256Hash, StorePath};

use super::ChunkStore;
use crate::{ChunkId, Manifest, Result};

/// Most chunks one delta is computed against.
pub const DELTA_BASE_CHUNKS: usize = 8;
/// Most bytes of base one delta is computed against.
pub const DELTA_BASE_BYTES: u64 = 2 * 1024 * 1024;
/// Base bytes taken on either side of where a chunk's bytes were in the older version: room
/// for what moved a little.
const MARGIN: u64 = 128 * 1024;

/// For each chunk of a NAR, the chunks of an older version of it that hold the bytes it most
/// likely resembles.
#[derive(Debug, Clone)]
pub struct DeltaPlan {
    pub old: Sha256Hash,
    bases: HashMap<ChunkId, Vec<ChunkId>>,
}

impl DeltaPlan {
    pub fn bases(&self, id: &ChunkId) -> Option<&[ChunkId]> {
        self.bases
            .get(id)
            .map(Vec::as_slice)
            .filter(|b| !b.is_empty())
    }
}

/// The package name of a store path's name: everything before the first dash that is not
/// followed by a letter, as Nix splits `name-version`.
pub fn package_name(name: &str) -> &str {
    let b = name.as_bytes();
    for i in 0..b.len() {
        if b[i] == b'-' && !b.get(i + 1).is_some_and(u8::is_ascii_alphabetic) {
            return &name[..i];
        }
    }
    name
}

impl ChunkStore {
    /// NARs held whole (in the local store or in packs) of store paths with the same package
    /// name as `path`, at most `max`, those with the nearest name first: the older versions a
    /// delta can start from.
    pub fn other_versions(&self, path: &StorePath, max: usize) -> Result<Vec<Sha256Hash>> {
        let want = package_name(path.name());
        let mut candidates: Vec<(Sha256Hash, StorePath)> = self.local_sources()?;
        for kv in self.inner.paths.iter() {
            let (_, v) = kv?;
            let base = v.get(32..).and_then(|b| std::str::from_utf8(b).ok());
            if let Some(p) = base.and_then(|b| StorePath::from_base_name(b).ok()) {
                candidates.push((super::hash_key(&v[..32])?, p));
            }
        }
        let mut found: Vec<(Sha256Hash, String)> = vec![];
        for (nar, p) in candidates {
            if p.hash() != path.hash()
                && package_name(p.name()) == want
                && !found.iter().any(|(n, _)| *n == nar)
                && self.readable_manifest(&nar)?.is_some()
            {
                found.push((nar, p.name().to_string()));
            }
        }
        // The nearest name is the likeliest previous release.
        let mine = path.name();
        found.sort_by_key(|(_, n)| std::cmp::Reverse(common_prefix(n, mine)));
        Ok(found.into_iter().take(max).map(|(n, _)| n).collect())
    }

    /// Which chunks of `old` each chunk of `new` resembles: those at the same place of the
    /// same file when both NARs are local store paths (whose layouts name the files), else
    /// those at the same relative place in the NAR. None if either NAR is not held whole.
    pub fn delta_plan(&self, new: &Sha256Hash, old: &Sha256Hash) -> Result<Option<DeltaPlan>> {
        let (Some(nm), Some(om)) = (self.readable_manifest(new)?, self.readable_manifest(old)?)
        else {
            return Ok(None);
        };
        let layouts = match (self.layout(new), self.layout(old)) {
            (Ok(n), Ok(o)) => Some((n, o)),
            _ => None,
        };
        let files = layouts.as_ref().map(|(n, o)| FileMap::new(&n.1, &o.1));
        let old_ends: Vec<u64> = om
            .chunks
            .iter()
            .scan(0u64, |end, c| {
                *end += u64::from(c.len);
                Some(*end)
            })
            .collect();
        let (new_size, old_size) = (nm.nar_size.max(1), om.nar_size);
        let mut bases = HashMap::with_capacity(nm.chunks.len());
        for (at, c) in nm.offsets() {
            let len = u64::from(c.len);
            let start = files
                .as_ref()
                .and_then(|f| f.old_offset(at, len))
                .unwrap_or_else(|| {
                    (u128::from(at) * u128::from(old_size) / u128::from(new_size)) as u64
                });
            let from = start.saturating_sub(MARGIN);
            let to = (start + len + MARGIN).min(old_size);
            bases.insert(c.id, chunks_between(&om, &old_ends, from, to));
        }
        Ok(Some(DeltaPlan { old: *old, bases }))
    }
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count()
}

/// The chunks of `m` overlapping `from..to`, trimmed from the far end to the base budget.
fn chunks_between(m: &Manifest, ends: &[u64], from: u64, to: u64) -> Vec<ChunkId> {
    let first = ends.partition_point(|&e| e <= from);
    let mut out = vec![];
    let mut bytes = 0u64;
    for c in m.chunks.iter().skip(first) {
        let start = ends[first + out.len()] - u64::from(c.len);
        if start >= to
            || out.len() == DELTA_BASE_CHUNKS
            || bytes + u64::from(c.len) > DELTA_BASE_BYTES
        {
            break;
        }
        bytes += u64::from(c.len);
        out.push(c.id);
    }
    out
}

/// Where each file of a new NAR was in the old one, by path, or by path with the digits left
/// out (a versioned directory such as `foo-1.2.dist-info` keeps its place across releases).
struct FileMap {
    /// New file spans in NAR order: (offset, size, old offset, old size).
    spans: Vec<(u64, u64, u64, u64)>,
}

impl FileMap {
    fn new(new: &NarLayout, old: &NarLayout) -> Self {
        let mut exact: HashMap<&Path, (u64, u64)> = HashMap::new();
        let mut loose: HashMap<String, (u64, u64)> = HashMap::new();
        for s in old.segments() {
            if let Segment::File { rel_path, size } = s.segment {
                exact.insert(rel_path, (s.offset, size));
                loose.insert(without_digits(rel_path), (s.offset, size));
            }
        }
        let spans = new
            .segments()
            .filter_map(|s| match s.segment {
                Segment::File { rel_path, size } if size > 0 => exact
                    .get(rel_path)
                    .or_else(|| loose.get(&without_digits(rel_path)))
                    .map(|&(oo, os)| (s.offset, size, oo, os)),
                _ => None,
            })
            .collect();
        Self { spans }
    }

    /// Where the bytes `at..at + len` of the new NAR most likely were in the old one: in the
    /// file that holds most of them, at the same offset within it.
    fn old_offset(&self, at: u64, len: u64) -> Option<u64> {
        let end = at + len;
        let first = self.spans.partition_point(|&(o, s, _, _)| o + s <= at);
        let (o, _, oo, os) = self.spans[first..]
            .iter()
            .take_while(|&&(o, _, _, _)| o < end)
            .max_by_key(|&&(o, s, _, _)| (o + s).min(end) - o.max(at))
            .copied()?;
        // The chunk's start in the file's coordinates (it may start before the file).
        let in_file = at.saturating_sub(o).min(os);
        Some((oo + in_file).saturating_sub(o.saturating_sub(at)))
    }
}

fn without_digits(p: &Path) -> String {
    p.to_string_lossy()
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_as_nix_splits_them() {
        assert_eq!(package_name("hello-2.12.1"), "hello");
        assert_eq!(package_name("python3.11-numpy-1.26.4"), "python3.11-numpy");
        assert_eq!(package_name("gtk+3-3.24.38"), "gtk+3");
        assert_eq!(package_name("source"), "source");
        assert_eq!(package_name("foo-"), "foo");
    }
}
