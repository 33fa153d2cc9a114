//! The NAR module against real Nix: our writer must produce exactly `nix-store --dump`'s
//! bytes, our reader must accept and unpack Nix's NARs, and hashes must match the store's.

mod common;

mod needs_nix {
    use super::*;

    use std::ffi::OsStr;
    use std::fs;
    use std::io::{self, Read, Write};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::path::Path;
    use std::process::Stdio;

    use peerix_nix::nar::{dump_path, unpack, validate, NarLayout, NarLimits};
    use sha2::{Digest, Sha256};

    /// A tree with every kind of node and the names that trip up naive implementations.
    fn awkward_tree(root: &Path) {
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

    fn nix_dump(nix: &common::Nix, path: &Path) -> Vec<u8> {
        let out = nix.output("nix-store", &["--dump", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "nix-store --dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn our_dump(path: &Path) -> Vec<u8> {
        let mut v = Vec::new();
        let n = dump_path(path, &mut v).unwrap();
        assert_eq!(n, v.len() as u64);
        v
    }

    /// The index of the first differing byte, for readable failures on large NARs.
    fn assert_same_nar(ours: &[u8], nix: &[u8], what: &str) {
        if ours != nix {
            let at = ours.iter().zip(nix).position(|(a, b)| a != b);
            panic!(
                "{what}: NARs differ (ours {} bytes, Nix {} bytes, first difference at {at:?})",
                ours.len(),
                nix.len()
            );
        }
    }

    #[test]
    fn dump_path_equals_nix_store_dump() {
        let nix = common::nix();
        let root = nix.scratch("src").join("tree");
        awkward_tree(&root);
        assert_same_nar(&our_dump(&root), &nix_dump(&nix, &root), "tree");
        for sub in ["nested", "exec", "empty", "dangling", "link-to-dir", "big"] {
            let p = root.join(sub);
            assert_same_nar(&our_dump(&p), &nix_dump(&nix, &p), sub);
        }
    }

    #[test]
    fn store_path_dump_and_hash_match_nix() {
        let nix = common::nix();
        let tree = nix.scratch("src").join("tree");
        awkward_tree(&tree);
        let path = nix.add(&tree);
        let real = nix.real(&path);
        let ours = our_dump(&real);
        assert_same_nar(&ours, &nix_dump(&nix, &real), "store path");
        let s = nix.store_arg();
        // `nix-store --dump` does not open the store, so ask the new CLI to read the chroot store.
        let via_store = nix.output("nix", &["store", "dump-path", "--store", &s, &path]);
        assert!(
            via_store.status.success(),
            "nix store dump-path: {}",
            String::from_utf8_lossy(&via_store.stderr)
        );
        assert_same_nar(&ours, &via_store.stdout, "store path via the store");

        let stats = validate(&ours[..], &NarLimits::default()).unwrap();
        let want = nix.run("nix-store", &["--store", &s, "-q", "--hash", &path]);
        assert_eq!(stats.nar_hash.to_nix_string(), want.trim());
        let size = nix.run("nix-store", &["--store", &s, "-q", "--size", &path]);
        assert_eq!(stats.nar_size.to_string(), size.trim());
    }

    #[test]
    fn unpacked_nix_nar_dumps_identically() {
        let nix = common::nix();
        let tree = nix.scratch("src").join("tree");
        awkward_tree(&tree);
        let nar = nix_dump(&nix, &tree);
        let dest = nix.scratch("out").join("unpacked");
        let n = unpack(&nar[..], &NarLimits::default(), &dest).unwrap();
        assert_eq!(n, nar.len() as u64);
        assert_same_nar(&nix_dump(&nix, &dest), &nar, "unpacked");
        // And Nix's own restore of our NAR gives the same tree back.
        let restored = nix.scratch("out").join("restored");
        let mut child = nix
            .cmd("nix-store")
            .arg("--restore")
            .arg(&restored)
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&our_dump(&tree))
            .unwrap();
        assert!(child.wait().unwrap().success());
        assert_same_nar(&nix_dump(&nix, &restored), &nar, "restored");
    }

    #[test]
    fn layout_ranges_equal_slices_of_nix_nar() {
        let nix = common::nix();
        let tree = nix.scratch("src").join("tree");
        awkward_tree(&tree);
        let nar = nix_dump(&nix, &tree);
        let layout = NarLayout::of_path(&tree).unwrap();
        assert_eq!(layout.nar_size(), nar.len() as u64);
        // xorshift64*: deterministic, so a failure reproduces.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let n = nar.len() as u64;
        for i in 0..2000 {
            let start = next() % (n + 1);
            // Mostly short ranges (chunk boundaries, framing), sometimes long ones across files.
            let max = if i % 4 == 0 {
                n - start
            } else {
                300.min(n - start)
            };
            let len = next() % (max + 1);
            let mut got = Vec::new();
            layout.read_range(&tree, start, len, &mut got).unwrap();
            assert!(
                got == nar[start as usize..(start + len) as usize],
                "range {start}+{len} differs"
            );
        }
    }

    struct HashWriter(Sha256, u64);

    impl Write for HashWriter {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.update(buf);
            self.1 += buf.len() as u64;
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn vm_hwm_kib() -> u64 {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn gigabyte_file_streams_in_constant_memory() {
        let nix = common::nix();
        let root = nix.scratch("big");
        fs::write(root.join("small"), b"small").unwrap();
        let big = root.join("sparse");
        let f = fs::File::create(&big).unwrap();
        let size = (1u64 << 30) + 12345;
        f.set_len(size).unwrap();
        // A few real bytes so a wrong offset anywhere changes the hash.
        use std::os::unix::fs::FileExt;
        for at in [0, 4095, 1 << 20, (1 << 29) + 3, size - 1] {
            f.write_all_at(b"X", at).unwrap();
        }
        drop(f);

        let before = vm_hwm_kib();
        let mut ours = HashWriter(Sha256::new(), 0);
        let n = dump_path(&root, &mut ours).unwrap();
        let after = vm_hwm_kib();
        assert!(n > size);
        assert_eq!(ours.1, n);
        assert!(
            after.saturating_sub(before) < 64 * 1024,
            "peak RSS grew by {} KiB while dumping",
            after - before
        );

        let mut child = nix
            .cmd("nix-store")
            .arg("--dump")
            .arg(&root)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut theirs = HashWriter(Sha256::new(), 0);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let k = stdout.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            theirs.write_all(&buf[..k]).unwrap();
        }
        assert!(child.wait().unwrap().success());
        assert_eq!(theirs.1, n, "NAR sizes differ");
        assert_eq!(ours.0.finalize(), theirs.0.finalize(), "NAR hashes differ");
    }

    #[test]
    fn peerix_nar_dump_cli_equals_nix_store_dump() {
        let nix = common::nix();
        let tree = nix.scratch("cli").join("tree");
        awkward_tree(&tree);
        for p in [tree.clone(), tree.join("nested"), tree.join("exec")] {
            let ours = common::peerix_ok(&["nar", "dump", p.to_str().unwrap()]);
            assert_same_nar(&ours, &nix_dump(&nix, &p), "peerix nar dump");
        }
        let out = common::peerix()
            .args(["nar", "dump", "/nonexistent/peerix-test"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/peerix-test"));
    }
}
