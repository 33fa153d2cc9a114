//! Big paths with real Nix: a NAR of hundreds of MiB arrives whole when the peer it comes from
//! restarts in the middle, and the receiving daemon's memory stays flat.
//! `PEERIX_BIG_MIB` sets the size (README: the multi-GiB command).

mod common;

use common::pair::{add_sized, pair_with, restart_on_same_port};

/// Peak resident memory of a process so far, in bytes.
fn peak_rss(pid: u32) -> u64 {
    common::proc_memory(pid, "VmHWM")
}

mod needs_nix {
    use super::*;

    use common::pair::{assert_substitutes, sign};
    use common::Daemon;

    /// A is killed with SIGKILL and started again (same identity, same port) while B is in the
    /// middle of substituting a big path only A holds: the path still arrives whole, because B
    /// dials A again and goes on, or Nix's retry resumes from the chunks B kept.
    #[test]
    fn a_big_path_arrives_whole_when_its_peer_restarts_mid_way() {
        let mib: usize = std::env::var("PEERIX_BIG_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256);
        let mut big = None;
        let Some(mut p) = pair_with("big-restart", &[], |nix, key| {
            big = Some(add_sized(nix, key, "big-restart", mib))
        }) else {
            return;
        };
        let big = big.unwrap();
        let idle = peak_rss(p.b.child.id());
        // Nix reaches B through a proxy that says when an eighth of the NAR has gone by.
        let proxy = common::counting_proxy(&p.b.http, (mib as u64) << 17);
        let (b_nix_store, url, key) = (
            p.b_nix.store_arg(),
            format!("http://{}", proxy.addr),
            p.b_key.1.clone(),
        );
        let nix = std::thread::scope(|s| {
            let realise = s.spawn(|| p.b_nix.realise(&big, &url, &key));
            // A goes away at that moment, in the middle of the transfer.
            proxy
                .reached
                .recv_timeout(common::WAIT * 4)
                .expect("B never got going");
            assert!(!realise.is_finished(), "Nix finished before A was killed");
            restart_on_same_port(&mut p.a, &p.a_nix, &p.a_args);
            realise.join().unwrap()
        });
        assert!(
            nix.status.success(),
            "Nix could not substitute {big} ({b_nix_store}): {}",
            String::from_utf8_lossy(&nix.stderr)
        );
        let one = std::slice::from_ref(&big);
        assert_eq!(p.b_nix.nar_hashes(one), p.a_nix.nar_hashes(one));
        let rss = peak_rss(p.b.child.id());
        let retries = String::from_utf8_lossy(&nix.stderr)
            .matches("retrying")
            .count();
        eprintln!(
            "big path: {mib} MiB across a restart of A; Nix retried {retries} times; B's peak \
             RSS {} MiB ({} MiB before the download)",
            rss >> 20,
            idle >> 20
        );
        for l in p.b.seen.iter().filter(|l| {
            l.contains("request failed")
                || l.contains("connection closed")
                || l.contains("dropping")
        }) {
            eprintln!("B: {l}");
        }
    }

    /// Three peers hold the same big path (each its own Nix store, all signing with the key B
    /// trusts); B substitutes it from all three at once, whole, in flat memory.
    #[test]
    fn a_big_path_arrives_whole_from_three_peers() {
        let mib: usize = std::env::var("PEERIX_BIG_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(128);
        let mut big = None;
        let mut key = None;
        let Some(mut p) = pair_with("big-three", &[], |nix, k| {
            big = Some(add_sized(nix, k, "big-three", mib));
            key = Some(k.to_owned());
        }) else {
            return;
        };
        let (big, key) = (big.unwrap(), key.unwrap());
        let mut others = vec![];
        for name in ["C", "D"] {
            let nix = common::nix();
            assert_eq!(add_sized(&nix, &key, "big-three", mib), big);
            sign(&nix, &key, &big);
            let mut d = Daemon::start(
                name,
                &nix,
                &["--private-key", key.to_str().unwrap(), "--peer", &p.a.p2p],
            );
            d.wait_scan();
            others.push((nix, d));
        }
        // B meets C and D through explicit dials of its own: restart it with all three.
        for (_, d) in &others {
            p.b_args.extend(["--peer".to_owned(), d.p2p.clone()]);
        }
        p.kill_and_restart_b();
        for (_, d) in &others {
            p.b.wait_peer(d);
        }
        let one = std::slice::from_ref(&big);
        assert_substitutes(&p.b_nix, &p.a_nix, &big, &p.b.url(), &p.b_key.1, one);
        let rss = peak_rss(p.b.child.id());
        eprintln!(
            "big path: {mib} MiB from three peers; B's peak RSS {} MiB",
            rss >> 20
        );
        // Every peer took part.
        let (_, metrics) = common::http(&p.b.http, "GET", "/metrics");
        let metrics = String::from_utf8_lossy(&metrics);
        for id in [&p.a.peer_id, &others[0].1.peer_id, &others[1].1.peer_id] {
            assert!(
                metrics
                    .lines()
                    .any(|l| l.starts_with("peerix_peer_received_bytes") && l.contains(id.as_str())),
                "nothing came from {id}:\n{metrics}"
            );
        }
    }
}
