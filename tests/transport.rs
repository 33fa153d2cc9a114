//! What a NAR travels over between two daemons. A daemon listens on TCP and QUIC by default,
//! and a dial to both of a peer's addresses at once most often ends over QUIC; QUIC costs about
//! twice the CPU per byte that TCP, TLS and yamux do here, on both ends, and keeps a capped
//! link less full (README, Benchmarks). So a daemon that reached a peer over QUIC dials it over
//! TCP as well, and new streams take the TCP connection.

mod common;

mod needs_root {
    use super::common::netns::Netns;
    use super::common::pair::add_sized;
    use super::common::{self, Daemon};

    /// UDP datagrams received in namespace `netns` so far (`InDatagrams` of /proc/net/snmp).
    fn udp_datagrams_in(netns: &str) -> u64 {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", netns, "cat", "/proc/net/snmp"])
            .output()
            .unwrap();
        assert!(out.status.success(), "/proc/net/snmp in {netns}");
        let text = String::from_utf8(out.stdout).unwrap();
        // Two lines per protocol: the field names, then their values.
        let mut udp = text.lines().filter(|l| l.starts_with("Udp: "));
        let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
        let at = names
            .split_whitespace()
            .position(|n| n == "InDatagrams")
            .unwrap();
        values.split_whitespace().nth(at).unwrap().parse().unwrap()
    }

    /// The QUIC address `d` listens on, from its start line.
    fn quic_address(d: &Daemon) -> String {
        d.seen
            .iter()
            .find_map(|l| l.strip_prefix("peerix: serving Nix on "))
            .and_then(|l| l.split_whitespace().find(|a| a.contains("/quic-v1/")))
            .unwrap_or_else(|| panic!("{}: no QUIC address in {:?}", d.name, d.seen))
            .to_owned()
    }

    #[test]
    fn a_peer_reached_over_quic_is_sent_the_nar_over_tcp() {
        assert!(peerix_bench::is_root(), "needs root: network namespaces");
        let ns = Netns::create("q");
        let [srv, cli] = &ns.names;
        let a_nix = common::nix();
        let (a_sec, a_pub) = a_nix.keys("peer-a-1");
        let path = add_sized(&a_nix, &a_sec, "tcp-or-quic", 16);
        let mut a = Daemon::start_in(
            Some(srv),
            "A",
            &a_nix,
            &[
                "--private-key",
                a_sec.to_str().unwrap(),
                "--p2p-listen",
                "/ip4/10.231.0.1/tcp/0",
                "/ip4/10.231.0.1/udp/0/quic-v1",
            ],
        );
        a.wait_scan();
        let b_nix = common::nix();
        b_nix.init_store();
        // B knows A by its QUIC address alone, where a dial to both most often ends.
        let mut b = Daemon::start_logging(
            Some(cli),
            "B",
            &b_nix,
            &[
                "--trusted-key",
                &a_pub,
                "--peer",
                &quic_address(&a),
                "--p2p-listen",
                "/ip4/10.231.0.2/tcp/0",
                "/ip4/10.231.0.2/udp/0/quic-v1",
            ],
            Some("peerix_swarm::node::event_loop=debug"),
        );
        b.wait_peer(&a);
        // The TCP port comes with A's identification over QUIC.
        b.wait_for("a TCP connection to A", |l| {
            l.contains("connection established")
                && l.contains(&a.peer_id)
                && l.contains("addr=/ip4/10.231.0.1/tcp/")
        });
        let before = udp_datagrams_in(cli);
        let out = b_nix.realise_in(Some(cli), &path, &b.url(), &a_pub);
        assert!(
            out.status.success(),
            "Nix could not substitute {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let paths = std::slice::from_ref(&path);
        assert_eq!(b_nix.nar_hashes(paths), a_nix.nar_hashes(paths));
        // Over TCP, QUIC carries its keep-alives alone (2 or 3 datagrams in this test's runs);
        // with half the requests over QUIC, B received 519 and 705 (GRO hands on several QUIC
        // packets as one).
        let datagrams = udp_datagrams_in(cli) - before;
        assert!(
            datagrams < 50,
            "B received {datagrams} UDP datagrams while Nix substituted 16 MiB"
        );
    }
}
