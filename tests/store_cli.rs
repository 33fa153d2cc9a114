//! `peerix store` on a real Nix store: a store path is indexed in place (no second copy) and
//! read back byte-for-byte as Nix dumps it.

mod common;

mod needs_nix {
    use super::*;

    #[test]
    fn store_paths_are_indexed_in_place_and_cat_equals_nix_dump() {
        let nix = common::nix();
        let state = nix.scratch("state");
        let state = state.to_str().unwrap();
        let root = nix.store_arg();
        let tree = nix.scratch("tree");
        std::fs::write(tree.join("big"), vec![7u8; 3 << 20]).unwrap();
        std::fs::write(tree.join("small"), b"hello").unwrap();
        let mut paths = nix.build_closure("store-cli");
        paths.push(nix.add(&tree));
        for p in &paths {
            let out =
                common::peerix_ok(&["store", "--state-dir", state, "--store", &root, "ingest", p]);
            let out = String::from_utf8(out).unwrap();
            let nar_hash = out.split_whitespace().next().unwrap().to_owned();
            let want = nix.run("nix-store", &["--store", &root, "-q", "--hash", p]);
            assert_eq!(
                nar_hash.parse::<peerix_nix::Sha256Hash>().unwrap(),
                want.trim().parse().unwrap()
            );
            let cat = common::peerix_ok(&[
                "store",
                "--state-dir",
                state,
                "--store",
                &root,
                "cat",
                &nar_hash,
            ]);
            let dump = nix.output("nix", &["store", "dump-path", "--store", &root, p]);
            assert!(dump.status.success());
            assert!(
                cat == dump.stdout,
                "store cat differs from Nix's NAR of {p}"
            );
        }
        let stats = String::from_utf8(common::peerix_ok(&["store", "--state-dir", state, "stats"]))
            .unwrap();
        assert!(stats.contains(&format!("NARs: {}", paths.len())), "{stats}");
        assert!(
            stats.contains("in packs: 0.0 MiB"),
            "a second copy was made: {stats}"
        );
        let fsck = String::from_utf8(common::peerix_ok(&[
            "store",
            "--state-dir",
            state,
            "--store",
            &root,
            "fsck",
            "--verify",
        ]))
        .unwrap();
        assert!(fsck.contains("clean"), "{fsck}");

        // A path that is not valid in the store is refused with a clear message.
        let out = common::peerix()
            .args(["store", "--state-dir", state, "--store", &root, "ingest"])
            .arg("/nix/store/00000000000000000000000000000000-nope")
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("not valid"));
    }
}
