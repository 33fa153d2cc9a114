//! Two daemons with real Nix stores: A holds a signed closure (and maybe a path of several
//! MiB), B trusts A's key and is connected to it. The start of most end-to-end tests.

use std::path::{Path, PathBuf};

use super::{noise, Daemon, Nix};

pub fn sign(nix: &Nix, key: &Path, top: &str) {
    let s = nix.store_arg();
    nix.run(
        "nix",
        &[
            "store",
            "sign",
            "--store",
            &s,
            "--key-file",
            key.to_str().unwrap(),
            "-r",
            top,
        ],
    );
}

/// `realise`, which must succeed, and then `b` holds `paths` with the NarHashes `a` has.
pub fn assert_substitutes(
    b: &Nix,
    a: &Nix,
    top: &str,
    substituters: &str,
    keys: &str,
    paths: &[String],
) {
    let out = b.realise(top, substituters, keys);
    assert!(
        out.status.success(),
        "Nix could not substitute {top}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(b.nar_hashes(paths), a.nar_hashes(paths));
}

pub fn hash_part(path: &str) -> &str {
    &path.trim_start_matches("/nix/store/")[..32]
}

/// A node holding a signed closure, and a second node connected to it that trusts the first's
/// key: the common start of most tests.
pub struct Pair {
    pub a_nix: Nix,
    pub b_nix: Nix,
    pub a: Daemon,
    pub b: Daemon,
    pub b_key: (PathBuf, String),
    pub top: String,
    pub paths: Vec<String>,
    /// A's and B's extra command-line arguments, to start them again.
    pub a_args: Vec<String>,
    pub b_args: Vec<String>,
}

impl Pair {
    /// Kill A with SIGKILL and start it again on the same state (the same identity) and the
    /// same p2p port, so B's address for it stays right.
    pub fn kill_and_restart_a(&mut self) {
        restart_on_same_port(&mut self.a, &self.a_nix, &self.a_args);
    }

    /// Kill B with SIGKILL, wherever it is, and start it again on the same state; it is
    /// connected to A again when this returns.
    pub fn kill_and_restart_b(&mut self) {
        let _ = self.b.child.kill();
        let _ = self.b.child.wait();
        let args: Vec<&str> = self.b_args.iter().map(String::as_str).collect();
        self.b = Daemon::start("B", &self.b_nix, &args);
        self.b.wait_peer(&self.a);
    }
}

pub fn pair(salt: &str, b_extra: &[&str]) -> Option<Pair> {
    pair_with(salt, b_extra, |_, _| {})
}

/// `prepare` runs on A's store (with A's key) before A starts and scans it.
pub fn pair_with(salt: &str, b_extra: &[&str], prepare: impl FnOnce(&Nix, &Path)) -> Option<Pair> {
    let a_nix = super::nix();
    let b_nix = super::nix();
    let built = a_nix.build_closure(salt);
    let top = built[0].clone();
    let a_key = a_nix.keys("peer-a-1");
    let b_key = b_nix.keys("peer-b-1");
    sign(&a_nix, &a_key.0, &top);
    prepare(&a_nix, &a_key.0);
    let paths = a_nix.closure(&top);
    assert_eq!(paths.len(), 3);
    b_nix.init_store();
    let a_args = vec![
        "--private-key".to_owned(),
        a_key.0.to_str().unwrap().to_owned(),
    ];
    let mut a = Daemon::start("A", &a_nix, &["--private-key", a_key.0.to_str().unwrap()]);
    assert!(a.wait_scan() >= 3);
    let mut args = vec![
        "--trusted-key",
        &a_key.1,
        "--private-key",
        b_key.0.to_str().unwrap(),
        "--peer",
        &a.p2p,
    ];
    args.extend_from_slice(b_extra);
    let mut b = Daemon::start("B", &b_nix, &args);
    b.wait_peer(&a);
    let b_args = args.iter().map(|s| s.to_string()).collect();
    Some(Pair {
        a_args,
        b_args,
        a_nix,
        b_nix,
        a,
        b,
        b_key,
        top,
        paths,
    })
}

/// Kill a daemon with SIGKILL and start it again with `args` on the same state (the same
/// identity) and the same p2p port, so its peers' addresses for it stay right.
pub fn restart_on_same_port(d: &mut Daemon, nix: &Nix, args: &[String]) {
    let _ = d.child.kill();
    let _ = d.child.wait();
    let tcp = d.p2p.split("/p2p/").next().unwrap().to_owned();
    let mut a: Vec<&str> = args.iter().map(String::as_str).collect();
    a.extend(["--p2p-listen", &tcp]);
    *d = Daemon::start(&d.name.clone(), nix, &a);
}

/// A 6 MiB content-addressed path, signed with `key`.
pub fn add_big(nix: &Nix, key: &Path) -> String {
    add_sized(nix, key, "big-tree", 6)
}

/// A content-addressed path named `name` holding `mib` MiB that neither compress nor dedup,
/// signed with `key`. Written a MiB at a time, so the test's memory does not grow with it.
pub fn add_sized(nix: &Nix, key: &Path, name: &str, mib: usize) -> String {
    use std::io::Write;
    let tree = nix.scratch(name);
    let mut f = std::io::BufWriter::new(std::fs::File::create(tree.join("blob")).unwrap());
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..mib {
        f.write_all(&noise(1 << 20, x.wrapping_add(i as u64)))
            .unwrap();
        x = x.rotate_left(7) ^ 0x5851_f42d_4c95_7f2d;
    }
    f.flush().unwrap();
    let path = nix.add(&tree);
    sign(nix, key, &path);
    path
}

/// A pair whose A also holds a signed path of several MiB (`add_big`); that path.
pub fn pair_with_big(salt: &str, b_extra: &[&str]) -> Option<(Pair, String)> {
    let mut big = None;
    let p = pair_with(salt, b_extra, |nix, key| big = Some(add_big(nix, key)))?;
    Some((p, big.expect("prepared")))
}

/// Bytes B's packs take on disk, as `peerix status` reports them (the daemon answers).
pub fn pack_bytes(p: &Pair) -> u64 {
    let state = p.b_nix.scratch("state-B");
    let out = super::peerix_ok(&["status", "--json", "--state-dir", state.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    v["store"]["pack_file_bytes"].as_u64().unwrap()
}
