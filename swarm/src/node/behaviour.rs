//! The node's libp2p behaviours (block and allow lists, streams, Kademlia, mDNS, identify,
//! ping) and the construction of the swarm around them from a [`NodeConfig`]. Everything
//! about how the behaviours are configured lives here; how their events are handled lives in
//! the event loop.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::kad;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{allow_block_list, identify, mdns, ping, Swarm, SwarmBuilder};

use super::transport::build_transport;
use super::{NodeConfig, NodeError, IDENTIFY_PROTOCOL_VERSION, KAD_PROTOCOL};

/// How often a node asks the LAN for peers by mDNS once its first probes are done.
const MDNS_QUERY_INTERVAL: Duration = Duration::from_secs(20);

/// Provider records we keep, for our own keys and for those other nodes announce to us. A LAN
/// of a few dozen nodes with 100,000 paths each stays well below this; the bound exists so
/// that a hostile peer cannot grow the store without limit.
pub const MAX_PROVIDED_KEYS: usize = 5_000_000;

/// Plain Kademlia records are not used by peerix; keeping their limit low keeps peers from
/// filling our memory with them.
const MAX_RECORDS: usize = 1024;

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    // Blocking comes first so a banned peer is refused before other behaviours see it.
    pub(super) blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub(super) allowed: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    pub(super) stream: libp2p_stream::Behaviour,
    pub(super) kad: kad::Behaviour<MemoryStore>,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
}

pub(super) fn build_swarm(
    keypair: Keypair,
    cfg: &NodeConfig,
) -> Result<Swarm<Behaviour>, NodeError> {
    let psk = cfg.swarm_key;
    let mdns_on = cfg.mdns;
    let allowed = cfg.allowed_peers.clone();
    let kad_server = cfg.kad_server;
    let provide_interval = cfg.provide_interval;
    let idle_timeout = cfg.idle_timeout;

    let mdns = if mdns_on {
        Some(
            mdns::tokio::Behaviour::new(
                mdns::Config {
                    // A node answers queries but learns of others only from its own: with the
                    // default 5 minutes, a node whose first queries went out before a neighbour
                    // was up did not find it for minutes.
                    query_interval: MDNS_QUERY_INTERVAL,
                    ..mdns::Config::default()
                },
                keypair.public().to_peer_id(),
            )
            .map_err(NodeError::Mdns)?,
        )
    } else {
        None
    };

    let swarm = SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_other_transport(|key| build_transport(key, psk))
        .map_err(|e| NodeError::Transport(e.to_string()))?
        .with_behaviour(|key| {
            let local = key.public().to_peer_id();
            let mut kad_cfg = kad::Config::new(KAD_PROTOCOL);
            // We pace announcements ourselves (see `Pacer`): kad's own republication would
            // announce every key at once, every interval.
            kad_cfg.set_provider_publication_interval(None);
            kad_cfg.set_provider_record_ttl(Some(provide_interval.saturating_mul(2)));
            kad_cfg.set_query_timeout(Duration::from_secs(30));
            let store = MemoryStore::with_config(
                local,
                MemoryStoreConfig {
                    max_records: MAX_RECORDS,
                    max_provided_keys: MAX_PROVIDED_KEYS,
                    ..Default::default()
                },
            );
            let mut kad = kad::Behaviour::with_config(local, store, kad_cfg);
            if kad_server {
                kad.set_mode(Some(kad::Mode::Server));
            }
            let allowed = allowed.map(|peers| {
                let mut b =
                    allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
                for p in peers {
                    b.allow_peer(p);
                }
                b
            });
            Behaviour {
                blocked: Default::default(),
                allowed: allowed.into(),
                stream: libp2p_stream::Behaviour::new(),
                kad,
                mdns: mdns.into(),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_owned(), key.public())
                        .with_agent_version(format!("peerix/{}", env!("CARGO_PKG_VERSION"))),
                ),
                ping: ping::Behaviour::default(),
            }
        })
        .map_err(|e| NodeError::Transport(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(idle_timeout))
        .build();
    Ok(swarm)
}
