//! Client for an upstream HTTP binary cache (https://cache.nixos.org by default).
//!
//! The cache is untrusted input like everything else: narinfo bodies are read with a size
//! bound, a narinfo must describe the path asked for, and NARs are decompressed as a stream,
//! counted against their declared size and hashed, so a wrong or endless body is an error
//! rather than something we pass on or buffer.

use std::io;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_compression::tokio::bufread::{BzDecoder, XzDecoder, ZstdDecoder};
use futures::TryStreamExt;
use lru::LruCache;
use sha2::Digest;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, BufReader, ReadBuf};
use tokio_util::io::StreamReader;

use crate::{NarInfo, Sha256Hash, StorePath, StorePathHash};

pub const DEFAULT_BASE_URL: &str = "https://cache.nixos.org";

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("upstream cache URL {url:?} is not an http(s) URL")]
    BadBaseUrl { url: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    #[error("request to {url} failed: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("request to {url} timed out")]
    Timeout { url: String },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("narinfo at {url} is larger than {limit} bytes")]
    NarInfoTooLarge { url: String, limit: usize },
    #[error("narinfo at {url} is not UTF-8")]
    NarInfoNotUtf8 { url: String },
    #[error("narinfo at {url} does not parse: {what}")]
    NarInfoParse { url: String, what: String },
    #[error("narinfo at {url} is for {got}, not for the requested hash {requested}")]
    WrongStorePath {
        url: String,
        requested: StorePathHash,
        got: StorePath,
    },
    #[error("narinfo for {path} has no URL")]
    NoNarUrl { path: StorePath },
    #[error("narinfo for {path} has the unsafe NAR URL {url:?}")]
    BadNarUrl { path: StorePath, url: String },
    #[error("narinfo for {path} uses the unsupported compression {compression:?}")]
    UnsupportedCompression {
        path: StorePath,
        compression: String,
    },
    #[error("NAR of {path} declares {size} bytes, more than the limit of {limit}")]
    NarTooLarge {
        path: StorePath,
        size: u64,
        limit: u64,
    },
    #[error("NAR of {path} is longer than its declared NarSize {expected}")]
    NarTooLong { path: StorePath, expected: u64 },
    #[error("NAR of {path} is {got} bytes, but NarSize says {expected}")]
    NarSizeMismatch {
        path: StorePath,
        expected: u64,
        got: u64,
    },
    #[error("NAR of {path} hashes to {got}, but NarHash says {expected}")]
    NarHashMismatch {
        path: StorePath,
        expected: Sha256Hash,
        got: Sha256Hash,
    },
    #[error("reading the NAR of {path} from {url} failed: {source}")]
    NarRead {
        path: StorePath,
        url: String,
        #[source]
        source: io::Error,
    },
}

/// The compressions Nix writes NARs with that we can undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Zstd,
    Bzip2,
}

impl Compression {
    /// From a narinfo's `Compression:` field; Nix treats a missing field as bzip2.
    pub fn from_narinfo(c: Option<&str>) -> Option<Self> {
        match c {
            Some("none") | Some("") => Some(Self::None),
            Some("xz") => Some(Self::Xz),
            Some("zstd") => Some(Self::Zstd),
            Some("bzip2") | None => Some(Self::Bzip2),
            Some(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Limit on establishing a TCP/TLS connection.
    pub connect_timeout: Duration,
    /// Limit on a whole narinfo request; for NARs, on waiting for the response headers and on
    /// each wait for more body (a NAR may take long in total, but must not stall).
    pub request_timeout: Duration,
    /// How long a found narinfo is served from memory.
    pub positive_ttl: Duration,
    /// How long "this cache does not have it" is remembered.
    pub negative_ttl: Duration,
    /// Entries in the narinfo cache (found and missing together); 0 disables it.
    pub cache_capacity: usize,
    /// NARs declaring a larger NarSize are refused before fetching.
    pub max_nar_size: u64,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            positive_ttl: Duration::from_secs(3600),
            // Like Nix's narinfo-cache-negative-ttl default.
            negative_ttl: Duration::from_secs(3600),
            cache_capacity: 65_536,
            max_nar_size: 64 << 30,
        }
    }
}

/// What `nix-cache-info` says about a cache.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NixCacheInfo {
    pub store_dir: Option<String>,
    pub want_mass_query: bool,
    pub priority: Option<u32>,
}

struct CacheEntry {
    expires: Instant,
    info: Option<Arc<NarInfo>>,
}

/// An HTTP binary cache. Cheap to share: put it in an `Arc`.
pub struct UpstreamCache {
    base: String,
    client: reqwest::Client,
    config: UpstreamConfig,
    /// A std mutex: it is never held across an await.
    cache: Option<Mutex<LruCache<StorePathHash, CacheEntry>>>,
}

fn http_error(url: &str, source: reqwest::Error) -> UpstreamError {
    if source.is_timeout() {
        UpstreamError::Timeout {
            url: url.to_owned(),
        }
    } else {
        UpstreamError::Http {
            url: url.to_owned(),
            source,
        }
    }
}

/// A NAR URL from a narinfo must stay inside the cache: relative, no `..`, no query tricks.
fn safe_nar_url(url: &str) -> bool {
    !url.is_empty()
        && !url.starts_with('/')
        && !url.contains("://")
        && url
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"?#\\%".contains(&b))
        && url
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

impl UpstreamCache {
    pub fn new(base_url: &str, config: UpstreamConfig) -> Result<Self, UpstreamError> {
        let base = base_url.trim_end_matches('/').to_owned();
        match reqwest::Url::parse(&base) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {}
            _ => {
                return Err(UpstreamError::BadBaseUrl {
                    url: base_url.chars().take(300).collect(),
                })
            }
        }
        let client = reqwest::Client::builder()
            .user_agent(concat!("peerix/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.request_timeout)
            .build()
            .map_err(UpstreamError::Client)?;
        let cache = NonZeroUsize::new(config.cache_capacity).map(|n| Mutex::new(LruCache::new(n)));
        Ok(Self {
            base,
            client,
            config,
            cache,
        })
    }

    /// The default upstream, cache.nixos.org.
    pub fn nixos(config: UpstreamConfig) -> Result<Self, UpstreamError> {
        Self::new(DEFAULT_BASE_URL, config)
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The narinfo for `hash`, or `None` if the cache does not have it. Both answers are
    /// remembered for their TTL; errors are not.
    pub async fn narinfo(&self, hash: &StorePathHash) -> Result<Option<NarInfo>, UpstreamError> {
        if let Some(hit) = self.cached(hash) {
            return Ok(hit.map(|i| (*i).clone()));
        }
        let url = format!("{}/{hash}.narinfo", self.base);
        let Some(body) = self.get_small(&url, NarInfo::MAX_SIZE).await? else {
            self.remember(hash, None);
            return Ok(None);
        };
        let text = String::from_utf8(body)
            .map_err(|_| UpstreamError::NarInfoNotUtf8 { url: url.clone() })?;
        let info = NarInfo::parse(&text).map_err(|e| UpstreamError::NarInfoParse {
            url: url.clone(),
            what: e.to_string(),
        })?;
        if info.store_path.hash() != *hash {
            return Err(UpstreamError::WrongStorePath {
                url,
                requested: *hash,
                got: info.store_path,
            });
        }
        self.remember(hash, Some(Arc::new(info.clone())));
        Ok(Some(info))
    }

    /// `nix-cache-info`, or `None` if the cache has none.
    pub async fn nix_cache_info(&self) -> Result<Option<NixCacheInfo>, UpstreamError> {
        let url = format!("{}/nix-cache-info", self.base);
        let Some(body) = self.get_small(&url, NarInfo::MAX_SIZE).await? else {
            return Ok(None);
        };
        let mut out = NixCacheInfo::default();
        for line in String::from_utf8_lossy(&body).lines() {
            match line.split_once(':').map(|(k, v)| (k.trim(), v.trim())) {
                Some(("StoreDir", v)) => out.store_dir = Some(v.to_owned()),
                Some(("WantMassQuery", v)) => out.want_mass_query = v == "1",
                Some(("Priority", v)) => out.priority = v.parse().ok(),
                _ => {}
            }
        }
        Ok(Some(out))
    }

    /// The decompressed NAR of `info`, streamed. The reader fails (with an `io::Error` wrapping
    /// an [`UpstreamError`]) as soon as the NAR exceeds its NarSize, and at the end if its size
    /// or hash differ from the narinfo's; only a reader that reached EOF without error has
    /// delivered the right NAR.
    pub async fn nar_reader(&self, info: &NarInfo) -> Result<NarReader, UpstreamError> {
        let path = &info.store_path;
        if info.nar_size > self.config.max_nar_size {
            return Err(UpstreamError::NarTooLarge {
                path: path.clone(),
                size: info.nar_size,
                limit: self.config.max_nar_size,
            });
        }
        let compression =
            Compression::from_narinfo(info.compression.as_deref()).ok_or_else(|| {
                UpstreamError::UnsupportedCompression {
                    path: path.clone(),
                    compression: info.compression.clone().unwrap_or_default(),
                }
            })?;
        let rel = info
            .url
            .as_deref()
            .ok_or_else(|| UpstreamError::NoNarUrl { path: path.clone() })?;
        if !safe_nar_url(rel) {
            return Err(UpstreamError::BadNarUrl {
                path: path.clone(),
                url: rel.chars().take(300).collect(),
            });
        }
        let url = format!("{}/{rel}", self.base);
        let resp = self.send(&url).await?;
        let status = resp.status();
        if !status.is_success() {
            return Err(UpstreamError::Status {
                url,
                status: status.as_u16(),
            });
        }
        let body = StreamReader::new(resp.bytes_stream().map_err(io::Error::other));
        let body = BufReader::new(body);
        let inner: Pin<Box<dyn AsyncRead + Send>> = match compression {
            Compression::None => Box::pin(body),
            Compression::Xz => {
                let mut d = XzDecoder::new(body);
                d.multiple_members(true);
                Box::pin(d)
            }
            Compression::Zstd => {
                let mut d = ZstdDecoder::new(body);
                d.multiple_members(true);
                Box::pin(d)
            }
            Compression::Bzip2 => {
                let mut d = BzDecoder::new(body);
                d.multiple_members(true);
                Box::pin(d)
            }
        };
        Ok(NarReader {
            inner,
            path: path.clone(),
            url,
            expected_hash: info.nar_hash,
            expected_size: info.nar_size,
            hasher: sha2::Sha256::new(),
            count: 0,
            state: ReadState::Reading,
        })
    }

    /// Fetch, decompress and check the NAR of `info`, discarding it.
    pub async fn verify_nar(&self, info: &NarInfo) -> Result<(), UpstreamError> {
        let mut r = self.nar_reader(info).await?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(r.into_upstream_error(e)),
            }
        }
    }

    fn cached(&self, hash: &StorePathHash) -> Option<Option<Arc<NarInfo>>> {
        let mut cache = self
            .cache
            .as_ref()?
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        match cache.get(hash) {
            Some(e) if e.expires > Instant::now() => Some(e.info.clone()),
            Some(_) => {
                cache.pop(hash);
                None
            }
            None => None,
        }
    }

    fn remember(&self, hash: &StorePathHash, info: Option<Arc<NarInfo>>) {
        let Some(cache) = &self.cache else { return };
        let ttl = if info.is_some() {
            self.config.positive_ttl
        } else {
            self.config.negative_ttl
        };
        let Some(expires) = Instant::now().checked_add(ttl) else {
            return;
        };
        cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .put(*hash, CacheEntry { expires, info });
    }

    /// GET with the header timeout; the body is the caller's.
    async fn send(&self, url: &str) -> Result<reqwest::Response, UpstreamError> {
        match tokio::time::timeout(self.config.request_timeout, self.client.get(url).send()).await {
            Ok(r) => r.map_err(|e| http_error(url, e)),
            Err(_) => Err(UpstreamError::Timeout {
                url: url.to_owned(),
            }),
        }
    }

    /// A small body, read whole within `request_timeout`, refusing more than `limit` bytes;
    /// `None` for "not here" (404, 403 as S3 answers, 410).
    async fn get_small(&self, url: &str, limit: usize) -> Result<Option<Vec<u8>>, UpstreamError> {
        let fetch = async {
            let mut resp = self
                .client
                .get(url)
                .send()
                .await
                .map_err(|e| http_error(url, e))?;
            let status = resp.status();
            if matches!(status.as_u16(), 403 | 404 | 410) {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(UpstreamError::Status {
                    url: url.to_owned(),
                    status: status.as_u16(),
                });
            }
            let too_large = || UpstreamError::NarInfoTooLarge {
                url: url.to_owned(),
                limit,
            };
            if resp.content_length().is_some_and(|l| l > limit as u64) {
                return Err(too_large());
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| http_error(url, e))? {
                if body.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Some(body))
        };
        match tokio::time::timeout(self.config.request_timeout, fetch).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamError::Timeout {
                url: url.to_owned(),
            }),
        }
    }
}

/// A decompressed NAR being checked against its narinfo as it is read.
pub struct NarReader {
    inner: Pin<Box<dyn AsyncRead + Send>>,
    path: StorePath,
    url: String,
    expected_hash: Sha256Hash,
    expected_size: u64,
    hasher: sha2::Sha256,
    count: u64,
    state: ReadState,
}

enum ReadState {
    Reading,
    Verified,
    /// What went wrong, repeated on every later read so a retry cannot look like EOF.
    Failed(String),
}

impl NarReader {
    /// Turn an error from this reader back into the typed error it carries.
    pub fn into_upstream_error(&self, e: io::Error) -> UpstreamError {
        let read_error = |source| UpstreamError::NarRead {
            path: self.path.clone(),
            url: self.url.clone(),
            source,
        };
        if e.get_ref().is_none() {
            return read_error(e);
        }
        let kind = e.kind();
        let Some(inner) = e.into_inner() else {
            return read_error(io::Error::from(kind));
        };
        match inner.downcast::<UpstreamError>() {
            Ok(u) => *u,
            // A body stream error arrives as io::Error wrapping the reqwest error.
            Err(inner) => match inner.downcast::<reqwest::Error>() {
                Ok(r) => http_error(&self.url, *r),
                Err(inner) => read_error(io::Error::new(kind, inner)),
            },
        }
    }

    fn fail(&mut self, e: UpstreamError) -> Poll<io::Result<()>> {
        self.state = ReadState::Failed(e.to_string());
        Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)))
    }
}

impl AsyncRead for NarReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match &this.state {
            ReadState::Reading => {}
            ReadState::Verified => return Poll::Ready(Ok(())),
            ReadState::Failed(what) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("NAR stream already failed: {what}"),
                )))
            }
        }
        let before = buf.filled().len();
        match this.inner.as_mut().poll_read(cx, buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => {
                this.state = ReadState::Failed(e.to_string());
                Poll::Ready(Err(e))
            }
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if new.is_empty() {
                    let got = Sha256Hash(this.hasher.clone().finalize().into());
                    if this.count != this.expected_size {
                        let e = UpstreamError::NarSizeMismatch {
                            path: this.path.clone(),
                            expected: this.expected_size,
                            got: this.count,
                        };
                        return this.fail(e);
                    }
                    if got != this.expected_hash {
                        let e = UpstreamError::NarHashMismatch {
                            path: this.path.clone(),
                            expected: this.expected_hash,
                            got,
                        };
                        return this.fail(e);
                    }
                    this.state = ReadState::Verified;
                    return Poll::Ready(Ok(()));
                }
                this.count += new.len() as u64;
                if this.count > this.expected_size {
                    // Stop a decompression bomb here instead of passing it on. The bytes are
                    // already in `buf`; take them back so no unverified excess is delivered.
                    buf.set_filled(before);
                    let e = UpstreamError::NarTooLong {
                        path: this.path.clone(),
                        expected: this.expected_size,
                    };
                    return this.fail(e);
                }
                this.hasher.update(new);
                Poll::Ready(Ok(()))
            }
        }
    }
}

#[cfg(test)]
mod tests;
