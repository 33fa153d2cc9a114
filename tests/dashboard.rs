//! `/dashboard` as a person sees it: two daemons exchange paths through real Nix, then the
//! page is opened in headless Chromium and the rendered DOM must show the peers, the transfer
//! and the activity; the counters must survive a restart. Screenshots are taken too (and
//! copied into the directory `PEERIX_DASHBOARD_PNG` names, which is how `docs/` gets them).

mod common;

mod needs_nix {
    use super::*;

    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::time::{Duration, Instant};

    use common::pair::sign;
    use common::{http, Daemon};

    const CHROMIUM: &str = "chromium";

    /// The dashboard's JSON; with `after`, once more than that many samples have been taken.
    fn api(d: &Daemon, after: Option<u64>) -> serde_json::Value {
        let path = match after {
            Some(n) => format!("/dashboard/api?after={n}"),
            None => "/dashboard/api".to_owned(),
        };
        let (status, body) = http(&d.http, "GET", &path);
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    /// `api` until `pred` holds, sample by sample, or a panic with the last answer.
    fn api_until(
        d: &Daemon,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let until = Instant::now() + Duration::from_secs(30);
        let mut after = None;
        loop {
            let v = api(d, after);
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < until, "{}: no {what}: {v:#}", d.name);
            after = v["samples_taken"].as_u64();
        }
    }

    /// Headless Chromium on `url` with `extra` (`--dump-dom`, `--screenshot=…`); its stdout.
    /// The page's script gets a few seconds of virtual time to fetch and render.
    fn chromium(profile: &Path, url: &str, extra: &[&str]) -> String {
        let which = Command::new("sh")
            .args(["-c", &format!("command -v {CHROMIUM}")])
            .output()
            .unwrap();
        assert!(
            which.status.success(),
            "needs Chromium ({CHROMIUM}, Debian's `chromium` package; scripts/test.sh installs it)"
        );
        let out = Command::new("timeout")
            .arg("120")
            .arg(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--virtual-time-budget=5000",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "chromium failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The text of each element whose start tag contains `attr`, up to its end tag `</tag>`.
    fn elements<'a>(dom: &'a str, attr: &str, tag: &str) -> Vec<&'a str> {
        let end = format!("</{tag}>");
        dom.match_indices(attr)
            .map(|(i, _)| {
                let rest = &dom[i..];
                &rest[..rest.find(&end).unwrap_or(rest.len())]
            })
            .collect()
    }

    /// The contents of the element with `id="…"`, up to the first `</tag>` after it.
    fn by_id<'a>(dom: &'a str, id: &str, tag: &str) -> &'a str {
        elements(dom, &format!("id=\"{id}\""), tag)
            .first()
            .copied()
            .unwrap_or_else(|| panic!("no #{id} in the page:\n{dom}"))
    }

    fn screenshot(profile: &Path, url: &str, out: &Path, size: &str) {
        let _ = std::fs::remove_file(out);
        chromium(
            profile,
            url,
            &[
                &format!("--screenshot={}", out.display()),
                &format!("--window-size={size}"),
            ],
        );
        let png = std::fs::read(out).unwrap();
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "not a PNG: {}",
            out.display()
        );
        // A directory to keep the screenshots in (how docs/dashboard*.png are made).
        if let Ok(dir) = std::env::var("PEERIX_DASHBOARD_PNG") {
            std::fs::copy(out, PathBuf::from(dir).join(out.file_name().unwrap())).unwrap();
        }
    }

    #[test]
    fn the_dashboard_shows_peers_transfers_and_activity_and_keeps_them() {
        let a_nix = common::nix();
        let b_nix = common::nix();
        let a_key = a_nix.keys("peer-a-1");
        let b_key = b_nix.keys("peer-b-1");
        // A holds a closure and a path with a recognisable name and some weight, signed.
        let tree = a_nix.scratch("hello-2.12.1");
        let data = common::noise(3 << 20, 0x9e37_79b9_7f4a_7c15);
        std::fs::write(tree.join("hello"), &data).unwrap();
        let hello = a_nix.add(&tree);
        assert!(hello.ends_with("-hello-2.12.1"), "{hello}");
        let top = a_nix.build_closure("dashboard")[0].clone();
        sign(&a_nix, &a_key.0, &top);
        sign(&a_nix, &a_key.0, &hello);
        b_nix.init_store();

        let mut a = Daemon::start("A", &a_nix, &["--private-key", a_key.0.to_str().unwrap()]);
        assert!(a.wait_scan() >= 4);
        let b_args = [
            "--trusted-key",
            &a_key.1,
            "--private-key",
            b_key.0.to_str().unwrap(),
            "--peer",
            &a.p2p,
        ];
        let mut b = Daemon::start("B", &b_nix, &b_args);
        b.wait_peer(&a);

        for path in [&hello, &top] {
            let out = b_nix.realise(path, &b.url(), &b_key.1);
            assert!(
                out.status.success(),
                "Nix could not substitute {path}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        // The JSON first: B fetched from A, A served B (bytes are sampled every 5 s).
        let bv = api_until(&b, "download from A", |v| {
            v["totals"]["downloads"].as_u64() >= Some(4)
                && v["peers"].as_array().unwrap().iter().any(|p| {
                    p["id"] == a.peer_id.as_str() && p["bytes_from"].as_u64() > Some(3 << 20)
                })
        });
        assert_eq!(bv["node"]["peer_id"], b.peer_id.as_str());
        assert_eq!(bv["top_requested"][0]["hits"].as_u64(), Some(1), "{bv:#}");
        let av =
            api_until(&a, "bytes served to B", |v| {
                v["peers"].as_array().unwrap().iter().any(|p| {
                    p["id"] == b.peer_id.as_str() && p["bytes_to"].as_u64() > Some(3 << 20)
                }) && v["top_served"].as_array().unwrap().len() >= 4
            });
        assert!(
            av["totals"]["bytes_to_peers"].as_u64() > Some(3 << 20),
            "{av:#}"
        );
        assert!(
            av["throughput"]["samples"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["to_peers"].as_u64() > Some(0)),
            "the chart has the upload: {av:#}"
        );

        // The page, rendered by a browser.
        let profile = a_nix.scratch("chromium-profile");
        let dom = chromium(&profile, &format!("{}/dashboard", b.url()), &["--dump-dom"]);
        assert!(
            dom.contains("data-loaded=\"yes\""),
            "the script did not render:\n{dom}"
        );
        assert!(by_id(&dom, "node-id", "dd").contains(&b.peer_id));
        let peer_rows = elements(&dom, &format!("data-peer=\"{}\"", a.peer_id), "tr");
        assert_eq!(peer_rows.len(), 1, "A in B's peers:\n{dom}");
        assert!(
            peer_rows[0].contains(">connected<") && peer_rows[0].contains("direct"),
            "{}",
            peer_rows[0]
        );
        assert!(
            peer_rows[0].contains("MiB"),
            "bytes from A shown: {}",
            peer_rows[0]
        );
        let downloads = elements(&dom, "data-kind=\"download\"", "li");
        assert!(
            downloads
                .iter()
                .any(|d| d.contains("hello-2.12.1") && d.contains("MiB")),
            "the download in B's activity:\n{downloads:#?}"
        );
        assert!(by_id(&dom, "requested-list", "ol").contains("hello-2.12.1"));
        assert!(
            by_id(&dom, "chart", "svg").contains("<polyline"),
            "a chart is drawn"
        );

        let dom = chromium(&profile, &format!("{}/dashboard", a.url()), &["--dump-dom"]);
        let served = by_id(&dom, "served-list", "ol");
        assert!(
            served.contains("hello-2.12.1") && served.contains(&b.peer_id[..8]),
            "what A served, and to whom:\n{served}"
        );
        let serves = elements(&dom, "data-kind=\"serve\"", "li");
        assert!(
            serves.iter().any(|s| s.contains("hello-2.12.1")),
            "{serves:#?}"
        );
        let rows = elements(&dom, &format!("data-peer=\"{}\"", b.peer_id), "tr");
        assert_eq!(rows.len(), 1, "B in A's peers:\n{dom}");

        // Screenshots: a laptop window and a phone.
        let shots = a_nix.scratch("shots");
        screenshot(
            &profile,
            &format!("{}/dashboard", b.url()),
            &shots.join("dashboard.png"),
            "1280,1900",
        );
        screenshot(
            &profile,
            &format!("{}/dashboard", a.url()),
            &shots.join("dashboard-phone.png"),
            "390,1600",
        );

        // Nothing on it changes state.
        let (status, _) = http(&b.http, "POST", "/dashboard/api");
        assert_eq!(status, 405);

        // Restarted (SIGTERM, as systemd stops it), B still knows what happened.
        let before = api(&b, None);
        let pid = b.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        assert!(b.child.wait().unwrap().success());
        assert!(b_nix.scratch("state-B").join("dashboard.json").exists());
        let b2 = Daemon::start("B", &b_nix, &b_args);
        let after = api(&b2, None);
        assert_eq!(after["node"]["peer_id"], b.peer_id.as_str());
        assert_eq!(after["totals"]["downloads"], before["totals"]["downloads"]);
        assert_eq!(
            after["totals"]["bytes_from_peers"],
            before["totals"]["bytes_from_peers"]
        );
        assert_eq!(after["top_requested"], before["top_requested"]);
        assert!(
            after["activity"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["kind"] == "download" && e["path"] == hello.as_str()),
            "{after:#}"
        );
        drop(a);
    }
}
