//! What the [`Node`](super::Node) handle asks of the event loop, which owns the swarm.

use libp2p::kad;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::PeerId;
use peerix_nix::StorePathHash;
use tokio::sync::{mpsc, oneshot};

use super::{NodeError, Overview, ProviderStats};

/// One request from the handle; those with an answer carry where it goes.
pub(super) enum Command {
    Dial {
        opts: DialOpts,
        peer: Option<PeerId>,
        target: String,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    ConnectedPeers(oneshot::Sender<Vec<PeerId>>),
    Overview(oneshot::Sender<Overview>),
    Providers {
        key: kad::RecordKey,
        found: mpsc::UnboundedSender<PeerId>,
    },
    SetProvided(Vec<StorePathHash>),
    DhtStats(oneshot::Sender<ProviderStats>),
    Ban {
        peer: PeerId,
        why: String,
        /// A peer whose ban was lifted to make room.
        lifted: Option<PeerId>,
        reply: oneshot::Sender<()>,
    },
    Shutdown(oneshot::Sender<()>),
}
