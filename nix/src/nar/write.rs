//! Serialising a filesystem tree as a NAR, byte-identical to `nix-store --dump`.

use std::io::Write;
use std::path::Path;

use super::error::NarError;
use super::layout::NarLayout;

/// Write the NAR of the tree at `path` to `out` and return its size.
///
/// Streams through a fixed buffer, so memory does not grow with file sizes. If a file changes
/// size between the walk and the copy this fails rather than emit a NAR whose framing lies;
/// whatever was already written to `out` must then be discarded.
pub fn dump_path(path: &Path, out: &mut impl Write) -> Result<u64, NarError> {
    let layout = NarLayout::of_path(path)?;
    layout.read_range(path, 0, layout.nar_size(), out)?;
    Ok(layout.nar_size())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// A NAR written token by token, independently of the layout code.
    fn s(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
        out.resize(out.len().next_multiple_of(8), 0);
    }

    fn toks(out: &mut Vec<u8>, ts: &[&[u8]]) {
        for t in ts {
            s(out, t);
        }
    }

    #[test]
    fn matches_a_hand_written_nar() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        fs::write(r.join("b"), b"123456789").unwrap();
        fs::set_permissions(r.join("b"), fs::Permissions::from_mode(0o744)).unwrap();
        fs::create_dir(r.join("a")).unwrap();
        symlink("../b", r.join("a/l")).unwrap();
        fs::write(r.join("c"), b"").unwrap();
        fs::set_permissions(r.join("c"), fs::Permissions::from_mode(0o655)).unwrap();

        let mut want = Vec::new();
        toks(&mut want, &[b"nix-archive-1", b"(", b"type", b"directory"]);
        toks(&mut want, &[b"entry", b"(", b"name", b"a", b"node"]);
        toks(&mut want, &[b"(", b"type", b"directory"]);
        toks(&mut want, &[b"entry", b"(", b"name", b"l", b"node"]);
        toks(
            &mut want,
            &[b"(", b"type", b"symlink", b"target", b"../b", b")"],
        );
        toks(&mut want, &[b")", b")", b")"]);
        toks(&mut want, &[b"entry", b"(", b"name", b"b", b"node"]);
        toks(&mut want, &[b"(", b"type", b"regular", b"executable", b""]);
        toks(&mut want, &[b"contents", b"123456789", b")", b")"]);
        // Group and other execute bits do not make a file executable for Nix.
        toks(&mut want, &[b"entry", b"(", b"name", b"c", b"node"]);
        toks(
            &mut want,
            &[b"(", b"type", b"regular", b"contents", b"", b")", b")"],
        );
        toks(&mut want, &[b")"]);

        let mut got = Vec::new();
        let n = dump_path(r, &mut got).unwrap();
        assert_eq!(n, got.len() as u64);
        assert_eq!(got, want);
    }

    #[test]
    fn a_failing_writer_is_reported() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::other("disk full"))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let d = tempfile::tempdir().unwrap();
        fs::write(d.path().join("f"), vec![1u8; 1 << 20]).unwrap();
        let err = dump_path(d.path(), &mut Broken).unwrap_err();
        assert!(matches!(err, NarError::Write(_)), "{err}");
    }

    #[test]
    fn a_missing_path_is_an_io_error() {
        let d = tempfile::tempdir().unwrap();
        let err = dump_path(&d.path().join("nope"), &mut Vec::new()).unwrap_err();
        assert!(matches!(err, NarError::Io { .. }), "{err}");
    }
}
