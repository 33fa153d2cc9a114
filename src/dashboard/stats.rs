//! The dashboard's counters, kept across restarts in `dashboard.json` in the state directory:
//! totals, a table of peers and two of paths (most requested by Nix, most served to peers),
//! and the recent activity. Every table is bounded: peer ids cost nothing to mint and path
//! hashes are whatever Nix asks for, so a full table forgets its least recently seen entry.
//! Throughput samples are kept for the last minutes only, and not saved.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Peers remembered (connected or not).
pub const MAX_PEERS: usize = 256;
/// Paths remembered in each of the two path tables.
pub const MAX_PATHS: usize = 256;
/// Peers remembered for each served path.
pub const MAX_PEERS_PER_PATH: usize = 8;
/// Activity entries kept.
pub const MAX_ACTIVITY: usize = 200;
/// One throughput sample per interval…
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// …for the last ten minutes.
pub const MAX_SAMPLES: usize = 120;
/// What the saved file may weigh; a larger one is not ours to parse.
const MAX_FILE: u64 = 16 * 1024 * 1024;
/// The saved format.
const VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum StatsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: larger than {MAX_FILE} bytes")]
    TooLarge { path: PathBuf },
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Totals {
    /// narinfo requests from Nix, and those answered 200.
    pub checks: u64,
    pub hits: u64,
    /// NAR bytes sent to Nix.
    pub bytes_to_nix: u64,
    /// Verified chunk bytes from peers, and chunk bytes served to them.
    pub bytes_from_peers: u64,
    pub bytes_to_peers: u64,
    /// NARs fetched from peers, and fetches that failed.
    pub downloads: u64,
    pub downloads_failed: u64,
    /// NARs peers started fetching from this node (manifests given out).
    pub serves: u64,
    pub bans: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PeerStat {
    pub bytes_from: u64,
    pub bytes_to: u64,
    /// NARs it helped this node fetch, and NARs it fetched from this node.
    pub downloads: u64,
    pub serves: u64,
    pub first_seen: u64,
    pub last_seen: u64,
    /// Why it was banned, when it was.
    pub banned: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PathStat {
    /// The store path when known, else the hash asked for.
    pub name: String,
    pub count: u64,
    /// Requests answered (requested table) or NAR bytes (served table).
    pub hits: u64,
    pub bytes: u64,
    pub last: u64,
    /// Served table: the peers that fetched it, with how often (bounded).
    pub peers: Vec<(String, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Nix asked for a narinfo.
    Check,
    /// A NAR fetched from peers.
    Download,
    /// A peer started fetching a NAR from this node.
    Serve,
    Peer,
    Ban,
    Scan,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Activity {
    pub at: u64,
    pub kind: Kind,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Activity {
    pub fn new(kind: Kind, ok: bool) -> Self {
        Self {
            at: now_ms(),
            kind,
            ok,
            path: None,
            peer: None,
            bytes: None,
            detail: None,
        }
    }
    pub fn path(mut self, p: impl Into<String>) -> Self {
        self.path = Some(p.into());
        self
    }
    pub fn peer(mut self, p: impl ToString) -> Self {
        self.peer = Some(p.to_string());
        self
    }
    pub fn bytes(mut self, b: u64) -> Self {
        self.bytes = Some(b);
        self
    }
    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }
}

/// Bytes moved during one sample interval.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Sample {
    pub at: u64,
    pub from_peers: u64,
    pub to_peers: u64,
    pub to_nix: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Saved {
    pub version: u32,
    pub totals: Totals,
    pub peers: HashMap<String, PeerStat>,
    pub requested: HashMap<String, PathStat>,
    pub served: HashMap<String, PathStat>,
    pub activity: VecDeque<Activity>,
}

impl Saved {
    /// Enforce the bounds on what came from a file (an older build may have kept more).
    fn bound(&mut self) {
        evict_to(&mut self.peers, MAX_PEERS, |p| p.last_seen);
        evict_to(&mut self.requested, MAX_PATHS, |p| p.last);
        evict_to(&mut self.served, MAX_PATHS, |p| p.last);
        for s in self.served.values_mut() {
            s.peers.truncate(MAX_PEERS_PER_PATH);
        }
        while self.activity.len() > MAX_ACTIVITY {
            self.activity.pop_front();
        }
    }
}

/// Drop the least recent entries until at most `cap` are left.
fn evict_to<V>(m: &mut HashMap<String, V>, cap: usize, recent: impl Fn(&V) -> u64) {
    while m.len() > cap {
        let Some(oldest) = m
            .iter()
            .min_by_key(|(_, v)| recent(v))
            .map(|(k, _)| k.clone())
        else {
            return;
        };
        m.remove(&oldest);
    }
}

/// The entry for `key`, made room for when it is new.
fn entry<'a, V: Default>(
    m: &'a mut HashMap<String, V>,
    key: &str,
    cap: usize,
    recent: impl Fn(&V) -> u64,
) -> &'a mut V {
    if !m.contains_key(key) {
        evict_to(m, cap.saturating_sub(1), recent);
        m.insert(key.to_owned(), V::default());
    }
    m.get_mut(key).expect("just inserted")
}

struct Inner {
    saved: Saved,
    samples: VecDeque<Sample>,
    /// Bytes from peers since the last sample (the others are read from counters).
    from_peers: u64,
    dirty: bool,
}

/// The counters, shared by the daemon's handlers; saved with [`Stats::save`].
pub struct Stats {
    file: PathBuf,
    inner: Mutex<Inner>,
}

impl Stats {
    /// Counters from `file` when it holds them; fresh ones when it does not exist. A file that
    /// cannot be read is an error the caller reports (and then starts fresh with [`Stats::fresh`]).
    pub fn load(file: &Path) -> Result<Self, StatsError> {
        let saved =
            match std::fs::File::open(file) {
                Ok(f) => {
                    let len = f
                        .metadata()
                        .map_err(|source| StatsError::Io {
                            path: file.to_owned(),
                            source,
                        })?
                        .len();
                    if len > MAX_FILE {
                        return Err(StatsError::TooLarge {
                            path: file.to_owned(),
                        });
                    }
                    let mut s: Saved = serde_json::from_reader(std::io::BufReader::new(f))
                        .map_err(|source| StatsError::Json {
                            path: file.to_owned(),
                            source,
                        })?;
                    s.bound();
                    s
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
                Err(source) => {
                    return Err(StatsError::Io {
                        path: file.to_owned(),
                        source,
                    })
                }
            };
        Ok(Self::with(file, saved))
    }

    pub fn fresh(file: &Path) -> Self {
        Self::with(file, Saved::default())
    }

    fn with(file: &Path, saved: Saved) -> Self {
        Self {
            file: file.to_owned(),
            inner: Mutex::new(Inner {
                saved,
                samples: VecDeque::new(),
                from_peers: 0,
                dirty: false,
            }),
        }
    }

    fn with_inner<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    /// Write the counters (to a temporary file, then renamed over the old one) if they changed.
    pub fn save(&self) -> Result<bool, StatsError> {
        let body = self.with_inner(|i| {
            if !i.dirty {
                return None;
            }
            i.dirty = false;
            i.saved.version = VERSION;
            Some(serde_json::to_vec(&i.saved))
        });
        let Some(body) = body else {
            return Ok(false);
        };
        let io = |source| StatsError::Io {
            path: self.file.clone(),
            source,
        };
        let body = body.map_err(|source| StatsError::Json {
            path: self.file.clone(),
            source,
        })?;
        let tmp = self.file.with_extension("json.tmp");
        std::fs::write(&tmp, body).map_err(io)?;
        std::fs::rename(&tmp, &self.file).map_err(io)?;
        Ok(true)
    }

    pub fn log(&self, a: Activity) {
        self.with_inner(|i| {
            i.saved.activity.push_back(a);
            while i.saved.activity.len() > MAX_ACTIVITY {
                i.saved.activity.pop_front();
            }
            i.dirty = true;
        });
    }

    fn peer<'a>(i: &'a mut Inner, peer: &str) -> &'a mut PeerStat {
        let now = now_ms();
        let p = entry(&mut i.saved.peers, peer, MAX_PEERS, |p| p.last_seen);
        if p.first_seen == 0 {
            p.first_seen = now;
        }
        p.last_seen = now;
        p
    }

    /// Nix asked for the narinfo of `hash`; `path` is the store path when it was found.
    pub fn check(&self, hash: &str, path: Option<&str>) {
        self.with_inner(|i| {
            i.saved.totals.checks += 1;
            i.saved.totals.hits += u64::from(path.is_some());
            let e = entry(&mut i.saved.requested, hash, MAX_PATHS, |p| p.last);
            e.count += 1;
            e.hits += u64::from(path.is_some());
            e.last = now_ms();
            if let Some(p) = path {
                e.name = p.to_owned();
            } else if e.name.is_empty() {
                e.name = hash.to_owned();
            }
        });
        let mut a = Activity::new(Kind::Check, path.is_some()).path(path.unwrap_or(hash));
        if path.is_none() {
            a = a.detail("not found");
        }
        self.log(a);
    }

    /// A fetch from peers settled: the bytes each peer sent, and whether the NAR was complete.
    pub fn downloaded(
        &self,
        path: &str,
        per_peer: &[(String, u64)],
        size: u64,
        error: Option<&str>,
    ) {
        self.with_inner(|i| {
            let t = &mut i.saved.totals;
            t.downloads += u64::from(error.is_none());
            t.downloads_failed += u64::from(error.is_some());
            for (peer, n) in per_peer {
                i.saved.totals.bytes_from_peers += n;
                i.from_peers += n;
                let p = Self::peer(i, peer);
                p.bytes_from += n;
                p.downloads += 1;
            }
        });
        let mut a = Activity::new(Kind::Download, error.is_none())
            .path(path)
            .bytes(size);
        if let Some((p, _)) = per_peer.iter().max_by_key(|(_, n)| *n) {
            a = a.peer(p);
        }
        let peers = per_peer.iter().filter(|(_, n)| *n > 0).count();
        match error {
            Some(e) => a = a.detail(e),
            None if peers > 1 => a = a.detail(format!("from {peers} peers")),
            None => {}
        }
        self.log(a);
    }

    /// A peer was given the manifest of `path` (`size` bytes): it is fetching it from us.
    pub fn served(&self, path: &str, peer: &str, size: u64) {
        self.with_inner(|i| {
            i.saved.totals.serves += 1;
            Self::peer(i, peer).serves += 1;
            let e = entry(&mut i.saved.served, path, MAX_PATHS, |p| p.last);
            e.name = path.to_owned();
            e.count += 1;
            e.bytes += size;
            e.last = now_ms();
            match e.peers.iter_mut().find(|(p, _)| p == peer) {
                Some((_, n)) => *n += 1,
                None => {
                    if e.peers.len() >= MAX_PEERS_PER_PATH {
                        // The peer seen least often makes room.
                        e.peers.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
                        e.peers.pop();
                    }
                    e.peers.push((peer.to_owned(), 1));
                }
            }
        });
        self.log(
            Activity::new(Kind::Serve, true)
                .path(path)
                .peer(peer)
                .bytes(size),
        );
    }

    pub fn peer_seen(&self, peer: &str, connected: bool) {
        self.with_inner(|i| {
            Self::peer(i, peer);
        });
        let what = if connected {
            "connected"
        } else {
            "disconnected"
        };
        self.log(Activity::new(Kind::Peer, connected).peer(peer).detail(what));
    }

    pub fn banned(&self, peer: &str, why: &str) {
        self.with_inner(|i| {
            i.saved.totals.bans += 1;
            Self::peer(i, peer).banned = Some(why.to_owned());
        });
        self.log(Activity::new(Kind::Ban, false).peer(peer).detail(why));
    }

    /// One sample: `to_nix` is the daemon's running total of NAR bytes to Nix, `to_peers` the
    /// chunk bytes served to each peer since the daemon started. The deltas since the last
    /// sample go into the totals and the per-peer table.
    pub fn sample(&self, to_nix: u64, to_peers: &[(String, u64)], last: &mut Last) {
        let d_nix = to_nix.saturating_sub(last.to_nix);
        last.to_nix = to_nix;
        let mut d_peers = 0;
        let mut seen = HashMap::with_capacity(to_peers.len());
        self.with_inner(|i| {
            for (peer, n) in to_peers {
                let d = n.saturating_sub(last.to_peers.get(peer).copied().unwrap_or(0));
                seen.insert(peer.clone(), *n);
                if d > 0 {
                    d_peers += d;
                    Self::peer(i, peer).bytes_to += d;
                }
            }
            let t = &mut i.saved.totals;
            t.bytes_to_nix += d_nix;
            t.bytes_to_peers += d_peers;
            let s = Sample {
                at: now_ms(),
                from_peers: std::mem::take(&mut i.from_peers),
                to_peers: d_peers,
                to_nix: d_nix,
            };
            i.dirty |= s.from_peers + s.to_peers + s.to_nix > 0;
            i.samples.push_back(s);
            while i.samples.len() > MAX_SAMPLES {
                i.samples.pop_front();
            }
        });
        last.to_peers = seen;
    }

    /// A copy of what is kept, and the recent samples.
    pub fn snapshot(&self) -> (Saved, Vec<Sample>) {
        self.with_inner(|i| (i.saved.clone(), i.samples.iter().cloned().collect()))
    }
}

/// The counters as the last sample read them.
#[derive(Default)]
pub struct Last {
    to_nix: u64,
    to_peers: HashMap<String, u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_stay_bounded_and_forget_the_least_recent() {
        let dir = tempfile::tempdir().unwrap();
        let s = Stats::fresh(&dir.path().join("d.json"));
        for n in 0..(MAX_PEERS + 50) {
            s.peer_seen(&format!("peer-{n}"), true);
            s.check(&format!("hash-{n}"), None);
        }
        for n in 0..20 {
            s.served("/nix/store/x-one", &format!("p{n}"), 10);
        }
        let (saved, _) = s.snapshot();
        assert_eq!(saved.peers.len(), MAX_PEERS);
        assert!(saved
            .peers
            .contains_key(&format!("peer-{}", MAX_PEERS + 49)));
        assert_eq!(saved.requested.len(), MAX_PATHS);
        assert_eq!(saved.activity.len(), MAX_ACTIVITY);
        assert_eq!(
            saved.served["/nix/store/x-one"].peers.len(),
            MAX_PEERS_PER_PATH
        );
        assert_eq!(saved.served["/nix/store/x-one"].count, 20);
    }

    #[test]
    fn counters_survive_a_save_and_a_load() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("d.json");
        let s = Stats::load(&f).unwrap();
        s.check("abc", Some("/nix/store/abc-hello"));
        s.downloaded("/nix/store/abc-hello", &[("peer-a".into(), 100)], 100, None);
        let mut last = Last::default();
        s.sample(500, &[("peer-b".into(), 70)], &mut last);
        s.sample(600, &[("peer-b".into(), 90)], &mut last);
        assert!(s.save().unwrap());
        assert!(!s.save().unwrap(), "nothing changed since");
        let t = Stats::load(&f).unwrap();
        let (saved, samples) = t.snapshot();
        assert!(samples.is_empty());
        assert_eq!(saved.totals.checks, 1);
        assert_eq!(saved.totals.bytes_from_peers, 100);
        assert_eq!(saved.totals.bytes_to_nix, 600);
        assert_eq!(saved.totals.bytes_to_peers, 90);
        assert_eq!(saved.peers["peer-b"].bytes_to, 90);
        assert_eq!(saved.requested["abc"].name, "/nix/store/abc-hello");
        assert_eq!(saved.activity.len(), 2);
        std::fs::write(&f, b"{ not json").unwrap();
        assert!(Stats::load(&f).is_err());
    }
}
