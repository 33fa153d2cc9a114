//! `peerix serve`'s settings: a TOML file (`--config`) and flags; a flag overrides the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use peerix_nix::PublicKey;
use peerix_swarm::Multiaddr;
use serde::Deserialize;

use crate::share::DEFAULT_DENY;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:12304";
pub const DEFAULT_P2P_LISTEN: &[&str] =
    &["/ip4/0.0.0.0/tcp/12305", "/ip4/0.0.0.0/udp/12305/quic-v1"];
pub const DEFAULT_STATE_DIR: &str = "/var/lib/peerix";
pub const DEFAULT_UPSTREAM: &str = "https://cache.nixos.org";
/// Nix asks substituters in priority order, lower first; cache.nixos.org says 40, so peers
/// are asked before it.
pub const DEFAULT_PRIORITY: u32 = 30;
pub const DEFAULT_TIMEOUT_SECS: f64 = 2.0;
pub const DEFAULT_SCAN_INTERVAL_SECS: f64 = 600.0;
pub const DEFAULT_MAX_STORE_SIZE: &str = "10GiB";

/// `peerix serve`'s flags. Every one may also be set in the `--config` file (same names, as
/// TOML keys; lists as arrays).
#[derive(clap::Args, Debug, Default)]
pub struct ServeArgs {
    /// TOML file with any of these settings (keys named like the flags); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where Nix reaches peerix (HTTP) [default: 127.0.0.1:12304].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Allow --listen on an address other than loopback. The endpoint is meant for this
    /// machine's Nix; clients elsewhere get only what this node shares with its peers, never a
    /// private path and never a fetch on their behalf.
    #[arg(long)]
    pub http_beyond_loopback: bool,
    /// libp2p listen multiaddrs [default: /ip4/0.0.0.0/tcp/12305 /ip4/0.0.0.0/udp/12305/quic-v1].
    #[arg(long = "p2p-listen", value_name = "MULTIADDR", num_args = 1..)]
    pub p2p_listen: Vec<String>,
    /// Explicit peers to connect to: multiaddr or host:port (repeatable).
    #[arg(long = "peer", value_name = "ADDR", num_args = 1..)]
    pub peers: Vec<String>,
    /// Entry points into the DHT: multiaddrs ending in /p2p/<peer id> (repeatable). Dialled at
    /// start and kept in the DHT's routing table, not held connected as a --peer is.
    #[arg(long = "bootstrap", value_name = "MULTIADDR", num_args = 1..)]
    pub bootstrap: Vec<String>,
    /// Do not discover peers on the LAN with mDNS.
    #[arg(long)]
    pub no_mdns: bool,
    /// Root of the local Nix store: `/`, or a chroot store's root [default: /].
    #[arg(long, value_name = "ROOT")]
    pub store: Option<PathBuf>,
    /// State directory: chunk store and p2p identity [default: /var/lib/peerix].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Nix secret key: sign what is handed to Nix and mark own-signed paths as shared.
    #[arg(long, value_name = "FILE")]
    pub private_key: Option<PathBuf>,
    /// Accept peers' paths signed by this Nix public key, `name:base64` (repeatable); a seed
    /// shares local paths it signed.
    #[arg(long = "trusted-key", value_name = "KEY", num_args = 1..)]
    pub trusted_keys: Vec<String>,
    /// Upstream cache whose NarHashes make paths public and trusted; `none` turns it off
    /// [default: https://cache.nixos.org].
    #[arg(long, value_name = "URL")]
    pub upstream_cache: Option<String>,
    /// Priority announced to Nix in nix-cache-info; lower is asked first [default: 30].
    #[arg(long, value_name = "N")]
    pub priority: Option<u32>,
    /// Seconds a lookup may take before Nix gets a 404 (fractions allowed) [default: 2].
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<f64>,
    /// Private swarm key file (`/key/swarm/psk/1.0.0/`); only peers with it can connect.
    #[arg(long, value_name = "FILE")]
    pub swarm_key: Option<PathBuf>,
    /// Seconds between scans of the local store for paths to share; 0 scans once at start
    /// (and after each seed) only [default: 600].
    #[arg(long, value_name = "SECS")]
    pub scan_interval: Option<f64>,
    /// Disk budget for NARs held in the state directory's packs (downloads not in the local
    /// Nix store, pins): `10GiB`, `500MB`, `0` for none. Least recently used unpinned NARs are
    /// evicted past it [default: 10GiB].
    #[arg(long, value_name = "SIZE")]
    pub max_store_size: Option<String>,
    /// Chunk bytes per second sent to peers beyond the LAN, all together, shared fairly
    /// between them: `2MiB`, `500KB`; `0` for no cap [default: none].
    #[arg(long, value_name = "SIZE")]
    pub max_upload_rate: Option<String>,
    /// Hold peers on the LAN (a direct connection from a private address) to
    /// --max-upload-rate too; by default they are not paced.
    #[arg(long)]
    pub cap_lan_uploads: bool,
    /// Do not relay for peers behind NAT. (A node relays only once peers have confirmed it is
    /// reachable, and within the limits below.)
    #[arg(long)]
    pub no_relay_service: bool,
    /// Circuits this node relays at once, for all peers [default: 16].
    #[arg(long, value_name = "N")]
    pub relay_circuits: Option<usize>,
    /// Bytes one relayed circuit may carry before the relay ends it: `8MiB` [default: 8MiB].
    #[arg(long, value_name = "SIZE")]
    pub relay_circuit_bytes: Option<String>,
    /// Seconds one relayed circuit may last [default: 120].
    #[arg(long, value_name = "SECS")]
    pub relay_circuit_duration: Option<f64>,
    /// Share every path not denied, not only public, own-signed and pinned ones.
    #[arg(long)]
    pub share_all: bool,
    /// Questions to the upstream cache in flight at once during a scan [default: 8].
    #[arg(long, value_name = "N")]
    pub upstream_concurrency: Option<usize>,
    /// Extra glob over store-path names never shared, added to the built-in list (repeatable).
    #[arg(long, value_name = "PATTERN", num_args = 1..)]
    pub deny: Vec<String>,
    /// Chunks from peers: `auto` asks for zstd (and deltas against older versions held here)
    /// while a peer's link is slower than compression, `always`, or `never` [default: auto].
    #[arg(long, value_name = "MODE")]
    pub wire_compression: Option<WireCompression>,
    /// Never ask peers for deltas against older versions of a path held here (they cost the
    /// sending peer CPU).
    #[arg(long)]
    pub no_deltas: bool,
    /// Average chunk size of a chunk store this creates (`256KiB`; at most `1MiB`); a store
    /// already made keeps the sizes it was made with [default: 256KiB].
    #[arg(long, value_name = "SIZE")]
    pub chunk_size: Option<String>,
}

/// `--wire-compression`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WireCompression {
    Auto,
    Always,
    Never,
}

impl From<WireCompression> for peerix_swarm::Compression {
    fn from(w: WireCompression) -> Self {
        match w {
            WireCompression::Auto => Self::Auto,
            WireCompression::Always => Self::Always,
            WireCompression::Never => Self::Never,
        }
    }
}

/// The `--config` file.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub listen: Option<String>,
    pub http_beyond_loopback: Option<bool>,
    pub p2p_listen: Option<Vec<String>>,
    #[serde(alias = "peer")]
    pub peers: Option<Vec<String>>,
    pub bootstrap: Option<Vec<String>>,
    pub mdns: Option<bool>,
    pub store: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub private_key: Option<PathBuf>,
    #[serde(alias = "trusted-key")]
    pub trusted_keys: Option<Vec<String>>,
    pub upstream_cache: Option<String>,
    pub priority: Option<u32>,
    pub timeout: Option<f64>,
    pub swarm_key: Option<PathBuf>,
    pub scan_interval: Option<f64>,
    pub max_store_size: Option<String>,
    pub max_upload_rate: Option<String>,
    pub cap_lan_uploads: Option<bool>,
    pub relay_service: Option<bool>,
    pub relay_circuits: Option<usize>,
    pub relay_circuit_bytes: Option<String>,
    pub relay_circuit_duration: Option<f64>,
    pub share_all: Option<bool>,
    pub upstream_concurrency: Option<usize>,
    pub deny: Option<Vec<String>>,
    pub wire_compression: Option<WireCompression>,
    pub deltas: Option<bool>,
    pub chunk_size: Option<String>,
}

/// Everything resolved.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub p2p_listen: Vec<Multiaddr>,
    pub peers: Vec<String>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    pub store: PathBuf,
    pub state_dir: PathBuf,
    pub private_key: Option<PathBuf>,
    pub trusted_keys: Vec<PublicKey>,
    pub upstream_cache: Option<String>,
    pub priority: u32,
    pub timeout: Duration,
    pub swarm_key: Option<PathBuf>,
    /// `None`: one scan at start-up (and one after each seed), no periodic rescans.
    pub scan_interval: Option<Duration>,
    /// Bytes the packs may hold; `None`: no budget.
    pub max_store_size: Option<u64>,
    /// Bytes per second.
    pub max_upload_rate: Option<std::num::NonZeroU32>,
    /// The cap holds for LAN peers too.
    pub cap_lan_uploads: bool,
    /// `None`: no relay service.
    pub relay_service: Option<peerix_swarm::RelayLimits>,
    pub share_all: bool,
    pub upstream_concurrency: usize,
    /// DEFAULT_DENY plus the configured extras.
    pub deny: Vec<String>,
    pub wire_compression: peerix_swarm::Compression,
    pub deltas: bool,
    pub chunker: peerix_chunkstore::ChunkerParams,
}

/// The relay service's limits, the defaults where not given; `None` when it is off.
fn relay_service(
    on: bool,
    circuits: Option<usize>,
    bytes: Option<String>,
    duration: Option<f64>,
) -> Result<Option<peerix_swarm::RelayLimits>> {
    if !on {
        return Ok(None);
    }
    let mut l = peerix_swarm::RelayLimits::default();
    if let Some(n) = circuits {
        if n == 0 {
            bail!("--relay-circuits must be at least 1 (--no-relay-service turns relaying off)");
        }
        l.max_circuits = n.min(4096);
    }
    if let Some(b) = bytes {
        l.max_circuit_bytes = size("--relay-circuit-bytes", &b)?
            .with_context(|| format!("--relay-circuit-bytes {b}: must be more than 0"))?;
    }
    if let Some(d) = duration {
        l.max_circuit_duration = secs("--relay-circuit-duration", d)?;
    }
    Ok(Some(l))
}

fn secs(what: &str, v: f64) -> Result<Duration> {
    if !v.is_finite() || v <= 0.0 || v > 1e9 {
        bail!("{what} must be a positive number of seconds, not {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// A byte size such as `10GiB`, `500 MB` or `1048576`; zero means no limit.
fn size(what: &str, v: &str) -> Result<Option<u64>> {
    let b: bytesize::ByteSize = v
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{what}: {v:?} is not a size like 10GiB or 500MB ({e})"))?;
    Ok((b.as_u64() > 0).then_some(b.as_u64()))
}

fn nonempty(v: Vec<String>) -> Option<Vec<String>> {
    (!v.is_empty()).then_some(v)
}

impl FileConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config {}", path.display()))
    }
}

impl ServeConfig {
    pub fn resolve(args: ServeArgs) -> Result<Self> {
        let file = match &args.config {
            Some(p) => FileConfig::read(p)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    pub fn merge(args: ServeArgs, file: FileConfig) -> Result<Self> {
        let listen_s = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen: SocketAddr = listen_s
            .parse()
            .with_context(|| format!("--listen {listen_s} is not an IP:port"))?;
        let beyond_loopback =
            args.http_beyond_loopback || file.http_beyond_loopback.unwrap_or(false);
        if !listen.ip().is_loopback() && !beyond_loopback {
            bail!(
                "--listen {listen} is not a loopback address: the HTTP endpoint is for this \
                 machine's Nix; pass --http-beyond-loopback to serve other machines (they get \
                 only what this node shares with its peers)"
            );
        }
        let p2p_listen = nonempty(args.p2p_listen)
            .or(file.p2p_listen)
            .unwrap_or_else(|| DEFAULT_P2P_LISTEN.iter().map(|s| s.to_string()).collect())
            .iter()
            .map(|s| {
                s.parse::<Multiaddr>()
                    .with_context(|| format!("--p2p-listen {s} is not a multiaddr"))
            })
            .collect::<Result<Vec<_>>>()?;
        let bootstrap = nonempty(args.bootstrap)
            .or(file.bootstrap)
            .unwrap_or_default()
            .iter()
            .map(|s| {
                let a = s
                    .parse::<Multiaddr>()
                    .with_context(|| format!("--bootstrap {s} is not a multiaddr"))?;
                match peerix_swarm::node::peer_of(&a) {
                    Some(_) => Ok(a),
                    None => bail!("--bootstrap {s} does not end in /p2p/<peer id>"),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let trusted_keys = nonempty(args.trusted_keys)
            .or(file.trusted_keys)
            .unwrap_or_default()
            .iter()
            .map(|k| {
                k.trim()
                    .parse::<PublicKey>()
                    .with_context(|| format!("--trusted-key {k} is not a Nix public key"))
            })
            .collect::<Result<Vec<_>>>()?;
        let upstream = args
            .upstream_cache
            .or(file.upstream_cache)
            .unwrap_or_else(|| DEFAULT_UPSTREAM.into());
        let upstream_cache = (upstream != "none" && !upstream.is_empty()).then_some(upstream);
        let mut deny: Vec<String> = DEFAULT_DENY.iter().map(|s| s.to_string()).collect();
        deny.extend(nonempty(args.deny).or(file.deny).unwrap_or_default());
        Ok(ServeConfig {
            listen,
            p2p_listen,
            peers: nonempty(args.peers).or(file.peers).unwrap_or_default(),
            bootstrap,
            mdns: if args.no_mdns {
                false
            } else {
                file.mdns.unwrap_or(true)
            },
            store: args.store.or(file.store).unwrap_or_else(|| "/".into()),
            state_dir: args
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
            private_key: args.private_key.or(file.private_key),
            trusted_keys,
            upstream_cache,
            priority: args.priority.or(file.priority).unwrap_or(DEFAULT_PRIORITY),
            timeout: secs(
                "--timeout",
                args.timeout
                    .or(file.timeout)
                    .unwrap_or(DEFAULT_TIMEOUT_SECS),
            )?,
            swarm_key: args.swarm_key.or(file.swarm_key),
            scan_interval: match args
                .scan_interval
                .or(file.scan_interval)
                .unwrap_or(DEFAULT_SCAN_INTERVAL_SECS)
            {
                0.0 => None,
                v => Some(secs("--scan-interval", v)?),
            },
            max_store_size: size(
                "--max-store-size",
                args.max_store_size
                    .or(file.max_store_size)
                    .as_deref()
                    .unwrap_or(DEFAULT_MAX_STORE_SIZE),
            )?,
            max_upload_rate: match args.max_upload_rate.or(file.max_upload_rate) {
                None => None,
                Some(v) => size("--max-upload-rate", &v)?
                    .map(|b| {
                        u32::try_from(b)
                            .ok()
                            .and_then(std::num::NonZeroU32::new)
                            .with_context(|| {
                                format!("--max-upload-rate {v}: at most 4GiB a second")
                            })
                    })
                    .transpose()?,
            },
            cap_lan_uploads: args.cap_lan_uploads || file.cap_lan_uploads.unwrap_or(false),
            relay_service: relay_service(
                !args.no_relay_service && file.relay_service.unwrap_or(true),
                args.relay_circuits.or(file.relay_circuits),
                args.relay_circuit_bytes.or(file.relay_circuit_bytes),
                args.relay_circuit_duration.or(file.relay_circuit_duration),
            )?,
            share_all: args.share_all || file.share_all.unwrap_or(false),
            upstream_concurrency: args
                .upstream_concurrency
                .or(file.upstream_concurrency)
                .unwrap_or(8)
                .clamp(1, 256),
            deny,
            wire_compression: args
                .wire_compression
                .or(file.wire_compression)
                .unwrap_or(WireCompression::Auto)
                .into(),
            deltas: !args.no_deltas && file.deltas.unwrap_or(true),
            chunker: match args.chunk_size.or(file.chunk_size) {
                None => peerix_chunkstore::ChunkerParams::DEFAULT,
                Some(v) => {
                    let avg = size("--chunk-size", &v)?.unwrap_or(0);
                    let avg = u32::try_from(avg).unwrap_or(u32::MAX);
                    peerix_chunkstore::ChunkerParams::new(avg / 4, avg, avg.saturating_mul(4))
                        .map_err(|e| anyhow::anyhow!("--chunk-size {v}: {e}"))?
                }
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scan_interval_of_zero_means_no_periodic_rescan() {
        let file: FileConfig = toml::from_str("scan-interval = 0\n").unwrap();
        let c = ServeConfig::merge(ServeArgs::default(), file).unwrap();
        assert_eq!(c.scan_interval, None);
        let c = ServeConfig::merge(ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.scan_interval, Some(Duration::from_secs(600)));
        let args = ServeArgs {
            scan_interval: Some(-1.0),
            ..ServeArgs::default()
        };
        assert!(ServeConfig::merge(args, FileConfig::default()).is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let file: FileConfig = toml::from_str(
            "listen = \"127.0.0.1:9000\"\npriority = 50\ntimeout = 0.5\nmdns = false\n\
             peers = [\"10.0.0.1:12305\"]\ndeny = [\"*-private\"]\nupstream-cache = \"none\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            priority: Some(20),
            ..ServeArgs::default()
        };
        let c = ServeConfig::merge(args, file).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.priority, 20);
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert!(!c.mdns);
        assert_eq!(c.peers, vec!["10.0.0.1:12305".to_string()]);
        assert!(c.deny.iter().any(|d| d == "*-private"));
        assert!(c.deny.iter().any(|d| d == "nixos-system-*"));
        assert_eq!(c.upstream_cache, None);
        assert_eq!(c.p2p_listen.len(), 2);
    }

    #[test]
    fn an_upload_cap_is_a_size_per_second() {
        let rate = |v: &str| {
            let args = ServeArgs {
                max_upload_rate: Some(v.into()),
                ..ServeArgs::default()
            };
            ServeConfig::merge(args, FileConfig::default()).map(|c| c.max_upload_rate)
        };
        assert_eq!(rate("2MiB").unwrap().map(|r| r.get()), Some(2 << 20));
        assert_eq!(rate("0").unwrap(), None);
        assert!(rate("fast").is_err());
        assert!(rate("8GiB").is_err());
        let c = ServeConfig::merge(ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.max_upload_rate, None, "no cap unless asked");
    }

    #[test]
    fn bootstrap_nodes_name_their_peer() {
        let id = "12D3KooWHZjUZLmsKDtRDUqYbRGgGoHWhLbFDmG5peDLhfb2CPo7";
        let file: FileConfig = toml::from_str(&format!(
            "bootstrap = [\"/ip4/10.0.0.1/tcp/12305/p2p/{id}\"]\n"
        ))
        .unwrap();
        let c = ServeConfig::merge(ServeArgs::default(), file).unwrap();
        assert_eq!(c.bootstrap.len(), 1);
        assert!(c.peers.is_empty(), "an entry point is not an explicit peer");
        let args = ServeArgs {
            bootstrap: vec!["/ip4/10.0.0.1/tcp/12305".into()],
            ..ServeArgs::default()
        };
        let e = ServeConfig::merge(args, FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("/p2p/"), "{e}");
    }

    #[test]
    fn defaults_and_bad_values() {
        let c = ServeConfig::merge(ServeArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.upstream_cache.as_deref(), Some(DEFAULT_UPSTREAM));
        assert_eq!(c.priority, DEFAULT_PRIORITY);
        assert!(c.mdns);
        let bad = ServeArgs {
            timeout: Some(-1.0),
            ..ServeArgs::default()
        };
        assert!(ServeConfig::merge(bad, FileConfig::default()).is_err());
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
        assert_eq!(c.max_store_size, Some(10 << 30));
        let sized = |v: &str| ServeArgs {
            max_store_size: Some(v.into()),
            ..ServeArgs::default()
        };
        let m = |v| ServeConfig::merge(sized(v), FileConfig::default()).map(|c| c.max_store_size);
        assert_eq!(m("500MB").unwrap(), Some(500_000_000));
        assert_eq!(m("64 MiB").unwrap(), Some(64 << 20));
        assert_eq!(m("0").unwrap(), None);
        assert!(m("lots").is_err());
    }

    #[test]
    fn a_listen_address_beyond_loopback_needs_its_flag() {
        let lan = || ServeArgs {
            listen: Some("0.0.0.0:12304".into()),
            ..ServeArgs::default()
        };
        let e = ServeConfig::merge(lan(), FileConfig::default()).unwrap_err();
        assert!(e.to_string().contains("--http-beyond-loopback"), "{e}");
        let ok = ServeArgs {
            http_beyond_loopback: true,
            ..lan()
        };
        assert!(ServeConfig::merge(ok, FileConfig::default()).is_ok());
        let v6 = ServeArgs {
            listen: Some("[::1]:12304".into()),
            ..ServeArgs::default()
        };
        assert!(ServeConfig::merge(v6, FileConfig::default()).is_ok());
    }
}
