//! `peerix seed`, `unseed` and `status` end to end: real daemons with chroot stores, the admin
//! socket, and real Nix substituting what a seed keeps available.

mod common;

mod needs_nix {
    use super::*;

    use std::path::Path;

    use common::{peerix, Daemon, Nix};

    /// `app` → `lib`: a closure that nothing shares until it is seeded (unsigned, no upstream).
    fn build_app(nix: &Nix, salt: &str) -> (String, Vec<String>) {
        let expr = format!(
            r#"let
      mk = name: script: builtins.derivation {{
        inherit name; system = builtins.currentSystem; builder = "/bin/sh";
        args = [ "-c" script ]; salt = "{salt}";
      }};
      lib = mk "seedlib" "/bin/mkdir -p $out/lib; /bin/dd if=/dev/zero bs=1024 count=512 2>/dev/null | /bin/tr '\\000' x > $out/lib/data";
      app = mk "seedapp" "/bin/mkdir -p $out/bin; echo ${{lib}} > $out/bin/app";
    in [ app lib ]"#
        );
        let out = nix.build(&expr);
        (out[0].clone(), out)
    }

    /// Run a `peerix` subcommand against a node's state directory and chroot store; its stdout,
    /// and whether it succeeded.
    fn run(nix: &Nix, state: &Path, args: &[&str]) -> (bool, String, String) {
        let store = nix.store_arg();
        let out = peerix()
            .args(args)
            .args(["--state-dir", state.to_str().unwrap(), "--store", &store])
            .args(["--upstream-cache", "none"])
            .output()
            .expect("spawn peerix");
        let (so, se) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        eprintln!("peerix {args:?}:\n{so}{se}");
        (out.status.success(), so, se)
    }

    fn run_ok(nix: &Nix, state: &Path, args: &[&str]) -> String {
        let (ok, so, se) = run(nix, state, args);
        assert!(ok, "peerix {args:?} failed:\n{so}{se}");
        so
    }

    fn status(nix: &Nix, state: &Path) -> serde_json::Value {
        serde_json::from_str(&run_ok(nix, state, &["status", "--json"])).unwrap()
    }

    /// Delete paths from a chroot store, as `nix-collect-garbage` would.
    fn delete(nix: &Nix, paths: &[String]) {
        let s = nix.store_arg();
        let mut args = vec!["--store", &s, "--delete"];
        args.extend(paths.iter().map(String::as_str));
        nix.run("nix-store", &args);
        for p in paths {
            assert!(!nix.real(p).exists(), "{p} still in the store");
        }
    }

    /// A (holding a closure nothing shares, with a key) and an empty B.
    struct Setup {
        a_nix: Nix,
        b_nix: Nix,
        top: String,
        paths: Vec<String>,
        /// A's NarHashes of `paths`.
        want: std::collections::BTreeMap<String, String>,
        a_key: (std::path::PathBuf, String),
        a_state: std::path::PathBuf,
    }

    fn setup(salt: &str) -> Option<Setup> {
        let (a_nix, b_nix) = (common::nix(), common::nix());
        let (top, paths) = build_app(&a_nix, salt);
        let want = a_nix.nar_hashes(&paths);
        let a_key = a_nix.keys(&format!("{salt}-1"));
        b_nix.init_store();
        let a_state = a_nix.scratch("state-A");
        Some(Setup {
            a_nix,
            b_nix,
            top,
            paths,
            want,
            a_key,
            a_state,
        })
    }

    impl Setup {
        /// B starts, connected to A and trusting A's key, and its Nix substitutes the closure
        /// with A's NarHashes.
        fn b_substitutes(&self, a: &Daemon) -> Daemon {
            let args = ["--trusted-key", &self.a_key.1, "--peer", &a.p2p];
            let mut b = Daemon::start("B", &self.b_nix, &args);
            b.wait_peer(a);
            let r = self.b_nix.realise(&self.top, &b.url(), &self.a_key.1);
            assert!(
                r.status.success(),
                "Nix could not substitute the seeded closure: {}",
                String::from_utf8_lossy(&r.stderr)
            );
            assert_eq!(self.b_nix.nar_hashes(&self.paths), self.want);
            b
        }
    }

    #[test]
    fn a_seeded_closure_is_served_after_it_leaves_the_store_and_a_restart() {
        let Some(t) = setup("seed-1") else {
            return;
        };
        let Setup {
            a_nix,
            top,
            paths,
            want,
            a_key,
            a_state,
            ..
        } = &t;
        let a_args = ["--private-key", a_key.0.to_str().unwrap()];
        let mut a = Daemon::start("A", a_nix, &a_args);
        assert_eq!(a.wait_scan(), 0, "nothing is shared before the seed");

        // Seeding private paths is a decision the flag makes and the output states; a pipe gets
        // plain lines.
        let out = run_ok(a_nix, a_state, &["seed", "--share-private-paths", top]);
        assert!(
            out.contains("2 paths shared only because of --share-private-paths"),
            "output: {out}"
        );
        assert!(out.contains("peerix: pinned 2/2 "), "output: {out}");
        assert!(
            out.contains("announces them to its peers now"),
            "output: {out}"
        );
        assert!(
            !out.contains('\u{1b}'),
            "no terminal codes on a pipe: {out:?}"
        );

        let st = status(a_nix, a_state);
        assert_eq!(st["seeds"].as_array().unwrap().len(), 1);
        assert_eq!(st["seeds"][0]["label"], top.as_str());
        assert_eq!(st["seeds"][0]["paths"], 2);
        assert!(st["seeds"][0]["bytes"].as_u64().unwrap() > 512 * 1024);
        assert_eq!(st["daemon"]["shared"]["pinned"], 2);
        assert_eq!(st["store"]["pins"], 2);

        // The paths leave A's Nix store, and A restarts: the seed keeps them served.
        delete(a_nix, paths);
        drop(a);
        let mut a = Daemon::start("A", a_nix, &a_args);
        assert_eq!(
            a.wait_scan(),
            2,
            "the seeded paths are shared after a restart"
        );
        let human = run_ok(a_nix, a_state, &["status"]);
        assert!(human.contains(&format!("{top}: 2 paths")), "{human}");
        assert!(human.contains("seeded 2"), "{human}");

        t.b_substitutes(&a);

        // A's own Nix gets the seeded paths back from A's chunk store.
        let r = a_nix.realise(top, &a.url(), &a_key.1);
        assert!(
            r.status.success(),
            "A's Nix could not get its seeded closure back: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        assert_eq!(&a_nix.nar_hashes(paths), want);

        // Unseeding by the label; an unknown name is an error.
        let (ok, _, err) = run(a_nix, a_state, &["unseed", "/nix/store/nothing-like-this"]);
        assert!(!ok && err.contains("no seed named"), "{err}");
        let packs_before = status(a_nix, a_state)["store"]["pack_file_bytes"]
            .as_u64()
            .unwrap();
        let out = run_ok(a_nix, a_state, &["unseed", top]);
        assert!(out.contains(&format!("unseeded {top}")), "{out}");
        assert!(out.contains("2 paths no longer pinned"), "{out}");
        let st = status(a_nix, a_state);
        assert_eq!(st["seeds"].as_array().unwrap().len(), 0);
        assert_eq!(st["store"]["pins"], 0);
        // The paths had left the Nix store, so their pack copies were the only ones: the space
        // goes back to the disk.
        let packs_after = st["store"]["pack_file_bytes"].as_u64().unwrap();
        assert!(
            packs_before > 0 && packs_after < packs_before,
            "packs took {packs_before} bytes before the unseed, {packs_after} after"
        );
    }

    #[test]
    fn seeding_without_a_daemon_is_announced_when_it_starts() {
        let Some(t) = setup("seed-2") else {
            return;
        };
        let Setup {
            a_nix,
            top,
            paths,
            a_key,
            a_state,
            ..
        } = &t;

        // A link to the closure, given in a list file, as `nix-build` leaves `./result`.
        let link = a_nix.scratch("links").join("result");
        std::os::unix::fs::symlink(top, &link).unwrap();
        let list = a_nix.scratch("lists").join("seed.txt");
        std::fs::write(&list, format!("# what to seed\n{}\n", link.display())).unwrap();
        let out = run_ok(
            a_nix,
            a_state,
            &[
                "seed",
                "--share-private-paths",
                "--from-file",
                list.to_str().unwrap(),
            ],
        );
        assert!(
            out.contains(&format!("seeding {} ({top})", link.display())),
            "{out}"
        );
        assert!(out.contains("peerix serve is not running"), "{out}");
        let st = status(a_nix, a_state);
        assert!(st["daemon"].is_null());
        assert_eq!(st["seeds"][0]["label"], link.to_str().unwrap());
        assert_eq!(st["seeds"][0]["paths"], 2);

        // A path that a deny pattern matches is not seeded, and the output says so.
        let tree = a_nix.scratch("tree").join("wifi-password");
        std::fs::create_dir_all(&tree).unwrap();
        std::fs::write(tree.join("pw"), "hunter2").unwrap();
        let secret = a_nix.add(&tree);
        let out = run_ok(a_nix, a_state, &["seed", "--share-private-paths", &secret]);
        assert!(
            out.contains("1 path not seeded: deny patterns match"),
            "{out}"
        );

        delete(a_nix, paths);
        let mut a = Daemon::start("A", a_nix, &["--private-key", a_key.0.to_str().unwrap()]);
        assert_eq!(a.wait_scan(), 2);
        let b = t.b_substitutes(&a);
        let narinfo = format!(
            "/{}.narinfo",
            &secret.trim_start_matches("/nix/store/")[..32]
        );
        let (status, _) = common::http(&b.http, "GET", &narinfo);
        assert_eq!(status, 404, "a denied path is never served");
    }

    /// The hash part of a store path, as a narinfo request names it.
    fn narinfo_url(path: &str) -> String {
        format!("/{}.narinfo", &path.trim_start_matches("/nix/store/")[..32])
    }

    /// The issue's case: a system-like closure holding a `users-groups.json` (password hashes and
    /// initial passwords) and the node's own signing key, copied into the store by a Nix path
    /// (`privateKeyFile = ./peerix.sec;`), on a builder that signs what it builds. Neither file is
    /// shared: not by the scan (own-signed), not by a seed, not with --share-private-paths. What is
    /// neither public nor signed by a trusted key is seeded only when the flag asks for it.
    #[test]
    fn seeding_a_system_closure_shares_no_secrets() {
        let Some(t) = setup("seed-3") else {
            return;
        };
        let Setup {
            a_nix,
            b_nix,
            a_key,
            a_state,
            ..
        } = &t;
        let cfg = a_nix.scratch("config");
        std::fs::copy(&a_key.0, cfg.join("peerix.sec")).unwrap();
        let expr = format!(
            r#"let
      mk = name: script: builtins.derivation {{
        inherit name; system = builtins.currentSystem; builder = "/bin/sh";
        args = [ "-c" script ]; salt = "seed-3";
      }};
      users = mk "users-groups.json" "echo '{{\"users\":[{{\"name\":\"alice\",\"initialPassword\":\"hunter2\"}}]}}' > $out";
      tool = mk "seedtool" "echo tool > $out";
      conf = mk "hostconf" "echo conf > $out";
      system = mk "seedsystem" "/bin/mkdir $out; echo ${{users}} ${{{key}}} ${{tool}} ${{conf}} > $out/refs";
    in [ system users tool conf ]"#,
            key = cfg.join("peerix.sec").display()
        );
        let built = a_nix.build(&expr);
        let (system, users, tool, conf) = (&built[0], &built[1], &built[2], &built[3]);
        let closure = a_nix.closure(system);
        let key = closure
            .iter()
            .find(|p| p.ends_with("-peerix.sec"))
            .expect("the key file is in the closure")
            .clone();
        assert!(users.ends_with("-users-groups.json"));
        assert_eq!(closure.len(), 5, "{closure:?}");
        // A signs what it builds (`secret-key-files`): the system and its secrets. `tool` comes
        // from a builder whose key A trusts; `conf` is signed by nobody.
        let s = a_nix.store_arg();
        let sign = |key: &Path, paths: &[&str]| {
            let mut args = vec!["store", "sign", "--store", &s, "--key-file"];
            args.push(key.to_str().unwrap());
            args.extend_from_slice(paths);
            a_nix.run("nix", &args);
        };
        sign(&a_key.0, &[system, users, &key]);
        let builder = a_nix.keys("builder-3");
        sign(&builder.0, &[tool]);

        // Own-signed paths are shared by default, but no deny pattern gives way to a signature.
        let a_args = [
            "--private-key",
            a_key.0.to_str().unwrap(),
            "--trusted-key",
            &builder.1,
        ];
        let mut a = Daemon::start("A", a_nix, &a_args);
        assert_eq!(
            a.wait_scan(),
            1,
            "the scan shares the own-signed system, not the own-signed secrets"
        );

        // A seed without the flag (through the running daemon): the paths signed by A's key or a
        // key A trusts, nothing private.
        let out = run_ok(a_nix, a_state, &["seed", system]);
        assert!(out.contains(&format!("seeding {system}: 2 paths")), "{out}");
        assert!(
            out.contains(
                "1 path not shared: neither in the upstream cache nor signed by this machine's key \
                 or a trusted key; pass --share-private-paths to share them"
            ) && out.contains(conf.trim_start_matches("/nix/store/")),
            "{out}"
        );
        assert!(
            out.contains("2 paths not seeded: deny patterns match"),
            "{out}"
        );
        for secret in [users, &key] {
            assert!(
                out.contains(secret.trim_start_matches("/nix/store/")),
                "the output names {secret}: {out}"
            );
        }
        let st = status(a_nix, a_state);
        assert_eq!(st["store"]["pins"], 2, "{st}");

        // Asked explicitly, the private path is shared and named; the secrets still are not.
        let out = run_ok(a_nix, a_state, &["seed", "--share-private-paths", system]);
        assert!(
            out.contains("1 path shared only because of --share-private-paths")
                && out.contains(conf.trim_start_matches("/nix/store/")),
            "{out}"
        );
        assert!(
            out.contains("2 paths not seeded: deny patterns match"),
            "{out}"
        );
        let st = status(a_nix, a_state);
        assert_eq!(st["store"]["pins"], 3, "{st}");
        assert_eq!(st["daemon"]["shared"]["total"], 3, "{st}");

        // A peer that trusts A gets what A shares, and never the secrets.
        let mut b = Daemon::start("B", b_nix, &["--trusted-key", &a_key.1, "--peer", &a.p2p]);
        b.wait_peer(&a);
        for p in [system, tool, conf] {
            let (status, _) = common::http(&b.http, "GET", &narinfo_url(p));
            assert_eq!(status, 200, "B gets {p} from A");
        }
        let r = b_nix.realise(conf, &b.url(), &a_key.1);
        assert!(
            r.status.success(),
            "B's Nix could not substitute {conf}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        for secret in [users, &key] {
            let (status, _) = common::http(&b.http, "GET", &narinfo_url(secret));
            assert_eq!(status, 404, "{secret} is never served to a peer");
            let r = b_nix.realise(secret, &b.url(), &a_key.1);
            assert!(!r.status.success(), "B's Nix got {secret}");
        }

        // Seeding again without the flag takes the choice back: the private path is unpinned and
        // no longer shared.
        let out = run_ok(a_nix, a_state, &["seed", system]);
        assert!(out.contains("1 path not shared"), "{out}");
        let st = status(a_nix, a_state);
        assert_eq!(st["store"]["pins"], 2, "{st}");
        assert_eq!(st["daemon"]["shared"]["total"], 2, "{st}");
    }

    /// Seeding a link again (as the module's hourly service does with /run/current-system)
    /// moves the seed to what the link points at now and releases what it pinned before;
    /// `--from-file -` reads the roots from stdin; `unseed --all` removes every seed.
    #[test]
    fn seeding_a_link_again_follows_it_and_unseed_all_empties() {
        let nix = common::nix();
        let (app1, paths1) = build_app(&nix, "relink-1");
        let (app2, paths2) = build_app(&nix, "relink-2");
        let state = nix.scratch("state-relink");
        let link = nix.scratch("links").join("current");
        std::os::unix::fs::symlink(&app1, &link).unwrap();
        let link_s = link.to_str().unwrap().to_owned();

        // The roots from stdin.
        let store = nix.store_arg();
        let mut child = peerix()
            .args(["seed", "--from-file", "-", "--share-private-paths"])
            .args(["--state-dir", state.to_str().unwrap(), "--store", &store])
            .args(["--upstream-cache", "none"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            writeln!(stdin, "{link_s}").unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let st = status(&nix, &state);
        assert_eq!(st["seeds"].as_array().unwrap().len(), 1, "{st}");
        assert_eq!(st["seeds"][0]["root"], &app1["/nix/store/".len()..], "{st}");
        assert_eq!(st["seeds"][0]["paths"], paths1.len());
        assert_eq!(st["store"]["pins"], paths1.len());

        // The link moves on; seeding it again follows it and lets the old closure go.
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&app2, &link).unwrap();
        run_ok(&nix, &state, &["seed", &link_s, "--share-private-paths"]);
        let st = status(&nix, &state);
        assert_eq!(st["seeds"].as_array().unwrap().len(), 1, "{st}");
        assert_eq!(st["seeds"][0]["root"], &app2["/nix/store/".len()..], "{st}");
        assert_eq!(st["store"]["pins"], paths2.len(), "{st}");

        let out = run_ok(&nix, &state, &["unseed", "--all"]);
        assert!(out.contains("unseeded"), "{out}");
        let st = status(&nix, &state);
        assert_eq!(st["seeds"].as_array().unwrap().len(), 0, "{st}");
        assert_eq!(st["store"]["pins"], 0);
    }
}
