//! The node's libp2p behaviours (block and allow lists, streams, Kademlia, mDNS, identify,
//! ping, and for NATs AutoNAT, the relay client and service, and DCUtR) and the construction
//! of the swarm around them from a [`NodeConfig`]. Everything about how the behaviours are
//! configured lives here; how their events are handled lives in the event loop.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::kad;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    allow_block_list, autonat, connection_limits, dcutr, identify, mdns, noise, ping, relay, yamux,
    Swarm, SwarmBuilder,
};

use super::provider_store::ProviderStore;
use super::relay_service::RelayService;
use super::transport::build_transport;
use super::{NodeConfig, NodeError, IDENTIFY_PROTOCOL_VERSION, KAD_PROTOCOL};

/// How often a node asks the LAN for peers by mDNS once its first probes are done.
const MDNS_QUERY_INTERVAL: Duration = Duration::from_secs(20);

/// AutoNAT's first probe waits this long after the start, for connections to peers to come up.
const AUTONAT_BOOT_DELAY: Duration = Duration::from_secs(5);

/// A probe that found no peer to ask is tried again this soon (libp2p's default is 90 s).
const AUTONAT_RETRY: Duration = Duration::from_secs(20);

/// Keys this node may provide itself (its own budget in the provider store; foreign records
/// have theirs, see [`super::ProviderLimits`]).
pub const MAX_PROVIDED_KEYS: usize = 5_000_000;

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    // Blocking comes first so a banned peer is refused before other behaviours see it.
    pub(super) blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub(super) allowed: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    // Then the caps on connections, per peer and in all, before anything is spent on one.
    pub(super) limits: connection_limits::Behaviour,
    pub(super) stream: libp2p_stream::Behaviour,
    pub(super) kad: kad::Behaviour<ProviderStore>,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) autonat: autonat::Behaviour,
    pub(super) relay_client: relay::client::Behaviour,
    pub(super) relay: Toggle<RelayService>,
    pub(super) dcutr: dcutr::Behaviour,
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
    let dht_limits = cfg.dht_limits.clone();
    let relay_service = cfg.relay_service.clone();
    let conn_limits = connection_limits::ConnectionLimits::default()
        .with_max_established_per_peer(Some(cfg.max_connections_per_peer))
        .with_max_established_incoming(Some(cfg.max_incoming_connections))
        .with_max_pending_incoming(Some(cfg.max_pending_incoming));

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
        // Connections through a relay, secured and multiplexed end to end like direct ones.
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| NodeError::Transport(e.to_string()))?
        .with_behaviour(|key, relay_client| {
            let local = key.public().to_peer_id();
            let mut kad_cfg = kad::Config::new(KAD_PROTOCOL);
            // We pace announcements ourselves (see `Pacer`): kad's own republication would
            // announce every key at once, every interval.
            kad_cfg.set_provider_publication_interval(None);
            kad_cfg.set_provider_record_ttl(Some(provide_interval.saturating_mul(2)));
            kad_cfg.set_query_timeout(Duration::from_secs(30));
            // Inbound records come to the event loop, which hands provider records to the
            // bounded store and drops plain ones (peerix does not use them).
            kad_cfg.set_record_filtering(kad::StoreInserts::FilterBoth);
            let store = ProviderStore::new(local, dht_limits);
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
                limits: connection_limits::Behaviour::new(conn_limits),
                stream: libp2p_stream::Behaviour::new(),
                kad,
                mdns: mdns.into(),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_owned(), key.public())
                        .with_agent_version(format!("peerix/{}", env!("CARGO_PKG_VERSION"))),
                ),
                ping: ping::Behaviour::default(),
                autonat: autonat::Behaviour::new(
                    local,
                    autonat::Config {
                        boot_delay: AUTONAT_BOOT_DELAY,
                        retry_interval: AUTONAT_RETRY,
                        // peerix runs on LANs and VPNs as much as on the internet: a peer that
                        // can dial back a private address is a verdict worth having.
                        only_global_ips: false,
                        ..autonat::Config::default()
                    },
                ),
                relay_client,
                // Serving only once a direct external address is confirmed (see RelayService),
                // so only a reachable node relays.
                relay: relay_service
                    .map(|limits| RelayService(relay::Behaviour::new(local, limits.config())))
                    .into(),
                dcutr: dcutr::Behaviour::new(local),
            }
        })
        .map_err(|e| NodeError::Transport(e.to_string()))?
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(idle_timeout)
                // A stream's request goes out with its protocol proposal, not a round trip
                // after it: every request of a download opens a stream of its own, and over a
                // long path that round trip left the peer idle before each (100 ms at 100 ms,
                // a quarter of a 2 MiB run's time at 100 Mbit/s). Interoperable: the wire is
                // multistream-select 1.0's; only a dialer offering one protocol settles early,
                // and a listener without it refuses as before, at the first read.
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();
    Ok(swarm)
}
