//! Not part of peerix: the child node of the swarm test
//! `needs_root::mdns_discovers_peers_across_network_namespaces`, which runs one of these in
//! each of two network namespaces. A separate binary rather than a mode of the test binary, so
//! the test runner never counts the child as a test that passed.
//!
//! Usage: `peerix-swarm-mdns-node STATE_DIR`. It listens on every address in its namespace with
//! mDNS on, prints `PEERIX-CHILD ID <peer id>` and then `PEERIX-CHILD MDNS <peer id>` for every
//! peer mDNS finds and `PEERIX-CHILD CONNECTED <peer id>` for every connection, and stops when its stdin closes (or after two minutes, should the parent
//! have died without closing it).

use std::time::Duration;

use peerix_swarm::node::{Discovery, Node, NodeConfig, NodeEvent};
use tokio::sync::broadcast::error::RecvError;

const PREFIX: &str = "PEERIX-CHILD";

#[tokio::main]
async fn main() {
    let Some(dir) = std::env::args_os().nth(1) else {
        eprintln!("usage: peerix-swarm-mdns-node STATE_DIR");
        std::process::exit(2);
    };
    let mut cfg = NodeConfig::new(std::path::Path::new(&dir));
    cfg.listen = vec!["/ip4/0.0.0.0/tcp/0".parse().unwrap()];
    cfg.mdns = true;
    let node = Node::start(cfg).await.expect("child node starts");
    let mut events = node.events();
    println!("{PREFIX} ID {}", node.peer_id());

    let (closed_tx, mut closed) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = closed_tx.send(());
    });
    let _ = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            tokio::select! {
                e = events.recv() => match e {
                    Ok(NodeEvent::Discovered { peer, via: Discovery::Mdns }) => {
                        println!("{PREFIX} MDNS {peer}");
                    }
                    Ok(NodeEvent::PeerConnected(peer)) => println!("{PREFIX} CONNECTED {peer}"),
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break,
                },
                _ = &mut closed => break,
            }
        }
    })
    .await;
    node.shutdown().await;
}
