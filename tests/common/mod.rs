//! The `peerix` binary under test: run it, or start `peerix serve` daemons on real Nix stores
//! (`pair`: two of them, connected). Nix itself, raw HTTP and the rest come from
//! peerix-test-support, re-exported here so a test names one module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

// Each test binary uses some of these; the rest would warn as unused.
#[allow(unused_imports)]
pub use peerix_test_support::http::{
    counting_proxy, get_until_cut, http, serve_dir, CountingProxy, HttpServer, KeepAlive,
};
#[allow(unused_imports)]
pub use peerix_test_support::internet;
#[allow(unused_imports)]
pub use peerix_test_support::netns;
#[allow(unused_imports)]
pub use peerix_test_support::nix::{nix, Nix};
#[allow(unused_imports)]
pub use peerix_test_support::rng::noise;

pub mod pair;

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

/// A memory field of `/proc/PID/status` (`VmRSS` now, `VmHWM` the peak so far), in bytes.
pub fn proc_memory(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        * 1024
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
        Self::start_logging(netns, name, nix, extra, None)
    }

    /// `start_in`, with `log` (a `RUST_LOG` directive, e.g. `peerix::serve=debug`) added to the
    /// daemon's log filter: for a test that waits for a line logged below `info`.
    pub fn start_logging(
        netns: Option<&str>,
        name: &str,
        nix: &Nix,
        extra: &[&str],
        log: Option<&str>,
    ) -> Daemon {
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
            // PEERIX_TEST_LOG: more than info from the daemons (e.g. `info,libp2p_dcutr=debug`).
            .env(
                "RUST_LOG",
                std::env::var("PEERIX_TEST_LOG")
                    .unwrap_or_else(|_| "info".into())
                    .split(',')
                    .chain(log)
                    .collect::<Vec<_>>()
                    .join(","),
            )
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

    /// A counter (`NAME_total`) from the daemon's `/metrics`.
    pub fn counter(&self, name: &str) -> u64 {
        let (status, body) = http(&self.http, "GET", "/metrics");
        assert_eq!(status, 200);
        let text = String::from_utf8(body).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_total ")))
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// `HOST:PORT` of the p2p address (`/ip4/HOST/tcp/PORT/p2p/ID`).
    pub fn p2p_socket(&self) -> String {
        let parts: Vec<&str> = self.p2p.split('/').collect();
        format!("{}:{}", parts[2], parts[4])
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `peerix bench-delay` in front of `to` (`HOST:PORT`): `at` reaches it with `rtt` added to the
/// round trip. The relay ends with its stdin, which dropping this closes (and kills it).
pub struct Relay {
    child: Child,
    /// `HOST:PORT` on loopback.
    pub at: String,
}

impl Relay {
    pub fn to(to: &str, rtt: Duration) -> Relay {
        let mut child = peerix()
            .args(["bench-delay", "--rtt-ms", &rtt.as_millis().to_string()])
            .args(["--to", to])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn peerix bench-delay");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let at = line
            .trim()
            .strip_prefix("listen ")
            .expect("listen ADDR")
            .to_owned();
        Relay { child, at }
    }

    /// A daemon's p2p address (`/ip4/…/tcp/…/p2p/ID`) through this relay.
    pub fn p2p_of(&self, d: &Daemon) -> String {
        let (ip, port) = self.at.rsplit_once(':').unwrap();
        format!("/ip4/{ip}/tcp/{port}/p2p/{}", d.peer_id)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
