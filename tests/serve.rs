//! `peerix serve` end to end: real daemons on loopback, each with its own chroot store and
//! state directory, and real Nix substituting from them.

mod common;

mod needs_nix {
    use super::*;

    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, Instant};

    use common::Nix;

    use common::pair::{
        assert_substitutes, hash_part, pack_bytes, pair, pair_with, pair_with_big, sign, Pair,
    };
    use common::{http, noise, Daemon, KeepAlive};

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
        // stderr is a pipe here, as under systemd: log lines carry no colour codes.
        assert!(p.b.seen.iter().any(|l| l.contains(" INFO ")));
        assert!(
            p.b.seen.iter().all(|l| !l.contains('\u{1b}')),
            "colour codes in a log that is not a terminal"
        );
        // HEAD of a narinfo peerix has.
        let (status, body) = http(
            &p.b.http,
            "HEAD",
            &format!("/{}.narinfo", hash_part(&p.top)),
        );
        assert_eq!(status, 200);
        assert!(body.is_empty());
        // HEAD of the NAR answers from what is known and starts no download.
        let (_, body) = http(&p.b.http, "GET", &format!("/{}.narinfo", hash_part(&p.top)));
        let text = String::from_utf8(body).unwrap();
        let url = text.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap();
        let (status, body) = http(&p.b.http, "HEAD", &format!("/{url}"));
        assert_eq!((status, body.len()), (200, 0));
        assert_eq!(metric(&p.b, "peerix_nar_bytes_served"), 0);

        assert_substitutes(&p.b_nix, &p.a_nix, &p.top, &p.b.url(), &p.b_key.1, &p.paths);

        let (status, body) = http(&p.b.http, "GET", "/metrics");
        assert_eq!(status, 200);
        let m = String::from_utf8(body).unwrap();
        assert!(m.contains("peerix_narinfo_hits_total"), "{m}");
        assert!(m.contains(&format!("peer=\"{}\"", p.a.peer_id)), "{m}");
        // Whether downloads waited for this machine's disk, read from the chunk store.
        for name in ["peerix_put_disk_waits ", "peerix_put_disk_stall_seconds "] {
            let v = m.lines().find_map(|l| l.strip_prefix(name));
            assert!(
                v.is_some_and(|v| v.parse::<f64>().is_ok()),
                "no {name}in {m}"
            );
        }
        let (status, body) = http(&p.b.http, "GET", "/health");
        assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    }

    #[test]
    fn dead_peers_mean_a_quick_404_and_nix_falls_back() {
        let Some(p) = pair("serve-b", &["--timeout", "1"]) else {
            return;
        };
        // A static cache with the same closure, signed by its own key.
        let (s_sk, s_pk) = p.a_nix.keys("static-1");
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
        assert_substitutes(&b_nix, &a_nix, &top, &subs, &trusted, &paths);
    }

    /// A's private path (not signed by A, no upstream, no --share-all) never leaves A: B's narinfo
    /// is 404, and A answers a peer's lookup and manifest request for it with nothing.
    #[test]
    fn private_paths_are_never_served() {
        let mut private = None;
        let Some(p) = pair_with("serve-c", &["--timeout", "1"], |nix, _| {
            private = Some(nix.build_closure("serve-c-private")[0].clone());
        }) else {
            return;
        };
        let private = private.unwrap();
        for path in p.a_nix.closure(&private) {
            let (status, _) = http(&p.b.http, "GET", &format!("/{}.narinfo", hash_part(&path)));
            assert_eq!(status, 404, "{path} was served");
        }
        let (status, _) = http(&p.b.http, "GET", &format!("/{}.narinfo", hash_part(&p.top)));
        assert_eq!(status, 200, "the shared path is served");

        // Straight to A over the peer protocol: nothing for the private path, not even its
        // manifest by NarHash; the shared path as control.
        let hash_of = |path: &str| -> peerix_nix::Sha256Hash {
            let h = p.a_nix.nar_hashes(&[path.to_owned()]);
            h.values().next().unwrap().parse().unwrap()
        };
        let (priv_nar, shared_nar) = (hash_of(&private), hash_of(&p.top));
        let a_peer: peerix_swarm::PeerId = p.a.peer_id.parse().unwrap();
        let a_addr: peerix_swarm::Multiaddr = p.a.p2p.parse().unwrap();
        let state = p.b_nix.scratch("probe-node");
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut cfg = peerix_swarm::NodeConfig::new(state);
            cfg.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
            cfg.mdns = false;
            let node = peerix_swarm::Node::start(cfg).await.unwrap();
            node.dial(a_addr).await.unwrap();
            let client = peerix_swarm::Client::new(node.stream_control());
            let priv_hash: peerix_nix::StorePathHash = hash_part(&private).parse().unwrap();
            assert!(client
                .lookup(a_peer, &[priv_hash])
                .await
                .unwrap()
                .is_empty());
            assert!(client.manifest(a_peer, priv_nar).await.unwrap().is_none());
            assert!(client.manifest(a_peer, shared_nar).await.unwrap().is_some());
            node.shutdown().await;
        });
        // B never learned the private NarHash: no NAR either.
        let (status, _) = http(
            &p.b.http,
            "GET",
            &format!("/nar/{}.nar", priv_nar.to_base32()),
        );
        assert_eq!(status, 404);
    }

    /// C holds the same closure but signs it with a key B does not trust; B still hands Nix the
    /// path, from A.
    #[test]
    fn a_peer_with_an_untrusted_key_does_not_get_in_the_way() {
        let a_nix = common::nix();
        let b_nix = common::nix();
        let c_nix = common::nix();
        let top = a_nix.build_closure("serve-d")[0].clone();
        assert_eq!(c_nix.build_closure("serve-d")[0], top);
        let a_key = a_nix.keys("peer-a-1");
        let b_key = b_nix.keys("peer-b-1");
        let c_key = c_nix.keys("peer-c-1");
        sign(&a_nix, &a_key.0, &top);
        sign(&c_nix, &c_key.0, &top);
        b_nix.init_store();
        let paths = a_nix.closure(&top);
        // C first, so it is asked too.
        let mut c = Daemon::start("C", &c_nix, &["--private-key", c_key.0.to_str().unwrap()]);
        assert!(c.wait_scan() >= 3);
        let mut a = Daemon::start("A", &a_nix, &["--private-key", a_key.0.to_str().unwrap()]);
        assert!(a.wait_scan() >= 3);
        let mut b = Daemon::start(
            "B",
            &b_nix,
            &[
                "--trusted-key",
                &a_key.1,
                "--private-key",
                b_key.0.to_str().unwrap(),
                "--peer",
                &c.p2p,
                "--peer",
                &a.p2p,
            ],
        );
        // Either order.
        let mut want: std::collections::HashSet<String> =
            [a.peer_id.clone(), c.peer_id.clone()].into();
        while !want.is_empty() {
            let l = b.wait_for("peer connections", |l| {
                l.starts_with("peerix: peer connected ")
            });
            want.remove(l.trim_start_matches("peerix: peer connected "));
        }
        let (status, body) = http(&b.http, "GET", &format!("/{}.narinfo", hash_part(&top)));
        assert_eq!(status, 200);
        let text = String::from_utf8(body).unwrap();
        assert!(
            !text.contains("peer-c-1:"),
            "C's signature handed on: {text}"
        );
        assert!(text.contains("peer-b-1:"), "{text}");

        assert_substitutes(&b_nix, &a_nix, &top, &b.url(), &b_key.1, &paths);
    }

    /// Nix asks for a closure's NARs one after another on one kept-alive connection. A NAR's
    /// response is written in two parts, its head and then its body; with Nagle's algorithm on
    /// the socket the body waited for the client to acknowledge the head, which a client
    /// delays by 40 ms: every small path cost 40 ms more than its bytes, from the local store
    /// or from a peer. 21 responses (seven rounds of the closure's three NARs), from A's own
    /// store and from B (the first round fetched from A), must take less than half of what 21
    /// such waits would.
    #[test]
    fn small_nars_one_after_another_do_not_wait_for_the_clients_ack() {
        let Some(p) = pair("serve-ack", &[]) else {
            return;
        };
        let urls: Vec<String> = p
            .paths
            .iter()
            .map(|path| {
                let (status, body) =
                    http(&p.a.http, "GET", &format!("/{}.narinfo", hash_part(path)));
                assert_eq!(status, 200);
                let text = String::from_utf8(body).unwrap();
                format!(
                    "/{}",
                    text.lines().find_map(|l| l.strip_prefix("URL: ")).unwrap()
                )
            })
            .collect();
        // B learns the narinfos first, as Nix asks for them before the NARs.
        for path in &p.paths {
            let (status, _) = http(&p.b.http, "GET", &format!("/{}.narinfo", hash_part(path)));
            assert_eq!(status, 200);
        }
        const DELAYED_ACK: Duration = Duration::from_millis(40);
        for d in [&p.a, &p.b] {
            let mut conn = KeepAlive::connect(&d.http);
            let t = Instant::now();
            let mut n = 0u32;
            for _ in 0..7 {
                for url in &urls {
                    let (status, body) = conn.get(url);
                    assert_eq!(status, 200, "{} {url}", d.name);
                    assert!(!body.is_empty());
                    n += 1;
                }
            }
            let took = t.elapsed();
            assert!(
                took < DELAYED_ACK * n / 2,
                "{n} small NARs on one connection to {} took {took:?}",
                d.name
            );
        }
    }

    /// Requests that are not a narinfo or NAR name are refused without touching the filesystem;
    /// never a 5xx, never a file.
    #[test]
    fn bad_requests_are_refused() {
        let nix = common::nix();
        nix.init_store();
        // Settings from a config file too; a flag overrides the file.
        let conf = nix.scratch("conf").join("peerix.toml");
        std::fs::write(&conf, "priority = 17\ntimeout = 5.0\nshare-all = true\n").unwrap();
        let mut d = Daemon::start(
            "E",
            &nix,
            &["--config", conf.to_str().unwrap(), "--timeout", "0.5"],
        );
        d.wait_scan();
        let (status, body) = http(&d.http, "GET", "/nix-cache-info");
        assert_eq!(status, 200);
        assert!(String::from_utf8(body).unwrap().contains("Priority: 17\n"));
        let cases: &[(&str, &str, &[u16])] = &[
            ("GET", "/nar/../../etc/passwd", &[400, 404]),
            ("GET", "/../../etc/passwd", &[400, 404]),
            ("GET", "/nar/..%2F..%2Fetc%2Fpasswd", &[400, 404]),
            ("GET", "/%2e%2e/%2e%2e/etc/passwd", &[400, 404]),
            (
                "GET",
                "/nar/%2e%2e%2f%2e%2e%2fetc%2fpasswd.nar",
                &[400, 404],
            ),
            ("GET", "/xyz.narinfo", &[400]),
            ("GET", "/0000.narinfo", &[400]),
            ("GET", "/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo", &[400]),
            ("GET", "/nar/0000.nar", &[400]),
            (
                "GET",
                "/nar/0kdc467rvrm9924cmghf8yyixdb9jbj6f77g9xp0w2srhmz4ri69.nar",
                &[404],
            ),
            ("GET", "/inrbbn8pggcp38qhr25j9nvp5f2micmp.narinfo", &[404]),
            ("HEAD", "/inrbbn8pggcp38qhr25j9nvp5f2micmp.narinfo", &[404]),
            ("HEAD", "/nix-cache-info", &[200]),
            ("GET", "/nope", &[400, 404]),
            ("POST", "/nix-cache-info", &[405]),
        ];
        for (method, path, want) in cases {
            let (status, body) = http(&d.http, method, path);
            assert!(
                want.contains(&status),
                "{method} {path}: {status}, wanted one of {want:?}"
            );
            assert!(!String::from_utf8_lossy(&body).contains("root:"), "{path}");
        }
    }

    /// `--timeout` bounds a lookup that nobody answers, and the flag beats the config file. The
    /// daemon's only peer is connected but stopped (SIGSTOP), so no answer ever comes and a
    /// miss takes exactly the timeout; without a peer it would be answered at once, whatever
    /// the timeout.
    #[test]
    fn a_miss_nobody_answers_takes_the_timeout_of_the_flag_not_the_file() {
        let nix = common::nix();
        nix.init_store();
        let mut silent = Daemon::start("P", &nix, &[]);
        let conf = nix.scratch("conf").join("peerix.toml");
        std::fs::write(&conf, "timeout = 5.0\n").unwrap();
        let conf = conf.to_str().unwrap();
        let args = ["--config", conf, "--timeout", "0.5", "--peer", &silent.p2p];
        let mut d = Daemon::start("E", &nix, &args);
        d.wait_peer(&silent);
        silent.wait_scan();
        let pid = silent.child.id().to_string();
        let stopped = std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap();
        assert!(stopped.success());
        let started = Instant::now();
        let (status, _) = http(&d.http, "GET", "/inrbbn8pggcp38qhr25j9nvp5f2micmp.narinfo");
        let took = started.elapsed();
        assert_eq!(status, 404);
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_secs(3),
            "a miss with a silent peer took {took:?}; the flag says 0.5 s, the file 5 s"
        );
    }

    /// 32 narinfo requests at once, hits and misses, then 4 NAR downloads at once (one NAR of
    /// several MiB twice): every answer as expected, no 5xx, the exact NAR bytes.
    #[test]
    fn concurrent_requests() {
        // A generous lookup deadline: 32 lookups at once on a loaded 2-core machine.
        let Some((p, big)) = pair_with_big("serve-f", &["--timeout", "10"]) else {
            return;
        };
        let mut hits: Vec<String> = p.paths.clone();
        hits.push(big.clone());
        let alphabet = b"0123456789abcdfghijklmnpqrsvwxyz";
        let misses: Vec<String> = (0..16)
            .map(|i| {
                (0..32)
                    .map(|j| alphabet[(i * 7 + j * 3 + j * j) % 32] as char)
                    .collect()
            })
            .collect();
        let base = p.b.url();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let nar_urls: Vec<(String, String)> = rt.block_on(async {
            let client = reqwest::Client::new();
            let mut tasks = vec![];
            for i in 0..32 {
                let (hash, hit) = if i % 2 == 0 {
                    (hash_part(&hits[(i / 2) % hits.len()]).to_owned(), true)
                } else {
                    (misses[i / 2].clone(), false)
                };
                let (client, base) = (client.clone(), base.clone());
                tasks.push(tokio::spawn(async move {
                    let r = client
                        .get(format!("{base}/{hash}.narinfo"))
                        .send()
                        .await
                        .unwrap();
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap();
                    assert_eq!(status, if hit { 200 } else { 404 }, "{hash}: {text}");
                    (hash, text)
                }));
            }
            let mut urls = BTreeMap::new();
            for t in tasks {
                let (hash, text) = t.await.unwrap();
                if let Some(u) = text.lines().find_map(|l| l.strip_prefix("URL: ")) {
                    urls.insert(hash, u.to_owned());
                }
            }
            assert_eq!(urls.len(), hits.len());
            // The big NAR twice, and two small ones, at once.
            let wanted = [&big, &big, &p.top, &p.paths[1]];
            wanted
                .iter()
                .map(|path| ((*path).clone(), urls[hash_part(path)].clone()))
                .collect()
        });
        let bodies: Vec<Vec<u8>> = rt.block_on(async {
            let client = reqwest::Client::new();
            let tasks: Vec<_> = nar_urls
                .iter()
                .map(|(_, url)| {
                    let (client, url) = (client.clone(), format!("{base}/{url}"));
                    tokio::spawn(async move {
                        let r = client.get(&url).send().await.unwrap();
                        assert_eq!(r.status().as_u16(), 200, "{url}");
                        r.bytes().await.unwrap().to_vec()
                    })
                })
                .collect();
            let mut out = vec![];
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        });
        let store = p.a_nix.store_arg();
        for ((path, _), body) in nar_urls.iter().zip(&bodies) {
            let want = p
                .a_nix
                .output("nix", &["store", "dump-path", "--store", &store, path]);
            assert!(want.status.success());
            assert!(body == &want.stdout, "NAR of {path} differs");
        }
        assert!(bodies[0].len() > 6 << 20);
    }

    /// The only peer's copy goes bad after it was indexed, near its end: the first chunks reach
    /// Nix, then the download fails its checks, so B cuts the response before Content-Length and
    /// Nix refuses the path.
    #[test]
    fn a_failed_download_cuts_the_response() {
        let Some((p, big)) = pair_with_big("serve-g", &["--timeout", "1"]) else {
            return;
        };
        let (status, body) = http(&p.b.http, "GET", &format!("/{}.narinfo", hash_part(&big)));
        assert_eq!(status, 200);
        let text = String::from_utf8(body).unwrap();
        let url = text
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
            .to_owned();
        // Flip bytes near the end of A's file, behind its index's back: the runs before it are
        // served (and reach Nix) before the run holding it is even asked for.
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(p.a_nix.real(&big).join("blob"))
                .unwrap();
            f.write_all_at(&[0xff; 64], (6 << 20) - 4096).unwrap();
        }
        // A response head: the first chunks were fine.
        let (status, len, got) = common::get_until_cut(&p.b.http, &format!("/{url}"));
        assert_eq!(status, 200);
        let len = len.expect("a Content-Length");
        let body = got.len();
        assert!(body > 0, "no byte before the failure");
        assert!(
            body < len,
            "the whole body arrived although the download failed"
        );
        // Nix never takes it.
        let out = p.b_nix.realise(&big, &p.b.url(), &p.b_key.1);
        assert!(!out.status.success());
        let s = p.b_nix.store_arg();
        let valid = p
            .b_nix
            .output("nix-store", &["--store", &s, "--check-validity", &big]);
        assert!(!valid.status.success(), "a bad NAR was imported");
    }

    /// The value of `peerix_peer_received_bytes_total{peer="ID"}` in B's metrics, 0 if absent.
    fn received_from(b: &Daemon, peer: &str) -> u64 {
        let (status, body) = http(&b.http, "GET", "/metrics");
        assert_eq!(status, 200);
        let m = String::from_utf8(body).unwrap();
        m.lines()
            .filter(|l| {
                l.starts_with("peerix_peer_received_bytes")
                    && l.contains(&format!("peer=\"{peer}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    fn metric(b: &Daemon, name: &str) -> u64 {
        let (_, body) = http(&b.http, "GET", "/metrics");
        String::from_utf8(body)
            .unwrap()
            .lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    /// A content-addressed path from `data`, the same store path in every store it is added to.
    fn add_tree(nix: &Nix, name: &str, data: &[u8], key: &Path) -> String {
        let tree = nix.scratch(name);
        std::fs::write(tree.join("blob"), data).unwrap();
        let path = nix.add(&tree);
        sign(nix, key, &path);
        path
    }

    /// Two holders (A and C, each with its own key) of the same 16 MiB path, and a node B that
    /// trusts both and is connected to both. `rot` runs on C's store after C indexed it.
    struct Trio {
        a_nix: Nix,
        b_nix: Nix,
        /// Kept so C's store outlives the setup.
        _c_nix: Nix,
        a: Daemon,
        b: Daemon,
        c: Daemon,
        b_key: (PathBuf, String),
        big: String,
    }

    fn trio(name: &str, seed: u64, rot: impl FnOnce(&Nix, &str)) -> Option<Trio> {
        let a_nix = common::nix();
        let c_nix = common::nix();
        let b_nix = common::nix();
        let (a_key, c_key, b_key) = (
            a_nix.keys("peer-a-1"),
            c_nix.keys("peer-c-1"),
            b_nix.keys("peer-b-1"),
        );
        let data = noise(16 << 20, seed);
        let big = add_tree(&a_nix, name, &data, &a_key.0);
        assert_eq!(add_tree(&c_nix, name, &data, &c_key.0), big);
        b_nix.init_store();
        let mut a = Daemon::start("A", &a_nix, &["--private-key", a_key.0.to_str().unwrap()]);
        let mut c = Daemon::start("C", &c_nix, &["--private-key", c_key.0.to_str().unwrap()]);
        a.wait_scan();
        c.wait_scan();
        rot(&c_nix, &big);
        let mut b = Daemon::start(
            "B",
            &b_nix,
            &[
                "--trusted-key",
                &a_key.1,
                "--trusted-key",
                &c_key.1,
                "--private-key",
                b_key.0.to_str().unwrap(),
                "--peer",
                &a.p2p,
                "--peer",
                &c.p2p,
            ],
        );
        b.wait_peer(&a);
        b.wait_peer(&c);
        Some(Trio {
            a_nix,
            b_nix,
            _c_nix: c_nix,
            a,
            b,
            c,
            b_key,
            big,
        })
    }

    #[test]
    fn chunks_come_from_two_peers_at_once() {
        let Some(t) = trio("two-peers", 0x1234_5678_9abc_def1, |_, _| {}) else {
            return;
        };
        assert_substitutes(
            &t.b_nix,
            &t.a_nix,
            &t.big,
            &t.b.url(),
            &t.b_key.1,
            std::slice::from_ref(&t.big),
        );
        let (from_a, from_c) = (
            received_from(&t.b, &t.a.peer_id),
            received_from(&t.b, &t.c.peer_id),
        );
        assert!(
            from_a > 0 && from_c > 0,
            "from A {from_a}, from C {from_c}: not both"
        );
        // The senders count what they served B, and B how long narinfos took.
        let served = |d: &Daemon| {
            let (_, body) = http(&d.http, "GET", "/metrics");
            String::from_utf8(body)
                .unwrap()
                .lines()
                .filter(|l| {
                    l.starts_with("peerix_peer_served_bytes")
                        && l.contains(&format!("peer=\"{}\"", t.b.peer_id))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>() as u64
        };
        assert!(served(&t.a) > 0 && served(&t.c) > 0);
        assert!(metric(&t.b, "peerix_narinfo_latency_seconds_count") >= 1);
    }

    #[test]
    fn an_update_costs_only_its_changed_chunks() {
        // A holds version 1 and version 2 of a 12 MiB package; version 2 changes 100 bytes.
        let v1 = noise(12 << 20, 0x0bad_cafe_f00d_1234);
        let mut v2 = v1.clone();
        v2[6 << 20..(6 << 20) + 100].fill(b'X');
        let mut made = None;
        let Some(p) = pair_with("serve-update", &[], |nix, key| {
            made = Some((
                add_tree(nix, "pkg-1", &v1, key),
                add_tree(nix, "pkg-2", &v2, key),
            ));
        }) else {
            return;
        };
        let (p1, p2) = made.unwrap();
        let out = p.b_nix.realise(&p1, &p.b.url(), &p.b_key.1);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let after_v1 = received_from(&p.b, &p.a.peer_id);
        // Version 1 came whole from A: the metric counts what crossed the wire.
        assert!(
            after_v1 >= v1.len() as u64,
            "{after_v1} bytes received from A for version 1 of {} bytes",
            v1.len()
        );
        let saved_v1 = metric(&p.b, "peerix_dedup_saved_bytes");
        let out = p.b_nix.realise(&p2, &p.b.url(), &p.b_key.1);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v2_wire = received_from(&p.b, &p.a.peer_id) - after_v1;
        let nar_size = v2.len() as u64;
        eprintln!("version 2: {v2_wire} bytes over the wire for a NAR of about {nar_size}");
        // At least the changed chunk (chunks are 64 KiB or more), far less than the NAR.
        assert!(
            (64 << 10..nar_size / 4).contains(&v2_wire),
            "{v2_wire} bytes over the wire for a NAR of about {nar_size}"
        );
        assert!(metric(&p.b, "peerix_dedup_saved_bytes") - saved_v1 > nar_size / 2);
    }

    #[test]
    fn a_peer_that_cannot_serve_a_chunk_does_not_stop_the_right_path() {
        // C's copy rots after it was indexed: its chunks there no longer match their ids.
        let rot = |c_nix: &Nix, big: &str| {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(c_nix.real(big).join("blob"))
                .unwrap();
            for off in (0..16u64 << 20).step_by(1 << 20) {
                f.write_all_at(&[0xee; 16], off + 4096).unwrap();
            }
        };
        let Some(t) = trio("corrupt-peer", 0x5555_aaaa_1234_4321, rot) else {
            return;
        };
        assert_substitutes(
            &t.b_nix,
            &t.a_nix,
            &t.big,
            &t.b.url(),
            &t.b_key.1,
            std::slice::from_ref(&t.big),
        );
        assert!(received_from(&t.b, &t.a.peer_id) > 0);
    }

    #[test]
    fn sigterm_stops_the_daemon_cleanly() {
        let nix = common::nix();
        nix.init_store();
        let mut d = Daemon::start("T", &nix, &[]);
        d.wait_scan();
        let pid = d.child.id().to_string();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(ok.success());
        d.wait_for("the shutdown", |l| l.contains("shutting down"));
        let status = d.child.wait().unwrap();
        assert!(
            status.success(),
            "peerix serve exited with {status} on SIGTERM"
        );
    }

    /// A path B downloaded is kept once: when Nix has imported it, B's next scan reads it in place
    /// and GC releases its pack copy. When Nix then garbage-collects it, B stops claiming it, and
    /// the next time Nix wants it, B fetches it from A again.
    #[test]
    fn a_downloaded_path_is_kept_once_and_comes_back_after_nix_collects_it() {
        let Some((mut p, big)) = pair_with_big("serve-gc", &["--scan-interval", "1"]) else {
            return;
        };
        assert_substitutes(
            &p.b_nix,
            &p.a_nix,
            &big,
            &p.b.url(),
            &p.b_key.1,
            std::slice::from_ref(&big),
        );
        // The scan after the import reads it in place; GC then gives the pack copy back.
        p.b.wait_for("GC of the downloaded copy", |l| {
            l.starts_with("peerix: gc: ") && !l.contains(" 0 pack copies released")
        });
        let packs = pack_bytes(&p);
        assert!(
            packs < 1 << 20,
            "B's packs still hold {packs} bytes of a 6 MiB path Nix holds"
        );

        // Nix collects it; B's next scans notice.
        let s = p.b_nix.store_arg();
        p.b_nix.run("nix-store", &["--store", &s, "--delete", &big]);
        p.b.wait_scan();
        p.b.wait_scan();
        assert_substitutes(
            &p.b_nix,
            &p.a_nix,
            &big,
            &p.b.url(),
            &p.b_key.1,
            std::slice::from_ref(&big),
        );
    }

    /// `--swarm-key` puts the daemon in a private swarm: a daemon with the same key connects,
    /// one without it is never let in, and says why.
    #[test]
    fn a_swarm_key_keeps_the_daemon_in_its_private_swarm() {
        let nix = common::nix();
        nix.init_store();
        let dir = nix.scratch("psk");
        let key = dir.join("swarm.key");
        std::fs::write(
            &key,
            format!("/key/swarm/psk/1.0.0/\n/base16/\n{}\n", "5e".repeat(32)),
        )
        .unwrap();
        let key = key.to_str().unwrap();
        let a = Daemon::start("A", &nix, &["--swarm-key", key]);
        let mut b = Daemon::start("B", &nix, &["--swarm-key", key, "--peer", &a.p2p]);
        b.wait_peer(&a);
        let mut outsider = Daemon::start("C", &nix, &["--peer", &a.p2p]);
        let line = outsider.wait_for("the refused dial", |l| {
            l.starts_with("peerix: cannot reach peer ")
        });
        assert!(line.contains(&a.p2p), "{line}");
        assert!(
            !outsider
                .seen
                .iter()
                .any(|l| l.starts_with("peerix: peer connected")),
            "an outsider got into the private swarm"
        );
    }
}
