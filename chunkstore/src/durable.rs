//! Pack bytes reach stable storage before the index points at them.
//!
//! Appends move forward only: within a pack the offset grows, and a new pack gets a higher id
//! and is started only once the previous one is synced. So one watermark, `(pack, length)`,
//! says what is durable: a record is durable when its end is at or below it.
//!
//! Group commit: a caller that needs its records durable waits while another caller's fdatasync
//! is running; if that sync covered its records (they were written before it began) it is done
//! without a sync of its own, else it syncs everything appended so far itself. So concurrent
//! ingests, pins, compactions and drains of puts (see [`crate::pending`]) share fdatasyncs.
//! After a failed fdatasync nothing appended before it can be trusted to be on disk (the kernel
//! may have dropped the dirty pages), so the packs refuse to report anything durable again until
//! the store is reopened.

use std::fs::File;
use std::path::Path;
use std::sync::{Condvar, Mutex};

use crate::error::IoContext;
use crate::{Error, Result};

/// A position in the packs: pack id, and a length of that pack.
pub(crate) type Mark = (u32, u64);

/// The points of the write path (and the one lookup that races it) a test can watch and fail
/// (see [`Faults`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The first `len` bytes of `pack` are on stable storage (`len` 0: the new pack's directory
    /// entry is). A hook's error counts as this fdatasync failing.
    Synced { pack: u32, len: u64 },
    /// Everything up to `upto` is durable and the index is about to point into it. A hook's
    /// error here stops the operation between the two steps, as a crash would.
    Durable { upto: Mark },
    /// A batch of a change too big for one transaction (see `store/journal.rs`) is in the
    /// index, `done` distinct chunks so far. A hook's error here stops the change, undone, as
    /// a crash would.
    Batch { done: usize },
    /// A chunk lookup has read the pending puts and not yet the index (see
    /// `ChunkStore::chunk_rec`): a hook may hold it there while a drain moves the chunk from
    /// one to the other. Its error is ignored.
    Lookup,
}

/// Test-only fault injection: a hook sees every [`Event`] and may fail it. Outside tests this
/// is an empty struct and [`Faults::at`] returns `Ok(())`, so it costs nothing.
#[derive(Default)]
pub(crate) struct Faults {
    #[cfg(test)]
    pub(crate) hook: Mutex<Option<Hook>>,
}

#[cfg(test)]
pub(crate) type Hook = std::sync::Arc<dyn Fn(Event) -> Result<()> + Send + Sync>;

impl Faults {
    #[inline(always)]
    pub(crate) fn at(&self, event: Event) -> Result<()> {
        #[cfg(test)]
        {
            let hook = self.hook.lock().expect("fault hook lock").clone();
            if let Some(h) = hook {
                return h(event);
            }
        }
        let _ = event;
        Ok(())
    }
}

#[derive(Default)]
struct State {
    durable: Option<Mark>,
    syncing: bool,
    failed: bool,
}

#[derive(Default)]
pub(crate) struct Durability {
    state: Mutex<State>,
    changed: Condvar,
    pub(crate) faults: Faults,
}

fn failed_error(dir: &Path) -> Error {
    Error::Io {
        path: dir.to_owned(),
        source: std::io::Error::other(
            "an earlier fdatasync of a pack failed; reopen the chunk store",
        ),
    }
}

impl Durability {
    fn is_durable(st: &State, end: Mark) -> bool {
        st.durable.is_some_and(|d| d >= end)
    }

    /// fdatasync `file` (pack `mark.0`, at least `mark.1` bytes long) and record that `mark` is
    /// durable. Callers that hold the active pack's lock use this directly (a pack retired on
    /// rollover or seal); others go through [`Durability::sync_to`].
    pub(crate) fn sync_file(&self, file: &File, mark: Mark, path: &Path) -> Result<()> {
        let r = file.sync_data().at(path).and_then(|()| {
            self.faults.at(Event::Synced {
                pack: mark.0,
                len: mark.1,
            })
        });
        let mut st = self.state.lock().expect("durability lock");
        match r {
            Ok(()) => st.durable = st.durable.max(Some(mark)),
            Err(_) => st.failed = true,
        }
        self.changed.notify_all();
        r
    }

    /// A new pack file's name is durable once its directory is synced.
    pub(crate) fn sync_new_pack(&self, dir: &Path, pack: u32) -> Result<()> {
        let r = File::open(dir)
            .and_then(|d| d.sync_all())
            .at(dir)
            .and_then(|()| self.faults.at(Event::Synced { pack, len: 0 }));
        if r.is_err() {
            self.state.lock().expect("durability lock").failed = true;
        }
        r
    }

    /// Return once everything up to `end` is durable, syncing the active pack if no running
    /// sync covers it. `active` gives the active pack's file, how far it is written, and its
    /// path (for errors).
    pub(crate) fn sync_to(
        &self,
        end: Mark,
        dir: &Path,
        active: impl FnOnce() -> Option<(std::sync::Arc<File>, Mark, std::path::PathBuf)>,
    ) -> Result<()> {
        let mut st = self.state.lock().expect("durability lock");
        loop {
            if st.failed {
                return Err(failed_error(dir));
            }
            if Self::is_durable(&st, end) {
                return Ok(());
            }
            if !st.syncing {
                break;
            }
            st = self.changed.wait(st).expect("durability lock");
        }
        st.syncing = true;
        drop(st);
        let r = match active() {
            Some((file, mark, path)) => self.sync_file(&file, mark, &path),
            // Retired since: retiring synced it.
            None => Ok(()),
        };
        let mut st = self.state.lock().expect("durability lock");
        st.syncing = false;
        self.changed.notify_all();
        r?;
        if st.failed {
            return Err(failed_error(dir));
        }
        if Self::is_durable(&st, end) {
            Ok(())
        } else {
            Err(Error::Io {
                path: dir.to_owned(),
                source: std::io::Error::other(format!(
                    "pack {} up to {} was never synced",
                    end.0, end.1
                )),
            })
        }
    }
}
