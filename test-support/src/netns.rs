//! Two network namespaces the test makes, joined by a veth pair: `srv` at 10.231.0.1 and `cli`
//! at 10.231.0.2 (names carry the test process's id, so parallel tests do not meet). Deleted
//! when dropped.

use std::process::Command;

pub struct Netns {
    pub names: [String; 2],
    /// The veth ends: `srv`'s and `cli`'s.
    pub devs: [String; 2],
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().unwrap();
    assert!(st.success(), "ip {args:?}");
}

impl Netns {
    pub fn create(tag: &str) -> Netns {
        let id = std::process::id();
        let names = [format!("px-{tag}s-{id}"), format!("px-{tag}c-{id}")];
        // Interface names are at most 15 bytes.
        let devs = [format!("pxs{id}"), format!("pxc{id}")];
        let n = Netns {
            names: names.clone(),
            devs: devs.clone(),
        };
        let [srv, cli] = &names;
        let [va, vb] = &devs;
        ip(&["netns", "add", srv]);
        ip(&["netns", "add", cli]);
        ip(&[
            "link", "add", va, "netns", srv, "type", "veth", "peer", "name", vb, "netns", cli,
        ]);
        ip(&["-n", srv, "addr", "add", "10.231.0.1/24", "dev", va]);
        ip(&["-n", cli, "addr", "add", "10.231.0.2/24", "dev", vb]);
        for (ns, dev) in [(srv, va), (cli, vb)] {
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        n
    }

    /// Cap what `srv` sends to `cli` (`tc tbf`, e.g. `100mbit`).
    pub fn cap_uplink(&self, rate: &str) {
        let st = Command::new("ip")
            .args(["netns", "exec", &self.names[0], "tc", "qdisc", "add", "dev"])
            .args([&self.devs[0], "root", "tbf", "rate", rate])
            .args(["burst", "256kb", "latency", "50ms"])
            .status()
            .unwrap();
        assert!(st.success(), "tc tbf {rate}");
    }

    /// Bytes `cli` has received on its veth, as the kernel counts them (every header too).
    pub fn cli_rx_bytes(&self) -> u64 {
        counter(&self.names[1], &self.devs[1], "rx_bytes")
    }
}

/// An interface's counter (`rx_bytes`, `tx_bytes`, …) inside a namespace, as the kernel keeps
/// it: the honest count of what crossed the wire, every header too.
pub fn counter(netns: &str, dev: &str, name: &str) -> u64 {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "cat"])
        .arg(format!("/sys/class/net/{dev}/statistics/{name}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{dev}'s {name} in {netns}");
    String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}
