//! The HTTP endpoint is for this machine. Bound beyond loopback (only with
//! `--http-beyond-loopback`), a client on another machine gets what the node shares with its
//! peers and nothing else: no private path, no fetch on its behalf, no metrics, no dashboard. The daemon runs
//! in a network namespace the test makes, the client in a second one behind a veth pair.

mod common;

use std::process::Command;

use common::netns::Netns;
use common::Daemon;

/// Status and body of a GET made from inside `ns`.
fn get_from(ns: &str, url: &str) -> (u16, Vec<u8>) {
    get_with(ns, url, &[])
}

/// `get_from` with extra curl arguments (headers).
fn get_with(ns: &str, url: &str, extra: &[&str]) -> (u16, Vec<u8>) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "curl",
            "-s",
            "-m",
            "30",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
        ])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    let mut body = out.stdout;
    let nl = body.iter().rposition(|&b| b == b'\n').unwrap();
    let code = std::str::from_utf8(&body[nl + 1..])
        .unwrap()
        .parse()
        .unwrap();
    body.truncate(nl);
    (code, body)
}

mod needs_root {
    use super::*;

    #[test]
    fn beyond_loopback_only_what_is_shared() {
        assert!(peerix_bench::is_root(), "needs root: network namespaces");
        let nix = common::nix();
        let ns = Netns::create("h");
        let [srv, cli] = &ns.names;
        // A shared path (signed with the node's key) and a private one the chunk store holds too
        // (indexed by hand, as a download would leave it).
        let shared_tree = nix.scratch("shared");
        std::fs::write(shared_tree.join("f"), b"shared with every peer").unwrap();
        let shared = nix.add(&shared_tree);
        let private_tree = nix.scratch("private");
        std::fs::write(private_tree.join("f"), b"kept on this machine").unwrap();
        let private = nix.add(&private_tree);
        let (sec, _) = nix.keys("node-1");
        common::pair::sign(&nix, &sec, &shared);
        let s = nix.store_arg();
        let state = nix.scratch("state-A");
        common::peerix_ok(&[
            "store",
            "ingest",
            "--state-dir",
            state.to_str().unwrap(),
            "--store",
            &s,
            &private,
        ]);
        let mut a = Daemon::start_in(
            Some(srv),
            "A",
            &nix,
            &[
                "--listen",
                "10.231.0.1:0",
                "--http-beyond-loopback",
                "--private-key",
                sec.to_str().unwrap(),
            ],
        );
        assert_eq!(a.wait_scan(), 1);
        let base = format!("http://{}", a.http);
        let narinfo_of = |p: &str| format!("{base}/{}.narinfo", &p["/nix/store/".len()..][..32]);

        let (code, body) = get_from(cli, &narinfo_of(&shared));
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        let url = String::from_utf8(body)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap()
            .to_owned();
        let (code, nar) = get_from(cli, &format!("{base}/{url}"));
        assert_eq!(code, 200);
        let want = nix.output("nix", &["store", "dump-path", "--store", &s, &shared]);
        assert!(nar == want.stdout, "the shared NAR differs");

        // The private path: no narinfo, and no NAR even by its NarHash.
        let (code, _) = get_from(cli, &narinfo_of(&private));
        assert_eq!(code, 404);
        let info = nix.path_info_json(&[&private]);
        let sri = info[0]["narHash"].as_str().unwrap().to_owned();
        let h = nix.run("nix", &["hash", "to-base32", &sri]);
        let (code, _) = get_from(cli, &format!("{base}/nar/{}.nar", h.trim()));
        assert_eq!(code, 404);
        // Metrics and the dashboard are for this machine only.
        for path in [
            "/metrics",
            "/dashboard",
            "/dashboard/",
            "/dashboard/api",
            "/dashboard/app.js",
            "/dashboard/style.css",
        ] {
            // Naming the machine as its own Nix would (Host: 127.0.0.1) changes nothing: it is
            // where the connection comes from that counts.
            for host in [None, Some("Host: 127.0.0.1:12304"), Some("Host: localhost")] {
                let extra: Vec<&str> = host.iter().flat_map(|h| ["-H", *h]).collect();
                let (code, body) = get_with(cli, &format!("{base}{path}"), &extra);
                assert_eq!(
                    code,
                    404,
                    "{path} {host:?}: {}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
    }
}
