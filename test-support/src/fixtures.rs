//! Store paths and trees made up for tests.

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
