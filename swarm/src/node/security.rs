//! Offering two security protocols on one TCP connection and taking the first both sides speak:
//! TLS 1.3 (AES-GCM first, which this kind of CPU does in hardware) before noise (ChaCha20,
//! all that earlier peerix nodes speak).
//!
//! libp2p's `SwarmBuilder` has this selection but keeps it private, and peerix builds its TCP
//! transport by hand (a pre-shared key goes under it), so this is that type, from rust-libp2p's
//! `libp2p/src/builder/select_security.rs` (MIT: Copyright 2023 Protocol Labs, 2018 Parity
//! Technologies (UK) Ltd.), with the same behaviour.

use std::error::Error;

use either::Either;
use futures::{future, future::MapOk, TryFutureExt};
use libp2p::core::either::EitherFuture;
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use libp2p::identity::Keypair;
use libp2p::{noise, PeerId};

/// Security upgrade `A` or `B`, `A` preferred.
#[derive(Debug, Clone)]
pub(super) struct SelectSecurity<A, B>(pub A, pub B);

/// What peerix's TCP connections offer: TLS first (AES-GCM costs a tenth of noise's
/// ChaCha20-Poly1305 per byte on a CPU with AES instructions; README, Benchmarks), noise for
/// peers that offer only that.
pub(super) fn tls_then_noise(
    key: &Keypair,
) -> Result<SelectSecurity<libp2p::tls::Config, noise::Config>, Box<dyn Error + Send + Sync>> {
    Ok(SelectSecurity(
        libp2p::tls::Config::new(key)?,
        noise::Config::new(key)?,
    ))
}

type InfoIter<A, B> = std::iter::Chain<
    std::iter::Map<
        <<A as UpgradeInfo>::InfoIter as IntoIterator>::IntoIter,
        fn(<A as UpgradeInfo>::Info) -> Either<<A as UpgradeInfo>::Info, <B as UpgradeInfo>::Info>,
    >,
    std::iter::Map<
        <<B as UpgradeInfo>::InfoIter as IntoIterator>::IntoIter,
        fn(<B as UpgradeInfo>::Info) -> Either<<A as UpgradeInfo>::Info, <B as UpgradeInfo>::Info>,
    >,
>;

impl<A: UpgradeInfo, B: UpgradeInfo> UpgradeInfo for SelectSecurity<A, B> {
    type Info = Either<A::Info, B::Info>;
    type InfoIter = InfoIter<A, B>;

    fn protocol_info(&self) -> Self::InfoIter {
        let a = self.0.protocol_info().into_iter();
        let b = self.1.protocol_info().into_iter();
        a.map(Either::Left as fn(A::Info) -> _)
            .chain(b.map(Either::Right as fn(B::Info) -> _))
    }
}

type Upgraded<F1, F2, TA, TB> = MapOk<
    EitherFuture<F1, F2>,
    fn(future::Either<(PeerId, TA), (PeerId, TB)>) -> (PeerId, future::Either<TA, TB>),
>;

impl<C, A, B, TA, TB, EA, EB> InboundConnectionUpgrade<C> for SelectSecurity<A, B>
where
    A: InboundConnectionUpgrade<C, Output = (PeerId, TA), Error = EA>,
    B: InboundConnectionUpgrade<C, Output = (PeerId, TB), Error = EB>,
{
    type Output = (PeerId, future::Either<TA, TB>);
    type Error = Either<EA, EB>;
    type Future = Upgraded<A::Future, B::Future, TA, TB>;

    fn upgrade_inbound(self, sock: C, info: Self::Info) -> Self::Future {
        match info {
            Either::Left(info) => EitherFuture::First(self.0.upgrade_inbound(sock, info)),
            Either::Right(info) => EitherFuture::Second(self.1.upgrade_inbound(sock, info)),
        }
        .map_ok(future::Either::factor_first)
    }
}

impl<C, A, B, TA, TB, EA, EB> OutboundConnectionUpgrade<C> for SelectSecurity<A, B>
where
    A: OutboundConnectionUpgrade<C, Output = (PeerId, TA), Error = EA>,
    B: OutboundConnectionUpgrade<C, Output = (PeerId, TB), Error = EB>,
{
    type Output = (PeerId, future::Either<TA, TB>);
    type Error = Either<EA, EB>;
    type Future = Upgraded<A::Future, B::Future, TA, TB>;

    fn upgrade_outbound(self, sock: C, info: Self::Info) -> Self::Future {
        match info {
            Either::Left(info) => EitherFuture::First(self.0.upgrade_outbound(sock, info)),
            Either::Right(info) => EitherFuture::Second(self.1.upgrade_outbound(sock, info)),
        }
        .map_ok(future::Either::factor_first)
    }
}

#[cfg(test)]
mod tests {
    use libp2p::core::transport::{DialOpts, ListenerId, PortUse, TransportEvent};
    use libp2p::core::upgrade::Version;
    use libp2p::core::Endpoint;
    use libp2p::Transport;

    use super::*;
    use crate::node::transport::build_transport;

    /// The next event of a transport's listeners.
    async fn next<O>(
        t: &mut libp2p::core::transport::Boxed<O>,
    ) -> TransportEvent<
        <libp2p::core::transport::Boxed<O> as Transport>::ListenerUpgrade,
        std::io::Error,
    > {
        futures::future::poll_fn(|cx| std::pin::Pin::new(&mut *t).poll(cx)).await
    }

    #[test]
    fn tls_is_offered_before_noise() {
        let k = Keypair::generate_ed25519();
        let offered: Vec<String> = tls_then_noise(&k)
            .unwrap()
            .protocol_info()
            .map(|p| p.either(|a| a.to_string(), |b| b.to_string()))
            .collect();
        assert_eq!(offered, ["/tls/1.0.0", "/noise"]);
    }

    /// A node of an earlier version (TCP, noise, yamux: nothing else) and this one's transport
    /// still connect, over real TCP on loopback.
    #[tokio::test]
    async fn a_node_that_speaks_only_noise_still_connects() {
        let (ours_key, old_key) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let mut ours = build_transport(&ours_key, None).unwrap();
        let mut old = libp2p::tcp::tokio::Transport::new(libp2p::tcp::Config::default())
            .upgrade(Version::V1Lazy)
            .authenticate(noise::Config::new(&old_key).unwrap())
            .multiplex(libp2p::yamux::Config::default())
            .boxed();
        let any_port = "/ip4/127.0.0.1/tcp/0".parse().unwrap();
        old.listen_on(ListenerId::next(), any_port).unwrap();
        let addr = loop {
            if let TransportEvent::NewAddress { listen_addr, .. } = next(&mut old).await {
                break listen_addr;
            }
        };
        let opts = DialOpts {
            role: Endpoint::Dialer,
            port_use: PortUse::New,
        };
        // The old node accepts in the background: with multistream-select's lazy mode the
        // listener finishes its side only once the dialer writes, which a bare transport
        // never does; the dialer's noise handshake cannot finish without the listener's.
        let listener = tokio::spawn(async move {
            loop {
                if let TransportEvent::Incoming { upgrade, .. } = next(&mut old).await {
                    tokio::spawn(upgrade);
                }
            }
        });
        let dialled = ours.dial(addr, opts).unwrap().await;
        listener.abort();
        assert_eq!(dialled.unwrap().0, old_key.public().to_peer_id());
    }
}
