//! `peerix bench` end to end on loopback. Performance is reported, never asserted.

use std::process::{Command, Stdio};

fn bench(args: &[&str]) -> std::process::Output {
    bench_pid(args).0
}

/// `peerix bench` with `args`: its output, and its process id, which the names of the network
/// namespaces it makes begin with (`pxb<pid>-`).
fn bench_pid(args: &[&str]) -> (std::process::Output, u32) {
    let child = Command::new(env!("CARGO_BIN_EXE_peerix"))
        .arg("bench")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running peerix bench");
    let pid = child.id();
    let out = child.wait_with_output().expect("running peerix bench");
    assert!(
        out.status.success(),
        "peerix bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out, pid)
}

/// The network namespaces a bench run `pid` left (other tests' runs may have some meanwhile).
fn namespaces_left_by(pid: u32) -> Vec<String> {
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&ns.stdout)
        .lines()
        .filter(|l| l.starts_with(&format!("pxb{pid}-")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn loopback_bench_reports_every_seeder_count_and_dedup() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("chart.svg");
    let out = bench(&[
        "--seeders",
        "1,2",
        "--size-mib",
        "16",
        "--json",
        "--svg",
        svg.to_str().unwrap(),
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
    ]);
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    // By default the seeders hold a store path read in place: its NAR is the files' 16 MiB
    // and the framing around them.
    assert_eq!(r["seed_from"], "store");
    let size = r["nar_size"].as_u64().unwrap();
    assert!(
        (16 << 20) < size && size < (16 << 20) + (64 << 10),
        "NAR of {size} bytes"
    );
    let rows = r["rows"].as_array().unwrap();
    let ns: Vec<u64> = rows
        .iter()
        .map(|x| x["seeders"].as_u64().unwrap())
        .collect();
    assert_eq!(ns, [1, 2], "one row per N");
    for row in rows {
        for k in [
            "mib_per_s",
            "ratio_to_ideal",
            "http_mib_per_s",
            "ratio_to_http",
            "first_byte_ms",
            "cpu_s_per_gib",
            "http_cpu_s_per_gib",
        ] {
            let v = row[k].as_f64().unwrap();
            assert!(v > 0.0 && v.is_finite(), "{k} = {v} in {row}");
        }
        // Page faults (allocator churn), counted over each download, and the time the
        // leecher's puts waited for its disk: a warm process may take no faults over a short
        // download, and a disk that keeps up makes no put wait.
        for k in ["faults_per_gib", "http_faults_per_gib", "disk_wait_ms"] {
            let v = row[k].as_f64().unwrap_or_else(|| panic!("no {k} in {row}"));
            assert!(v >= 0.0 && v.is_finite(), "{k} = {v} in {row}");
        }
        // The seeders' links idle at the end of the download: a part of it.
        let tail = row["tail_ms"]
            .as_f64()
            .unwrap_or_else(|| panic!("no tail_ms in {row}"));
        let elapsed_ms = row["elapsed_s"].as_f64().unwrap() * 1000.0;
        assert!(
            (0.0..elapsed_ms).contains(&tail),
            "tail_ms = {tail} of a {elapsed_ms} ms download in {row}"
        );
        let sent: u64 = row["bytes_per_peer"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .sum();
        // Endgame duplicates may make it a little more than the NAR.
        assert!(sent >= size, "the seeders sent the whole NAR: {row}");
        let peers = row["bytes_per_peer"].as_array().unwrap().len() as u64;
        assert!(
            peers <= row["seeders"].as_u64().unwrap(),
            "only N seeders sent: {row}"
        );
        // N links are a netns figure: on loopback every server is the same process.
        assert!(row["http_links_mib_per_s"].is_null(), "{row}");
        // The seeders and the HTTP server, on a runtime of their own: their threads' CPU,
        // read from their clocks.
        for k in ["seeders_cpu_s_per_gib", "http_server_cpu_s_per_gib"] {
            let v = row[k].as_f64().unwrap_or_else(|| panic!("no {k} in {row}"));
            assert!(v > 0.0 && v.is_finite(), "{k} = {v} in {row}");
        }
    }
    assert!(r["ideal_per_peer_mib_per_s"].as_f64().unwrap() > 0.0);
    // What the run cost: the NarHash's SHA-256 of the same bytes, and this process's peak.
    for k in ["sha256_cpu_s_per_gib", "peak_rss_mib"] {
        let v = r[k].as_f64().unwrap();
        assert!(v > 0.0 && v.is_finite(), "{k} = {v}");
    }
    let d = &r["dedup"];
    assert_eq!(d["v2_size"].as_u64().unwrap(), size);
    let fetched = d["fetched_bytes"].as_u64().unwrap();
    assert!(
        fetched > 0 && fetched < size / 4,
        "version 2 fetched {fetched} of {size} bytes"
    );
    let chart = std::fs::read_to_string(&svg).expect("the SVG was written");
    assert!(chart.starts_with("<svg") || chart.starts_with("<?xml"));
    assert!(chart.trim_end().ends_with("</svg>"));
}

#[test]
fn the_table_is_the_default_output_and_packs_can_be_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let out = bench(&[
        "--seeders",
        "2",
        "--size-mib",
        "4",
        "--seed-from",
        "packs",
        "--state-dir",
        dir.path().to_str().unwrap(),
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    // A NAR generated whole, as the chunk store keeps a download: exactly the size asked for.
    assert!(text.starts_with("NAR 4.0 MiB"), "{text}");
    assert!(text.contains("packs"), "{text}");
    assert!(text.contains("MiB/s"), "{text}");
    assert!(text.contains("dedup"), "{text}");
    // N = 1 is measured for the ideal line but only the asked-for N is a row (N, then MiB/s;
    // the seeders' CPU lines name them after N).
    let rows: Vec<&str> = text
        .lines()
        .filter(|l| {
            let mut w = l.split_whitespace();
            w.next().is_some_and(|n| n.parse::<usize>().is_ok())
                && w.next().is_some_and(|r| r.parse::<f64>().is_ok())
        })
        .collect();
    assert_eq!(rows.len(), 1, "{text}");
    assert!(rows[0].trim_start().starts_with("2 "), "{text}");
}

/// Over QUIC alone, and over a daemon's pair of listeners dialled at QUIC: the same report,
/// naming what it ran over.
#[test]
fn the_transport_can_be_quic_or_both_of_a_daemon_s() {
    for (transport, says) in [
        ("quic", ", over QUIC,"),
        ("both", ", seeders on TCP and QUIC, dialled over QUIC,"),
    ] {
        let out = bench(&[
            "--seeders",
            "1",
            "--size-mib",
            "4",
            "--transport",
            transport,
        ]);
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.starts_with("NAR 4.0 MiB, Loopback mode"), "{text}");
        assert!(text.contains(says), "{transport}: {text}");
        assert!(text.contains("dedup"), "{text}");
    }
    // The round trip is made by a relay of TCP connections.
    let out = Command::new(env!("CARGO_BIN_EXE_peerix"))
        .args([
            "bench",
            "--mode",
            "netns",
            "--rtt-ms",
            "10",
            "--transport",
            "quic",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--rtt-ms delays TCP connections only"),
        "{err}"
    );
}

mod needs_root {
    use super::*;

    /// `peerix bench --mode netns` at 50 Mbit/s with `args`, as root: its JSON report, once
    /// its namespaces are checked gone (the guard deletes every one it made).
    fn netns_bench(args: &[&str]) -> serde_json::Value {
        assert!(
            peerix_bench::is_root(),
            "this test needs root (it creates network namespaces); scripts/test.sh leaves the \
             needs_root tests out for a normal user and names them"
        );
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().to_str().unwrap();
        let common = [
            "--mode",
            "netns",
            "--rate",
            "50mbit",
            "--json",
            "--state-dir",
            state,
        ];
        let (out, pid) = bench_pid(&[&common[..], args].concat());
        let left = namespaces_left_by(pid);
        assert!(left.is_empty(), "namespaces left behind: {left:?}");
        serde_json::from_slice(&out.stdout).expect("JSON on stdout")
    }

    #[test]
    fn netns_bench_reports_against_the_cap_and_cleans_up() {
        let r = netns_bench(&["--seeders", "1,2", "--size-mib", "8"]);
        assert_eq!(r["mode"], "netns");
        // 50 Mbit/s in MiB/s: the ideal per-peer figure is the cap.
        let cap = r["ideal_per_peer_mib_per_s"].as_f64().unwrap();
        assert!((cap - 50e6 / 8.0 / 1048576.0).abs() < 1e-9, "{cap}");
        let rows = r["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 2, "one row per N");
        for row in rows {
            for k in [
                "mib_per_s",
                "ratio_to_ideal",
                "http_mib_per_s",
                "ratio_to_http",
                "cpu_s_per_gib",
                "http_cpu_s_per_gib",
            ] {
                let v = row[k].as_f64().unwrap();
                assert!(v > 0.0 && v.is_finite(), "{k} = {v} in {row}");
            }
            // Only this run's N seeders, each held to the cap: the others (the DHT lets the
            // leecher meet them) send nothing.
            let n = row["seeders"].as_u64().unwrap();
            assert!(
                row["bytes_per_peer"].as_array().unwrap().len() as u64 <= n,
                "{row}"
            );
            let ratio = row["ratio_to_ideal"].as_f64().unwrap();
            assert!(ratio < 1.1, "N = {n} beat N caps: {row}");
            // Plain HTTP over the same N links, one range from each seeder: held to N caps
            // too, and at N = 1 the single-link download itself.
            let links = row["http_links_mib_per_s"]
                .as_f64()
                .unwrap_or_else(|| panic!("no http_links_mib_per_s in {row}"));
            assert!(
                links > 0.0 && links < 1.1 * n as f64 * cap,
                "plain HTTP over {n} links at {links} MiB/s: {row}"
            );
            if n == 1 {
                assert_eq!(links, row["http_mib_per_s"].as_f64().unwrap(), "{row}");
            } else {
                // More than one link carried it: one alone is held to its cap.
                assert!(
                    links > 1.1 * cap,
                    "plain HTTP over {n} links at {links} MiB/s: {row}"
                );
            }
            // The seeders' own processes, read from /proc in clock ticks (a short run may
            // round to none).
            for k in ["seeders_cpu_s_per_gib", "http_server_cpu_s_per_gib"] {
                let v = row[k].as_f64().unwrap_or_else(|| panic!("no {k} in {row}"));
                assert!(v >= 0.0 && v.is_finite(), "{k} = {v} in {row}");
            }
        }
        let fetched = r["dedup"]["fetched_bytes"].as_u64().unwrap();
        assert!(fetched < 8 << 20, "version 2 fetched {fetched} bytes");
    }

    /// `--rtt-ms` puts a round trip between the leecher and every seeder: no byte of the NAR
    /// comes out before one has passed, and the relay goes with the namespaces.
    #[test]
    fn netns_bench_adds_the_round_trip_asked_for() {
        let r = netns_bench(&["--rtt-ms", "300", "--seeders", "1", "--size-mib", "4"]);
        assert_eq!(r["rtt_ms"], 300);
        let row = &r["rows"][0];
        // The manifest and then the chunks are asked for: a round trip each, at least.
        let first = row["first_byte_ms"].as_f64().unwrap();
        assert!(
            first >= 300.0,
            "the first byte came after {first} ms: {row}"
        );
        let ratio = row["ratio_to_ideal"].as_f64().unwrap();
        assert!(ratio > 0.0 && ratio < 1.1, "{row}");
        // No other test starts a relay.
        let relays: Vec<_> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .filter(|c| c.split(|&b| b == 0).any(|a| a == b"bench-delay"))
            .collect();
        assert!(
            relays.is_empty(),
            "{} delay relays left running",
            relays.len()
        );
    }

    /// A signal to the benchmark's own process alone (`kill PID`, as `timeout` sends it), not
    /// to its process group as Ctrl-C is, ends it: its seeders and leecher are stopped and its
    /// namespaces deleted, where it used to go on to the end of the run.
    #[test]
    fn netns_bench_ends_on_a_signal_to_it_alone() {
        use std::io::{BufRead, BufReader, Read};
        assert!(peerix_bench::is_root(), "this test needs root");
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_peerix"))
            .args([
                "bench",
                "--mode",
                "netns",
                "--rate",
                "50mbit",
                "--seeders",
                "1",
            ])
            .args([
                "--size-mib",
                "32",
                "--state-dir",
                dir.path().to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running peerix bench");
        let pid = child.id();
        // Once the leecher's warm-up download has begun, every child of the run is up.
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut said = String::new();
        loop {
            let at = said.len();
            let n = err.read_line(&mut said).unwrap();
            assert!(n > 0, "the bench ended before it downloaded: {said}");
            if said[at..].starts_with("bench: warm-up download") {
                break;
            }
        }
        let kill = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
        err.read_to_string(&mut said).unwrap();
        let status = child.wait().unwrap();
        assert!(
            !status.success(),
            "the bench went on to the end after SIGTERM: {said}"
        );
        let left = namespaces_left_by(pid);
        assert!(left.is_empty(), "namespaces left behind: {left:?}");
    }
}
