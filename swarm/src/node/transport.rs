//! The libp2p transport: TCP (through pnet when a swarm key is set) with noise and yamux,
//! plus QUIC when the swarm is not private, and the TCP wrapper that dials from a fresh port.
//! Kept apart from the behaviours because it only decides how bytes get between two nodes,
//! not what the nodes say to each other.

use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, OrTransport};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{noise, Multiaddr, PeerId, Transport};

/// Bounds a TCP handshake (pnet, noise, yamux); a peer with the wrong swarm key can otherwise
/// leave multistream-select waiting for bytes that never come.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

pub(super) fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

/// TCP dialling from a fresh port rather than the listen port.
///
/// With the listen port reused, two nodes that find each other at the same moment (mDNS
/// answers reach both at once) dial each other from and to the same port pair: TCP turns that
/// into one simultaneous-open connection on which both sides are the initiator, and the
/// handshake fails on both. Reuse only helps NAT hole punching, which peerix does not do.
struct FreshPortTcp(libp2p::tcp::tokio::Transport);

impl Transport for FreshPortTcp {
    type Output = <libp2p::tcp::tokio::Transport as Transport>::Output;
    type Error = <libp2p::tcp::tokio::Transport as Transport>::Error;
    type ListenerUpgrade = <libp2p::tcp::tokio::Transport as Transport>::ListenerUpgrade;
    type Dial = <libp2p::tcp::tokio::Transport as Transport>::Dial;

    fn listen_on(
        &mut self,
        id: libp2p::core::transport::ListenerId,
        addr: Multiaddr,
    ) -> Result<(), libp2p::core::transport::TransportError<Self::Error>> {
        self.0.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: libp2p::core::transport::ListenerId) -> bool {
        self.0.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: libp2p::core::transport::DialOpts,
    ) -> Result<Self::Dial, libp2p::core::transport::TransportError<Self::Error>> {
        let opts = libp2p::core::transport::DialOpts {
            port_use: libp2p::core::transport::PortUse::New,
            ..opts
        };
        self.0.dial(addr, opts)
    }

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<libp2p::core::transport::TransportEvent<Self::ListenerUpgrade, Self::Error>>
    {
        std::pin::Pin::new(&mut self.get_mut().0).poll(cx)
    }
}

pub(super) fn build_transport(
    key: &Keypair,
    psk: Option<PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    let tcp_config = libp2p::tcp::Config::default().nodelay(true);
    let noise = noise::Config::new(key)?;
    // The yamux defaults auto-tune each stream's window (up to a large per-connection cap),
    // which is what lets one stream carry hundreds of MB/s.
    let yamux = libp2p::yamux::Config::default();
    let tcp = match psk {
        Some(psk) => FreshPortTcp(libp2p::tcp::tokio::Transport::new(tcp_config))
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux)
            .timeout(HANDSHAKE_TIMEOUT)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        None => FreshPortTcp(libp2p::tcp::tokio::Transport::new(tcp_config))
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux)
            .timeout(HANDSHAKE_TIMEOUT)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
    };
    if psk.is_some() {
        return Ok(tcp);
    }
    let quic = libp2p::quic::tokio::Transport::new(libp2p::quic::Config::new(key))
        .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn)));
    Ok(OrTransport::new(tcp, quic)
        .map(|either, _| either.into_inner())
        .boxed())
}
