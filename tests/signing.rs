//! Signing keys and narinfo signatures against real Nix, both ways.

mod common;

mod needs_nix {
    use super::*;

    use std::collections::BTreeSet;
    use std::path::Path;

    use peerix_nix::{LocalStore, NarInfo, PublicKey, SecretKey, StorePath};

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap()
    }

    /// Nix's own key pair, made by Nix: the secret and public key files.
    fn nix_keys(nix: &common::Nix, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let (sk, _) = nix.keys(name);
        let pk = sk.with_extension("pub");
        (sk, pk)
    }

    /// A key pair made by `peerix keygen`.
    fn peerix_keys(nix: &common::Nix, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let d = nix.scratch("keys");
        let (sk, pk) = (d.join(format!("{name}.sec")), d.join(format!("{name}.pub")));
        common::peerix_ok(&["keygen", name, sk.to_str().unwrap(), pk.to_str().unwrap()]);
        (sk, pk)
    }

    #[test]
    fn key_files_are_interchangeable_with_nix() {
        let nix = common::nix();
        // Nix's keys parse in peerix, and the public half derives from the secret.
        let (nsk, npk) = nix_keys(&nix, "nix-made-1");
        let sk: SecretKey = read(&nsk).parse().unwrap();
        assert_eq!(sk.public_key().to_string(), read(&npk));
        assert_eq!(
            sk.to_string(),
            read(&nsk),
            "secret key renders as Nix wrote it"
        );

        // peerix's keys work in Nix: sign with `nix store sign`, check with `nix store verify`.
        let (psk, ppk) = peerix_keys(&nix, "peerix-made-1");
        let pk_text = read(&ppk);
        assert!(
            !pk_text.ends_with('\n'),
            "Nix writes key files without a newline"
        );
        assert_eq!(
            std::fs::metadata(&psk).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let paths = nix.build_closure("keys");
        let top = &paths[0];
        let store = nix.store_arg();
        let verify = |key: &str| {
            nix.output(
                "nix",
                &[
                    "store",
                    "verify",
                    "--store",
                    &store,
                    "--no-contents",
                    "--sigs-needed",
                    "1",
                    "--option",
                    "trusted-public-keys",
                    key,
                    top,
                ],
            )
        };
        assert!(!verify(&pk_text).status.success(), "unsigned path verified");
        nix.run(
            "nix",
            &[
                "store",
                "sign",
                "--store",
                &store,
                "--key-file",
                psk.to_str().unwrap(),
                top,
            ],
        );
        let ok = verify(&pk_text);
        assert!(
            ok.status.success(),
            "Nix rejects peerix's signature: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        assert!(!verify(&read(&npk)).status.success(), "wrong key accepted");

        // And the signature Nix stored (made from peerix's key file) verifies in peerix.
        let ls = LocalStore::open(&nix.store()).unwrap();
        let info = ls.query_path_info(&top.parse().unwrap()).unwrap().unwrap();
        let ni = NarInfo::for_uncompressed(&info);
        let ppk: PublicKey = pk_text.parse().unwrap();
        assert!(ni.verified_by(std::slice::from_ref(&ppk)).is_some());
    }

    use std::os::unix::fs::PermissionsExt;

    /// Lay out a binary cache of `paths` (and nothing else) the way peerix serves one:
    /// narinfos from `peerix narinfo`, NARs from `peerix nar dump`.
    fn peerix_cache(nix: &common::Nix, dir: &Path, paths: &[String], sign: Option<&Path>) {
        std::fs::create_dir_all(dir.join("nar")).unwrap();
        std::fs::write(
            dir.join("nix-cache-info"),
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n",
        )
        .unwrap();
        let store = nix.store_arg();
        for p in paths {
            let mut args = vec!["narinfo", p.as_str(), "--store", &store];
            let key;
            if let Some(k) = sign {
                key = k.to_str().unwrap().to_owned();
                args.extend(["--sign", &key]);
            }
            let text = String::from_utf8(common::peerix_ok(&args)).unwrap();
            let ni = NarInfo::parse(&text).unwrap();
            let sp: StorePath = p.parse().unwrap();
            std::fs::write(dir.join(format!("{}.narinfo", sp.hash())), &text).unwrap();
            let nar = common::peerix_ok(&["nar", "dump", nix.real(p).to_str().unwrap()]);
            std::fs::write(dir.join(ni.url.unwrap()), nar).unwrap();
        }
    }

    /// `nix-store -r` in a fresh store, substituting only from `url` and trusting only `key`.
    fn substitute(url: &str, key: &str, top: &str) -> (bool, String, common::Nix) {
        let b = common::nix();
        let store = b.store_arg();
        let out = b.output(
            "nix-store",
            &[
                "--store",
                &store,
                "-r",
                top,
                "--option",
                "substituters",
                url,
                "--option",
                "trusted-public-keys",
                key,
            ],
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            b,
        )
    }

    #[test]
    fn nix_substitutes_from_a_peerix_signed_cache_and_rejects_bad_signatures() {
        let nix = common::nix();
        let built = nix.build_closure("substitute");
        let top = built[0].clone();
        let paths = nix.closure(&top);
        assert_eq!(paths.len(), 3);
        let (sk, pk) = peerix_keys(&nix, "peerix-sub-1");
        let pk = read(&pk);

        // Signed by our key: Nix takes the whole closure, with the same NAR hashes.
        let good = nix.scratch("cache-good");
        peerix_cache(&nix, &good, &paths, Some(&sk));
        let server = common::serve_dir(&good);
        let (ok, err, b) = substitute(&server.url, &pk, &top);
        assert!(ok, "Nix refused peerix's cache: {err}");
        let want = nix.path_info_json(&paths.iter().map(String::as_str).collect::<Vec<_>>());
        let got = b.path_info_json(&paths.iter().map(String::as_str).collect::<Vec<_>>());
        let hashes = |v: &serde_json::Value| -> BTreeSet<(String, String)> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p["path"].as_str().unwrap().to_owned(),
                        p["narHash"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        };
        assert_eq!(hashes(&got), hashes(&want));
        drop(server);

        // Signed by a key Nix does not trust: refused.
        let (other_sk, _) = peerix_keys(&nix, "peerix-sub-1-impostor");
        let wrong = nix.scratch("cache-wrong-key");
        peerix_cache(&nix, &wrong, &paths, Some(&other_sk));
        let server = common::serve_dir(&wrong);
        let (ok, err, _) = substitute(&server.url, &pk, &top);
        assert!(!ok);
        assert!(err.contains("is not signed by any of the keys"), "{err}");
        drop(server);

        // Unsigned: refused.
        let unsigned = nix.scratch("cache-unsigned");
        peerix_cache(&nix, &unsigned, &paths, None);
        let server = common::serve_dir(&unsigned);
        let (ok, err, _) = substitute(&server.url, &pk, &top);
        assert!(!ok);
        assert!(err.contains("is not signed by any of the keys"), "{err}");
        drop(server);

        // A signed narinfo edited afterwards: refused by Nix, and by peerix.
        let edited = nix.scratch("cache-edited");
        peerix_cache(&nix, &edited, &paths, Some(&sk));
        let sp: StorePath = top.parse().unwrap();
        let f = edited.join(format!("{}.narinfo", sp.hash()));
        let mut ni = NarInfo::parse(&read(&f)).unwrap();
        ni.nar_size += 8;
        ni.file_size = Some(ni.nar_size);
        std::fs::write(&f, ni.render()).unwrap();
        let pkey: PublicKey = pk.parse().unwrap();
        assert!(ni.verified_by(std::slice::from_ref(&pkey)).is_none());
        let server = common::serve_dir(&edited);
        let (ok, err, _) = substitute(&server.url, &pk, &top);
        assert!(!ok);
        assert!(err.contains("is not signed by any of the keys"), "{err}");
    }
}
