//! The libp2p transport: TCP (through pnet when a swarm key is set) with TLS or noise and yamux,
//! plus QUIC when the swarm is not private. Kept apart from the behaviours because it only decides how bytes get between two nodes,
//! not what the nodes say to each other.

use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, OrTransport};
use libp2p::core::upgrade::Version;
use libp2p::core::ConnectedPoint;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{Multiaddr, PeerId, Transport};

use super::security::tls_then_noise;

/// Bounds a TCP handshake (pnet, TLS or noise, yamux); a peer with the wrong swarm key can otherwise
/// leave multistream-select waiting for bytes that never come.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// What one read from a TCP socket may take. TLS (rustls) asks for a record at a time, at most
/// 16 KiB and often 4 KiB; reading the socket through this buffer takes what has arrived in
/// one system call instead: a loopback download of 512 MiB made 12 thousand reads against 42.
/// At most 64 KiB per connection, within the connection limits (README, Benchmarks).
const READ_BUFFER: usize = 64 * 1024;

/// A TCP connection (through pnet or not), read through [`READ_BUFFER`] before TLS or noise.
fn read_buffered<S: futures::AsyncRead>(socket: S, _: ConnectedPoint) -> futures::io::BufReader<S> {
    futures::io::BufReader::with_capacity(READ_BUFFER, socket)
}

/// Whether `addr` is a QUIC address.
pub fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
}

/// Which local port a TCP dial leaves from is the caller's choice ([`DialOpts`]): the dials
/// peerix starts itself for peers it found (mDNS, explicit peers, providers, the handle's
/// dials) take a fresh port, the rest (bootstrap nodes, relays, Kademlia, hole punching)
/// leave from the listen port.
///
/// A fresh port, because two nodes that find each other at the same moment (mDNS answers
/// reach both at once) would otherwise dial each other from and to the same port pair: TCP
/// turns that into one simultaneous-open connection on which both sides are the initiator,
/// and the handshake fails on both. The listen port, because behind a NAT it is what the
/// relay and the bootstrap nodes observe and what a hole punch must come from: the NAT keeps
/// the port when it can, so peers learn an address that maps back to our listener.
///
/// [`DialOpts`]: libp2p::swarm::dial_opts::DialOpts
pub(super) fn build_transport(
    key: &Keypair,
    psk: Option<PreSharedKey>,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    let tcp_config = libp2p::tcp::Config::default().nodelay(true);
    let security = tls_then_noise(key)?;
    // The yamux defaults auto-tune each stream's window (up to a large per-connection cap),
    // which is what lets one stream carry hundreds of MB/s.
    let yamux = libp2p::yamux::Config::default();
    let tcp = match psk {
        Some(psk) => libp2p::tcp::tokio::Transport::new(tcp_config)
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .map(read_buffered)
            .upgrade(Version::V1Lazy)
            .authenticate(security)
            .multiplex(yamux)
            .timeout(HANDSHAKE_TIMEOUT)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        None => libp2p::tcp::tokio::Transport::new(tcp_config)
            .map(read_buffered)
            .upgrade(Version::V1Lazy)
            .authenticate(security)
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
