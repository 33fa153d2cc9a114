//! `peerix unseed`: remove seeds; their paths are unpinned and their space given back.

use anyhow::{bail, Result};

use super::common::{ask, paths_n, Answer, CommonArgs};
use crate::admin::{Reply, Request};
use crate::seed::{self, human, Seeder, UnseedSummary};

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

pub async fn run(args: UnseedArgs) -> Result<()> {
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
