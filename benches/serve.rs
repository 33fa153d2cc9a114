//! `peerix serve` through real Nix, against a plain static HTTP cache of the same closure on
//! the same loopback, in one run:
//! - time for `nix-store -r` of a closure (three small paths and a 96 MiB one) into a fresh
//!   store: from peer A through node B ("cold": B's chunk store is fresh each time), from B
//!   once it holds the chunks ("warm"), and from the static cache;
//! - narinfo latency on B for hits and misses (p50/p99);
//! - over a long path (`PEERIX_BENCH_RTT_MS`, default 100, added to the round trip by a relay in
//!   front of A and another in front of the static cache): time for `nix-store -r` of a closure
//!   of 41 small paths nine levels deep, where round trips rather than bytes set the time.
//!
//! Needs real Nix (chroot stores; not root); without it, it panics saying so.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, Nix, Relay};

/// A GET's status.
fn get(addr: &str, path: &str) -> u16 {
    common::http(addr, "GET", path).0
}

fn keygen(nix: &Nix, name: &str) -> (PathBuf, String) {
    let d = nix.scratch("keys");
    let (sk, pk) = (d.join(format!("{name}.sec")), d.join(format!("{name}.pub")));
    common::peerix_ok(&["keygen", name, sk.to_str().unwrap(), pk.to_str().unwrap()]);
    (sk.clone(), std::fs::read_to_string(pk).unwrap())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Substitute `paths` into a fresh chroot store from `url`; seconds taken.
fn substitute(url: &str, keys: &str, paths: &[String]) -> f64 {
    let c = common::nix();
    let store = c.store_arg();
    let mut args = vec!["--store", &store, "-r"];
    args.extend(paths.iter().map(String::as_str));
    args.extend([
        "--option",
        "substituters",
        url,
        "--option",
        "trusted-public-keys",
        keys,
    ]);
    let t = Instant::now();
    let out = c.output("nix-store", &args);
    let secs = t.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    secs
}

fn start_b(a: &Nix, name: &str, a_pub: &str, b_key: &Path, a_p2p: &str) -> Daemon {
    let mut b = Daemon::start(
        name,
        a,
        &[
            "--trusted-key",
            a_pub,
            "--private-key",
            b_key.to_str().unwrap(),
            "--peer",
            a_p2p,
            "--timeout",
            "5",
        ],
    );
    b.wait_for("a peer", |l| l.starts_with("peerix: peer connected"));
    b
}

fn main() {
    let a = common::nix();
    let store = a.store_arg();
    let tree = a.scratch("big");
    let data = peerix_test_support::rng::data(0x9e37_79b9_7f4a_7c15, 96 << 20);
    std::fs::write(tree.join("blob"), &data).unwrap();
    let big = a.add(&tree);
    let mut paths = a.build_closure("bench");
    paths.push(big.clone());
    let deep = a.build_deep_closure("bench-deep", 8, 5);
    let (a_key, a_pub) = keygen(&a, "bench-a-1");
    let (b_key, b_pub) = keygen(&a, "bench-b-1");
    let mut args = vec![
        "store",
        "sign",
        "--store",
        &store,
        "--key-file",
        a_key.to_str().unwrap(),
        "-r",
    ];
    args.extend(paths.iter().map(String::as_str));
    args.push(&deep);
    a.run("nix", &args);

    // The baseline: a static binary cache of the same paths, same loopback.
    let cache = a.scratch("static");
    let to = format!("file://{}?compression=none", cache.display());
    let mut args = vec!["copy", "--store", &store, "--to", &to];
    args.extend(paths.iter().map(String::as_str));
    args.push(&deep);
    a.run("nix", &args);
    let static_srv = common::serve_dir(&cache);

    let mut da = Daemon::start("A", &a, &["--private-key", a_key.to_str().unwrap()]);
    da.wait_scan();
    let keys = format!("{a_pub} {b_pub}");
    let fetch_all = |url: &str| -> f64 { substitute(url, &keys, &paths) };

    let runs = 3;
    let mut cold = vec![];
    let mut warm = vec![];
    let mut plain = vec![];
    for i in 0..runs {
        let b = start_b(&a, &format!("B{i}"), &a_pub, &b_key, &da.p2p);
        cold.push(fetch_all(&b.url()));
        warm.push(fetch_all(&b.url()));
        plain.push(fetch_all(&static_srv.url));
    }
    let size: u64 = {
        let mut args = vec!["path-info", "--store", &store, "--json"];
        args.extend(paths.iter().map(String::as_str));
        let v: serde_json::Value = serde_json::from_str(&a.run("nix", &args)).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p["narSize"].as_u64().unwrap())
            .sum()
    };
    let mib = size as f64 / 1048576.0;
    let (c, w, p) = (median(cold), median(warm), median(plain));
    println!(
        "closure: {} paths, {mib:.1} MiB of NARs; medians of {runs} runs, each into a fresh store",
        paths.len()
    );
    println!("| source | seconds | MiB/s | vs static cache |");
    println!("|---|---|---|---|");
    println!(
        "| static HTTP cache (baseline) | {p:.2} | {:.0} | 1.00 |",
        mib / p
    );
    println!(
        "| peerix, chunks from a peer (cold) | {c:.2} | {:.0} | {:.2}× the time |",
        mib / c,
        c / p
    );
    println!(
        "| peerix, chunks already held (warm) | {w:.2} | {:.0} | {:.2}× the time |",
        mib / w,
        w / p
    );

    // narinfo latency on a node connected to one peer.
    let b = start_b(&a, "Blat", &a_pub, &b_key, &da.p2p);
    let known: Vec<String> = paths
        .iter()
        .map(|p| p.trim_start_matches("/nix/store/")[..32].to_owned())
        .collect();
    for h in &known {
        assert_eq!(get(&b.http, &format!("/{h}.narinfo")), 200);
    }
    let mut hits = vec![];
    for i in 0..200 {
        let h = &known[i % known.len()];
        let t = Instant::now();
        assert_eq!(get(&b.http, &format!("/{h}.narinfo")), 200);
        hits.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let mut misses = vec![];
    for i in 0..200u32 {
        let h =
            peerix_nix::base32::encode(&peerix_nix::Sha256Hash::digest(&i.to_le_bytes()).0[..20]);
        let t = Instant::now();
        assert_eq!(get(&b.http, &format!("/{h}.narinfo")), 404);
        misses.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!("\nnarinfo latency on B (one peer connected), 200 requests each:");
    println!("| | p50 ms | p99 ms |");
    println!("|---|---|---|");
    println!(
        "| hit | {:.2} | {:.2} |",
        percentile(&mut hits, 0.5),
        percentile(&mut hits, 0.99)
    );
    println!(
        "| miss (distinct hashes) | {:.2} | {:.2} |",
        percentile(&mut misses, 0.5),
        percentile(&mut misses, 0.99)
    );
    drop(b);

    // Over a long path: B reaches A through a relay adding the round trip, and Nix reaches the
    // static cache through another; B's Nix store and chunk store are fresh each time.
    let rtt_ms: u64 = std::env::var("PEERIX_BENCH_RTT_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let rtt = Duration::from_millis(rtt_ms);
    let a_far = Relay::to(&da.p2p_socket(), rtt);
    let static_far = Relay::to(static_srv.url.trim_start_matches("http://"), rtt);
    let deep_paths = a.closure(&deep);
    let (mut far_peerix, mut far_plain, mut used) = (vec![], vec![], 0.0);
    for i in 0..runs {
        let b_nix = common::nix();
        b_nix.init_store();
        let b = start_b(
            &b_nix,
            &format!("Bfar{i}"),
            &a_pub,
            &b_key,
            &a_far.p2p_of(&da),
        );
        far_peerix.push(substitute(&b.url(), &keys, std::slice::from_ref(&deep)));
        used += b.counter("peerix_manifest_prefetches_used") as f64;
        far_plain.push(substitute(
            &format!("http://{}", static_far.at),
            &keys,
            std::slice::from_ref(&deep),
        ));
    }
    // Each run too: how many of a level's NARs Nix asks for at once varies from run to run.
    let runs_of = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (each_peerix, each_plain) = (runs_of(&far_peerix), runs_of(&far_plain));
    let (fp, fs) = (median(far_peerix), median(far_plain));
    println!(
        "\nover a {rtt_ms} ms round trip: a closure of {} small paths nine levels deep; medians \
         of {runs} runs, each into a fresh store",
        deep_paths.len()
    );
    println!("| source | seconds | vs static cache | each run |");
    println!("|---|---|---|---|");
    println!("| static HTTP cache (baseline) | {fs:.2} | 1.00 | {each_plain} |");
    println!(
        "| peerix, from a peer (cold) | {fp:.2} | {:.2}× the time | {each_peerix} |",
        fp / fs
    );
    println!(
        "NAR fetches that began with a manifest asked for with the narinfo: {:.0} per run",
        used / runs as f64
    );
    drop(da);
}
