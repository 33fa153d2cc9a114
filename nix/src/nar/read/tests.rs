use super::*;
use crate::nar::{dump_path, unpack};
use proptest::prelude::*;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};

/// NAR bytes written token by token, so tests can build exactly the malformed input they need.
#[derive(Default, Clone)]
struct N(Vec<u8>);

impl N {
    fn new() -> Self {
        let mut n = N::default();
        n.s(b"nix-archive-1");
        n
    }
    fn s(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(&(b.len() as u64).to_le_bytes());
        self.0.extend_from_slice(b);
        self.0.resize(self.0.len().next_multiple_of(8), 0);
        self
    }
    fn t(&mut self, ts: &[&str]) -> &mut Self {
        for t in ts {
            self.s(t.as_bytes());
        }
        self
    }
    fn file(&mut self, contents: &[u8]) -> &mut Self {
        self.t(&["(", "type", "regular", "contents"])
            .s(contents)
            .t(&[")"])
    }
    fn entry(&mut self, name: &[u8], node: impl FnOnce(&mut Self) -> &mut Self) -> &mut Self {
        self.t(&["entry", "(", "name"]).s(name).t(&["node"]);
        node(self).t(&[")"])
    }
    fn dir(&mut self, names: &[&[u8]]) -> &mut Self {
        self.t(&["(", "type", "directory"]);
        for n in names {
            self.entry(n, |s| s.file(b"x"));
        }
        self.t(&[")"])
    }
    fn bytes(&self) -> Vec<u8> {
        self.0.clone()
    }
}

fn check(nar: &[u8]) -> Result<NarStats, NarError> {
    validate(nar, &NarLimits::default())
}

fn err(nar: &[u8]) -> NarError {
    match check(nar) {
        Ok(s) => panic!("accepted a bad NAR: {s:?}"),
        Err(e) => e,
    }
}

fn sample_tree() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    fs::create_dir_all(r.join("sub/deeper/empty")).unwrap();
    fs::write(r.join("sub/deeper/f"), vec![0xabu8; 300_001]).unwrap();
    fs::write(r.join("x"), b"exec").unwrap();
    fs::set_permissions(r.join("x"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(r.join("empty"), b"").unwrap();
    symlink("sub/deeper", r.join("to-dir")).unwrap();
    symlink("/does/not/exist", r.join("dangling")).unwrap();
    fs::write(
        r.join(std::ffi::OsStr::from_bytes(b"\xff odd \xc3\xa4")),
        b"bytes",
    )
    .unwrap();
    d
}

#[test]
fn round_trip_dump_validate_unpack_dump() {
    let d = sample_tree();
    let mut nar = Vec::new();
    dump_path(d.path(), &mut nar).unwrap();
    let stats = check(&nar).unwrap();
    assert_eq!(stats.nar_size, nar.len() as u64);
    assert_eq!(stats.nar_hash, Sha256Hash::digest(&nar));
    assert_eq!((stats.files, stats.directories, stats.symlinks), (4, 4, 2));

    let out = tempfile::tempdir().unwrap();
    let dest = out.path().join("unpacked");
    assert_eq!(
        unpack(&nar[..], &NarLimits::default(), &dest).unwrap(),
        nar.len() as u64
    );
    let mut again = Vec::new();
    dump_path(&dest, &mut again).unwrap();
    assert!(again == nar, "unpacked tree dumps differently");
    let mode = fs::metadata(dest.join("x")).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111);
}

#[test]
fn single_file_and_symlink_roots_round_trip() {
    let d = sample_tree();
    for root in ["x", "dangling", "empty"] {
        let mut nar = Vec::new();
        dump_path(&d.path().join(root), &mut nar).unwrap();
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("u");
        unpack(&nar[..], &NarLimits::default(), &dest).unwrap();
        let mut again = Vec::new();
        dump_path(&dest, &mut again).unwrap();
        assert_eq!(again, nar, "{root}");
    }
}

#[test]
fn unpack_refuses_an_existing_destination() {
    let out = tempfile::tempdir().unwrap();
    let nar = N::new().file(b"hi").bytes();
    let e = unpack(&nar[..], &NarLimits::default(), out.path()).unwrap_err();
    assert!(matches!(e, NarError::DestinationExists { .. }), "{e}");
    // A dangling symlink exists too, and must not be written through.
    let link = out.path().join("link");
    symlink(out.path().join("target"), &link).unwrap();
    let e = unpack(&nar[..], &NarLimits::default(), &link).unwrap_err();
    assert!(matches!(e, NarError::DestinationExists { .. }), "{e}");
    assert!(!out.path().join("target").exists());
}

#[test]
fn unpack_reports_truncation_not_a_sink_error() {
    let d = sample_tree();
    let mut nar = Vec::new();
    dump_path(d.path(), &mut nar).unwrap();
    let cut = nar.windows(4).position(|w| w == [0xab; 4]).unwrap() + 1000;
    let out = tempfile::tempdir().unwrap();
    let e = unpack(&nar[..cut], &NarLimits::default(), &out.path().join("u")).unwrap_err();
    assert!(
        matches!(e, NarError::UnexpectedEof { offset } if offset == cut as u64),
        "{e}"
    );
}

#[test]
fn sink_may_leave_contents_unread() {
    struct Half(Vec<u8>);
    impl NarSink for Half {
        fn directory(&mut self, _: &Path) -> Result<(), NarError> {
            Ok(())
        }
        fn symlink(&mut self, _: &Path, _: &[u8]) -> Result<(), NarError> {
            Ok(())
        }
        fn file(&mut self, _: &Path, _: bool, size: u64, c: &mut dyn Read) -> Result<(), NarError> {
            let mut b = vec![0; size as usize / 2];
            c.read_exact(&mut b).unwrap();
            self.0.extend(b);
            Ok(())
        }
    }
    let nar = N::new()
        .t(&["(", "type", "directory"])
        .entry(b"a", |s| s.file(&[1u8; 200_000]))
        .entry(b"b", |s| s.file(b"0123456789"))
        .t(&[")"])
        .bytes();
    let mut sink = Half(Vec::new());
    let n = parse(&nar[..], &NarLimits::default(), &mut sink).unwrap();
    assert_eq!(n, nar.len() as u64);
    assert_eq!(sink.0.len(), 100_005);
    assert_eq!(&sink.0[100_000..], b"01234");
}

#[test]
fn accepts_minimal_nars() {
    check(&N::new().file(b"").bytes()).unwrap();
    check(&N::new().dir(&[]).bytes()).unwrap();
    check(
        &N::new()
            .t(&["(", "type", "symlink", "target", "/", ")"])
            .bytes(),
    )
    .unwrap();
    check(&N::new().dir(&[b"a", b"b", &[0xff; 255]]).bytes()).unwrap();
}

#[test]
fn bad_magic() {
    assert!(matches!(err(b""), NarError::BadMagic { .. }));
    let mut n = N::default();
    n.s(b"nix-archive-2").file(b"");
    assert!(matches!(err(&n.bytes()), NarError::BadMagic { .. }));
    let mut n = N::default();
    n.s(&[b'x'; 1000]);
    assert!(matches!(err(&n.bytes()), NarError::BadMagic { .. }));
}

#[test]
fn unknown_tokens() {
    let nar = N::new().t(&["(", "type", "fifo", ")"]).bytes();
    let e = err(&nar);
    assert!(
        matches!(e, NarError::UnexpectedToken { offset: 56, ref found, .. } if found == "fifo"),
        "{e}"
    );
    let nar = N::new().t(&["[", "type", "regular"]).bytes();
    assert!(matches!(
        err(&nar),
        NarError::UnexpectedToken { offset: 24, .. }
    ));
    let mut n = N::new();
    n.t(&["(", "type", "regular"]).s(&[b'c'; 1 << 20]);
    assert!(matches!(err(&n.bytes()), NarError::UnexpectedToken { .. }));
    // A length near u64::MAX where a token belongs must not be allocated.
    let mut nar = N::new().t(&["(", "type"]).bytes();
    nar.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(err(&nar), NarError::UnexpectedToken { .. }));
    let nar = N::new()
        .t(&["(", "type", "regular", "executable", "x", "contents"])
        .s(b"")
        .t(&[")"])
        .bytes();
    assert!(matches!(err(&nar), NarError::UnexpectedToken { .. }));
    let nar = N::new()
        .t(&["(", "type", "directory", "entry", "(", "nome"])
        .bytes();
    assert!(matches!(err(&nar), NarError::UnexpectedToken { .. }));
}

#[test]
fn nonzero_padding() {
    let mut nar = N::new().file(b"abc").bytes();
    let at = nar.windows(3).position(|w| w == b"abc").unwrap() + 3;
    nar[at + 2] = 1;
    let e = err(&nar);
    assert!(
        matches!(e, NarError::NonZeroPadding { offset } if offset == at as u64 + 2),
        "{e}"
    );
    let mut nar = N::new().t(&["(", "type", "directory", ")"]).bytes();
    let len = nar.len();
    nar[len - 3] = b'!';
    assert!(matches!(err(&nar), NarError::NonZeroPadding { .. }));
}

#[test]
fn unsorted_and_duplicate_entries() {
    let e = err(&N::new().dir(&[b"b", b"a"]).bytes());
    assert!(matches!(e, NarError::UnsortedEntries { .. }), "{e}");
    // Bytewise, not by locale: "B" < "a" < "a-b" < "a.b" < "ä".
    check(
        &N::new()
            .dir(&[b"B", b"a", b"a-b", b"a.b", "ä".as_bytes()])
            .bytes(),
    )
    .unwrap();
    let e = err(&N::new().dir(&[b"a", b"B"]).bytes());
    assert!(matches!(e, NarError::UnsortedEntries { .. }), "{e}");
    let e = err(&N::new().dir(&[b"a", b"b", b"b"]).bytes());
    assert!(matches!(e, NarError::DuplicateEntry { .. }), "{e}");
}

#[test]
fn invalid_names() {
    for name in [&b""[..], b".", b"..", b"a/b", b"/", b"a\0b"] {
        let e = err(&N::new().dir(&[name]).bytes());
        assert!(
            matches!(e, NarError::InvalidName { offset: 128, .. }),
            "{name:?}: {e}"
        );
    }
    let e = err(&N::new().dir(&[&[b'n'; 256]]).bytes());
    assert!(
        matches!(
            e,
            NarError::NameTooLong {
                offset: 128,
                len: 256,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn symlink_targets() {
    let link = |t: &[u8]| {
        N::new()
            .t(&["(", "type", "symlink", "target"])
            .s(t)
            .t(&[")"])
            .bytes()
    };
    check(&link(&[b'a'; 4095])).unwrap();
    let e = err(&link(&[b'a'; 4096]));
    assert!(
        matches!(e, NarError::TargetTooLong { len: 4096, .. }),
        "{e}"
    );
    let e = err(&link(b""));
    assert!(matches!(e, NarError::EmptyTarget { .. }), "{e}");
    // Found by fuzzing: validate accepted it, unpack could not create it.
    let e = err(&link(b"libfoo.s\0\0\x01"));
    assert!(matches!(e, NarError::NulInTarget { offset: 88 }), "{e}");
    assert!(matches!(
        unpack(
            &link(b"a\0")[..],
            &NarLimits::default(),
            &tempfile::tempdir().unwrap().path().join("x")
        ),
        Err(NarError::NulInTarget { .. })
    ));
}

fn nested(depth: usize) -> Vec<u8> {
    let mut n = N::new();
    for _ in 0..depth {
        n.t(&["(", "type", "directory", "entry", "(", "name", "d", "node"]);
    }
    n.file(b"leaf");
    for _ in 0..depth {
        n.t(&[")", ")"]);
    }
    n.bytes()
}

#[test]
fn nesting_depth() {
    let limits = NarLimits {
        max_depth: 10,
        ..NarLimits::default()
    };
    validate(&nested(10)[..], &limits).unwrap();
    let e = validate(&nested(11)[..], &limits).unwrap_err();
    assert!(matches!(e, NarError::TooDeep { max: 10, .. }), "{e}");
    check(&nested(256)).unwrap();
    assert!(matches!(err(&nested(257)), NarError::TooDeep { .. }));
}

#[test]
fn size_limits() {
    let limits = NarLimits {
        max_nar_size: 1000,
        ..NarLimits::default()
    };
    validate(&N::new().file(&[0; 800]).bytes()[..], &limits).unwrap();
    let e = validate(&N::new().file(&[0; 950]).bytes()[..], &limits).unwrap_err();
    assert!(matches!(e, NarError::TooLarge { size: 950, .. }), "{e}");
    // A claimed size that is absurd fails before anything is read or allocated.
    let mut nar = N::new().t(&["(", "type", "regular", "contents"]).bytes();
    nar.extend_from_slice(&u64::MAX.to_le_bytes());
    let e = check(&nar).unwrap_err();
    assert!(matches!(e, NarError::TooLarge { .. }), "{e}");
    // Framing alone past the limit.
    let mut n = N::new();
    n.t(&["(", "type", "directory"]);
    for i in 0..20 {
        n.entry(format!("{i:02}").as_bytes(), |s| {
            s.t(&["(", "type", "directory", ")"])
        });
    }
    let e = validate(&n.t(&[")"]).bytes()[..], &limits).unwrap_err();
    assert!(matches!(e, NarError::NarTooLarge { max: 1000, .. }), "{e}");
}

#[test]
fn entry_limit() {
    let limits = NarLimits {
        max_entries: 3,
        ..NarLimits::default()
    };
    validate(&N::new().dir(&[b"a", b"b", b"c"]).bytes()[..], &limits).unwrap();
    let e = validate(
        &N::new().dir(&[b"a", b"b", b"c", b"d"]).bytes()[..],
        &limits,
    )
    .unwrap_err();
    assert!(matches!(e, NarError::TooManyEntries { max: 3, .. }), "{e}");
}

#[test]
fn trailing_data() {
    let mut nar = N::new().file(b"x").bytes();
    let len = nar.len() as u64;
    nar.push(0);
    let e = err(&nar);
    assert!(
        matches!(e, NarError::TrailingData { offset } if offset == len),
        "{e}"
    );
    let mut nar = N::new().dir(&[b"a"]).bytes();
    nar.extend(N::new().file(b"x").bytes());
    assert!(matches!(err(&nar), NarError::TrailingData { .. }));
}

#[test]
fn truncation_anywhere() {
    let nar = N::new()
        .t(&["(", "type", "directory"])
        .entry(b"a", |s| s.file(b"hello"))
        .entry(b"l", |s| s.t(&["(", "type", "symlink", "target", "a", ")"]))
        .t(&[")"])
        .bytes();
    check(&nar).unwrap();
    for cut in 24..nar.len() {
        let e = err(&nar[..cut]);
        assert!(
            matches!(e, NarError::UnexpectedEof { offset } if offset <= cut as u64),
            "cut {cut}: {e}"
        );
    }
}

#[test]
fn read_errors_are_reported() {
    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("network down"))
        }
    }
    let e = validate(Failing, &NarLimits::default()).unwrap_err();
    assert!(matches!(e, NarError::Read { offset: 0, .. }), "{e}");
}

fn a_valid_nar() -> Vec<u8> {
    N::new()
        .t(&["(", "type", "directory"])
        .entry(b"a", |s| s.file(b"hello world"))
        .entry(b"b", |s| {
            s.t(&["(", "type", "directory"])
                .entry(b"c", |s| {
                    s.t(&["(", "type", "regular", "executable", "", "contents"])
                        .s(b"#!")
                        .t(&[")"])
                })
                .t(&[")"])
        })
        .entry(b"l", |s| {
            s.t(&["(", "type", "symlink", "target", "../x", ")"])
        })
        .t(&[")"])
        .bytes()
}

/// A small tree description for the round-trip property.
#[derive(Debug, Clone)]
enum Tree {
    File(Vec<u8>, bool),
    Link(Vec<u8>),
    Dir(Vec<(Vec<u8>, Tree)>),
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(1u8..=255, 1..12).prop_filter("valid name", |n| {
        !n.contains(&b'/') && n != b"." && n != b".."
    })
}

fn tree() -> impl Strategy<Value = Tree> {
    let leaf = prop_oneof![
        (prop::collection::vec(any::<u8>(), 0..300), any::<bool>())
            .prop_map(|(c, x)| Tree::File(c, x)),
        prop::collection::vec(1u8..=255, 1..40).prop_map(Tree::Link),
    ];
    leaf.prop_recursive(4, 30, 5, |inner| {
        prop::collection::btree_map(name(), inner, 0..5)
            .prop_map(|m| Tree::Dir(m.into_iter().collect()))
    })
}

fn materialise(t: &Tree, at: &Path) {
    match t {
        Tree::File(c, x) => {
            fs::write(at, c).unwrap();
            let mode = if *x { 0o755 } else { 0o644 };
            fs::set_permissions(at, fs::Permissions::from_mode(mode)).unwrap();
        }
        Tree::Link(target) => symlink(std::ffi::OsStr::from_bytes(target), at).unwrap(),
        Tree::Dir(entries) => {
            fs::create_dir(at).unwrap();
            for (n, t) in entries {
                materialise(t, &at.join(std::ffi::OsStr::from_bytes(n)));
            }
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = check(&bytes);
        let mut prefixed = N::new().bytes();
        prefixed.extend(&bytes);
        let _ = check(&prefixed);
    }

    #[test]
    fn mutated_nars_never_panic(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut nar = a_valid_nar();
        for (i, b, op) in edits {
            let i = i.index(nar.len());
            match op {
                0 => nar[i] = b,
                1 => nar.insert(i, b),
                _ => { nar.remove(i); }
            }
        }
        let _ = check(&nar);
        let _ = check(&nar[..cut.index(nar.len() + 1)]);
    }

    #[test]
    fn mutated_nars_unpack_inside_dest_only(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut nar = a_valid_nar();
        for (i, b) in edits {
            let i = i.index(nar.len());
            nar[i] = b;
        }
        let out = tempfile::tempdir().unwrap();
        let dest = out.path().join("u");
        let _ = unpack(&nar[..], &NarLimits::default(), &dest);
        let outside: Vec<_> = fs::read_dir(out.path()).unwrap().collect();
        prop_assert!(outside.len() <= 1);
    }

    #[test]
    fn trees_round_trip(t in tree()) {
        let src = tempfile::tempdir().unwrap();
        let root = src.path().join("t");
        materialise(&t, &root);
        let mut nar = Vec::new();
        dump_path(&root, &mut nar).unwrap();
        let stats = check(&nar).unwrap();
        prop_assert_eq!(stats.nar_size, nar.len() as u64);
        let dest = src.path().join("u");
        unpack(&nar[..], &NarLimits::default(), &dest).unwrap();
        let mut again = Vec::new();
        dump_path(&dest, &mut again).unwrap();
        prop_assert_eq!(again, nar);
    }
}
