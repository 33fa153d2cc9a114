//! The `peerix` binary.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use peerix::cli;

#[derive(Parser)]
#[command(
    name = "peerix",
    version,
    about = "A peer-to-peer binary cache for Nix"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a binary-cache signing key pair, as `nix-store --generate-binary-cache-key`.
    Keygen(cli::keygen::KeygenArgs),
    /// NAR (Nix ARchive) tools.
    Nar {
        #[command(subcommand)]
        command: cli::nar::NarCommand,
    },
    /// The chunk store: operators' tools.
    Store {
        #[command(flatten)]
        args: cli::store::StoreArgs,
        #[command(subcommand)]
        command: cli::store::StoreCommand,
    },
    /// Run the daemon: a Nix substituter on HTTP, backed by the local store and the peers.
    Serve {
        #[command(flatten)]
        args: Box<peerix::config::ServeArgs>,
    },
    /// Pin closures so this machine keeps serving them to its peers, even after they leave
    /// the local Nix store; the running daemon announces them at once.
    Seed(cli::seed::SeedArgs),
    /// Remove seeds: their paths are unpinned and the space they took is given back.
    Unseed(cli::unseed::UnseedArgs),
    /// The daemon's peers, the seeds with their sizes, what is shared, and the chunk store.
    Status(cli::status::StatusArgs),
    /// Measure multi-peer download throughput against N seeders (self-contained).
    Bench {
        #[command(flatten)]
        args: peerix_bench::BenchArgs,
    },
    /// One seeder of `peerix bench --mode netns` (internal).
    #[command(hide = true)]
    BenchNode {
        #[command(flatten)]
        args: peerix_bench::netns::NodeArgs,
    },
    /// The round trip of `peerix bench --mode netns --rtt-ms` (internal).
    #[command(hide = true)]
    BenchDelay {
        #[command(flatten)]
        args: peerix_bench::delay::DelayArgs,
    },
    /// Print the narinfo peerix would serve for a path in the local store.
    Narinfo(cli::narinfo::NarinfoArgs),
}

fn main() -> Result<()> {
    // Every command, the benchmark's nodes included, so that they measure the daemon's
    // allocator as it runs.
    tune_malloc();
    let cli = Cli::parse();
    // The benchmark reports its own progress; the nodes' info logs would drown it.
    let default_filter = match cli.command {
        // A lone seeder's DHT has nobody to bootstrap from; that is expected here.
        Command::Bench { .. } | Command::BenchNode { .. } | Command::BenchDelay { .. } => {
            "warn,libp2p_kad=error"
        }
        // These commands print what they do; logs would only repeat it.
        Command::Seed { .. } | Command::Unseed { .. } | Command::Status { .. } => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        // Colour only on a terminal: escape codes in a file or the journal are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Bench { args } => peerix_bench::run(args),
        Command::BenchNode { args } => peerix_bench::netns::node(args),
        Command::BenchDelay { args } => peerix_bench::delay::run(args),
        Command::Keygen(args) => cli::keygen::run(&args),
        Command::Nar { command } => cli::nar::run(&command),
        Command::Narinfo(args) => cli::narinfo::run(&args),
        Command::Store { args, command } => cli::store::run(&args, command),
        Command::Serve { args } => serve(*args),
        Command::Seed(args) => block_on(cli::seed::run(args)),
        Command::Unseed(args) => block_on(cli::unseed::run(args)),
        Command::Status(args) => block_on(cli::status::run(args)),
    }
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(f)
}

fn serve(args: peerix::config::ServeArgs) -> Result<()> {
    let cfg = peerix::config::ServeConfig::resolve(args)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(peerix::serve::run(cfg))
}

/// glibc's malloc, tuned for a daemon that moves big NARs in chunks of ~256 KiB (the
/// environment's `MALLOC_ARENA_MAX` / `MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` still
/// decide when set):
/// - Chunk buffers come from mmap and go back to the OS when freed. By default glibc raises
///   its mmap threshold to the size of the first such buffer freed, after which chunks are cut
///   from the heap, which fragments and keeps growing: a 4 GiB path substituted from a peer
///   peaked at 77 MiB, 2 GiB at 56, against 46 at 2 GiB with the threshold fixed.
/// - At most two arenas: glibc gives every thread that allocates under contention an arena of
///   its own, and memory freed in one is not reused by the others; a 1 GiB path from three
///   peers peaked ~10 MiB higher with the default (8 arenas per core). Two keep allocation
///   from serialising on one lock.
/// - Chunk buffers are reused from a small pool (`peerix_chunkstore::buffers`), so that the
///   mappings are not made and faulted in again for every chunk.
/// - Up to 1 MiB free at the top of a heap is kept rather than given back. With the mmap
///   threshold fixed, glibc leaves the trim threshold at 128 KiB, and a multiplexed connection's
///   frames (up to 64 KiB each) are cut from the heap: freeing two or three of them at its top
///   gave the pages back and the next frames faulted them in and the kernel zeroed them again,
///   39 thousand page faults of 54 thousand over a 512 MiB download on loopback.
///
/// Called before any thread starts.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let set = |var: &str, param: libc::c_int, value: libc::c_int| {
            if std::env::var_os(var).is_none() {
                // SAFETY: mallopt only changes a malloc tunable; no other thread exists yet.
                unsafe {
                    libc::mallopt(param, value);
                }
            }
        };
        set("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 2);
        set("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 128 << 10);
        set("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}
