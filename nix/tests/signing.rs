//! Narinfo signatures against real Nix: narinfos Nix wrote parse, render byte for byte and
//! verify here. Key files and caches made by the `peerix` binary are tested against Nix in the
//! root package (tests/signing.rs).

mod needs_nix {
    use peerix_nix::{NarInfo, PublicKey, SecretKey};
    use peerix_test_support::nix::nix;

    #[test]
    fn nix_written_narinfos_render_identically_and_verify() {
        let nix = nix();
        let (nsk, npk) = nix.keys("cache-test-1");
        let npk: PublicKey = npk.parse().unwrap();
        let other = SecretKey::generate("cache-test-1").unwrap().public_key();
        let mut paths = nix.build_closure("render");
        let tree = nix.scratch("ca-tree");
        std::fs::write(tree.join("f"), "content-addressed\n").unwrap();
        paths.push(nix.add(&tree));
        let store = nix.store_arg();
        let mut seen = 0;
        for compression in ["none", "xz"] {
            let cache = nix.scratch(&format!("cache-{compression}"));
            let to = format!(
                "file://{}?compression={compression}&secret-key={}",
                cache.display(),
                nsk.display()
            );
            let mut args = vec!["copy", "--store", &store, "--to", &to];
            args.extend(paths.iter().map(String::as_str));
            nix.run("nix", &args);
            for entry in std::fs::read_dir(&cache).unwrap() {
                let p = entry.unwrap().path();
                if p.extension().and_then(|e| e.to_str()) != Some("narinfo") {
                    continue;
                }
                let text = std::fs::read_to_string(&p).unwrap();
                let ni = NarInfo::parse(&text).unwrap();
                assert_eq!(ni.render(), text, "render differs for {}", p.display());
                assert_eq!(
                    ni.verified_by(std::slice::from_ref(&npk)),
                    Some(&npk),
                    "{}",
                    p.display()
                );
                assert!(ni.verified_by(std::slice::from_ref(&other)).is_none());
                let mut edited = ni.clone();
                edited.nar_size += 1;
                assert!(edited.verified_by(std::slice::from_ref(&npk)).is_none());
                let mut fewer_refs = ni.clone();
                if fewer_refs.references.pop_first().is_some() {
                    assert!(fewer_refs.verified_by(std::slice::from_ref(&npk)).is_none());
                }
                seen += 1;
            }
        }
        assert_eq!(seen, 2 * paths.len());
    }
}
