//! Across the internet, behind NATs, with real Nix: a small internet in network namespaces
//! (see peerix-test-support's `internet`) with a public machine R that is the DHT's bootstrap
//! node and a relay, and two homes A and B, each behind its own NAT router. Neither home can
//! accept a connection; they share nothing but R.
//!
//! A holds a closure and a path of several MiB; B's Nix substitutes them through B's peerix.
//! What must happen on the way: R learns it is reachable (AutoNAT) and starts relaying; A
//! learns it is not, reserves a slot on R and announces its paths again with the relayed
//! address; B finds A in the DHT, reaches it through R, and the two punch a hole (DCUtR) and
//! move the chunks onto the direct connection. With B's NAT made symmetric no hole can be
//! punched: the transfer then goes through R, within R's limits; A says that hole punching
//! failed and B's status shows its connection to A as relayed.
//!
//! Each test prints the figures the README shows: time to the first paths (the small closure,
//! which includes finding A and connecting) and throughput of the big path, direct or relayed,
//! and the bytes that crossed the relay's interface.

mod common;

use std::time::{Duration, Instant};

use common::internet::{Internet, RELAY_IP};
use common::pair::{add_sized, sign};
use common::{Daemon, Nix};

/// The big path, in MiB: enough that where its bytes went shows plainly.
const BIG_MIB: usize = 8;

/// AutoNAT's verdicts and the relay's reservation take some seconds (the first probe waits for
/// connections to come up, see the node's behaviour); nothing here should take a minute.
const NAT_WAIT: Duration = Duration::from_secs(120);

/// The p2p addresses a daemon printed on its start line.
fn p2p_addrs(d: &Daemon) -> Vec<String> {
    let line = d
        .seen
        .iter()
        .find(|l| l.starts_with("peerix: serving Nix on"))
        .expect("start line");
    let addrs = line.split(", p2p on ").nth(1).unwrap();
    addrs
        .split_whitespace()
        .map(|a| {
            if a.contains("/p2p/") {
                a.to_owned()
            } else {
                format!("{a}/p2p/{}", d.peer_id)
            }
        })
        .collect()
}

/// `peerix status --json` of the daemon whose state is `state` (over its admin socket, which
/// a namespace does not hide).
fn status(nix: &Nix, name: &str) -> serde_json::Value {
    let state = nix.scratch(&format!("state-{name}"));
    let out = common::peerix_ok(&["status", "--json", "--state-dir", state.to_str().unwrap()]);
    serde_json::from_slice(&out).unwrap()
}

/// The whole story for one setting of B's NAT (see the top of the file); prints the figures.
fn run(symmetric_b: bool) {
    let net = Internet::create([false, symmetric_b]);
    let (r_nix, a_nix, b_nix) = (common::nix(), common::nix(), common::nix());
    r_nix.init_store();
    b_nix.init_store();

    // A's paths: a small closure and a big path, signed by A.
    let (a_sec, a_pub) = a_nix.keys("home-a-1");
    let closure = a_nix.build_closure("nat");
    let top = closure[0].clone();
    sign(&a_nix, &a_sec, &top);
    let paths = a_nix.closure(&top);
    let big = add_sized(&a_nix, &a_sec, "nat-big", BIG_MIB);

    // R: public, the bootstrap node and the relay, with room for the big path in a circuit.
    let tcp = format!("/ip4/{RELAY_IP}/tcp/0");
    let quic = format!("/ip4/{RELAY_IP}/udp/0/quic-v1");
    let mut r = Daemon::start_in(
        Some(&net.relay),
        "R",
        &r_nix,
        &[
            "--p2p-listen",
            &tcp,
            &quic,
            "--relay-circuit-bytes",
            "64MiB",
        ],
    );
    let bootstrap = p2p_addrs(&r);
    assert_eq!(
        bootstrap.len(),
        2,
        "R listens on TCP and QUIC: {bootstrap:?}"
    );
    let home_args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "--p2p-listen",
            "/ip4/0.0.0.0/tcp/0",
            "/ip4/0.0.0.0/udp/0/quic-v1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for b in &bootstrap {
            v.extend(["--bootstrap".to_owned(), b.clone()]);
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let a_args = home_args(&["--private-key", a_sec.to_str().unwrap()]);
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let mut a = Daemon::start_in(Some(&net.homes[0]), "A", &a_nix, &a_args);
    assert!(a.wait_scan() >= 4);
    let b_args = home_args(&["--trusted-key", &a_pub]);
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let mut b = Daemon::start_in(Some(&net.homes[1]), "B", &b_nix, &b_args);

    // R is confirmed reachable by the homes' dial-backs, and relays from then on.
    r.wait_for_within(NAT_WAIT, "R's reachability", |l| {
        l.contains("reachability: public")
    });
    // A is behind NAT, holds a reservation on R, and its records in the DHT now carry the
    // relayed address.
    a.wait_for_within(NAT_WAIT, "A's reachability", |l| {
        l.contains("reachability: private")
    });
    a.wait_for_within(NAT_WAIT, "A's reservation on R", |l| {
        l.contains(&format!("reachable through relay {}", r.peer_id))
    });
    a.wait_for_within(
        NAT_WAIT,
        "A's announcements with the relayed address",
        |l| l.contains("announced again, with the relayed address"),
    );

    // B's Nix substitutes `top` (whose closure is `paths`) through B; how long it took.
    let url = b.url();
    let substitute = |top: &str, paths: &[String]| {
        let t = Instant::now();
        let out = b_nix.realise_in(Some(&net.homes[1]), top, &url, &a_pub);
        assert!(
            out.status.success(),
            "B's Nix could not substitute {top}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let took = t.elapsed();
        assert_eq!(b_nix.nar_hashes(paths), a_nix.nar_hashes(paths));
        took
    };
    let before = net.relay_bytes();
    let first_paths = substitute(&top, &paths);

    let direct = !symmetric_b;
    let punch = if direct {
        b.wait_for_within(NAT_WAIT, "a hole punched to A", |l| {
            l.contains(&format!("hole punched: direct connection to {}", a.peer_id))
        })
    } else {
        // The side that accepted the relayed connection leads the hole punch, and says when
        // it gives up.
        a.wait_for_within(NAT_WAIT, "hole punching to B failing", |l| {
            l.contains(&format!("hole punching to {} failed", b.peer_id))
        })
    };
    eprintln!("nat: {punch}");

    let mid = net.relay_bytes();
    let big_time = substitute(&big, std::slice::from_ref(&big));
    let after = net.relay_bytes();

    // What B says of its connection to A, and R of the circuits it relayed.
    let st = status(&b_nix, "B");
    let d = &st["daemon"];
    let peer_a = d["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == a.peer_id.as_str())
        .unwrap_or_else(|| panic!("B is not connected to A: {d}"));
    assert_eq!(
        peer_a["relayed"].as_bool().unwrap(),
        !direct,
        "B's connection to A: {peer_a}"
    );
    assert!(
        d["reachability"].as_str().unwrap().starts_with("private"),
        "{d}"
    );
    let r_st = status(&r_nix, "R");
    assert!(
        r_st["daemon"]["nat"]["relay_circuits_total"]
            .as_u64()
            .unwrap()
            >= 1,
        "R relayed no circuit: {}",
        r_st["daemon"]
    );

    let (relay_big, relay_all) = (after - mid, after - before);
    let big_bytes = (BIG_MIB as u64) << 20;
    if direct {
        assert!(
            relay_big < big_bytes / 8,
            "{relay_big} bytes of an {BIG_MIB} MiB path went through the relay after the hole was punched"
        );
    } else {
        assert!(
            relay_big > big_bytes,
            "only {relay_big} bytes through the relay for an {BIG_MIB} MiB path, with no hole punched"
        );
    }
    eprintln!(
        "nat: {}: closure in {:.2} s, {BIG_MIB} MiB path in {:.2} s ({:.1} MiB/s); through the relay: {:.1} KiB during the big path, {:.1} KiB in all",
        if direct { "hole punched, direct" } else { "symmetric NAT, relayed" },
        first_paths.as_secs_f64(),
        big_time.as_secs_f64(),
        BIG_MIB as f64 / big_time.as_secs_f64(),
        relay_big as f64 / 1024.0,
        relay_all as f64 / 1024.0,
    );
}

mod needs_root {
    use super::*;

    /// Two homes behind ordinary NATs: the connection becomes direct and the big path does
    /// not go through the relay.
    #[test]
    fn two_homes_behind_nat_punch_a_hole_and_substitute_directly() {
        run(false);
    }

    /// B behind a symmetric NAT: no hole can be punched; A says so, and the paths come
    /// through the relay, within its limits.
    #[test]
    fn behind_a_symmetric_nat_the_paths_come_through_the_relay() {
        run(true);
    }
}
