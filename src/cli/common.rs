//! What `peerix seed`, `unseed` and `status` share: where the state is, and who does the
//! work: the running daemon over its admin socket, or this process on the state directory
//! when no daemon runs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::admin::{self, Reply, Request};
use crate::config::{ServeArgs, ServeConfig};
use crate::seed::SeedEvent;
use crate::serve::{open_parts, Parts};

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
    pub(super) fn config(&self) -> Result<ServeConfig> {
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

/// Who does the work.
pub(super) enum Answer {
    /// The running daemon did; its reply.
    Daemon(Reply),
    /// No daemon runs; the state directory is open here.
    Local(Box<Parts>),
}

/// Ask the daemon, or open the state directory when none runs.
pub(super) async fn ask(
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

pub(super) fn paths_n(n: usize) -> String {
    format!("{n} path{}", if n == 1 { "" } else { "s" })
}

pub(super) fn dedup_pct(bytes: u64, copied: u64) -> f64 {
    if bytes == 0 {
        0.0
    } else {
        100.0 * (1.0 - copied as f64 / bytes as f64)
    }
}
