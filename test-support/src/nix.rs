//! Real Nix for tests: a private chroot store per test, offline settings, and a fresh narinfo
//! cache so Nix's negative cache never leaks between runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Nix's settings for tests: no build users, no network substituters, the new CLI on. Chroot
/// stores build in a sandbox, which needs the host's shell and libraries bound in; as a normal
/// user Nix makes that sandbox in a user namespace, so no test needs root to build.
const NIX_CONFIG: &str = "build-users-group =\nsandbox = false\nsubstituters =\n\
experimental-features = nix-command flakes\nsandbox-paths = /bin /lib /lib64 /usr\n\
narinfo-cache-negative-ttl = 0\nconnect-timeout = 2";

pub struct Nix {
    pub dir: tempfile::TempDir,
}

/// Real Nix for a test in a `needs_nix` module, with a fresh chroot store. Panics, so the test
/// fails, when Nix is not installed: such a test never passes without having run.
/// `scripts/test.sh` leaves the `needs_nix` tests out (and names them) where Nix is missing.
pub fn nix() -> Nix {
    let nix = Nix {
        dir: tempfile::tempdir().expect("tempdir"),
    };
    // In the test environment: as a normal user even `--version` opens the default store.
    match nix.cmd("nix-store").arg("--version").output() {
        Ok(out) => assert!(
            out.status.success(),
            "this test needs real Nix, and `nix-store --version` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!(
            "this test needs real Nix (nix-store on PATH; Debian: apt-get install nix-bin): \
             {e}; scripts/test.sh installs it, or leaves the needs_nix tests out and says so"
        ),
    }
    nix
}

impl Nix {
    /// The chroot store's root, as given to `--store`.
    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn store_arg(&self) -> String {
        self.store().to_str().unwrap().to_owned()
    }

    /// Where a store path's files really are.
    pub fn real(&self, store_path: &str) -> PathBuf {
        self.store().join(store_path.trim_start_matches('/'))
    }

    /// A scratch directory inside the test's temporary directory.
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// A `Command` for a Nix tool with the test environment; the caller adds `--store` where
    /// the tool takes it. The default store is the chroot store too, so a tool that opens a
    /// store without being told which (key generation, `nix-instantiate --parse`) never
    /// touches `/nix/var/nix`, which a normal user cannot write.
    pub fn cmd(&self, program: &str) -> Command {
        self.cmd_in(None, program)
    }

    /// `cmd`, inside the network namespace `netns` when given (`ip netns exec`): Nix on a
    /// machine whose peerix listens on that namespace's loopback.
    pub fn cmd_in(&self, netns: Option<&str>, program: &str) -> Command {
        let mut c = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        };
        c.env("NIX_CONFIG", NIX_CONFIG)
            .env("XDG_CACHE_HOME", self.dir.path().join("xdg-cache"))
            .env("XDG_CONFIG_HOME", self.dir.path().join("xdg-config"))
            .env("HOME", self.dir.path().join("home"))
            .env("NIX_REMOTE", self.store())
            .stdin(Stdio::null());
        c
    }

    /// Run and return stdout, panicking with stderr on failure.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        String::from_utf8(self.run_bytes(program, args)).unwrap()
    }

    /// Run and return stdout as bytes, panicking with stderr on failure.
    pub fn run_bytes(&self, program: &str, args: &[&str]) -> Vec<u8> {
        let out = self.output(program, args);
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        self.cmd(program).args(args).output().expect("spawn nix")
    }

    /// `nix-store --dump` of any path: Nix's own NAR of it.
    pub fn dump(&self, path: &Path) -> Vec<u8> {
        let out = self.output("nix-store", &["--dump", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "nix-store --dump: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// `nix-store --add` a tree: a content-addressed store path (it carries `CA:`).
    pub fn add(&self, tree: &Path) -> String {
        let s = self.store_arg();
        self.run(
            "nix-store",
            &["--store", &s, "--add", tree.to_str().unwrap()],
        )
        .trim()
        .to_owned()
    }

    /// Build a Nix expression in the chroot store; returns the output paths.
    pub fn build(&self, expr: &str) -> Vec<String> {
        let s = self.store_arg();
        let out = self.output("nix-build", &["--store", &s, "--no-out-link", "-E", expr]);
        assert!(
            out.status.success(),
            "nix-build in a chroot store failed (as a normal user Nix needs unprivileged user \
             namespaces for its build sandbox): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// A small closure with references and derivers: `top` → `mid` → `leaf`, `top` → `leaf`.
    /// `salt` makes the paths differ between calls.
    pub fn build_closure(&self, salt: &str) -> Vec<String> {
        let expr = format!(
            r#"let
  mk = name: script: builtins.derivation {{
    inherit name; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" script ]; salt = "{salt}";
  }};
  leaf = mk "leaf" "echo leaf > $out";
  mid = mk "mid" "/bin/mkdir -p $out/bin; echo '#!/bin/sh' > $out/bin/run; echo ${{leaf}} >> $out/bin/run; /bin/chmod +x $out/bin/run; /bin/ln -s ${{leaf}} $out/leaf";
  top = mk "top" "/bin/mkdir $out; echo ${{mid}} ${{leaf}} > $out/refs; /bin/ln -s $out/refs $out/self";
in [ top mid leaf ]"#
        );
        self.build(&expr)
    }

    /// A closure of small paths `levels` deep, `width` to a level, each path referring to every
    /// path of the level below, under one top: as Nix substitutes it, a level's NARs are asked
    /// for once the level below is in, long after their narinfos. Returns the top.
    pub fn build_deep_closure(&self, salt: &str, levels: usize, width: usize) -> String {
        let expr = format!(
            r#"let
  mk = name: deps: builtins.derivation {{
    inherit name; system = builtins.currentSystem; builder = "/bin/sh";
    args = [ "-c" "echo ${{name}} ${{toString deps}} > $out" ]; salt = "{salt}";
  }};
  level = n: below: builtins.genList (i: mk "l${{toString n}}-${{toString i}}" below) {width};
  up = n: below: if n == {levels} then below else up (n + 1) (level n below);
in mk "top" (up 0 [])"#
        );
        self.build(&expr).remove(0)
    }

    /// A binary-cache key pair made by Nix: the secret key file and the public key.
    pub fn keys(&self, name: &str) -> (PathBuf, String) {
        let d = self.scratch("keys");
        let (sk, pk) = (d.join(format!("{name}.sec")), d.join(format!("{name}.pub")));
        self.run(
            "nix-store",
            &[
                "--generate-binary-cache-key",
                name,
                sk.to_str().unwrap(),
                pk.to_str().unwrap(),
            ],
        );
        (sk, std::fs::read_to_string(&pk).unwrap())
    }

    /// Make sure the chroot store exists (its database too), so a daemon can open it.
    pub fn init_store(&self) {
        let s = self.store_arg();
        self.run("nix", &["path-info", "--store", &s, "--all"]);
    }

    /// `nix-store -qR top`.
    pub fn closure(&self, top: &str) -> Vec<String> {
        let s = self.store_arg();
        self.run("nix-store", &["--store", &s, "-qR", top])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Each path's NarHash as Nix reports it.
    pub fn nar_hashes(&self, paths: &[String]) -> std::collections::BTreeMap<String, String> {
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        self.path_info_json(&refs)
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["path"].as_str().unwrap().to_owned(),
                    o["narHash"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// `nix-store -r top` from `substituters` only, trusting `keys` only.
    pub fn realise(&self, top: &str, substituters: &str, keys: &str) -> Output {
        self.realise_in(None, top, substituters, keys)
    }

    /// `realise`, inside the network namespace `netns` when given.
    pub fn realise_in(
        &self,
        netns: Option<&str>,
        top: &str,
        substituters: &str,
        keys: &str,
    ) -> Output {
        let s = self.store_arg();
        self.cmd_in(netns, "nix-store")
            .args(["--store", &s, "-r", top, "--option", "substituters"])
            .args([substituters, "--option", "trusted-public-keys", keys])
            .output()
            .expect("spawn nix-store")
    }

    /// `nix path-info --json --sigs` of some paths, parsed.
    pub fn path_info_json(&self, paths: &[&str]) -> serde_json::Value {
        let s = self.store_arg();
        let mut args = vec!["path-info", "--store", &s, "--json", "--sigs"];
        args.extend_from_slice(paths);
        serde_json::from_str(&self.run("nix", &args)).unwrap()
    }
}
