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

        // Seeding private paths is a decision the output states; a pipe gets plain lines.
        let out = run_ok(a_nix, a_state, &["seed", top]);
        assert!(
            out.contains("2 of them were not shared before"),
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
        let out = run_ok(a_nix, a_state, &["unseed", top]);
        assert!(out.contains(&format!("unseeded {top}")), "{out}");
        assert!(out.contains("2 paths no longer pinned"), "{out}");
        let st = status(a_nix, a_state);
        assert_eq!(st["seeds"].as_array().unwrap().len(), 0);
        assert_eq!(st["store"]["pins"], 0);
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
            &["seed", "--from-file", list.to_str().unwrap()],
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
        let out = run_ok(a_nix, a_state, &["seed", &secret]);
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
}
