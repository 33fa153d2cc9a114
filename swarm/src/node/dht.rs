//! The Kademlia side of the event loop: bootstrapping as peers arrive, provider lookups (whose
//! results stream back to the caller, and whose providers are dialled while the lookup still
//! knows their addresses), and the outcome of announcements. Apart from the main loop because
//! Kademlia's query results are a protocol of their own.

use std::time::Duration;

use libp2p::kad;
use libp2p::kad::store::RecordStore;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use peerix_nix::StorePathHash;
use tokio::time::Instant;

use super::event_loop::EventLoop;
use super::{Discovery, NodeEvent};

/// Bootstrap again at most this often when new peers keep arriving.
const BOOTSTRAP_MIN_GAP: Duration = Duration::from_secs(30);

impl EventLoop {
    pub(super) fn routing_table_empty(&mut self) -> bool {
        self.swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .all(|b| b.num_entries() == 0)
    }

    pub(super) fn maybe_bootstrap(&mut self) {
        let now = Instant::now();
        if self
            .last_bootstrap
            .is_some_and(|t| now.duration_since(t) < BOOTSTRAP_MIN_GAP)
        {
            return;
        }
        // NoKnownPeers only means the routing table is still empty; the next peer retries.
        if self.swarm.behaviour_mut().kad.bootstrap().is_ok() {
            self.last_bootstrap = Some(now);
        }
    }

    pub(super) fn on_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => match result {
                kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                    providers,
                    ..
                })) => {
                    let mut to_dial = Vec::new();
                    if let Some(q) = self.provider_queries.get_mut(&id) {
                        for p in providers {
                            if p == self.local || !q.seen.insert(p) {
                                continue;
                            }
                            if q.found.send(p).is_err() {
                                break;
                            }
                            to_dial.push(p);
                        }
                    }
                    for p in to_dial {
                        if !self.swarm.is_connected(&p) {
                            self.emit(NodeEvent::Discovered {
                                peer: p,
                                via: Discovery::Kad,
                            });
                            // Now, while the query still holds the addresses it learned,
                            // and even while another dial is under way: that one may know
                            // only addresses that lead nowhere (a node behind NAT is known
                            // by its LAN addresses too), the record has the one that works
                            // (its relayed address, say).
                            let opts = DialOpts::peer_id(p)
                                .condition(PeerCondition::Disconnected)
                                .allocate_new_port()
                                .build();
                            if let Err(e) = self.swarm.dial(opts) {
                                tracing::debug!(peer = %p, error = %e, "cannot dial a provider");
                            }
                        }
                    }
                    if step.last {
                        self.provider_queries.remove(&id);
                    }
                }
                kad::QueryResult::GetProviders(Ok(
                    kad::GetProvidersOk::FinishedWithNoAdditionalRecord { .. },
                )) => {
                    self.provider_queries.remove(&id);
                }
                kad::QueryResult::GetProviders(Err(e)) => {
                    tracing::debug!(error = %e, "provider lookup ended");
                    self.provider_queries.remove(&id);
                }
                kad::QueryResult::StartProviding(result)
                    if step.last && self.announcing.remove(&id).is_some() =>
                {
                    match result {
                        Ok(kad::AddProviderOk { key }) => {
                            if let Ok(h) = <[u8; 20]>::try_from(key.as_ref()) {
                                self.emit(NodeEvent::Announced(StorePathHash(h)));
                            }
                        }
                        Err(e) => tracing::debug!(error = %e, "announcement incomplete"),
                    }
                    self.pacer.done();
                    if let Some(n) = self.pacer.again_finished() {
                        tracing::info!(paths = n, "announced again, with the relayed address");
                    }
                    self.pump_announcements(Instant::now());
                }
                kad::QueryResult::Bootstrap(Err(e)) => {
                    tracing::debug!(error = %e, "bootstrap incomplete");
                }
                _ => {}
            },
            kad::Event::InboundRequest {
                request: kad::InboundRequest::AddProvider { record: Some(r) },
            } => {
                // The store bounds, counts and logs what it refuses.
                let _ = self.swarm.behaviour_mut().kad.store_mut().add_provider(r);
            }
            kad::Event::RoutingUpdated {
                peer, is_new_peer, ..
            } if is_new_peer && !self.swarm.is_connected(&peer) => {
                self.emit(NodeEvent::Discovered {
                    peer,
                    via: Discovery::Kad,
                });
            }
            _ => {}
        }
    }
}

impl EventLoop {
    pub(super) fn pump_announcements(&mut self, now: Instant) {
        // Announcing to nobody would only burn keys off the queue; they wait for a peer.
        if self.pacer.set.is_empty() || self.routing_table_empty() {
            return;
        }
        while let Some(key) = self.pacer.next(now) {
            let rkey = kad::RecordKey::new(key.as_bytes());
            match self.swarm.behaviour_mut().kad.start_providing(rkey) {
                Ok(id) => {
                    self.announcing.insert(id, key);
                }
                Err(e) => {
                    self.pacer.done();
                    tracing::warn!(key = %key, error = ?e, "cannot announce a store path");
                }
            }
        }
    }
}
