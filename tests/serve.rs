//! `peerix serve` end to end: real daemons on loopback, each with its own chroot store and
//! state directory, and real Nix substituting from them.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Nix;

/// How long a daemon may take to print what a test waits for.
const WAIT: Duration = Duration::from_secs(60);

/// A running `peerix serve`, killed when dropped.
struct Daemon {
    child: Child,
    name: String,
    /// `127.0.0.1:PORT` of the HTTP side.
    http: String,
    peer_id: String,
    /// The p2p address, `/ip4/…/tcp/…/p2p/…`.
    p2p: String,
    lines: mpsc::Receiver<String>,
    /// Every line seen so far, for failure messages.
    seen: Vec<String>,
}

impl Daemon {
    fn start(name: &str, nix: &Nix, extra: &[&str]) -> Daemon {
        let state = nix.scratch(&format!("state-{name}"));
        let store = nix.store_arg();
        let mut cmd = common::peerix();
        cmd.args([
            "serve",
            "--store",
            &store,
            "--state-dir",
            state.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--p2p-listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
            "--upstream-cache",
            "none",
        ])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn peerix serve");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let tag = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
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
    fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let until = Instant::now() + WAIT;
        loop {
            let left = until.saturating_duration_since(Instant::now());
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
    fn wait_scan(&mut self) -> usize {
        let l = self.wait_for("completed scan", |l| l.starts_with("peerix: scan done: "));
        l.trim_start_matches("peerix: scan done: ")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn wait_peer(&mut self, other: &Daemon) {
        let want = format!("peerix: peer connected {}", other.peer_id);
        self.wait_for(&format!("connection to {}", other.name), |l| l == want);
    }

    fn url(&self) -> String {
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
fn http(addr: &str, method: &str, path: &str) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
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

fn keys(nix: &Nix, name: &str) -> (PathBuf, String) {
    let d = nix.scratch("keys");
    let (sk, pk) = (d.join(format!("{name}.sec")), d.join(format!("{name}.pub")));
    nix.run(
        "nix-store",
        &[
            "--generate-binary-cache-key",
            name,
            sk.to_str().unwrap(),
            pk.to_str().unwrap(),
        ],
    );
    let pk = std::fs::read_to_string(&pk).unwrap();
    (sk, pk)
}

/// Make sure the chroot store exists (its database too), so a daemon can open it.
fn init_store(nix: &Nix) {
    let s = nix.store_arg();
    nix.run("nix", &["path-info", "--store", &s, "--all"]);
}

fn sign(nix: &Nix, key: &Path, top: &str) {
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

fn closure(nix: &Nix, top: &str) -> Vec<String> {
    let s = nix.store_arg();
    nix.run("nix-store", &["--store", &s, "-qR", top])
        .lines()
        .map(str::to_owned)
        .collect()
}

fn nar_hashes(nix: &Nix, paths: &[String]) -> BTreeMap<String, String> {
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    nix.path_info_json(&refs)
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

/// `nix-store -r top` in `nix`'s store from `substituters`, trusting `keys`.
fn realise(nix: &Nix, top: &str, substituters: &str, keys: &str) -> std::process::Output {
    let s = nix.store_arg();
    nix.output(
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

fn hash_part(path: &str) -> &str {
    &path.trim_start_matches("/nix/store/")[..32]
}

/// A node holding a signed closure, and a second node connected to it that trusts the first's
/// key: the common start of most tests.
struct Pair {
    a_nix: Nix,
    b_nix: Nix,
    a: Daemon,
    b: Daemon,
    #[allow(dead_code)]
    a_key: (PathBuf, String),
    b_key: (PathBuf, String),
    top: String,
    paths: Vec<String>,
}

fn pair(salt: &str, b_extra: &[&str]) -> Option<Pair> {
    let a_nix = common::nix()?;
    let b_nix = common::nix()?;
    let built = a_nix.build_closure(salt);
    let top = built[0].clone();
    let a_key = keys(&a_nix, "peer-a-1");
    let b_key = keys(&b_nix, "peer-b-1");
    sign(&a_nix, &a_key.0, &top);
    let paths = closure(&a_nix, &top);
    assert_eq!(paths.len(), 3);
    init_store(&b_nix);
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
    Some(Pair {
        a_nix,
        b_nix,
        a,
        b,
        a_key,
        b_key,
        top,
        paths,
    })
}

#[test]
fn nix_substitutes_a_closure_only_a_peer_holds() {
    let Some(p) = pair("serve-a", &[]) else {
        return;
    };
    let (status, body) = http(&p.b.http, "GET", "/nix-cache-info");
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8(body).unwrap(),
        "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n"
    );
    // HEAD of a narinfo peerix has.
    let (status, body) = http(
        &p.b.http,
        "HEAD",
        &format!("/{}.narinfo", hash_part(&p.top)),
    );
    assert_eq!(status, 200);
    assert!(body.is_empty());

    let out = realise(&p.b_nix, &p.top, &p.b.url(), &p.b_key.1);
    assert!(
        out.status.success(),
        "Nix could not substitute from peerix: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        nar_hashes(&p.b_nix, &p.paths),
        nar_hashes(&p.a_nix, &p.paths)
    );

    let (status, body) = http(&p.b.http, "GET", "/metrics");
    assert_eq!(status, 200);
    let m = String::from_utf8(body).unwrap();
    assert!(m.contains("peerix_narinfo_hits_total"), "{m}");
    assert!(m.contains(&format!("peer=\"{}\"", p.a.peer_id)), "{m}");
    let (status, body) = http(&p.b.http, "GET", "/health");
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
}

#[test]
fn dead_peers_mean_a_quick_404_and_nix_falls_back() {
    let Some(p) = pair("serve-b", &["--timeout", "1"]) else {
        return;
    };
    // A static cache with the same closure, signed by its own key.
    let (s_sk, s_pk) = keys(&p.a_nix, "static-1");
    let dir = p.a_nix.scratch("static-cache");
    let to = format!(
        "file://{}?compression=none&secret-key={}",
        dir.display(),
        s_sk.display()
    );
    let store = p.a_nix.store_arg();
    p.a_nix
        .run("nix", &["copy", "--store", &store, "--to", &to, &p.top]);
    let server = common::serve_dir(&dir);

    let Pair {
        a,
        b,
        b_nix,
        b_key,
        top,
        paths,
        a_nix,
        ..
    } = p;
    drop(a);
    let started = Instant::now();
    let (status, _) = http(&b.http, "GET", &format!("/{}.narinfo", hash_part(&top)));
    let took = started.elapsed();
    assert_eq!(status, 404);
    assert!(took < Duration::from_secs(3), "the 404 took {took:?}");

    let subs = format!("{} {}", b.url(), server.url);
    let trusted = format!("{} {}", b_key.1, s_pk);
    let out = realise(&b_nix, &top, &subs, &trusted);
    assert!(
        out.status.success(),
        "Nix did not fall back: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(nar_hashes(&b_nix, &paths), nar_hashes(&a_nix, &paths));
}
