//! A NAR from a peer or the upstream cache: the streaming reader never panics and keeps its
//! limits; what it accepts hashes and sizes as the bytes do, names only single path components,
//! and unpacks to a tree that our writer turns back into exactly the same bytes.
#![no_main]

use std::io::Read;
use std::path::{Component, Path};

use libfuzzer_sys::fuzz_target;
use peerix_nix::nar::{self, NarError, NarLimits, NarSink};
use peerix_nix::Sha256Hash;

/// Checks what the parser hands a sink: relative paths of normal components, a directory
/// before its entries, and file contents of exactly the announced size.
#[derive(Default)]
struct Checker {
    dirs: Vec<std::path::PathBuf>,
    nodes: u64,
}

impl Checker {
    fn node(&mut self, path: &Path) {
        self.nodes += 1;
        if self.nodes == 1 {
            assert!(path.as_os_str().is_empty(), "the root comes first");
            return;
        }
        assert!(path.components().all(|c| matches!(c, Component::Normal(_))));
        let parent = path.parent().expect("an entry has a parent");
        assert!(
            self.dirs.iter().any(|d| d == parent),
            "entry before its directory"
        );
    }
}

impl NarSink for Checker {
    fn directory(&mut self, path: &Path) -> Result<(), NarError> {
        self.node(path);
        self.dirs.push(path.to_owned());
        Ok(())
    }
    fn symlink(&mut self, path: &Path, target: &[u8]) -> Result<(), NarError> {
        self.node(path);
        assert!(!target.is_empty() && target.len() <= nar::MAX_TARGET_LEN);
        assert!(!target.contains(&0));
        Ok(())
    }
    fn file(
        &mut self,
        path: &Path,
        _executable: bool,
        size: u64,
        contents: &mut dyn Read,
    ) -> Result<(), NarError> {
        self.node(path);
        let mut got = Vec::new();
        // An input error while reading is the parser's to report.
        if contents.read_to_end(&mut got).is_ok() {
            assert_eq!(got.len() as u64, size);
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = NarLimits {
        max_nar_size: 1 << 20,
        max_depth: 8,
        max_entries: 256,
    };
    let mut checker = Checker::default();
    let parsed = nar::parse(data, &limits, &mut checker);
    let stats = match nar::validate(data, &limits) {
        Ok(s) => s,
        Err(_) => {
            assert!(parsed.is_err(), "validate and parse disagree");
            return;
        }
    };
    assert_eq!(
        parsed.expect("validate and parse disagree"),
        data.len() as u64
    );
    assert_eq!(stats.nar_size, data.len() as u64);
    assert_eq!(stats.nar_hash, Sha256Hash::digest(data));
    assert_eq!(
        stats.files + stats.directories + stats.symlinks,
        checker.nodes
    );
    assert!(stats.directories + stats.files + stats.symlinks <= limits.max_entries + 1);

    // A valid NAR is canonical: unpacked and dumped again it is the same bytes.
    let tmp = tempfile::Builder::new()
        .prefix("peerix-fuzz-nar")
        .tempdir_in(std::env::var_os("PEERIX_FUZZ_TMP").unwrap_or_else(|| "/tmp".into()))
        .expect("temporary directory");
    let dest = tmp.path().join("out");
    assert_eq!(
        nar::unpack(data, &limits, &dest).expect("unpack"),
        data.len() as u64
    );
    let mut again = Vec::new();
    nar::dump_path(&dest, &mut again).expect("dump");
    assert!(again == data, "the unpacked tree dumps to other bytes");
});
