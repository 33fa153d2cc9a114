//! `peerix store …`: the chunk store seen and handled by an operator.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use peerix_chunkstore::Progress;
use peerix_nix::{LocalStore, Sha256Hash, StorePath};

use crate::config::DEFAULT_STATE_DIR;

#[derive(clap::Subcommand, Debug)]
pub enum StoreCommand {
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

#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// peerix's state directory (the chunk store is in its `chunks/`).
    #[arg(long, default_value = DEFAULT_STATE_DIR, global = true)]
    pub state_dir: PathBuf,
    /// Root of the local Nix store: `/`, or a chroot store's root.
    #[arg(long, default_value = "/", global = true)]
    pub store: PathBuf,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Progress as plain lines on stderr, one per 8 MiB: readable in a pipe or a log, and what
/// tests wait for before they kill the process.
fn progress_lines(what: &str) -> impl FnMut(&Progress) + '_ {
    let mut next = 0u64;
    move |p: &Progress| {
        if p.bytes >= next {
            eprintln!(
                "{what}: {:.1} MiB, {} chunks ({} new, {:.1} MiB new)",
                mib(p.bytes),
                p.chunks,
                p.new_chunks,
                mib(p.new_bytes)
            );
            next = p.bytes + 8 * 1024 * 1024;
        }
    }
}

pub fn run(args: &StoreArgs, cmd: StoreCommand) -> Result<()> {
    let (state_dir, store_root) = (args.state_dir.as_path(), args.store.as_path());
    let cs = crate::serve::open_chunk_store(state_dir, store_root)?;
    match cmd {
        StoreCommand::Ingest { source } => {
            let m = if source.starts_with(peerix_nix::STORE_DIR) {
                let path = StorePath::from_path_prefix(&source)
                    .with_context(|| format!("{source} is not a store path"))?;
                let ls = LocalStore::open(store_root).with_context(|| {
                    format!("opening the Nix store at {}", store_root.display())
                })?;
                let info = ls
                    .query_path_info(&path)?
                    .with_context(|| format!("{path} is not valid in the local store"))?;
                cs.ingest_local(
                    &path,
                    Some((info.nar_hash, info.nar_size)),
                    &mut progress_lines("ingest"),
                )
                .with_context(|| format!("indexing {path}"))?
            } else {
                let f =
                    std::fs::File::open(&source).with_context(|| format!("opening {source}"))?;
                let r = std::io::BufReader::with_capacity(1 << 20, f);
                cs.ingest_nar(r, None, None, &mut progress_lines("ingest"))
                    .with_context(|| format!("ingesting {source}"))?
            };
            println!(
                "{} {} bytes {} chunks",
                m.nar_hash,
                m.nar_size,
                m.chunks.len()
            );
        }
        StoreCommand::Cat { nar_hash } => {
            let h: Sha256Hash = nar_hash
                .parse()
                .with_context(|| format!("{nar_hash} is not a NarHash"))?;
            let mut r = cs.nar_reader(&h)?;
            let stdout = std::io::stdout();
            if stdout.is_terminal() {
                bail!("refusing to write a NAR to a terminal; redirect stdout");
            }
            let mut out = stdout.lock();
            std::io::copy(&mut r, &mut out).context("reading the NAR")?;
            out.flush()?;
        }
        StoreCommand::Stats => {
            let s = cs.stats()?;
            let c = cs.chunker();
            println!(
                "chunk sizes (min/avg/max): {}/{}/{} KiB",
                c.min / 1024,
                c.avg / 1024,
                c.max / 1024
            );
            println!(
                "NARs: {} ({} downloads in progress)",
                s.manifests, s.partial_manifests
            );
            println!("logical bytes: {:.1} MiB", mib(s.logical_bytes));
            println!(
                "unique bytes: {:.1} MiB in {} chunks",
                mib(s.unique_bytes),
                s.chunks
            );
            println!("dedup ratio: {:.2}", s.dedup_ratio());
            println!(
                "read in place from the Nix store: {:.1} MiB",
                mib(s.local_bytes)
            );
            println!(
                "in packs: {:.1} MiB stored as {:.1} MiB; {} pack files, {:.1} MiB on disk",
                mib(s.packed_bytes),
                mib(s.packed_stored_bytes),
                s.pack_files,
                mib(s.pack_file_bytes)
            );
            println!(
                "index: {:.1} MiB ({:.3}% of the logical bytes)",
                mib(s.index_bytes),
                100.0 * s.index_bytes as f64 / s.logical_bytes.max(1) as f64
            );
            println!("pinned paths: {}", s.pins);
        }
        StoreCommand::Fsck { verify } => {
            let r = cs.fsck(verify)?;
            println!(
                "{} NARs, {} chunks, {} packs, {:.1} MiB reclaimable by gc",
                r.manifests,
                r.chunks,
                r.packs,
                mib(r.garbage_bytes)
            );
            if r.left_store > 0 {
                println!(
                    "{} chunks were read in place from paths Nix has collected since the last \
                     scan (the daemon's next scan forgets them)",
                    r.left_store
                );
            }
            for p in &r.problems {
                println!("problem: {p}");
            }
            if !r.is_clean() {
                bail!("{} problems found", r.problems.len());
            }
            println!("clean");
        }
        StoreCommand::Gc => {
            let s = cs.gc(&mut |line| eprintln!("gc: {line}"))?;
            println!(
                "deleted {} chunks ({:.1} MiB), released {} pack copies, removed {} packs, compacted {}, reclaimed {:.1} MiB",
                s.chunks_deleted,
                mib(s.bytes_deleted),
                s.pack_copies_released,
                s.packs_removed,
                s.packs_compacted,
                mib(s.bytes_reclaimed)
            );
        }
        StoreCommand::Rm { nar_hash } => {
            let h: Sha256Hash = nar_hash
                .parse()
                .with_context(|| format!("{nar_hash} is not a NarHash"))?;
            if !cs.remove_manifest(&h)? {
                bail!("no NAR {h} in the store");
            }
        }
    }
    Ok(())
}
