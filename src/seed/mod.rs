//! `peerix seed` / `unseed`: closures pinned in the chunk store so that this machine keeps
//! serving them to its peers, even after they leave the local Nix store.
//!
//! The work happens where the chunk store is open: inside the running daemon (asked over the
//! admin socket, see [`crate::admin`]), or in the command itself when no daemon runs, in which
//! case the daemon announces the seeds when it starts.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use peerix_chunkstore::ChunkStore;
use peerix_nix::{LocalStore, NarInfo, PathInfo, StorePath, StorePathHash, STORE_DIR};
use serde::{Deserialize, Serialize};

use crate::share::Sharing;

pub(crate) mod record;
pub use record::Seed;

/// Upstream checks in flight at once.
const UPSTREAM_CONCURRENCY: usize = 8;

/// Names listed in full when the output states what a seed newly shares or leaves out.
const NAMES_SHOWN: usize = 20;

/// What the operator asked to seed: the label as given (a store path, or a link to one such as
/// `/run/current-system`), and the store path it resolved to.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Target {
    pub label: String,
    pub root: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SeedEvent {
    /// A closure was computed. `paths` and `bytes` are what will be pinned. `private` lists
    /// paths neither in the upstream cache nor signed by this node's key or a trusted key:
    /// pinned and shared when `shared_private` (`--share-private-paths`), left out otherwise.
    /// `denied` lists those a deny pattern keeps private whatever else says.
    Plan {
        label: String,
        root: String,
        paths: usize,
        bytes: u64,
        private: Vec<String>,
        shared_private: bool,
        denied: Vec<String>,
    },
    /// Work on a path begins (a big one can take a while).
    Begin { name: String, nar_size: u64 },
    /// One path is pinned; `copied` of its NAR bytes were not held in the chunk store before.
    Path {
        name: String,
        nar_size: u64,
        copied: u64,
    },
    /// An earlier seed under the same label was replaced; these paths were released.
    Replaced { label: String, released: usize },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SeedSummary {
    pub seeds: usize,
    pub paths: usize,
    pub bytes: u64,
    pub copied: u64,
    /// Paths shared only because `--share-private-paths` was given.
    pub shared_private: usize,
    /// Paths left out for want of `--share-private-paths`.
    pub not_shared: usize,
    pub denied: usize,
    pub seconds: f64,
    /// Whether a running daemon took the seed (and announces it now).
    pub announced: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UnseedSummary {
    pub removed: Vec<String>,
    pub unknown: Vec<String>,
    /// Paths no seed pins any more.
    pub released: usize,
    /// Bytes the chunk store gave back.
    pub freed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedStatus {
    pub label: String,
    pub root: String,
    pub paths: usize,
    pub bytes: u64,
}

/// The chunk store, the local store and the sharing rules: what seeding works with.
pub struct Seeder {
    pub store: ChunkStore,
    pub local: Arc<LocalStore>,
    pub sharing: Arc<Sharing>,
}

impl Seeder {
    /// Pin the closures of `targets`. A path that a deny pattern matches is never pinned; one
    /// that is neither public nor signed by a key this node trusts (see
    /// [`Sharing::seedable`]) only when `share_private` says so.
    pub async fn seed(
        &self,
        targets: &[Target],
        share_private: bool,
        on_event: &(dyn Fn(SeedEvent) + Send + Sync),
    ) -> Result<SeedSummary> {
        let started = Instant::now();
        let mut sum = SeedSummary::default();
        for t in targets {
            let root = StorePath::from_full_path(&t.root)
                .with_context(|| format!("{}: not a store path", t.root))?;
            let local = self.local.clone();
            let r = root.clone();
            let infos = tokio::task::spawn_blocking(move || -> Result<Vec<PathInfo>> {
                if local.query_path_info(&r)?.is_none() {
                    bail!("{} is not valid in the local Nix store", r.to_full_path());
                }
                let mut v = vec![];
                for p in local.closure(std::slice::from_ref(&r))? {
                    v.push(
                        local
                            .query_path_info(&p)?
                            .with_context(|| format!("{p} vanished from the store"))?,
                    );
                }
                Ok(v)
            })
            .await??;

            let (denied, candidates): (Vec<PathInfo>, Vec<PathInfo>) = infos
                .into_iter()
                .partition(|i| self.sharing.denied(i.path.name()));
            let denied: Vec<String> = denied
                .iter()
                .map(|i| i.path.base_name().to_owned())
                .collect();
            // Upstream is asked about several paths at once, as a scan does.
            let sharing = self.sharing.clone();
            let verdicts: Vec<bool> = futures::stream::iter(candidates.clone())
                .map(move |i| {
                    let sharing = sharing.clone();
                    async move { sharing.seedable(&i).await }
                })
                .buffered(UPSTREAM_CONCURRENCY)
                .collect()
                .await;
            let mut seeded = vec![];
            let mut private = vec![];
            let mut private_members = vec![];
            for (info, ok) in candidates.into_iter().zip(verdicts) {
                if !ok {
                    private.push(info.path.base_name().to_owned());
                    if !share_private {
                        continue;
                    }
                    private_members.push(info.path.hash());
                }
                seeded.push(info);
            }
            let bytes = seeded.iter().map(|i| i.nar_size).sum::<u64>();
            if share_private {
                sum.shared_private += private.len();
            } else {
                sum.not_shared += private.len();
            }
            sum.denied += denied.len();
            on_event(SeedEvent::Plan {
                label: t.label.clone(),
                root: t.root.clone(),
                paths: seeded.len(),
                bytes,
                private,
                shared_private: share_private,
                denied,
            });

            let mut members = vec![];
            for info in seeded {
                let name = info.path.base_name().to_owned();
                let nar_size = info.nar_size;
                on_event(SeedEvent::Begin {
                    name: name.clone(),
                    nar_size,
                });
                let copied = self
                    .store
                    .blocking(move |cs| {
                        let hash = info.path.hash();
                        let indexed = cs.path_nar(&hash)?.map(|(n, _)| n) == Some(info.nar_hash)
                            && cs.has_manifest(&info.nar_hash)?;
                        if !indexed {
                            cs.ingest_local(
                                &info.path,
                                Some((info.nar_hash, info.nar_size)),
                                &mut |_| {},
                            )?;
                        }
                        Ok(cs.pin_path(&NarInfo::for_uncompressed(&info))?.copied_bytes)
                    })
                    .await
                    .with_context(|| format!("pinning {name}"))?;
                members.push(StorePath::from_base_name(&name)?.hash());
                sum.paths += 1;
                sum.bytes += nar_size;
                sum.copied += copied;
                on_event(SeedEvent::Path {
                    name,
                    nar_size,
                    copied,
                });
                // Serving Nix and peers never waits behind a long seed.
                tokio::task::yield_now().await;
            }

            let seed = Seed {
                label: t.label.clone(),
                root: root.base_name().to_owned(),
                members,
                private: private_members,
            };
            let (cs, local) = (self.store.clone(), self.local.clone());
            let released = tokio::task::spawn_blocking(move || -> Result<usize> {
                let old = Seed::load(&cs, &seed.label)?;
                seed.save(&cs)?;
                match old {
                    Some(old) => release(&cs, &local, &old.members).map(|(n, _)| n),
                    None => Ok(0),
                }
            })
            .await??;
            if released > 0 {
                on_event(SeedEvent::Replaced {
                    label: t.label.clone(),
                    released,
                });
            }
            sum.seeds += 1;
        }
        sum.seconds = started.elapsed().as_secs_f64();
        Ok(sum)
    }

    /// Remove seeds by label, root store path or root base name (`all`: every seed), unpin
    /// what no remaining seed holds, and give its space back.
    pub async fn unseed(&self, which: Vec<String>, all: bool) -> Result<UnseedSummary> {
        let (cs, local) = (self.store.clone(), self.local.clone());
        tokio::task::spawn_blocking(move || -> Result<UnseedSummary> {
            let mut out = UnseedSummary::default();
            let seeds = Seed::all(&cs)?;
            let mut dropped = vec![];
            for w in &which {
                let hit: Vec<&Seed> = seeds
                    .iter()
                    .filter(|s| {
                        s.label == *w || s.root == *w || format!("{STORE_DIR}/{}", s.root) == *w
                    })
                    .collect();
                if hit.is_empty() {
                    out.unknown.push(w.clone());
                }
                dropped.extend(hit.into_iter().cloned());
            }
            if all {
                dropped = seeds.clone();
            }
            let mut candidates = HashSet::new();
            for s in &dropped {
                if Seed::remove(&cs, &s.label)? {
                    out.removed.push(s.label.clone());
                }
                candidates.extend(s.members.iter().copied());
            }
            let candidates: Vec<StorePathHash> = candidates.into_iter().collect();
            let (released, freed) = release(&cs, &local, &candidates)?;
            out.released = released;
            out.freed = freed;
            Ok(out)
        })
        .await?
    }

    pub async fn seeds(&self) -> Result<Vec<SeedStatus>> {
        self.store.blocking(|cs| Ok(seed_statuses(cs))).await?
    }
}

/// Every seed with its size.
pub fn seed_statuses(cs: &ChunkStore) -> Result<Vec<SeedStatus>> {
    let mut out = vec![];
    for s in Seed::all(cs)? {
        let mut bytes = 0;
        for m in &s.members {
            if let Some(i) = cs.pinned_info(m)? {
                bytes += i.nar_size;
            }
        }
        out.push(SeedStatus {
            label: s.label,
            root: s.root,
            paths: s.members.len(),
            bytes,
        });
    }
    Ok(out)
}

/// Unpin those of `paths` that no seed holds any more; NARs of theirs that are not in the local
/// store are dropped, and a GC gives the space back. Returns (paths unpinned, bytes freed).
fn release(cs: &ChunkStore, local: &LocalStore, paths: &[StorePathHash]) -> Result<(usize, u64)> {
    let held: HashSet<StorePathHash> = Seed::all(cs)?
        .into_iter()
        .flat_map(|s| s.members.into_iter())
        .collect();
    let mut released = 0;
    for h in paths.iter().filter(|h| !held.contains(h)) {
        let info = cs.pinned_info(h)?;
        if cs.unpin(h)? {
            released += 1;
        }
        // A NAR whose path is still in the local store stays indexed there (in place).
        if let Some(info) = info {
            if local.query_path_info(&info.store_path)?.is_none() {
                if let Err(e) = cs.remove_manifest(&info.nar_hash) {
                    // Another pinned path with the same NAR keeps it.
                    tracing::debug!(path = %info.store_path, error = %e, "NAR kept");
                }
            }
        }
    }
    if released == 0 {
        return Ok((0, 0));
    }
    let gc = cs.gc(&mut |_| {})?;
    Ok((released, gc.bytes_reclaimed))
}

/// Resolve what the operator typed to a store path: a store path (or a path inside one), or a
/// link to one, followed link by link so that a chroot store's links (which point into
/// `/nix/store` of the chroot, not of this machine) resolve too.
pub fn resolve(arg: &str) -> Result<Target> {
    let label = label_of(arg);
    let mut p = PathBuf::from(arg);
    for _ in 0..40 {
        let s = p.to_string_lossy();
        if s.starts_with(STORE_DIR) {
            let sp = StorePath::from_path_prefix(&s)
                .with_context(|| format!("{arg}: {s} is not a store path"))?;
            return Ok(Target {
                label,
                root: sp.to_full_path(),
            });
        }
        if is_link(&p) {
            let t = std::fs::read_link(&p).with_context(|| format!("reading link {s}"))?;
            p = if t.is_absolute() {
                t
            } else {
                p.parent().unwrap_or(Path::new("/")).join(t)
            };
            continue;
        }
        if !p.exists() {
            bail!("{arg}: no such store path or link to one");
        }
        let c = p
            .canonicalize()
            .with_context(|| format!("resolving {arg}"))?;
        if c.to_string_lossy().starts_with(STORE_DIR) {
            p = c;
            continue;
        }
        bail!(
            "{arg} is not in the Nix store ({} is not under {STORE_DIR})",
            c.display()
        );
    }
    bail!("{arg}: too many levels of links")
}

/// The name a seed is kept under: a store path as given, anything else made absolute (so
/// `./result` names the same seed from anywhere).
pub fn label_of(arg: &str) -> String {
    let p = Path::new(arg);
    if arg.starts_with(STORE_DIR) || !p.exists() && !is_link(p) {
        return arg.to_owned();
    }
    std::path::absolute(p)
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_else(|_| arg.to_owned())
}

fn is_link(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink())
}

/// The store paths listed in a file (`-`: standard input), one per line; `#` starts a comment.
pub fn read_list(file: &Path) -> Result<Vec<String>> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading the list from stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    Ok(text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Sizes as people read them.
pub fn human(b: u64) -> String {
    indicatif::HumanBytes(b).to_string()
}

/// Up to [`NAMES_SHOWN`] names, then how many more.
pub fn name_list(names: &[String]) -> String {
    let mut s: Vec<String> = names.iter().take(NAMES_SHOWN).cloned().collect();
    if names.len() > NAMES_SHOWN {
        s.push(format!("… and {} more", names.len() - NAMES_SHOWN));
    }
    s.join("\n    ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_resolve_to_store_paths_even_when_the_store_is_elsewhere() {
        let t = tempfile::tempdir().unwrap();
        let sp = "/nix/store/8mag2g73n0f7ywnqxh9pwc1lwi7b8rs1-seedapp";
        // result -> gen-2 -> (a store path that need not exist on this machine)
        std::os::unix::fs::symlink(format!("{sp}/bin/app"), t.path().join("gen-2")).unwrap();
        std::os::unix::fs::symlink("gen-2", t.path().join("result")).unwrap();
        let r = t.path().join("result");
        let target = resolve(r.to_str().unwrap()).unwrap();
        assert_eq!(target.root, sp);
        assert_eq!(target.label, r.to_str().unwrap());
        assert_eq!(resolve(sp).unwrap().label, sp);
        assert_eq!(resolve(&format!("{sp}/bin")).unwrap().root, sp);
        assert!(
            resolve(t.path().to_str().unwrap()).is_err(),
            "not in the store"
        );
        assert!(resolve("/nonexistent/thing").is_err());
        std::os::unix::fs::symlink("loop", t.path().join("loop")).unwrap();
        assert!(resolve(t.path().join("loop").to_str().unwrap()).is_err());
    }

    #[test]
    fn lists_skip_comments_and_blanks() {
        let t = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            t.path(),
            "# seeds\n/nix/store/a-b # the app\n\n  /nix/store/c-d\n",
        )
        .unwrap();
        assert_eq!(
            read_list(t.path()).unwrap(),
            vec!["/nix/store/a-b", "/nix/store/c-d"]
        );
    }
}
