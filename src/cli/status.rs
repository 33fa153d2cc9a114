//! `peerix status`: the daemon's peers, the seeds, what is shared, and the chunk store.

use anyhow::{bail, Result};

use super::common::CommonArgs;
use crate::admin::{self, Reply, Request, StatusReport, StoreStatus};
use crate::seed::{self, human};
use crate::serve::open_chunk_store;

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// Print the status as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

pub async fn run(args: StatusArgs) -> Result<()> {
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
            println!("reachability: {}", d.reachability);
            if !d.relays.is_empty() {
                println!("  reachable through relay {}", d.relays.join(", relay "));
            }
            println!("peers: {} connected", d.peers.len());
            for p in &d.peers {
                let how = if p.relayed { "relayed" } else { "direct" };
                println!("  {} {how} {}", p.id, p.addr.as_deref().unwrap_or(""));
            }
            let n = &d.nat;
            println!(
                "relay service: {} reservations, {} circuits now, {} in all, {} refused; hole punching: {} succeeded, {} failed",
                n.relay_reservations,
                n.relay_circuits_active,
                n.relay_circuits_total,
                n.relay_circuits_denied,
                n.hole_punches_succeeded,
                n.hole_punches_failed
            );
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
