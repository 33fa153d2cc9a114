//! The `peerix seed`, `unseed` and `status` commands: ask the running daemon over its admin
//! socket, or do the work on the state directory when no daemon runs.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};

use crate::admin::{self, Reply, Request, StatusReport, StoreStatus};
use crate::config::{ServeArgs, ServeConfig};
use crate::seed::{self, human, name_list, SeedEvent, SeedSummary, Seeder, UnseedSummary};
use crate::serve::{open_chunk_store, open_parts, Parts};

/// How long a command waits for a daemon that holds the state directory but has not opened
/// its admin socket yet (it is starting).
const DAEMON_START_WAIT: Duration = Duration::from_secs(60);

/// Where the state is, and (for work done without a daemon) the daemon's settings.
#[derive(clap::Args, Debug, Default)]
pub struct CommonArgs {
    /// `peerix serve`'s config file: its state directory, store and sharing rules apply.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// State directory of the daemon [default: /var/lib/peerix].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Root of the local Nix store: `/`, or a chroot store's root [default: /].
    #[arg(long, value_name = "ROOT")]
    pub store: Option<PathBuf>,
    /// Upstream cache, as for `peerix serve` (used only when no daemon runs).
    #[arg(long, value_name = "URL")]
    pub upstream_cache: Option<String>,
    /// Nix secret key, as for `peerix serve` (used only when no daemon runs).
    #[arg(long, value_name = "FILE")]
    pub private_key: Option<PathBuf>,
    /// Trusted keys, as for `peerix serve` (used only when no daemon runs): a seed shares what
    /// they signed.
    #[arg(long = "trusted-key", value_name = "KEY")]
    pub trusted_keys: Vec<String>,
    /// Deny patterns, as for `peerix serve` (used only when no daemon runs).
    #[arg(long = "deny", value_name = "GLOB")]
    pub deny: Vec<String>,
    /// As for `peerix serve` (used only when no daemon runs).
    #[arg(long)]
    pub share_all: bool,
}

impl CommonArgs {
    fn config(&self) -> Result<ServeConfig> {
        ServeConfig::resolve(ServeArgs {
            config: self.config.clone(),
            state_dir: self.state_dir.clone(),
            store: self.store.clone(),
            upstream_cache: self.upstream_cache.clone(),
            private_key: self.private_key.clone(),
            trusted_keys: self.trusted_keys.clone(),
            deny: self.deny.clone(),
            share_all: self.share_all,
            ..ServeArgs::default()
        })
    }
}

#[derive(clap::Args, Debug)]
pub struct SeedArgs {
    /// Store paths, or links to them (`./result`, `/run/current-system`); their closures are
    /// seeded. Seeding a link again replaces what it pinned before.
    #[arg(value_name = "PATH")]
    pub paths: Vec<String>,
    /// Seed the closure of PATH (repeatable); the same as giving PATH as an argument.
    #[arg(long = "closure-of", value_name = "PATH")]
    pub closure_of: Vec<String>,
    /// Seed the store paths listed in FILE, one per line (`-`: standard input).
    #[arg(long = "from-file", value_name = "FILE")]
    pub from_file: Vec<PathBuf>,
    /// Also share the paths of these closures that are neither in the upstream cache nor
    /// signed by this machine's key or a trusted key: your own builds, and whatever
    /// configuration a closure holds. Every peer that asks gets them, and the output lists
    /// them. Without it they are left out. Deny patterns win either way.
    #[arg(long)]
    pub share_private_paths: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(clap::Args, Debug)]
pub struct UnseedArgs {
    /// Seeds to remove: as given to `peerix seed`, or their root store path.
    #[arg(value_name = "PATH")]
    pub which: Vec<String>,
    /// Remove every seed.
    #[arg(long, conflicts_with = "which")]
    pub all: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

/// Who does the work.
enum Answer {
    /// The running daemon did; its reply.
    Daemon(Reply),
    /// No daemon runs; the state directory is open here.
    Local(Box<Parts>),
}

/// Ask the daemon, or open the state directory when none runs.
async fn ask(
    cfg: &ServeConfig,
    req: &Request,
    on_event: impl FnMut(SeedEvent) + Clone,
) -> Result<Answer> {
    let deadline = tokio::time::Instant::now() + DAEMON_START_WAIT;
    let mut delay = Duration::from_millis(50);
    let mut said = false;
    loop {
        if let Some(r) = admin::request(&cfg.state_dir, req, on_event.clone()).await? {
            return Ok(Answer::Daemon(r));
        }
        match open_parts(cfg) {
            Ok(parts) => return Ok(Answer::Local(Box::new(parts))),
            Err(e) if is_locked(&e) && tokio::time::Instant::now() < deadline => {
                if !said {
                    eprintln!(
                        "peerix: the state directory is in use; waiting for peerix serve to start"
                    );
                    said = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_locked(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<peerix_chunkstore::Error>(),
            Some(peerix_chunkstore::Error::Locked(_))
        )
    })
}

/// Progress for people: a bar on a terminal, plain lines on a pipe.
struct Printer {
    tty: bool,
    bar: Option<ProgressBar>,
    paths: (usize, usize),
    bytes: (u64, u64),
}

impl Printer {
    fn new() -> Self {
        Self {
            tty: std::io::stdout().is_terminal(),
            bar: None,
            paths: (0, 0),
            bytes: (0, 0),
        }
    }

    fn line(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => {
                let mut o = std::io::stdout().lock();
                let _ = writeln!(o, "{s}");
            }
        }
    }

    fn event(&mut self, e: SeedEvent) {
        match e {
            SeedEvent::Plan {
                label,
                root,
                paths,
                bytes,
                private,
                shared_private,
                denied,
            } => {
                if let Some(b) = self.bar.take() {
                    b.finish_and_clear();
                }
                let shown = if label == root {
                    label
                } else {
                    format!("{label} ({root})")
                };
                self.line(&format!(
                    "peerix: seeding {shown}: {}, {}",
                    paths_n(paths),
                    human(bytes)
                ));
                if !private.is_empty() && shared_private {
                    self.line(&format!(
                        "peerix: {} shared only because of --share-private-paths (neither in the upstream cache \
                         nor signed by this machine's key or a trusted key); every peer that asks gets them:\n    {}",
                        paths_n(private.len()),
                        name_list(&private)
                    ));
                }
                if !private.is_empty() && !shared_private {
                    self.line(&format!(
                        "peerix: {} not shared: neither in the upstream cache nor signed by this machine's key \
                         or a trusted key; pass --share-private-paths to share them:\n    {}",
                        paths_n(private.len()),
                        name_list(&private)
                    ));
                }
                if !denied.is_empty() {
                    self.line(&format!(
                        "peerix: {} not seeded: deny patterns match, so they stay private:\n    {}",
                        paths_n(denied.len()),
                        name_list(&denied)
                    ));
                }
                self.paths = (0, paths);
                self.bytes = (0, 0);
                if self.tty {
                    let b = ProgressBar::new(bytes);
                    b.set_style(
                        ProgressStyle::with_template(
                            "{spinner} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
                        )
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                    );
                    b.enable_steady_tick(Duration::from_millis(200));
                    self.bar = Some(b);
                }
            }
            SeedEvent::Begin { name, nar_size } => {
                if let Some(b) = &self.bar {
                    b.set_message(format!(
                        "paths {}/{}, {:.0}% already held; {name} ({})",
                        self.paths.0,
                        self.paths.1,
                        dedup_pct(self.bytes.0, self.bytes.1),
                        human(nar_size)
                    ));
                }
            }
            SeedEvent::Path {
                name,
                nar_size,
                copied,
            } => {
                self.paths.0 += 1;
                self.bytes.0 += nar_size;
                self.bytes.1 += copied;
                let dedup = dedup_pct(self.bytes.0, self.bytes.1);
                match &self.bar {
                    Some(b) => {
                        b.inc(nar_size);
                        b.set_message(format!(
                            "paths {}/{}, {dedup:.0}% already held",
                            self.paths.0, self.paths.1
                        ));
                    }
                    None => self.line(&format!(
                        "peerix: pinned {}/{} {name} {} ({} new)",
                        self.paths.0,
                        self.paths.1,
                        human(nar_size),
                        human(copied)
                    )),
                }
            }
            SeedEvent::Replaced { label, released } => self.line(&format!(
                "peerix: {label} replaces its earlier seed; {} of that one are no longer pinned",
                paths_n(released)
            )),
        }
    }

    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

fn paths_n(n: usize) -> String {
    format!("{n} path{}", if n == 1 { "" } else { "s" })
}

fn dedup_pct(bytes: u64, copied: u64) -> f64 {
    if bytes == 0 {
        0.0
    } else {
        100.0 * (1.0 - copied as f64 / bytes as f64)
    }
}

pub async fn seed(args: SeedArgs) -> Result<()> {
    let mut wanted: Vec<String> = args.paths.clone();
    wanted.extend(args.closure_of.iter().cloned());
    for f in &args.from_file {
        wanted.extend(seed::read_list(f)?);
    }
    if wanted.is_empty() {
        bail!("nothing to seed: give store paths, --closure-of PATH or --from-file FILE");
    }
    let targets = wanted
        .iter()
        .map(|w| seed::resolve(w))
        .collect::<Result<Vec<_>>>()?;
    let cfg = args.common.config()?;
    let printer = Arc::new(Mutex::new(Printer::new()));
    let p = printer.clone();
    let on_event = move |e| p.lock().expect("printer").event(e);
    let req = Request::Seed {
        targets: targets.clone(),
        share_private_paths: args.share_private_paths,
    };
    let sum = match ask(&cfg, &req, on_event.clone()).await? {
        Answer::Daemon(Reply::Seeded(s)) => s,
        Answer::Local(parts) => {
            let seeder = Seeder {
                store: parts.store,
                local: parts.local,
                sharing: parts.sharing,
            };
            seeder
                .seed(&targets, args.share_private_paths, &on_event)
                .await?
        }
        Answer::Daemon(Reply::Error(e)) => bail!("peerix serve: {e}"),
        Answer::Daemon(other) => bail!("unexpected answer from peerix serve: {other:?}"),
    };
    printer.lock().expect("printer").finish();
    print_seeded(&sum);
    Ok(())
}

fn print_seeded(s: &SeedSummary) {
    println!(
        "peerix: seeded {} ({}) in {:.1} s: {} new to the chunk store, {:.0}% was already held",
        paths_n(s.paths),
        human(s.bytes),
        s.seconds,
        human(s.copied),
        dedup_pct(s.bytes, s.copied)
    );
    if s.shared_private > 0 {
        println!(
            "peerix: {} shared only because of --share-private-paths",
            paths_n(s.shared_private)
        );
    }
    if s.not_shared > 0 {
        println!(
            "peerix: {} not shared (neither in the upstream cache nor signed by a trusted key); \
             --share-private-paths shares them",
            paths_n(s.not_shared)
        );
    }
    if s.denied > 0 {
        println!(
            "peerix: {} never shared: deny patterns match",
            paths_n(s.denied)
        );
    }
    if s.announced {
        println!("peerix: peerix serve announces them to its peers now");
    } else {
        println!("peerix: peerix serve is not running; it announces them when it starts");
    }
}

pub async fn unseed(args: UnseedArgs) -> Result<()> {
    if args.which.is_empty() && !args.all {
        bail!("name the seeds to remove (see `peerix status`), or give --all");
    }
    let which: Vec<String> = args.which.iter().map(|w| seed::label_of(w)).collect();
    let cfg = args.common.config()?;
    let req = Request::Unseed {
        which: which.clone(),
        all: args.all,
    };
    let (sum, announced): (UnseedSummary, bool) = match ask(&cfg, &req, |_| {}).await? {
        Answer::Daemon(Reply::Unseeded(s)) => (s, true),
        Answer::Local(parts) => {
            let seeder = Seeder {
                store: parts.store,
                local: parts.local,
                sharing: parts.sharing,
            };
            (seeder.unseed(which, args.all).await?, false)
        }
        Answer::Daemon(Reply::Error(e)) => bail!("peerix serve: {e}"),
        Answer::Daemon(other) => bail!("unexpected answer from peerix serve: {other:?}"),
    };
    for r in &sum.removed {
        println!("peerix: unseeded {r}");
    }
    if !sum.removed.is_empty() {
        println!(
            "peerix: {} no longer pinned; {} freed in the chunk store{}",
            paths_n(sum.released),
            human(sum.freed),
            if announced {
                "; peerix serve stops announcing what it no longer shares"
            } else {
                ""
            }
        );
    }
    if !sum.unknown.is_empty() {
        bail!(
            "no seed named {} (see `peerix status`)",
            sum.unknown.join(", ")
        );
    }
    Ok(())
}

pub async fn status(args: StatusArgs) -> Result<()> {
    let cfg = args.common.config()?;
    let report = match admin::request(&cfg.state_dir, &Request::Status, |_| {}).await? {
        Some(Reply::Status(s)) => *s,
        Some(Reply::Error(e)) => bail!("peerix serve: {e}"),
        Some(other) => bail!("unexpected answer from peerix serve: {other:?}"),
        None => {
            let cs = open_chunk_store(&cfg.state_dir, &cfg.store)?;
            StatusReport {
                daemon: None,
                seeds: seed::seed_statuses(&cs)?,
                store: StoreStatus::of(&cs)?,
            }
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    match &report.daemon {
        Some(d) => {
            println!("peerix serve: running, peer id {}", d.peer_id);
            println!("  Nix:   http://{}", d.http);
            println!("  p2p:   {}", d.p2p.join(" "));
            println!("peers: {} connected", d.peers.len());
            for p in &d.peers {
                println!("  {p}");
            }
            let s = &d.shared;
            println!(
                "shared: {} paths (upstream {}, own signature {}, seeded {}, share-all {})",
                s.total, s.upstream, s.own_signature, s.pinned, s.share_all
            );
            let t = &d.traffic;
            println!(
                "traffic: {} of chunks from peers as {} on the wire (saved: dedup {}, compression {}, deltas {}); {} sent to peers; {} recompressed to serve",
                human(t.chunk_bytes_received),
                human(t.wire_bytes_received),
                human(t.saved_by_dedup),
                human(t.saved_by_compression),
                human(t.saved_by_delta),
                human(t.wire_bytes_served),
                human(t.recompressed_bytes)
            );
        }
        None => println!(
            "peerix serve: not running (no admin socket at {})",
            admin::socket_path(&cfg.state_dir).display()
        ),
    }
    println!("seeds: {}", report.seeds.len());
    for s in &report.seeds {
        let root = format!("{}/{}", peerix_nix::STORE_DIR, s.root);
        let shown = if s.label == root {
            root
        } else {
            format!("{} -> {root}", s.label)
        };
        println!("  {shown}: {} paths, {}", s.paths, human(s.bytes));
    }
    let st = &report.store;
    println!(
        "chunk store: {} NARs, {} in {} of distinct chunks (dedup {:.2}x); packs {} on disk, {} read in place from the Nix store; {} pinned paths",
        st.nars,
        human(st.logical_bytes),
        human(st.unique_bytes),
        st.dedup_ratio,
        human(st.pack_file_bytes),
        human(st.local_bytes),
        st.pins
    );
    Ok(())
}
