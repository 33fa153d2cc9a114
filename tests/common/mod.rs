//! Real Nix for the integration tests: a private chroot store per test, offline settings, and
//! a fresh narinfo cache so Nix's negative cache never leaks between runs.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

pub mod netns;
pub mod pair;

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
        let mut c = Command::new(program);
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
        let s = self.store_arg();
        self.output(
            "nix-store",
            &[
                "--store",
                &s,
                "-r",
                top,
                "--option",
                "substituters",
                substituters,
                "--option",
                "trusted-public-keys",
                keys,
            ],
        )
    }

    /// `nix path-info --json --sigs` of some paths, parsed.
    pub fn path_info_json(&self, paths: &[&str]) -> serde_json::Value {
        let s = self.store_arg();
        let mut args = vec!["path-info", "--store", &s, "--json", "--sigs"];
        args.extend_from_slice(paths);
        serde_json::from_str(&self.run("nix", &args)).unwrap()
    }
}

/// A static HTTP server on 127.0.0.1 (port from the OS) serving a directory, as a binary cache
/// written by `nix copy --to file://…` is served. Stops when dropped.
pub struct HttpServer {
    pub url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

pub fn serve_dir(dir: &Path) -> HttpServer {
    let dir = dir.to_owned();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            addr_tx.send(listener.local_addr().unwrap()).unwrap();
            let app =
                axum::Router::new().fallback_service(tower_http::services::ServeDir::new(dir));
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await
                .expect("serve");
        });
    });
    let addr = addr_rx.recv().expect("server address");
    HttpServer {
        url: format!("http://{addr}"),
        stop: Some(stop_tx),
        thread: Some(thread),
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The `peerix` binary built for this test run.
pub fn peerix() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peerix"));
    c.stdin(Stdio::null());
    c
}

/// Run `peerix` and return stdout as bytes, panicking with stderr on failure.
pub fn peerix_ok(args: &[&str]) -> Vec<u8> {
    let out = peerix().args(args).output().expect("spawn peerix");
    assert!(
        out.status.success(),
        "peerix {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// How long a daemon may take to print what a test waits for.
pub const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A running `peerix serve`, killed when dropped.
pub struct Daemon {
    pub child: std::process::Child,
    pub name: String,
    /// `127.0.0.1:PORT` of the HTTP side.
    pub http: String,
    pub peer_id: String,
    /// The p2p address, `/ip4/…/tcp/…/p2p/…`.
    pub p2p: String,
    pub lines: std::sync::mpsc::Receiver<String>,
    /// Every line seen so far, for failure messages.
    pub seen: Vec<String>,
}

impl Daemon {
    pub fn start(name: &str, nix: &Nix, extra: &[&str]) -> Daemon {
        Self::start_in(None, name, nix, extra)
    }

    /// `start`, inside the network namespace `netns` when given (`ip netns exec`).
    pub fn start_in(netns: Option<&str>, name: &str, nix: &Nix, extra: &[&str]) -> Daemon {
        let state = nix.scratch(&format!("state-{name}"));
        let store = nix.store_arg();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_peerix")])
                    .stdin(Stdio::null());
                c
            }
            None => peerix(),
        };
        cmd.args(["serve", "--store", &store]);
        // The test's own state directory (a small filesystem, say) when it gives one.
        if !extra.contains(&"--state-dir") {
            cmd.args(["--state-dir", state.to_str().unwrap()]);
        }
        if !extra.contains(&"--p2p-listen") {
            cmd.args(["--p2p-listen", "/ip4/127.0.0.1/tcp/0"]);
        }
        cmd.arg("--no-mdns");
        // Loopback on a port the OS picks, and no upstream cache, unless the test says.
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--upstream-cache") {
            cmd.args(["--upstream-cache", "none"]);
        }
        cmd.args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn peerix serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let tag = name.to_owned();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
                let Ok(line) = line else { break };
                eprintln!("[{tag}] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon {
            child,
            name: name.to_owned(),
            http: String::new(),
            peer_id: String::new(),
            p2p: String::new(),
            lines: rx,
            seen: vec![],
        };
        let line = d.wait_for("the start line", |l| {
            l.starts_with("peerix: serving Nix on http://")
        });
        // peerix: serving Nix on http://ADDR, peer id ID, p2p on ADDR…
        let rest = line.strip_prefix("peerix: serving Nix on http://").unwrap();
        let (http, rest) = rest.split_once(", peer id ").unwrap();
        let (id, p2p) = rest.split_once(", p2p on ").unwrap();
        d.http = http.to_owned();
        d.peer_id = id.to_owned();
        d.p2p = p2p.split_whitespace().next().unwrap().to_owned();
        d
    }

    /// The next line matching `pred` (earlier lines are skipped), or a panic after WAIT.
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        self.wait_for_within(WAIT, what, pred)
    }

    /// `wait_for`, for something that takes longer than WAIT.
    pub fn wait_for_within(
        &mut self,
        wait: std::time::Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let until = std::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if pred(&l) {
                        return l;
                    }
                }
                Err(e) => panic!(
                    "{}: no {what} ({e:?}); output so far:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for a completed scan of the local store; returns how many paths it shares.
    pub fn wait_scan(&mut self) -> usize {
        let l = self.wait_for("completed scan", |l| l.starts_with("peerix: scan done: "));
        l.trim_start_matches("peerix: scan done: ")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn wait_peer(&mut self, other: &Daemon) {
        let want = format!("peerix: peer connected {}", other.peer_id);
        // Peers connect in any order: the line may have gone by while waiting for another.
        if self.seen.contains(&want) {
            return;
        }
        self.wait_for(&format!("connection to {}", other.name), |l| l == want);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw HTTP/1.1 request (nothing normalises the path); status and body.
pub fn http(addr: &str, method: &str, path: &str) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = vec![];
    s.read_to_end(&mut buf).unwrap();
    let head_end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, buf[head_end + 4..].to_vec())
}

/// One GET read until EOF or until the server cuts the connection: the status, the
/// Content-Length the head announced, and the body bytes that arrived. For telling a complete
/// response from a cut one.
pub fn get_until_cut(addr: &str, path: &str) -> (u16, Option<usize>, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut got = vec![];
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let end = got
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .map(|v| v.trim().parse().unwrap());
    (status, len, got[end + 4..].to_vec())
}

/// Deterministic bytes that neither compress nor dedup.
pub fn noise(len: usize, mut x: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A TCP proxy on loopback in front of `target` that tells when `threshold` bytes have gone
/// from the target to its clients: a test acts at a point of a transfer, not after a time.
pub struct CountingProxy {
    pub addr: String,
    pub reached: std::sync::mpsc::Receiver<()>,
}

pub fn counting_proxy(target: &str, threshold: u64) -> CountingProxy {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, reached) = std::sync::mpsc::channel();
    let count = Arc::new(AtomicU64::new(0));
    let target = target.to_owned();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { break };
            let Ok(server) = std::net::TcpStream::connect(&target) else {
                continue;
            };
            let (mut c_r, mut s_w) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_r, &mut s_w);
                let _ = s_w.shutdown(std::net::Shutdown::Write);
            });
            let (mut s_r, mut c_w) = (server, client);
            let (count, tx) = (count.clone(), tx.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match s_r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if c_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let before = count.fetch_add(n as u64, Ordering::SeqCst);
                    if before < threshold && before + n as u64 >= threshold {
                        let _ = tx.send(());
                    }
                }
                let _ = c_w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    CountingProxy { addr, reached }
}
