//! `peerix bench --mode netns`: every seeder and the leecher in a network namespace of its own,
//! joined by veths to a bridge in a hub namespace, each seeder's uplink capped with `tc tbf`.
//! Root only. Nothing is configured outside the namespaces created here; a guard deletes them.

use clap::ValueEnum;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use peerix_swarm::{Catalog, ServeLimits, Server};

use crate::{BenchArgs, Report, SeedFrom};

/// `peerix bench-node`'s flags: one seeder, in the namespace it was started in.
#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    #[arg(long)]
    pub state_dir: PathBuf,
    #[arg(long)]
    pub size_mib: u64,
    #[arg(long, value_enum)]
    pub seed_from: SeedFrom,
    /// The address to listen on (this namespace's).
    #[arg(long)]
    pub ip: String,
    /// What to listen on.
    #[arg(long, value_enum, default_value_t = crate::Transport::Tcp)]
    pub transport: crate::Transport,
}

fn sh(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The namespaces and processes of one benchmark; dropping it kills and deletes them all.
struct Lab {
    namespaces: Vec<String>,
    children: Vec<Child>,
    pids: Pids,
}

/// The lab's processes not yet reaped, for a signal to stop. Once reaped, a pid may be another
/// process's: a child leaves this list (under its lock) before it is waited for.
#[derive(Clone, Default)]
struct Pids(Arc<Mutex<Vec<u32>>>);

impl Pids {
    fn add(&self, pid: u32) {
        self.0.lock().expect("pids lock").push(pid);
    }

    fn remove(&self, pid: u32) {
        self.0.lock().expect("pids lock").retain(|p| *p != pid);
    }

    fn clear(&self) {
        self.0.lock().expect("pids lock").clear();
    }
}

/// Ctrl-C reaches the whole process group: the seeders and the leecher die, and this process,
/// which catches the signal, fails on and cleans up through `Lab`'s drop. A signal to this
/// process alone (`kill PID`, `timeout`) would leave the benchmark running to its end: on one,
/// the children in `pids` are stopped, to the same end.
fn stop_children_on_signal(pids: Pids) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let (mut int, mut term) = {
        let _rt = rt.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        )
    };
    std::thread::Builder::new()
        .name("bench-signals".into())
        .spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
            for &pid in pids.0.lock().expect("pids lock").iter() {
                // SAFETY: kill only sends a signal, to a child not yet reaped (see `Pids`).
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
            }
        })?;
    Ok(())
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.pids.clear();
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting a namespace deletes its veth ends, and with them their peers.
        for ns in self.namespaces.iter().rev() {
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

impl Lab {
    fn add_ns(&mut self, name: String) -> Result<()> {
        sh(&["ip", "netns", "add", &name])?;
        self.namespaces.push(name.clone());
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"])
    }

    /// Namespace `ns`, wired to the hub's bridge, with address 10.233.0.`host`.
    fn attach(&mut self, hub: &str, ns: &str, i: usize, host: usize) -> Result<()> {
        let port = format!("p{i}");
        sh(&[
            "ip", "-n", hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
            ns,
        ])?;
        sh(&["ip", "-n", hub, "link", "set", &port, "master", "br0", "up"])?;
        let addr = format!("10.233.0.{host}/24");
        sh(&["ip", "-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
        sh(&["ip", "-n", ns, "link", "set", "eth0", "up"])
    }

    /// Start `exe args` in namespace `ns`, killed with the lab; what it prints. Its stdin is
    /// kept open: the `peerix bench-*` helpers run until it closes.
    fn start(&mut self, ns: &str, exe: &Path, args: &[&OsStr], what: &str) -> Result<ChildStdout> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let stdout = child.stdout.take().expect("piped");
        self.pids.add(child.id());
        self.children.push(child);
        Ok(stdout)
    }
}

pub fn outer(args: &BenchArgs) -> Result<Report> {
    if !crate::is_root() {
        bail!("--mode netns needs root (it creates network namespaces)");
    }
    let max_n = *args.seeders.iter().max().context("--seeders")?;
    if max_n > 200 {
        bail!("at most 200 seeders in netns mode");
    }
    rate_mib_per_s(&args.rate)?;
    let exe = std::env::current_exe().context("finding the peerix binary")?;
    let tmp;
    let dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new().prefix("peerix-bench").tempdir()?;
            tmp.path().to_owned()
        }
    };
    std::fs::create_dir_all(&dir)?;
    let pids = Pids::default();
    stop_children_on_signal(pids.clone())?;
    let pid = std::process::id();
    let mut lab = Lab {
        namespaces: vec![],
        children: vec![],
        pids,
    };
    let hub = format!("pxb{pid}-hub");
    lab.add_ns(hub.clone())?;
    sh(&["ip", "-n", &hub, "link", "add", "br0", "type", "bridge"])?;
    sh(&["ip", "-n", &hub, "link", "set", "br0", "up"])?;
    let leecher_ns = format!("pxb{pid}-l");
    lab.add_ns(leecher_ns.clone())?;
    lab.attach(&hub, &leecher_ns, 0, 1)?;
    // A bucket of 10 ms at the cap (at least 64 KiB, a TSO segment): what a real link's
    // shaper lets through at once. A 4 KiB bucket made the kernel release the link a few
    // packets per timer tick, and a plain HTTP transfer reached only ~0.7 of the cap.
    let burst = ((rate_mib_per_s(&args.rate)? * crate::MIB / 100.0) as u64)
        .max(64 << 10)
        .to_string();
    eprintln!("bench: starting {max_n} seeder(s), each chunking the NAR…");
    let mut pending = vec![];
    for i in 0..max_n {
        let ns = format!("pxb{pid}-s{i}");
        lab.add_ns(ns.clone())?;
        lab.attach(&hub, &ns, i + 1, i + 2)?;
        sh(&[
            "ip", "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate",
            &args.rate, "burst", &burst, "latency", "400ms",
        ])?;
        let ip = format!("10.233.0.{}", i + 2);
        let (state, size, from, transport) = (
            dir.join(format!("seeder-{i}")),
            args.size_mib.to_string(),
            flag_value(args.seed_from),
            flag_value(args.transport),
        );
        let node_args: Vec<&OsStr> = vec![
            "bench-node".as_ref(),
            "--state-dir".as_ref(),
            state.as_os_str(),
            "--size-mib".as_ref(),
            size.as_ref(),
            "--ip".as_ref(),
            ip.as_ref(),
            "--seed-from".as_ref(),
            from.as_ref(),
            "--transport".as_ref(),
            transport.as_ref(),
        ];
        pending.push(lab.start(&ns, &exe, &node_args, "a seeder")?);
    }
    let (mut addrs, mut http) = (vec![], vec![]);
    for stdout in pending {
        let mut lines = BufReader::new(stdout).lines();
        let mut next = |what: &str| -> Result<String> {
            let l = lines.next().context("a seeder exited")??;
            l.strip_prefix(what)
                .map(str::to_owned)
                .with_context(|| format!("a seeder said {l:?}, not {what}…"))
        };
        addrs.push(next("peer ")?);
        http.push(next("http ")?);
    }
    if args.rtt_ms > 0 {
        (addrs, http) = delayed(&mut lab, &exe, &leecher_ns, args.rtt_ms, &addrs, &http)?;
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &leecher_ns])
        .arg(&exe)
        .args(["bench", "--mode", "netns", "--json", "--rate", &args.rate])
        .args(["--rtt-ms", &args.rtt_ms.to_string()])
        .arg("--seeders")
        .arg(
            args.seeders
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(","),
        )
        .args(["--size-mib", &args.size_mib.to_string()])
        .args(["--seed-from", &flag_value(args.seed_from)])
        .args(["--transport", &flag_value(args.transport)])
        .args(["--wire-compression", &flag_value(args.wire_compression)])
        .arg("--state-dir")
        .arg(dir.join("leecher"))
        .arg("--inner-seeders")
        .arg(addrs.join(","))
        .arg("--inner-http")
        .arg(http.join(","))
        // `ip netns exec` execs the seeder: its pid is the seeder's.
        .arg("--inner-seeder-pids")
        .arg(
            lab.children
                .iter()
                .map(|c| c.id().to_string())
                .collect::<Vec<_>>()
                .join(","),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut leecher = cmd.spawn().context("running the leecher")?;
    lab.pids.add(leecher.id());
    let mut stdout = vec![];
    let read = leecher
        .stdout
        .take()
        .expect("piped")
        .read_to_end(&mut stdout);
    lab.pids.remove(leecher.id());
    let status = leecher.wait().context("waiting for the leecher")?;
    read.context("reading the leecher's output")?;
    if !status.success() {
        bail!("the leecher failed ({status})");
    }
    let report: Report = serde_json::from_slice(&stdout).context("reading the leecher's report")?;
    drop(lab);
    Ok(report)
}

/// Start `peerix bench-delay` in the leecher's namespace, in front of every seeder's peer
/// address and HTTP server; the addresses the leecher is to use instead.
fn delayed(
    lab: &mut Lab,
    exe: &Path,
    leecher_ns: &str,
    rtt_ms: u64,
    addrs: &[String],
    http: &[String],
) -> Result<(Vec<String>, Vec<String>)> {
    let mut urls: Vec<reqwest::Url> = vec![];
    for u in http {
        urls.push(u.parse().context("a seeder's HTTP address")?);
    }
    let mut to = vec![];
    for a in addrs {
        let at = a
            .parse()
            .ok()
            .and_then(|a| peerix_swarm::node::tcp_socket_of(&a))
            .with_context(|| format!("seeder address {a} is not a TCP one"))?;
        to.push(at.to_string());
    }
    for url in &urls {
        let at = url
            .socket_addrs(|| None)?
            .into_iter()
            .next()
            .context("a seeder's HTTP address")?;
        to.push(at.to_string());
    }
    let (rtt, to) = (rtt_ms.to_string(), to.join(","));
    let delay_args: Vec<&OsStr> = vec![
        "bench-delay".as_ref(),
        "--rtt-ms".as_ref(),
        rtt.as_ref(),
        "--to".as_ref(),
        to.as_ref(),
    ];
    let stdout = lab.start(leecher_ns, exe, &delay_args, "the delay relay")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut listen = || -> Result<std::net::SocketAddr> {
        let l = lines.next().context("the delay relay exited")??;
        l.strip_prefix("listen ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("the delay relay said {l:?}"))
    };
    let mut relayed = vec![];
    for a in addrs {
        let at = listen()?;
        let peer = a
            .parse()
            .ok()
            .and_then(|a| peerix_swarm::node::peer_of(&a))
            .with_context(|| format!("seeder address {a} names no peer"))?;
        relayed.push(format!("/ip4/{}/tcp/{}/p2p/{peer}", at.ip(), at.port()));
    }
    let mut relayed_http = vec![];
    for mut url in urls {
        let at = listen()?;
        url.set_ip_host(at.ip())
            .map_err(|()| anyhow::anyhow!("setting the relay's address"))?;
        url.set_port(Some(at.port()))
            .map_err(|()| anyhow::anyhow!("setting the relay's port"))?;
        relayed_http.push(url.to_string());
    }
    Ok((relayed, relayed_http))
}

/// `peerix bench-node`: a seeder holding both versions of the benchmark NAR; prints
/// `peer <multiaddr>` and `http <url>`, then serves until its stdin closes.
pub fn node(args: NodeArgs) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let s =
                crate::seed(&args.state_dir, args.size_mib * 1024 * 1024, args.seed_from).await?;
            let catalog: Arc<dyn Catalog> = Arc::new(s.catalog);
            let node = crate::start_node(
                args.state_dir.join("node"),
                &args.transport.listen(&args.ip),
                vec![],
            )
            .await?;
            let server = Server::new(s.store, catalog, ServeLimits::default());
            let serving = tokio::spawn(server.run(node.stream_control())?);
            let (url, http) = crate::http_server(s.nar_file, &format!("{}:0", args.ip)).await?;
            println!("peer {}", args.transport.dialled(&node)?);
            println!("http {url}");
            // Serve until the benchmark lets go of our stdin.
            let mut sink = Vec::new();
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
            serving.abort();
            http.abort();
            Ok(())
        })
}

/// How `v` is written on the command line, for the processes this mode starts.
fn flag_value(v: impl ValueEnum) -> String {
    v.to_possible_value()
        .expect("every value has a name")
        .get_name()
        .to_owned()
}

/// A `tc` rate (`100mbit`, `50mbit`, `1gbit`, `800kbit`, `10mbps`) in MiB/s.
pub fn rate_mib_per_s(rate: &str) -> Result<f64> {
    let r = rate.trim().to_ascii_lowercase();
    let digits = r
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(r.len());
    let (num, unit) = r.split_at(digits);
    let num: f64 = num.parse().with_context(|| format!("rate {rate}"))?;
    let bits_per_s = match unit {
        "bit" | "" => num,
        "kbit" => num * 1e3,
        "mbit" => num * 1e6,
        "gbit" => num * 1e9,
        "bps" => num * 8.0,
        "kbps" => num * 8e3,
        "mbps" => num * 8e6,
        "gbps" => num * 8e9,
        _ => bail!("rate {rate}: unknown unit {unit}"),
    };
    if bits_per_s <= 0.0 {
        bail!("rate {rate} is not positive");
    }
    Ok(bits_per_s / 8.0 / crate::MIB)
}
