//! The HTTP listener Nix talks to: axum's router on hyper, with the bounds a daemon on a
//! shared machine needs (a cap on connections, a deadline for each request head, so a slow
//! client cannot pin the daemon) and every request tagged with where it came from.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;
use tracing::{debug, warn};

#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// How long a client may take to send a request head.
    pub header_read_timeout: Duration,
    /// How long requests in flight may go on after a shutdown was asked for.
    pub shutdown_grace: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            header_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// Where a request came from: this machine (loopback) or elsewhere. Handlers read it as an
/// extension; a client elsewhere is only ever given what the node shares with its peers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Origin {
    pub local: bool,
}

/// Serve `router` on `listener` until `shutdown` resolves, then let requests in flight finish
/// (for at most the grace period).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, most likely: give connections time to close.
                    warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // A response goes out in parts (its head, then its body as the store or the peers
        // produce it). With Nagle's algorithm each part after the first waits for the client
        // to acknowledge the one before, and a client delays that by up to 40 ms: a small NAR
        // took 40 ms or more where its bytes took a millisecond, every path of a closure.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%addr, error = %e, "cannot set TCP_NODELAY on an HTTP connection");
        }
        let origin = Origin {
            local: addr.ip().is_loopback(),
        };
        let svc = router.clone().map_request(move |mut req: Request<_>| {
            req.extensions_mut().insert(origin);
            req
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%addr, error = %e, "HTTP connection ended with an error");
            }
            drop(permit);
        });
    }
    if tokio::time::timeout(limits.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("HTTP requests still in flight at shutdown were cut");
    }
}
