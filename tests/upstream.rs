//! The upstream cache client against binary caches written by real Nix (`nix copy --to
//! file://…`), served over HTTP on a local port, and against misbehaving servers.
mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::routing::get;
use axum::Router;
use common::Nix;
use peerix_nix::upstream::{UpstreamCache, UpstreamConfig, UpstreamError};
use peerix_nix::{NarInfo, StorePath, StorePathHash};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_http::services::ServeDir;

const COMPRESSIONS: [&str; 4] = ["xz", "zstd", "bzip2", "none"];

/// A hash no test cache holds.
const UNKNOWN: &str = "00000000000000000000000000000001";
const WRONG: &str = "00000000000000000000000000000002";
const HUGE: &str = "00000000000000000000000000000003";
const FAILING: &str = "00000000000000000000000000000005";

fn hash(s: &str) -> StorePathHash {
    s.parse().unwrap()
}

fn sp(s: &str) -> StorePath {
    s.parse().unwrap()
}

/// A local HTTP server that records every request path.
struct Server {
    base: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn count(&self, path: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|p| *p == path)
            .count()
    }
}

async fn serve(router: Router) -> Server {
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    let router = router.layer(middleware::from_fn(move |req: Request, next: Next| {
        log.lock().unwrap().push(req.uri().path().to_owned());
        next.run(req)
    }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    Server {
        base: format!("http://{addr}"),
        requests,
    }
}

/// Serves `dir`, plus routes for the misbehaving cases.
async fn serve_cache(dir: &Path, wrong_narinfo: Option<String>) -> Server {
    let huge = format!(
        "StorePath: /nix/store/{HUGE}-huge\n{}",
        "X-Padding: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n"
            .repeat(1500)
    );
    assert!(huge.len() > NarInfo::MAX_SIZE);
    let mut r = Router::new()
        .route(
            &format!("/{HUGE}.narinfo"),
            get(move || {
                let h = huge.clone();
                async move { h }
            }),
        )
        .route(
            &format!("/{FAILING}.narinfo"),
            get(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "oops") }),
        );
    if let Some(text) = wrong_narinfo {
        r = r.route(
            &format!("/{WRONG}.narinfo"),
            get(move || {
                let t = text.clone();
                async move { t }
            }),
        );
    }
    serve(r.fallback_service(ServeDir::new(dir))).await
}

fn quick_config() -> UpstreamConfig {
    UpstreamConfig {
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        ..UpstreamConfig::default()
    }
}

/// A chroot store with a closure and a content-addressed path, copied by Nix into one file
/// cache per compression.
struct Fixture {
    nix: Nix,
    /// top, mid, leaf, added.
    paths: Vec<String>,
}

impl Fixture {
    fn new(salt: &str) -> Self {
        let nix = common::nix();
        let mut paths = nix.build_closure(salt);
        let t = nix.scratch("tree");
        std::fs::write(t.join("file"), format!("some content {salt}\n").repeat(200)).unwrap();
        paths.push(nix.add(&t));
        let s = nix.store_arg();
        for c in COMPRESSIONS {
            let to = format!(
                "file://{}?compression={c}",
                nix.dir.path().join(format!("cache-{c}")).display()
            );
            nix.run(
                "nix",
                &["copy", "--store", &s, "--to", &to, &paths[0], &paths[3]],
            );
        }
        Self { nix, paths }
    }

    fn cache(&self, c: &str) -> PathBuf {
        self.nix.dir.path().join(format!("cache-{c}"))
    }

    fn narinfo_text(&self, c: &str, path: &str) -> String {
        std::fs::read_to_string(
            self.cache(c)
                .join(format!("{}.narinfo", sp(path).hash_str())),
        )
        .unwrap()
    }

    fn dump(&self, path: &str) -> Vec<u8> {
        let s = self.nix.store_arg();
        // `nix-store --dump` ignores --store and reads the host's /nix/store.
        let out = self
            .nix
            .output("nix", &["store", "dump-path", "--store", &s, path]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

#[tokio::test]
async fn unknown_hash_is_none_and_cached_negatively() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_cache(dir.path(), None).await;
    let up = UpstreamCache::new(&server.base, quick_config()).unwrap();
    let route = format!("/{UNKNOWN}.narinfo");
    assert!(up.narinfo(&hash(UNKNOWN)).await.unwrap().is_none());
    assert!(up.narinfo(&hash(UNKNOWN)).await.unwrap().is_none());
    assert_eq!(server.count(&route), 1, "second miss served from memory");

    // With no negative TTL every lookup asks again.
    let uncached = UpstreamCache::new(
        &server.base,
        UpstreamConfig {
            negative_ttl: Duration::ZERO,
            ..quick_config()
        },
    )
    .unwrap();
    assert!(uncached.narinfo(&hash(UNKNOWN)).await.unwrap().is_none());
    assert!(uncached.narinfo(&hash(UNKNOWN)).await.unwrap().is_none());
    assert_eq!(server.count(&route), 3);
    assert!(up.nix_cache_info().await.unwrap().is_none());
}

#[tokio::test]
async fn oversized_narinfo_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_cache(dir.path(), None).await;
    let up = UpstreamCache::new(&server.base, quick_config()).unwrap();
    let err = up.narinfo(&hash(HUGE)).await.unwrap_err();
    assert!(
        matches!(err, UpstreamError::NarInfoTooLarge { .. }),
        "{err}"
    );

    // Chunked, without a Content-Length, so only the running count can catch it.
    let mut resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let line = "X-Padding: 0123456789abcdef0123456789abcdef0123456789abcdef\n";
    for _ in 0..2000 {
        resp.extend_from_slice(format!("{:x}\r\n{line}\r\n", line.len()).as_bytes());
    }
    resp.extend_from_slice(b"0\r\n\r\n");
    let up = UpstreamCache::new(&raw_server(resp).await, quick_config()).unwrap();
    let err = up.narinfo(&hash(HUGE)).await.unwrap_err();
    assert!(
        matches!(err, UpstreamError::NarInfoTooLarge { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn server_error_is_an_error_not_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve_cache(dir.path(), None).await;
    let up = UpstreamCache::new(&server.base, quick_config()).unwrap();
    for _ in 0..2 {
        let err = up.narinfo(&hash(FAILING)).await.unwrap_err();
        assert!(
            matches!(err, UpstreamError::Status { status: 500, .. }),
            "{err}"
        );
    }
    assert_eq!(
        server.count(&format!("/{FAILING}.narinfo")),
        2,
        "errors are not cached"
    );
}

/// A server that writes `response` on every connection and then keeps it open without a
/// word more; an empty response is a server that never answers.
async fn raw_server(response: Vec<u8>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut sock, _)) = listener.accept().await {
            // hyper drops a connection that speaks before it was asked, so read the request
            // head first.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = sock.write_all(&response).await;
            held.push(sock);
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn silent_server_times_out_promptly() {
    let config = UpstreamConfig {
        request_timeout: Duration::from_millis(300),
        ..quick_config()
    };
    let info = NarInfo::parse(&format!(
        "StorePath: /nix/store/{UNKNOWN}-x\nURL: nar/x.nar\nCompression: none\n\
         NarHash: sha256:{}\nNarSize: 100000\n",
        "0".repeat(52)
    ))
    .unwrap();
    // Never answering, and answering the headers and part of the body, then stalling.
    for response in [
        &b""[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nabc",
    ] {
        let up = UpstreamCache::new(&raw_server(response.to_vec()).await, config.clone()).unwrap();
        let start = Instant::now();
        let err = up.narinfo(&hash(UNKNOWN)).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Timeout { .. }), "{err}");
        let err = up.verify_nar(&info).await.unwrap_err();
        assert!(matches!(err, UpstreamError::Timeout { .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(3), "prompt");
        // A timeout is not a miss, so it is not remembered as one.
        assert!(up.narinfo(&hash(UNKNOWN)).await.is_err());
    }
}

#[tokio::test]
async fn refused_connection_is_an_error() {
    // Bind, learn the port, and close it again so nothing listens there.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let up = UpstreamCache::new(&format!("http://{addr}"), quick_config()).unwrap();
    let err = up.narinfo(&hash(UNKNOWN)).await.unwrap_err();
    assert!(matches!(err, UpstreamError::Http { .. }), "{err}");
}

mod needs_nix {
    use super::*;

    #[tokio::test]
    async fn narinfo_matches_nix_path_info() {
        let f = Fixture::new("upstream-narinfo");
        let paths: Vec<&str> = f.paths.iter().map(String::as_str).collect();
        let json = f.nix.path_info_json(&paths);
        for c in COMPRESSIONS {
            let server = serve_cache(&f.cache(c), None).await;
            let up = UpstreamCache::new(&server.base, quick_config()).unwrap();
            for v in json.as_array().unwrap() {
                let path = sp(v["path"].as_str().unwrap());
                let info = up.narinfo(&path.hash()).await.unwrap().expect("found");
                assert_eq!(info.store_path, path);
                assert_eq!(info.nar_hash.to_sri(), v["narHash"].as_str().unwrap());
                assert_eq!(info.nar_size, v["narSize"].as_u64().unwrap());
                let refs: BTreeSet<String> =
                    info.references.iter().map(|r| r.to_string()).collect();
                let theirs: BTreeSet<String> = v["references"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_owned())
                    .collect();
                assert_eq!(refs, theirs, "{path}");
                assert_eq!(info.compression.as_deref(), Some(c));
                // Found narinfos are remembered too.
                let again = up.narinfo(&path.hash()).await.unwrap().unwrap();
                assert_eq!(again, info);
                assert_eq!(server.count(&format!("/{}.narinfo", path.hash())), 1);
            }
            let ci = up.nix_cache_info().await.unwrap().expect("nix-cache-info");
            assert_eq!(ci.store_dir.as_deref(), Some("/nix/store"));
        }
    }

    #[tokio::test]
    async fn verify_nar_passes_for_every_compression() {
        let f = Fixture::new("upstream-verify");
        for c in COMPRESSIONS {
            let server = serve_cache(&f.cache(c), None).await;
            let up = UpstreamCache::new(&server.base, quick_config()).unwrap();
            for p in &f.paths {
                let info = up.narinfo(&sp(p).hash()).await.unwrap().unwrap();
                up.verify_nar(&info).await.unwrap();
                let mut nar = Vec::new();
                up.nar_reader(&info)
                    .await
                    .unwrap()
                    .read_to_end(&mut nar)
                    .await
                    .unwrap();
                assert!(nar == f.dump(p), "{c} NAR of {p} equals nix-store --dump");
            }
        }
    }

    #[tokio::test]
    async fn altered_nar_fails_verification() {
        let f = Fixture::new("upstream-altered");
        let added = &f.paths[3];
        for c in ["none", "xz"] {
            let server = serve_cache(&f.cache(c), None).await;
            let up = UpstreamCache::new(&server.base, quick_config()).unwrap();
            let info = up.narinfo(&sp(added).hash()).await.unwrap().unwrap();
            let file = f.cache(c).join(info.url.as_deref().unwrap());
            let original = std::fs::read(&file).unwrap();

            let mut flipped = original.clone();
            let mid = flipped.len() / 2;
            flipped[mid] ^= 0x20;
            std::fs::write(&file, &flipped).unwrap();
            let err = up.verify_nar(&info).await.unwrap_err();
            // A reader that failed keeps failing rather than looking like a clean EOF.
            let mut r = up.nar_reader(&info).await.unwrap();
            let mut sink = Vec::new();
            assert!(r.read_to_end(&mut sink).await.is_err());
            assert!(r.read(&mut [0u8; 16]).await.is_err());
            if c == "none" {
                assert!(
                    matches!(err, UpstreamError::NarHashMismatch { .. }),
                    "{c}: {err}"
                );
            } else {
                // xz's own check may notice first; either way it is an error.
                assert!(
                    matches!(
                        err,
                        UpstreamError::NarHashMismatch { .. } | UpstreamError::NarRead { .. }
                    ),
                    "{c}: {err}"
                );
            }

            if c == "none" {
                let mut longer = original.clone();
                longer.extend_from_slice(b"trailing bytes");
                std::fs::write(&file, &longer).unwrap();
                let err = up.verify_nar(&info).await.unwrap_err();
                assert!(matches!(err, UpstreamError::NarTooLong { .. }), "{err}");

                std::fs::write(&file, &original[..original.len() - 8]).unwrap();
                let err = up.verify_nar(&info).await.unwrap_err();
                assert!(
                    matches!(err, UpstreamError::NarSizeMismatch { .. }),
                    "{err}"
                );
            }

            std::fs::remove_file(&file).unwrap();
            let err = up.verify_nar(&info).await.unwrap_err();
            assert!(
                matches!(err, UpstreamError::Status { status: 404, .. }),
                "{err}"
            );
            std::fs::write(&file, &original).unwrap();
            up.verify_nar(&info).await.unwrap();
        }
    }

    #[tokio::test]
    async fn narinfo_for_another_path_is_rejected() {
        let f = Fixture::new("upstream-wrong");
        let text = f.narinfo_text("xz", &f.paths[3]);
        let server = serve_cache(&f.cache("xz"), Some(text)).await;
        let up = UpstreamCache::new(&server.base, quick_config()).unwrap();
        let err = up.narinfo(&hash(WRONG)).await.unwrap_err();
        match err {
            UpstreamError::WrongStorePath { got, requested, .. } => {
                assert_eq!(got, sp(&f.paths[3]));
                assert_eq!(requested, hash(WRONG));
            }
            e => panic!("{e}"),
        }
    }
}
