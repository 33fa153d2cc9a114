//! `peerix bench`: a self-contained multi-peer throughput benchmark.
//!
//! For each seeder count N, N seeder nodes holding a generated NAR and one leecher with a fresh
//! chunk store are started on loopback, connected, and the leecher downloads the NAR from all of
//! them. Reported: aggregate throughput, its ratio to N × the single-peer figure, its ratio to a
//! plain HTTP download of the same bytes in the same run, the time to the first byte, and how
//! much of a slightly changed second version had to be fetched (deduplication).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use peerix_chunkstore::{ChunkStore, Options};
use peerix_nix::{Sha256Hash, StorePath};
use peerix_swarm::{
    fetch_nar, Client, DownloadConfig, FetchRequest, Node, NodeConfig, NodeEvent, PeerId,
    WireConfig,
};
use serde::{Deserialize, Serialize};

mod cpu;
mod data;
pub mod delay;
mod http;
mod loopback;
pub mod netns;
mod report;

pub use data::{seed, store_path, NarGen, SeedFrom, Seeded};
use http::http_fetch;
pub use http::http_server;
use loopback::Local;
pub use report::{svg, table};

const MIB: f64 = 1024.0 * 1024.0;
const CONNECT_WAIT: Duration = Duration::from_secs(60);

/// Whether this process runs as root (effective uid 0): network namespaces, `tc` and Nix's
/// chroot-store sandbox need it.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// `--wire-compression`: the values of `peerix serve --wire-compression`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WireCompression {
    Auto,
    Always,
    Never,
}

impl From<WireCompression> for peerix_swarm::Compression {
    fn from(w: WireCompression) -> Self {
        match w {
            WireCompression::Auto => Self::Auto,
            WireCompression::Always => Self::Always,
            WireCompression::Never => Self::Never,
        }
    }
}

/// `--transport`: what the peer download runs over.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TCP, TLS 1.3 and yamux: the seeders listen on TCP alone.
    #[default]
    Tcp,
    /// QUIC (its own TLS 1.3 and streams): the seeders listen on QUIC alone.
    Quic,
    /// The seeders listen on TCP and QUIC, as a daemon does, and the leecher dials their QUIC
    /// addresses, as a dial to both at once most often ends.
    Both,
}

impl Transport {
    /// The addresses a node listens on at `ip`, with ports the OS picks.
    pub fn listen(self, ip: &str) -> Vec<String> {
        let (tcp, quic) = (
            format!("/ip4/{ip}/tcp/0"),
            format!("/ip4/{ip}/udp/0/quic-v1"),
        );
        match self {
            Self::Tcp => vec![tcp],
            Self::Quic => vec![quic],
            Self::Both => vec![tcp, quic],
        }
    }

    /// Which of `node`'s listen addresses the leecher dials.
    pub fn dialled(self, node: &Node) -> Result<String> {
        let quic = self != Self::Tcp;
        node.listen_addrs()
            .into_iter()
            .find(|a| peerix_swarm::node::is_quic(a) == quic)
            .map(|a| a.to_string())
            .context("the seeder listens on no address of its transport")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every node in this process, on 127.0.0.1.
    Loopback,
    /// Every node in its own network namespace, seeders' uplinks rate-limited (root only).
    Netns,
}

/// `peerix bench`'s flags.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Seeder counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    pub seeders: Vec<usize>,
    /// Size of the generated NAR in MiB (of its files' contents, when it is a store path).
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Where the seeders hold the NAR: a path of their Nix store read in place, as a daemon
    /// serves what Nix holds, or their chunk store's packs, as it serves what it downloaded
    /// or pinned.
    #[arg(long, value_enum, default_value_t = SeedFrom::Store)]
    pub seed_from: SeedFrom,
    /// Where the nodes run.
    #[arg(long, value_enum, default_value_t = Mode::Loopback)]
    pub mode: Mode,
    /// What the peer download runs over: the seeders listen on it alone.
    #[arg(long, value_enum, default_value_t = Transport::Tcp)]
    pub transport: Transport,
    /// Per-seeder uplink cap (netns mode only), as `tc` takes it: `100mbit`, `50mbit`, ….
    #[arg(long, default_value = "100mbit")]
    pub rate: String,
    /// A round trip added between the leecher and each seeder (netns mode only), in
    /// milliseconds: the delay of a path across the internet. Made in user space (this kernel
    /// has no `netem`), by a relay in the leecher's namespace; the HTTP baseline goes through it
    /// too.
    #[arg(long, default_value_t = 0)]
    pub rtt_ms: u64,
    /// Print the results as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// What the leecher asks the seeders for, as `peerix serve --wire-compression`.
    #[arg(long, value_enum, default_value_t = WireCompression::Auto)]
    pub wire_compression: WireCompression,
    /// Also write a chart of aggregate throughput against N to this SVG file.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Working directory (a temporary one, removed afterwards, by default).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// netns mode, inside the leecher's namespace: the seeders' addresses (internal).
    #[arg(long, hide = true, value_delimiter = ',')]
    pub inner_seeders: Vec<String>,
    /// netns mode, inside the leecher's namespace: each seeder's HTTP URL of the NAR, in the
    /// order of `--inner-seeders` (internal).
    #[arg(long, hide = true, value_delimiter = ',')]
    pub inner_http: Vec<String>,
    /// netns mode, inside the leecher's namespace: the seeders' process ids, for their CPU
    /// time (internal).
    #[arg(long, hide = true, value_delimiter = ',')]
    pub inner_seeder_pids: Vec<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Row {
    pub seeders: usize,
    /// Aggregate throughput of the peer download.
    pub mib_per_s: f64,
    /// `mib_per_s` / (N × the ideal per-peer figure).
    pub ratio_to_ideal: f64,
    /// The plain HTTP download of the same bytes, same link, same run.
    pub http_mib_per_s: f64,
    /// `mib_per_s` / `http_mib_per_s`.
    pub ratio_to_http: f64,
    /// netns mode: plain HTTP over the same N links at once, each of the N seeders' servers
    /// sending an equal range of the NAR over its own connection (at N = 1, the download of
    /// `http_mib_per_s`). A download over N links pays for its start and its end N times as
    /// much as one over a single link, in a download N times as short; this is what plain HTTP
    /// reaches with that handicap.
    #[serde(default)]
    pub http_links_mib_per_s: Option<f64>,
    /// From the start of the download to the first byte of the leecher's output.
    pub first_byte_ms: f64,
    /// The seeders' links idle at the end of the download, on average: from each one's last
    /// chunk to the end (the endgame's cost, and the NarHash check and commit after it).
    #[serde(default)]
    pub tail_ms: f64,
    pub elapsed_s: f64,
    /// Bytes each seeder sent, largest first.
    pub bytes_per_peer: Vec<u64>,
    /// Chunk bytes as they crossed the wire (compressed or raw; the NAR is incompressible).
    #[serde(default)]
    pub wire_bytes: u64,
    /// CPU seconds per GiB of the peer download, user and system, of the leecher alone: this
    /// process, less (loopback) the threads of the seeders' runtime.
    #[serde(default)]
    pub cpu_s_per_gib: f64,
    /// The same for the plain HTTP download's client alone.
    #[serde(default)]
    pub http_cpu_s_per_gib: f64,
    /// CPU seconds per GiB the N seeders spent serving the peer download, all together:
    /// their own processes, read from /proc (netns), or their runtime's threads (loopback).
    #[serde(default)]
    pub seeders_cpu_s_per_gib: Option<f64>,
    /// The same for the HTTP server (seeder 0's, or on the seeders' runtime) over the HTTP
    /// download.
    #[serde(default)]
    pub http_server_cpu_s_per_gib: Option<f64>,
    /// Page faults per GiB of the peer download, in the same process(es) as `cpu_s_per_gib`.
    #[serde(default)]
    pub faults_per_gib: f64,
    /// The same for the plain HTTP download.
    #[serde(default)]
    pub http_faults_per_gib: f64,
    /// How long the leecher's download stood waiting for its disk, at least one put waiting
    /// (`PutWaits::stalled` in the chunk store): where a run falls short, time lost to a disk
    /// that fell behind the network shows here. The plain HTTP download writes nothing.
    #[serde(default)]
    pub disk_wait_ms: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Dedup {
    /// The leecher held version 1; version 2 differs from it in a few places.
    pub v2_size: u64,
    /// Bytes fetched from peers for version 2.
    pub fetched_bytes: u64,
    /// Bytes of version 2 the leecher already had.
    pub local_bytes: u64,
    pub fetched_ratio: f64,
    /// The fetched bytes as they crossed the wire.
    #[serde(default)]
    pub wire_bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    pub mode: Mode,
    /// Where the seeders held the NAR.
    #[serde(default)]
    pub seed_from: SeedFrom,
    /// What the peer download ran over.
    #[serde(default)]
    pub transport: Transport,
    pub nar_size: u64,
    /// The per-peer figure the ideal line is N times: the single-peer throughput on loopback,
    /// the cap in netns mode (MiB/s).
    pub ideal_per_peer_mib_per_s: f64,
    /// The round trip added between the leecher and each seeder (ms; netns mode).
    #[serde(default)]
    pub rtt_ms: u64,
    pub rows: Vec<Row>,
    pub dedup: Dedup,
    /// CPU seconds SHA-256 takes per GiB of the same bytes, in this process: the NarHash check
    /// every download pays.
    #[serde(default)]
    pub sha256_cpu_s_per_gib: f64,
    /// This process's peak resident set over the run (MiB): the leecher, and in loopback
    /// mode the seeders and the HTTP server too.
    #[serde(default)]
    pub peak_rss_mib: f64,
}

pub fn run(args: BenchArgs) -> Result<()> {
    // The downloads' default settings measure zstd's speed here once; not inside a timed run.
    let _ = DownloadConfig::default();
    if args.seeders.is_empty() || args.seeders.contains(&0) {
        bail!("--seeders takes a list of positive counts");
    }
    if args.size_mib == 0 {
        bail!("--size-mib must be positive");
    }
    if args.rtt_ms > 0 && args.mode != Mode::Netns {
        bail!("--rtt-ms needs --mode netns");
    }
    if args.rtt_ms > 0 && args.transport != Transport::Tcp {
        bail!("--rtt-ms delays TCP connections only: it needs --transport tcp");
    }
    let report = match args.mode {
        Mode::Loopback => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(measure(&args))?,
        Mode::Netns if args.inner_seeders.is_empty() => netns::outer(&args)?,
        Mode::Netns => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(measure(&args))?,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    if let Some(f) = &args.svg {
        std::fs::write(f, svg(&report)).with_context(|| format!("writing {}", f.display()))?;
    }
    Ok(())
}

/// Progress on stderr: a bar on a terminal, plain lines otherwise.
struct Progress {
    bar: ProgressBar,
    tty: bool,
}

impl Progress {
    fn new() -> Self {
        let tty = std::io::stderr().is_terminal();
        let bar = if tty {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg:28} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b
        } else {
            ProgressBar::hidden()
        };
        Progress { bar, tty }
    }
    fn start(&self, what: &str, total: u64) {
        self.bar.set_length(total);
        self.bar.set_position(0);
        self.bar.set_message(what.to_string());
        if !self.tty {
            eprintln!("bench: {what}…");
        }
    }
    fn done(&self, what: &str, mib_s: f64) {
        if self.tty {
            self.bar.println(format!("{what}: {mib_s:.1} MiB/s"));
        } else {
            eprintln!("bench: {what}: {mib_s:.1} MiB/s");
        }
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

struct Leecher {
    node: Arc<Node>,
    store: ChunkStore,
}

pub async fn start_node(dir: PathBuf, listen: &[String], peers: Vec<String>) -> Result<Node> {
    let mut c = NodeConfig::new(dir);
    c.listen = listen.iter().map(|a| a.parse()).collect::<Result<_, _>>()?;
    // Never on the real LAN: peers are given explicitly.
    c.mdns = false;
    c.peers = peers;
    Ok(Node::start(c).await?)
}

/// Wait until `node` is connected to every one of `seeders`.
async fn wait_connected(node: &Node, seeders: &[PeerId]) -> Result<()> {
    let mut ev = node.events();
    let deadline = tokio::time::Instant::now() + CONNECT_WAIT;
    let connected = || async {
        let c = node.connected_peers().await;
        seeders.iter().filter(|s| c.contains(s)).count()
    };
    while connected().await < seeders.len() {
        match tokio::time::timeout_at(deadline, ev.recv()).await {
            Ok(Ok(NodeEvent::PeerConnected(_))) | Ok(Ok(_)) | Ok(Err(_)) => {}
            Err(_) => bail!(
                "only {} of {} seeders connected",
                connected().await,
                seeders.len()
            ),
        }
    }
    Ok(())
}

/// The peer ids the seeders' addresses end with (`/p2p/<id>`).
fn seeder_ids(addrs: &[String]) -> Result<Vec<PeerId>> {
    addrs
        .iter()
        .map(|a| {
            a.parse()
                .ok()
                .and_then(|a| peerix_swarm::node::peer_of(&a))
                .with_context(|| format!("seeder address {a} names no peer"))
        })
        .collect()
}

/// What one download did.
struct Fetched {
    elapsed: Duration,
    first_byte: Duration,
    bytes_per_peer: Vec<u64>,
    bytes_local: u64,
    wire_bytes: u64,
    /// The peers' links idle at the end, on average ([`idle_at_the_end`]).
    tail: Duration,
}

/// Fetch one NAR the way the daemon does ([`fetch_nar`]): the manifest from a holder, the
/// chunks from every one of this run's seeders.
async fn fetch(
    wire: WireCompression,
    leecher: &Leecher,
    seeders: &[PeerId],
    nar_hash: Sha256Hash,
    size: u64,
    progress: &Progress,
) -> Result<Fetched> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let started = Instant::now();
    let bar = progress.bar.clone();
    let sink = tokio::spawn(async move {
        let mut first = None;
        let mut total = 0u64;
        while let Some(b) = rx.recv().await {
            first.get_or_insert_with(|| started.elapsed());
            total += b.len() as u64;
            bar.set_position(total);
        }
        // The output closed with the NAR's verified last chunk: what Nix waits for. The
        // download's commit to the store runs on (and its CPU counts in the run's).
        (first, total, started.elapsed())
    });
    let client = Client::new(leecher.node.stream_control());
    // This run's seeders only: the DHT lets the leecher meet the others too (they learn of
    // one another through earlier runs' leechers), and a download from them all would not
    // be N's.
    let holders = seeders.to_vec();
    let req = FetchRequest {
        nar_hash,
        nar_size: size,
        holders,
        others: vec![],
        manifest: None,
        config: DownloadConfig {
            wire: WireConfig {
                compression: wire.into(),
                ..WireConfig::default()
            },
            ..DownloadConfig::default()
        },
    };
    // On the runtime's workers, as the daemon runs it (src/serve/nar.rs), not on the thread
    // that blocks on the bench: that thread is a third one sharing the two cores, and a
    // download's every step there woke it.
    let outcome = tokio::spawn(fetch_nar(client, leecher.store.clone(), req, tx))
        .await
        .context("the peer download's task")?;
    outcome.result.context("the peer download")?;
    let report = outcome.report;
    let (first, total, elapsed) = sink.await?;
    if total != size {
        bail!("the leecher got {total} bytes of a {size}-byte NAR");
    }
    let tail = idle_at_the_end(&report.last_chunk, report.complete);
    let mut bytes_per_peer: Vec<u64> = report.bytes_per_peer.values().copied().collect();
    bytes_per_peer.sort_unstable_by(|a, b| b.cmp(a));
    Ok(Fetched {
        elapsed,
        first_byte: first.unwrap_or(elapsed),
        bytes_per_peer,
        bytes_local: report.bytes_local,
        wire_bytes: report.wire_bytes,
        tail,
    })
}

/// How long the links of the peers that sent chunks stood idle at the end, on average: from
/// their last chunk to the NAR's end going out. With every link full until then, this is what keeps
/// N capped links from N × what one of them carries, but for the start (the manifest, then a
/// request to each peer).
fn idle_at_the_end(last_chunk: &HashMap<PeerId, Duration>, download: Duration) -> Duration {
    let n = last_chunk.len().max(1) as u32;
    let idle: Duration = last_chunk
        .values()
        .map(|&t| download.saturating_sub(t))
        .sum();
    idle / n
}

/// The measurements, in this process: on loopback with in-process seeders, or (netns mode)
/// inside the leecher's namespace with the seeders `--inner-seeders` names.
async fn measure(args: &BenchArgs) -> Result<Report> {
    let tmp;
    let dir = match &args.state_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("peerix-bench").tempdir()?;
            tmp.path().to_owned()
        }
    };
    let content = args.size_mib * 1024 * 1024;
    let progress = Progress::new();
    let (p1, p2) = (store_path("bench-nar-1")?, store_path("bench-nar-2")?);

    let netns = args.mode == Mode::Netns;
    // Loopback: the seeders (and the HTTP server) run on a runtime of their own, whose
    // threads' CPU is theirs; one chunk store, shared by every seeder: the NAR is chunked
    // once, disk spared. netns: the seeders are other processes, started by the outer
    // `peerix bench`.
    let mut local = None;
    let urls = if netns {
        if args.inner_http.len() != args.inner_seeders.len() {
            bail!("--inner-http must name one URL per seeder");
        }
        args.inner_http.clone()
    } else {
        progress.start("chunking the NAR (seeders)", content);
        let (l, url) = Local::start(&dir.join("seed"), content, args.seed_from).await?;
        local = Some(l);
        vec![url]
    };
    // The NAR's size, as the first seeder describes it (a store path's NAR is its files'
    // contents and the framing around them).
    let mut size = 0;
    // The single-peer figure the ideal line is built on (loopback): measured first, reused
    // for N = 1. In netns mode it is the cap.
    let mut counts = args.seeders.clone();
    let mut single = 0.0;
    if netns {
        single = netns::rate_mib_per_s(&args.rate)?;
        if counts.iter().any(|&n| n > args.inner_seeders.len()) {
            bail!("more seeders asked for than started");
        }
    } else if !counts.contains(&1) {
        counts.insert(0, 1);
    } else {
        counts.sort_by_key(|&n| n != 1);
    }
    // First a download that is not measured, with every seeder: the first in a process pays
    // once for what later ones reuse (this VM backs guest memory on first touch, and the
    // leecher's first pack writes were up to twice as costly as the next ones' for that).
    counts.insert(0, *counts.iter().max().expect("at least one count"));
    let mut rows: Vec<Row> = vec![];
    let mut dedup = None;
    let last = counts.len() - 1;
    for (run, &n) in counts.iter().enumerate() {
        let warm_up = run == 0;
        let run_dir = dir.join(format!("run-{run}-n{n}"));
        let (seeders, addrs) = match &local {
            None => (None, args.inner_seeders[..n].to_vec()),
            Some(local) => {
                let s = local.seeders(&run_dir, n, args.transport).await?;
                let addrs = s.addrs()?;
                (Some(s), addrs)
            }
        };
        let listen = args
            .transport
            .listen(if netns { "0.0.0.0" } else { "127.0.0.1" });
        let ids = seeder_ids(&addrs)?;
        // The leecher dials the seeders.
        let leecher = Leecher {
            node: Arc::new(start_node(run_dir.join("leecher"), &listen, addrs).await?),
            store: ChunkStore::open(&run_dir.join("leecher-chunks"), Options::default())?,
        };
        wait_connected(&leecher.node, &ids).await?;
        let client = Client::new(leecher.node.stream_control());
        let first = ids[0];
        // The NarHashes and sizes, as the seeders describe the two versions over the peer
        // protocol.
        let infos = client.lookup(first, &[p1.hash(), p2.hash()]).await?;
        let nar = |p: &StorePath| {
            infos
                .iter()
                .find(|i| i.store_path == *p)
                .map(|i| (i.nar_hash, i.nar_size))
                .with_context(|| format!("the seeder does not describe {p}"))
        };
        let ((h1, s1), (h2, size2)) = (nar(&p1)?, nar(&p2)?);
        size = s1;
        let what = if warm_up {
            format!("warm-up download ({n} peers)")
        } else {
            format!("{n} seeder(s)")
        };
        progress.start(&what, size);
        // The seeders' CPU: their processes' (netns), or their runtime's threads' (loopback),
        // which is then not the leecher's.
        let pids = args.inner_seeder_pids.get(..n).unwrap_or_default();
        let servers_cpu = |pids: &[u32]| match &local {
            Some(local) => local.cpu(),
            None => cpu::processes_cpu(pids),
        };
        let seeders_cpu = servers_cpu(pids);
        let used = cpu::Usage::now();
        let waits = leecher.store.put_waits();
        let f = fetch(args.wire_compression, &leecher, &ids, h1, size, &progress).await?;
        let mut peer = cpu::Usage::since(used);
        let waits = leecher.store.put_waits().since(waits);
        let seeders_cpu = servers_cpu(pids).saturating_sub(seeders_cpu);
        let mib_s = size as f64 / MIB / f.elapsed.as_secs_f64();
        progress.done(&what, mib_s);
        progress.start(&format!("HTTP baseline (N={n})"), size);
        let server_pid = pids.get(..1).unwrap_or_default();
        let server_cpu = servers_cpu(server_pid);
        let used = cpu::Usage::now();
        let http_mib_s = http_fetch(&urls[..1], size, &progress).await?;
        let mut http = cpu::Usage::since(used);
        let server_cpu = servers_cpu(server_pid).saturating_sub(server_cpu);
        if local.is_some() {
            peer.cpu = peer.cpu.saturating_sub(seeders_cpu);
            http.cpu = http.cpu.saturating_sub(server_cpu);
        }
        progress.done("HTTP baseline", http_mib_s);
        let row_wanted =
            !warm_up && args.seeders.contains(&n) && !rows.iter().any(|r| r.seeders == n);
        let http_links_mib_s = match n {
            _ if !netns || !row_wanted => None,
            1 => Some(http_mib_s),
            _ => {
                let what = format!("HTTP over {n} links");
                progress.start(&what, size);
                let mib_s = http_fetch(&urls[..n], size, &progress).await?;
                progress.done(&what, mib_s);
                Some(mib_s)
            }
        };
        if n == 1 && single == 0.0 && !warm_up {
            single = mib_s;
        }
        if row_wanted {
            rows.push(Row {
                seeders: n,
                mib_per_s: mib_s,
                ratio_to_ideal: mib_s / (n as f64 * single),
                http_mib_per_s: http_mib_s,
                ratio_to_http: mib_s / http_mib_s,
                http_links_mib_per_s: http_links_mib_s,
                first_byte_ms: f.first_byte.as_secs_f64() * 1000.0,
                tail_ms: f.tail.as_secs_f64() * 1000.0,
                elapsed_s: f.elapsed.as_secs_f64(),
                bytes_per_peer: f.bytes_per_peer,
                wire_bytes: f.wire_bytes,
                cpu_s_per_gib: cpu::per_gib(peer.cpu, size),
                http_cpu_s_per_gib: cpu::per_gib(http.cpu, size),
                seeders_cpu_s_per_gib: Some(cpu::per_gib(seeders_cpu, size)),
                http_server_cpu_s_per_gib: Some(cpu::per_gib(server_cpu, size)),
                faults_per_gib: cpu::faults_per_gib(peer.faults, size),
                http_faults_per_gib: cpu::faults_per_gib(http.faults, size),
                disk_wait_ms: waits.stalled.as_secs_f64() * 1000.0,
            });
        }

        if run == last {
            // The leecher now holds version 1; fetch version 2 and see what crossed the wire.
            progress.start("version 2 (dedup)", size2);
            let f = fetch(args.wire_compression, &leecher, &ids, h2, size2, &progress).await?;
            let fetched: u64 = f.bytes_per_peer.iter().sum();
            progress.done(
                "version 2 (dedup)",
                size2 as f64 / MIB / f.elapsed.as_secs_f64(),
            );
            dedup = Some(Dedup {
                v2_size: size2,
                fetched_bytes: fetched,
                local_bytes: f.bytes_local,
                fetched_ratio: fetched as f64 / size2 as f64,
                wire_bytes: f.wire_bytes,
            });
        }
        drop(seeders);
        drop(leecher);
        // Free the leecher's copy before the next run.
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    progress.finish();
    rows.sort_by_key(|r| r.seeders);
    let sha = tokio::task::spawn_blocking(move || cpu::sha256_cpu(size)).await??;
    Ok(Report {
        sha256_cpu_s_per_gib: cpu::per_gib(sha, size),
        peak_rss_mib: cpu::peak_rss() as f64 / MIB,
        mode: args.mode,
        seed_from: args.seed_from,
        transport: args.transport,
        nar_size: size,
        ideal_per_peer_mib_per_s: single,
        rtt_ms: args.rtt_ms,
        rows,
        dedup: dedup.expect("at least one run"),
    })
}
