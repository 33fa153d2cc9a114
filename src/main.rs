//! The `peerix` binary.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use peerix_nix::{LocalStore, NarInfo, SecretKey, StorePath};

mod store;

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
    Keygen {
        /// Key name, conventionally `HOSTNAME-1`; it prefixes every signature.
        name: String,
        /// Where to write the secret key (created with mode 0600; must not exist).
        secret_file: PathBuf,
        /// Where to write the public key, for Nix's `trusted-public-keys`.
        public_file: PathBuf,
    },
    /// NAR (Nix ARchive) tools.
    Nar {
        #[command(subcommand)]
        command: NarCommand,
    },
    /// The chunk store: operators' tools.
    Store {
        #[command(flatten)]
        args: StoreArgs,
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Run the daemon: a Nix substituter on HTTP, backed by the local store and the peers.
    Serve {
        #[command(flatten)]
        args: Box<peerix::config::ServeArgs>,
    },
    /// Pin closures so this machine keeps serving them to its peers, even after they leave
    /// the local Nix store; the running daemon announces them at once.
    Seed {
        #[command(flatten)]
        args: peerix::seed_cmd::SeedArgs,
    },
    /// Remove seeds: their paths are unpinned and the space they took is given back.
    Unseed {
        #[command(flatten)]
        args: peerix::seed_cmd::UnseedArgs,
    },
    /// The daemon's peers, the seeds with their sizes, what is shared, and the chunk store.
    Status {
        #[command(flatten)]
        args: peerix::seed_cmd::StatusArgs,
    },
    /// Measure multi-peer download throughput against N seeders (self-contained).
    Bench {
        #[command(flatten)]
        args: peerix::bench::BenchArgs,
    },
    /// One seeder of `peerix bench --mode netns` (internal).
    #[command(hide = true)]
    BenchNode {
        #[command(flatten)]
        args: peerix::bench::netns::NodeArgs,
    },
    /// Print the narinfo peerix would serve for a path in the local store.
    Narinfo {
        /// A store path (`/nix/store/<hash>-<name>`, or a path inside one).
        store_path: String,
        /// Root of the local Nix store: `/`, or a chroot store's root as in `nix --store ROOT`.
        #[arg(long, default_value = "/")]
        store: PathBuf,
        /// Sign the narinfo with this Nix secret key file.
        #[arg(long, value_name = "SECRET_FILE")]
        sign: Option<PathBuf>,
    },
}

use peerix::config::DEFAULT_STATE_DIR;

#[derive(Subcommand)]
enum StoreCommand {
    /// Chunk a NAR file, or index a valid local store path in place.
    Ingest {
        /// A NAR file, or a store path (`/nix/store/…`) valid in the local store.
        source: String,
    },
    /// Write a stored NAR to stdout, every chunk and the NarHash verified.
    Cat {
        /// NarHash (`sha256:…` in any of Nix's encodings).
        nar_hash: String,
    },
    /// Sizes, chunk counts and deduplication of the chunk store.
    Stats,
    /// Check the index against the data; exits 1 on any problem.
    Fsck {
        /// Also read and hash every chunk.
        #[arg(long)]
        verify: bool,
    },
    /// Delete unused chunks and reclaim pack space.
    Gc,
    /// Forget a stored NAR (GC then reclaims its chunks unless others use them).
    Rm { nar_hash: String },
}

#[derive(clap::Args)]
struct StoreArgs {
    /// peerix's state directory (the chunk store is in its `chunks/`).
    #[arg(long, default_value = DEFAULT_STATE_DIR, global = true)]
    state_dir: PathBuf,
    /// Root of the local Nix store: `/`, or a chroot store's root.
    #[arg(long, default_value = "/", global = true)]
    store: PathBuf,
}

#[derive(Subcommand)]
enum NarCommand {
    /// Write the NAR of PATH to stdout, byte-for-byte as `nix-store --dump PATH`.
    Dump { path: PathBuf },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The benchmark reports its own progress; the nodes' info logs would drown it.
    let default_filter = match cli.command {
        // A lone seeder's DHT has nobody to bootstrap from; that is expected here.
        Command::Bench { .. } | Command::BenchNode { .. } => "warn,libp2p_kad=error",
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
        Command::Bench { args } => peerix::bench::run(args),
        Command::BenchNode { args } => peerix::bench::netns::node(args),
        Command::Keygen {
            name,
            secret_file,
            public_file,
        } => keygen(&name, &secret_file, &public_file),
        Command::Nar {
            command: NarCommand::Dump { path },
        } => nar_dump(&path),
        Command::Narinfo {
            store_path,
            store,
            sign,
        } => narinfo(&store_path, &store, sign.as_deref()),
        Command::Store { args, command } => store::run(&args.state_dir, &args.store, command),
        Command::Serve { args } => serve(*args),
        Command::Seed { args } => block_on(peerix::seed_cmd::seed(args)),
        Command::Unseed { args } => block_on(peerix::seed_cmd::unseed(args)),
        Command::Status { args } => block_on(peerix::seed_cmd::status(args)),
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
    tune_malloc();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(peerix::serve::run(cfg))
}

/// glibc's malloc, tuned for a daemon that moves big NARs in chunks of ~256 KiB (the
/// environment's `MALLOC_ARENA_MAX` / `MALLOC_MMAP_THRESHOLD_` still decide when set):
/// - Chunk buffers come from mmap and go back to the OS when freed. By default glibc raises
///   its mmap threshold to the size of the first such buffer freed, after which chunks are cut
///   from the heap, which fragments and keeps growing: a 4 GiB path substituted from a peer
///   peaked at 77 MiB, 2 GiB at 56, against 46 at 2 GiB with the threshold fixed.
/// - At most two arenas: glibc gives every thread that allocates under contention an arena of
///   its own, and memory freed in one is not reused by the others; a 1 GiB path from three
///   peers peaked ~10 MiB higher with the default (8 arenas per core). Two keep allocation
///   from serialising on one lock.
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
    }
}

fn keygen(name: &str, secret_file: &Path, public_file: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = SecretKey::generate(name).context("generating the key")?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(secret_file)
        .with_context(|| format!("creating {}", secret_file.display()))?;
    f.write_all(key.to_string().as_bytes())
        .with_context(|| format!("writing {}", secret_file.display()))?;
    std::fs::write(public_file, key.public_key().to_string())
        .with_context(|| format!("writing {}", public_file.display()))?;
    Ok(())
}

fn nar_dump(path: &Path) -> Result<()> {
    let stdout = std::io::stdout();
    // A large buffer: the NAR is written in big slices of file contents.
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, stdout.lock());
    peerix_nix::nar::dump_path(path, &mut out)
        .with_context(|| format!("dumping {}", path.display()))?;
    out.flush().context("writing to stdout")?;
    Ok(())
}

fn narinfo(store_path: &str, root: &Path, sign: Option<&Path>) -> Result<()> {
    let path = StorePath::from_path_prefix(store_path)
        .with_context(|| format!("{store_path} is not a store path"))?;
    let key = sign
        .map(|f| -> Result<SecretKey> {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("reading secret key {}", f.display()))?;
            text.parse()
                .with_context(|| format!("secret key {}", f.display()))
        })
        .transpose()?;
    let store = LocalStore::open(root)
        .with_context(|| format!("opening the Nix store at {}", root.display()))?;
    let Some(info) = store
        .query_path_info(&path)
        .with_context(|| format!("querying {path}"))?
    else {
        bail!("{path} is not valid in the store at {}", root.display());
    };
    let mut ni = NarInfo::for_uncompressed(&info);
    if let Some(key) = &key {
        ni.sign(key);
    }
    print!("{}", ni.render());
    Ok(())
}
