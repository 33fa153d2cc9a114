//! `peerix seed`: pin closures so this machine keeps serving them to its peers.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};

use super::common::{ask, dedup_pct, paths_n, Answer, CommonArgs};
use super::progress::Printer;
use crate::admin::{Reply, Request};
use crate::seed::{self, human, SeedSummary, Seeder};

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

pub async fn run(args: SeedArgs) -> Result<()> {
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
