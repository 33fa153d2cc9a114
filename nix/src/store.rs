//! Read-only access to a local Nix store's database (`/nix/var/nix/db/db.sqlite` under a root).
//!
//! Nix owns this database and must never wait for us. So the connection is opened read-only
//! (`SQLITE_OPEN_READ_ONLY` and `mode=ro`), every query runs in a short deferred read
//! transaction, and we never touch Nix's `big-lock`. In WAL mode (Nix's default) readers and
//! the writer never block each other; in rollback-journal mode our short reads can at worst
//! delay a commit for a moment, which Nix retries.

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior};
use thiserror::Error;

use crate::{Sha256Hash, StorePath, StorePathHash, STORE_DIR};

/// Where the database lives under a store root.
pub const DB_RELATIVE_PATH: &str = "nix/var/nix/db/db.sqlite";

/// How long a query waits on a lock before giving up. Only a rollback-journal store (or a WAL
/// recovery) can make a reader wait at all, and then only for one of Nix's commits.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("store database {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("store database holds a bad row for {path}: {what}")]
    BadRow { path: String, what: String },
    #[error("no Nix store database at {path} (is Nix installed, and is the store root right?)")]
    Missing { path: PathBuf },
    #[error(
        "cannot read store database {path} read-only: {source}; in WAL mode SQLite needs the \
         -shm and -wal files next to it, and creates them if missing, which needs write access \
         to the directory (run as a user who may write there, or let Nix create them first)"
    )]
    ReadOnlyOpen {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path} is not a valid path in the store")]
    NotValid { path: StorePath },
}

/// What the store database knows about one valid path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: Sha256Hash,
    pub nar_size: u64,
    /// Full set of references, possibly including the path itself.
    pub references: BTreeSet<StorePath>,
    pub deriver: Option<StorePath>,
    /// Signatures as stored: `name:base64`.
    pub sigs: BTreeSet<String>,
    /// Content address, as rendered by Nix (`fixed:r:sha256:…`, `text:sha256:…`).
    pub ca: Option<String>,
    /// Seconds since the epoch.
    pub registration_time: i64,
    pub ultimate: bool,
}

/// A local Nix store, opened read-only.
///
/// One connection behind a mutex: queries are short, so contention is low, and reusing the
/// connection keeps its prepared statements and the mapped WAL index instead of re-opening the
/// database per call. `LocalStore` is `Send + Sync`; from async code put it in an `Arc` and call
/// it inside `tokio::task::spawn_blocking`.
pub struct LocalStore {
    root: PathBuf,
    db_path: PathBuf,
    conn: Mutex<Connection>,
}

/// The raw columns of one `ValidPaths` row.
struct Row {
    id: i64,
    path: String,
    hash: String,
    registration_time: i64,
    deriver: Option<String>,
    nar_size: Option<i64>,
    ultimate: Option<i64>,
    sigs: Option<String>,
    ca: Option<String>,
}

const ROW_COLUMNS: &str = "id, path, hash, registrationTime, deriver, narSize, ultimate, sigs, ca";

impl Row {
    fn from_sql(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            id: r.get(0)?,
            path: r.get(1)?,
            hash: r.get(2)?,
            registration_time: r.get(3)?,
            deriver: r.get(4)?,
            nar_size: r.get(5)?,
            ultimate: r.get(6)?,
            sigs: r.get(7)?,
            ca: r.get(8)?,
        })
    }
}

fn bad_row(path: &str, what: impl Into<String>) -> StoreError {
    StoreError::BadRow {
        path: path.chars().take(300).collect(),
        what: what.into(),
    }
}

/// SQLite URIs treat `?`, `#` and `%` specially; escape everything outside a safe set.
fn sqlite_uri(path: &Path) -> String {
    let mut uri = String::from("file:");
    for b in path.as_os_str().as_encoded_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(b) {
            uri.push(*b as char);
        } else {
            uri.push_str(&format!("%{b:02X}"));
        }
    }
    uri.push_str("?mode=ro");
    uri
}

fn is_open_error(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::CannotOpen | rusqlite::ErrorCode::ReadOnly)
    )
}

impl LocalStore {
    /// `root` is `/` for the system store, or a chroot store's root (`--store /tmp/x`).
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let db_path = root.join(DB_RELATIVE_PATH);
        if !db_path.is_file() {
            return Err(StoreError::Missing { path: db_path });
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let open_err = |source: rusqlite::Error| {
            if is_open_error(&source) {
                StoreError::ReadOnlyOpen {
                    path: db_path.clone(),
                    source,
                }
            } else {
                StoreError::Db {
                    path: db_path.clone(),
                    source,
                }
            }
        };
        let conn = Connection::open_with_flags(sqlite_uri(&db_path), flags).map_err(open_err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // SQLite opens lazily; touch the table now so a missing -shm, a locked or a foreign
        // database fails here, with the hint, instead of on the first query.
        conn.query_row("SELECT count(*) FROM ValidPaths WHERE id = 0", [], |_| {
            Ok(())
        })
        .map_err(open_err)?;
        Ok(Self {
            root: root.to_owned(),
            db_path,
            conn: Mutex::new(conn),
        })
    }

    /// Where the files of `path` are on this machine.
    pub fn real_path(&self, path: &StorePath) -> PathBuf {
        self.root
            .join(crate::STORE_DIR.trim_start_matches('/'))
            .join(path.base_name())
    }

    /// All valid paths, sorted by `StorePath`'s order. Rows whose path does not parse are skipped with a warning, so
    /// that one odd entry cannot hide the whole store.
    pub fn valid_paths(&self) -> Result<Vec<StorePath>, StoreError> {
        let mut out = Vec::new();
        self.for_each_valid_path(|p| out.push(p))?;
        // The database orders by path text, which is not `StorePath`'s (hash-byte) order.
        out.sort_unstable();
        Ok(out)
    }

    /// Stream all valid paths, in path-text order, to `f` from one read snapshot, without collecting them.
    /// `f` runs while the connection is held, so it must not call back into this store (that
    /// would deadlock); Nix may go on writing meanwhile.
    pub fn for_each_valid_path(&self, mut f: impl FnMut(StorePath)) -> Result<(), StoreError> {
        self.read(|tx, db| {
            let mut stmt = tx
                .prepare_cached("SELECT path FROM ValidPaths ORDER BY path")
                .map_err(db)?;
            let rows = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(db)?;
            for row in rows {
                let p = row.map_err(db)?;
                match StorePath::from_full_path(&p) {
                    Ok(sp) => f(sp),
                    Err(e) => tracing::warn!(path = %p, error = %e, "skipping bad store path row"),
                }
            }
            Ok(())
        })
    }

    pub fn query_path_info(&self, path: &StorePath) -> Result<Option<PathInfo>, StoreError> {
        self.read(|tx, db| {
            let row = tx
                .prepare_cached(&format!(
                    "SELECT {ROW_COLUMNS} FROM ValidPaths WHERE path = ?1"
                ))
                .map_err(db)?
                .query_row([path.to_full_path()], Row::from_sql)
                .optional()
                .map_err(db)?;
            row.map(|row| Self::path_info(tx, db, row)).transpose()
        })
    }

    /// Look a path up by its hash part, as Nix's `queryPathFromHashPart` does: the first path
    /// at or after `/nix/store/<hash>` in the unique index, if it starts with that prefix.
    pub fn query_path_info_by_hash(
        &self,
        hash: &StorePathHash,
    ) -> Result<Option<PathInfo>, StoreError> {
        let prefix = format!("{STORE_DIR}/{hash}");
        self.read(|tx, db| {
            let row = tx
                .prepare_cached(&format!(
                    "SELECT {ROW_COLUMNS} FROM ValidPaths WHERE path >= ?1 ORDER BY path LIMIT 1"
                ))
                .map_err(db)?
                .query_row([&prefix], Row::from_sql)
                .optional()
                .map_err(db)?;
            match row {
                // The `-` keeps a hash from matching a longer hash (impossible at a fixed
                // length, but cheap to rule out).
                Some(row) if row.path.starts_with(&format!("{prefix}-")) => {
                    Self::path_info(tx, db, row).map(Some)
                }
                _ => Ok(None),
            }
        })
    }

    pub fn is_valid(&self, path: &StorePath) -> Result<bool, StoreError> {
        self.read(|tx, db| {
            tx.prepare_cached("SELECT 1 FROM ValidPaths WHERE path = ?1")
                .map_err(db)?
                .query_row([path.to_full_path()], |_| Ok(()))
                .optional()
                .map(|o| o.is_some())
                .map_err(db)
        })
    }

    /// The closure of `paths` under references, `paths` included, read in one snapshot. Every
    /// start path must be valid.
    pub fn closure(&self, paths: &[StorePath]) -> Result<BTreeSet<StorePath>, StoreError> {
        self.read(|tx, db| {
            let mut id_of = tx
                .prepare_cached("SELECT id FROM ValidPaths WHERE path = ?1")
                .map_err(db)?;
            let mut refs = tx
                .prepare_cached(
                    "SELECT v.id, v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference \
                     WHERE r.referrer = ?1",
                )
                .map_err(db)?;
            let mut seen_ids = BTreeSet::new();
            let mut out = BTreeSet::new();
            let mut queue = VecDeque::new();
            for p in paths {
                let id: i64 = id_of
                    .query_row([p.to_full_path()], |r| r.get(0))
                    .optional()
                    .map_err(db)?
                    .ok_or_else(|| StoreError::NotValid { path: p.clone() })?;
                if seen_ids.insert(id) {
                    out.insert(p.clone());
                    queue.push_back(id);
                }
            }
            while let Some(id) = queue.pop_front() {
                let rows = refs
                    .query_map([id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
                    .map_err(db)?;
                for row in rows {
                    let (rid, rpath) = row.map_err(db)?;
                    if seen_ids.insert(rid) {
                        let sp = StorePath::from_full_path(&rpath)
                            .map_err(|e| bad_row(&rpath, e.to_string()))?;
                        out.insert(sp);
                        queue.push_back(rid);
                    }
                }
            }
            Ok(out)
        })
    }

    fn path_info(
        tx: &Transaction<'_>,
        db: &dyn Fn(rusqlite::Error) -> StoreError,
        row: Row,
    ) -> Result<PathInfo, StoreError> {
        let p = &row.path;
        let path = StorePath::from_full_path(p).map_err(|e| bad_row(p, e.to_string()))?;
        let nar_hash: Sha256Hash = row
            .hash
            .parse()
            .map_err(|e| bad_row(p, format!("hash {:?}: {e}", row.hash)))?;
        // Very old databases may lack narSize; Nix reads NULL as 0 too.
        let nar_size = u64::try_from(row.nar_size.unwrap_or(0))
            .map_err(|_| bad_row(p, format!("negative narSize {:?}", row.nar_size)))?;
        let deriver = match row.deriver.as_deref() {
            None | Some("") => None,
            Some(d) => Some(
                StorePath::from_full_path(d).map_err(|e| bad_row(p, format!("deriver: {e}")))?,
            ),
        };
        let sigs = row
            .sigs
            .as_deref()
            .unwrap_or("")
            .split_ascii_whitespace()
            .map(str::to_owned)
            .collect();
        let ca = row.ca.filter(|c| !c.is_empty());
        let mut references = BTreeSet::new();
        let mut stmt = tx
            .prepare_cached(
                "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference \
                 WHERE r.referrer = ?1",
            )
            .map_err(db)?;
        for r in stmt
            .query_map([row.id], |r| r.get::<_, String>(0))
            .map_err(db)?
        {
            let r = r.map_err(db)?;
            references.insert(
                StorePath::from_full_path(&r)
                    .map_err(|e| bad_row(p, format!("reference {r:?}: {e}")))?,
            );
        }
        Ok(PathInfo {
            path,
            nar_hash,
            nar_size,
            references,
            deriver,
            sigs,
            ca,
            registration_time: row.registration_time,
            ultimate: row.ultimate.unwrap_or(0) != 0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave the read-only connection in a bad state
        // (any transaction is rolled back on drop), so a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` in one short deferred read transaction: a consistent snapshot for queries that
    /// take several statements, released as soon as `f` returns.
    fn read<T>(
        &self,
        f: impl FnOnce(
            &Transaction<'_>,
            &dyn Fn(rusqlite::Error) -> StoreError,
        ) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let db = |source| StoreError::Db {
            path: self.db_path.clone(),
            source,
        };
        let mut conn = self.lock();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Deferred)
            .map_err(db)?;
        let out = f(&tx, &db)?;
        // Ending a read-only transaction by commit or rollback is the same; commit reports
        // errors, drop would only log them.
        tx.commit().map_err(db)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_escapes_specials() {
        assert_eq!(
            sqlite_uri(Path::new("/tmp/a b?c#d%e/db.sqlite")),
            "file:/tmp/a%20b%3Fc%23d%25e/db.sqlite?mode=ro"
        );
    }

    #[test]
    fn missing_db_is_clear() {
        let dir = tempfile::tempdir().unwrap();
        match LocalStore::open(dir.path()) {
            Err(StoreError::Missing { path }) => assert!(path.ends_with(DB_RELATIVE_PATH)),
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("opened a missing database"),
        }
    }

    fn fake_store(rows: &[(&str, &str)]) -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(DB_RELATIVE_PATH);
        std::fs::create_dir_all(db.parent().unwrap()).unwrap();
        let c = Connection::open(&db).unwrap();
        c.execute_batch(
            "CREATE TABLE ValidPaths (id integer primary key autoincrement not null,
               path text unique not null, hash text not null, registrationTime integer not null,
               deriver text, narSize integer, ultimate integer, sigs text, ca text);
             CREATE TABLE Refs (referrer integer not null, reference integer not null,
               primary key (referrer, reference));",
        )
        .unwrap();
        for (p, h) in rows {
            c.execute(
                "INSERT INTO ValidPaths (path, hash, registrationTime, narSize) VALUES (?1, ?2, 1, 5)",
                [p, h],
            )
            .unwrap();
        }
        drop(c);
        let s = LocalStore::open(dir.path()).unwrap();
        (dir, s)
    }

    const GOOD: &str = "/nix/store/inrbbn8pggcp38qhr25j9nvp5f2micmp-top";
    const HEX: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn bad_rows_are_typed_or_skipped() {
        let (_d, s) = fake_store(&[(GOOD, "sha256:zz"), ("/nix/store/not-a-store-path", HEX)]);
        let good: StorePath = GOOD.parse().unwrap();
        // The bad path is skipped in the listing, the bad hash is an error when asked for.
        assert_eq!(s.valid_paths().unwrap(), vec![good.clone()]);
        assert!(matches!(
            s.query_path_info(&good),
            Err(StoreError::BadRow { .. })
        ));
        assert!(matches!(
            s.query_path_info_by_hash(&good.hash()),
            Err(StoreError::BadRow { .. })
        ));
        assert!(s.is_valid(&good).unwrap());
    }

    #[test]
    fn by_hash_needs_the_exact_prefix() {
        let (_d, s) = fake_store(&[(GOOD, HEX)]);
        let good: StorePath = GOOD.parse().unwrap();
        let info = s.query_path_info_by_hash(&good.hash()).unwrap().unwrap();
        assert_eq!(info.path, good);
        assert_eq!(info.nar_size, 5);
        assert!(info.references.is_empty() && info.sigs.is_empty() && !info.ultimate);
        let other: StorePathHash = "inrbbn8pggcp38qhr25j9nvp5f2micma".parse().unwrap();
        assert!(s.query_path_info_by_hash(&other).unwrap().is_none());
        let after: StorePathHash = "zzrbbn8pggcp38qhr25j9nvp5f2micmp".parse().unwrap();
        assert!(s.query_path_info_by_hash(&after).unwrap().is_none());
    }

    /// The usual state when Nix is not running: WAL mode, and the last writer removed the -wal
    /// and -shm files on close. We must still be able to read.
    #[test]
    fn reads_closed_wal_database() {
        let (d, s) = fake_store(&[(GOOD, HEX)]);
        drop(s);
        let db = d.path().join(DB_RELATIVE_PATH);
        let c = Connection::open(&db).unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode = wal", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(c);
        let wal = db.with_extension("sqlite-wal");
        assert!(!wal.exists());
        let s = LocalStore::open(d.path()).unwrap();
        assert!(s.is_valid(&GOOD.parse().unwrap()).unwrap());
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<LocalStore>();
    }
}
