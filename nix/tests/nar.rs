//! The NAR module against real Nix: our writer must produce exactly `nix-store --dump`'s
//! bytes, our reader must accept and unpack Nix's NARs, and hashes must match the store's.

mod needs_nix {
    use std::fs;
    use std::io::{Read, Write};
    use std::path::Path;
    use std::process::Stdio;

    use peerix_nix::nar::{dump_path, unpack, validate, NarLayout, NarLimits};
    use peerix_test_support::fixtures::{assert_same_nar, awkward_tree};
    use peerix_test_support::io::HashingWriter;
    use peerix_test_support::nix::nix;
    use peerix_test_support::rng::Star;
    use sha2::Digest;

    fn our_dump(path: &Path) -> Vec<u8> {
        let mut v = Vec::new();
        let n = dump_path(path, &mut v).unwrap();
        assert_eq!(n, v.len() as u64);
        v
    }

    #[test]
    fn dump_path_equals_nix_store_dump() {
        let nix = nix();
        let root = nix.scratch("src").join("tree");
        awkward_tree(&root);
        assert_same_nar(&our_dump(&root), &nix.dump(&root), "tree");
        for sub in ["nested", "exec", "empty", "dangling", "link-to-dir", "big"] {
            let p = root.join(sub);
            assert_same_nar(&our_dump(&p), &nix.dump(&p), sub);
        }
    }

    #[test]
    fn store_path_dump_and_hash_match_nix() {
        let nix = nix();
        let tree = nix.scratch("src").join("tree");
        awkward_tree(&tree);
        let path = nix.add(&tree);
        let real = nix.real(&path);
        let ours = our_dump(&real);
        assert_same_nar(&ours, &nix.dump(&real), "store path");
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
        let nix = nix();
        let tree = nix.scratch("src").join("tree");
        awkward_tree(&tree);
        let nar = nix.dump(&tree);
        let dest = nix.scratch("out").join("unpacked");
        let n = unpack(&nar[..], &NarLimits::default(), &dest).unwrap();
        assert_eq!(n, nar.len() as u64);
        assert_same_nar(&nix.dump(&dest), &nar, "unpacked");
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
        assert_same_nar(&nix.dump(&restored), &nar, "restored");
    }

    #[test]
    fn layout_ranges_equal_slices_of_nix_nar() {
        let nix = nix();
        let tree = nix.scratch("src").join("tree");
        awkward_tree(&tree);
        let nar = nix.dump(&tree);
        let layout = NarLayout::of_path(&tree).unwrap();
        assert_eq!(layout.nar_size(), nar.len() as u64);
        // Deterministic, so a failure reproduces.
        let mut r = Star(0x9e37_79b9_7f4a_7c15);
        let mut next = move || r.next();
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

    fn vm_hwm_kib() -> u64 {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn gigabyte_file_streams_in_constant_memory() {
        let nix = nix();
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
        let mut ours = HashingWriter::new();
        let n = dump_path(&root, &mut ours).unwrap();
        let after = vm_hwm_kib();
        assert!(n > size);
        assert_eq!(ours.len, n);
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
        let mut theirs = HashingWriter::new();
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let k = stdout.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            theirs.write_all(&buf[..k]).unwrap();
        }
        assert!(child.wait().unwrap().success());
        assert_eq!(theirs.len, n, "NAR sizes differ");
        assert_eq!(
            ours.sha.finalize(),
            theirs.sha.finalize(),
            "NAR hashes differ"
        );
    }
}
