//! Store paths and trees made up for tests.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use peerix_nix::{Sha256Hash, StorePath};

use crate::rng::Rng;

/// A package-like tree of about `total` bytes under `dir`: files in `lib` and `lib/sub`, an
/// empty directory, an empty file and a symlink.
pub fn make_tree(dir: &Path, seed: u64, total: usize) {
    let mut r = Rng(seed | 1);
    std::fs::create_dir_all(dir.join("lib/sub")).unwrap();
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    std::fs::write(dir.join("empty-file"), b"").unwrap();
    std::os::unix::fs::symlink("lib/sub", dir.join("link")).unwrap();
    let mut left = total;
    let mut i = 0;
    while left > 0 {
        let n = (r.next() as usize % (total / 4 + 1)).clamp(1, left);
        let sub = if i % 2 == 0 { "lib" } else { "lib/sub" };
        std::fs::write(dir.join(sub).join(format!("f{i}")), r.bytes(n)).unwrap();
        left -= n;
        i += 1;
    }
}

/// The NAR of a tree.
pub fn nar_of(dir: &Path) -> Vec<u8> {
    let mut v = vec![];
    peerix_nix::nar::dump_path(dir, &mut v).unwrap();
    v
}

/// A directory laid out like a Nix store root, holding one "store path": a `make_tree` of
/// `size` bytes under `root/nix/store`.
pub fn fake_store_path(root: &Path, name: &str, seed: u64, size: usize) -> StorePath {
    let mut r = Rng(seed | 1);
    let hash: String = (0..32)
        .map(|_| peerix_nix::base32::ALPHABET[r.next() as usize % 32] as char)
        .collect();
    let sp = StorePath::from_base_name(&format!("{hash}-{name}")).unwrap();
    make_tree(&root.join("nix/store").join(sp.base_name()), seed, size);
    sp
}

/// Store path number `n`, `/nix/store/<hash>-test-<n>`.
pub fn store_path(n: u8) -> StorePath {
    let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
    let hash: String = (0..32)
        .map(|i| alphabet[(usize::from(n) * 7 + i * 3) % 32] as char)
        .collect();
    StorePath::from_base_name(&format!("{hash}-test-{n}")).unwrap()
}

/// A store path named `name`, its hash part derived from the name.
pub fn named_store_path(name: &str) -> StorePath {
    let h = peerix_nix::base32::encode(&Sha256Hash::digest(name.as_bytes()).0[..20]);
    StorePath::from_base_name(&format!("{h}-{name}")).unwrap()
}

/// A tree with every kind of node and the names that trip up naive implementations.
pub fn awkward_tree(root: &Path) {
    fs::create_dir(root).unwrap();
    let file = |rel: &[u8], contents: &[u8], mode: u32| {
        let p = root.join(OsStr::from_bytes(rel));
        fs::write(&p, contents).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    };
    // Names whose bytewise order differs from any locale's.
    for name in ["B", "a", "a.b", "a-b", "ä", "Z", "_", "with space", " lead"] {
        file(name.as_bytes(), name.as_bytes(), 0o644);
    }
    file(b"\xff\xfe high bytes", b"\x00\x01\xff", 0o644);
    file(b"empty", b"", 0o644);
    file(b"empty-exec", b"", 0o755);
    file(b"exec", b"#!/bin/sh\necho hi\n", 0o755);
    // Nix decides "executable" by the owner's bit alone.
    file(b"group-exec-only", b"g", 0o654);
    file(b"owner-exec-only", b"o", 0o744);
    let big: Vec<u8> = (0..1_000_003u32).map(|i| (i * 7 % 251) as u8).collect();
    file(b"big", &big, 0o644);
    for len in 1..=17u8 {
        file(
            format!("pad{len:02}").as_bytes(),
            &vec![len; len as usize],
            0o644,
        );
    }
    fs::create_dir_all(root.join("nested/deeper/deepest")).unwrap();
    fs::create_dir(root.join("empty-dir")).unwrap();
    file(b"nested/deeper/deepest/leaf", b"leaf", 0o644);
    file(b"nested/n", b"n", 0o755);
    symlink("nested/deeper", root.join("link-to-dir")).unwrap();
    symlink("exec", root.join("link-to-file")).unwrap();
    symlink("/nonexistent/dangling target", root.join("dangling")).unwrap();
    symlink("../../..", root.join("nested/deeper/up")).unwrap();
    symlink(
        OsStr::from_bytes(b"\xff\xfe"),
        root.join("link-to-high-bytes"),
    )
    .unwrap();
}

/// The index of the first differing byte, for readable failures on large NARs.
pub fn assert_same_nar(ours: &[u8], nix: &[u8], what: &str) {
    if ours != nix {
        let at = ours.iter().zip(nix).position(|(a, b)| a != b);
        panic!(
            "{what}: NARs differ (ours {} bytes, Nix {} bytes, first difference at {at:?})",
            ours.len(),
            nix.len()
        );
    }
}
