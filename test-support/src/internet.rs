//! A small internet in network namespaces the test makes: a public network (a bridge in its
//! own namespace, 10.77.0.0/24) with a `relay` machine at [`RELAY_IP`], and two homes, each a
//! router namespace doing NAT (iptables MASQUERADE) between the public network and a home
//! network 192.168.N.0/24 with one machine at 192.168.N.2. A home can be made a symmetric NAT
//! (`--random-fully`: every flow gets a new public port, so hole punching cannot work).
//! Namespace and interface names carry the test process's id, so parallel tests do not meet;
//! everything is deleted when dropped.
//!
//! ```text
//!  home-a ── router-a (NAT, 10.77.0.1) ─┐
//!                                       ├─ bridge ── relay (10.77.0.10)
//!  home-b ── router-b (NAT, 10.77.0.2) ─┘
//! ```

use std::process::Command;

/// The relay machine's address on the public network.
pub const RELAY_IP: &str = "10.77.0.10";

pub struct Internet {
    /// The public machine's namespace (bootstrap node and relay run here).
    pub relay: String,
    /// The machines behind the NATs.
    pub homes: [String; 2],
    /// The routers' public addresses.
    pub router_ips: [String; 2],
    relay_dev: String,
    namespaces: Vec<String>,
}

fn run(program: &str, args: &[&str]) {
    let st = Command::new(program)
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(st.success(), "{program} {args:?}");
}

fn ip(args: &[&str]) {
    run("ip", args);
}

fn in_ns(ns: &str, program: &str, args: &[&str]) {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all);
}

/// A veth pair between two namespaces, each end with its name.
fn link(a: &str, ns_a: &str, b: &str, ns_b: &str) {
    ip(&[
        "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b,
    ]);
    ip(&["-n", ns_a, "link", "set", a, "up"]);
    ip(&["-n", ns_b, "link", "set", b, "up"]);
}

impl Internet {
    /// The internet; `symmetric[i]` makes home i's NAT symmetric.
    pub fn create(symmetric: [bool; 2]) -> Internet {
        let id = std::process::id();
        let ns = |role: &str| format!("px-{role}-{id}");
        // Interface names are at most 15 bytes: a letter for the link, one for the end.
        let dev = |l: char, end: u8| format!("x{l}{end}{id}");
        let inet = ns("inet");
        let relay = ns("relay");
        let routers = [ns("rta"), ns("rtb")];
        let homes = [ns("homea"), ns("homeb")];
        let mut namespaces = vec![inet.clone(), relay.clone()];
        namespaces.extend(routers.iter().cloned());
        namespaces.extend(homes.iter().cloned());
        let net = Internet {
            relay: relay.clone(),
            homes: homes.clone(),
            router_ips: ["10.77.0.1".into(), "10.77.0.2".into()],
            relay_dev: dev('r', 0),
            namespaces: namespaces.clone(),
        };
        for n in &namespaces {
            ip(&["netns", "add", n]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        let bridge = "br0";
        ip(&["-n", &inet, "link", "add", bridge, "type", "bridge"]);
        ip(&["-n", &inet, "link", "set", bridge, "up"]);

        link(&dev('r', 0), &relay, &dev('r', 1), &inet);
        ip(&["-n", &inet, "link", "set", &dev('r', 1), "master", bridge]);
        ip(&[
            "-n",
            &relay,
            "addr",
            "add",
            &format!("{RELAY_IP}/24"),
            "dev",
            &dev('r', 0),
        ]);

        for (i, (router, home)) in routers.iter().zip(&homes).enumerate() {
            let (outer, inner) = (['a', 'b'][i], ['c', 'd'][i]);
            let lan = format!("192.168.{}", i + 1);
            // The router's public side, on the bridge.
            link(&dev(outer, 0), router, &dev(outer, 1), &inet);
            ip(&["-n", &inet, "link", "set", &dev(outer, 1), "master", bridge]);
            ip(&[
                "-n",
                router,
                "addr",
                "add",
                &format!("{}/24", net.router_ips[i]),
                "dev",
                &dev(outer, 0),
            ]);
            // The home network: the router at .1, the machine at .2, routed out through it.
            link(&dev(inner, 0), router, &dev(inner, 1), home);
            ip(&[
                "-n",
                router,
                "addr",
                "add",
                &format!("{lan}.1/24"),
                "dev",
                &dev(inner, 0),
            ]);
            ip(&[
                "-n",
                home,
                "addr",
                "add",
                &format!("{lan}.2/24"),
                "dev",
                &dev(inner, 1),
            ]);
            ip(&[
                "-n",
                home,
                "route",
                "add",
                "default",
                "via",
                &format!("{lan}.1"),
            ]);
            in_ns(router, "sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
            let mut nat = vec![
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                &dev(outer, 0),
                "-j",
                "MASQUERADE",
            ]
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
            if symmetric[i] {
                nat.push("--random-fully".into());
            }
            let nat: Vec<&str> = nat.iter().map(String::as_str).collect();
            in_ns(router, "iptables", &nat);
            // Nothing from outside gets in unless it answers a flow from inside, and what does
            // not is dropped without a word, as a home router's firewall does. (A router that
            // took an early hole-punching packet to its own address kept a connection-tracking
            // entry for it, and the home's own packet of that flow then left from another
            // port: no hole could ever be punched.)
            for chain in ["INPUT", "FORWARD"] {
                in_ns(
                    router,
                    "iptables",
                    &[
                        "-A",
                        chain,
                        "-i",
                        &dev(outer, 0),
                        "-m",
                        "conntrack",
                        "!",
                        "--ctstate",
                        "ESTABLISHED,RELATED",
                        "-j",
                        "DROP",
                    ],
                );
            }
        }
        net
    }

    /// Bytes through the relay machine's one interface, both ways, as the kernel counts them
    /// (every header too): all the relayed traffic, and the relay's own.
    pub fn relay_bytes(&self) -> u64 {
        ["rx_bytes", "tx_bytes"]
            .iter()
            .map(|f| crate::netns::counter(&self.relay, &self.relay_dev, f))
            .sum()
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        // A namespace takes its interfaces (and their veth peers) with it.
        for n in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}
