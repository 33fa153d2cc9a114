//! Puts made durable in the background. A chunk a download puts is readable (and servable) as
//! soon as the put returns; the fdatasync and index writes that make a group of puts durable
//! (see [`crate::pending`]) run on a thread of their own, so the download goes on receiving
//! meanwhile. A put waits for the disk only once it has fallen behind:
//! [`crate::PUT_UNSYNCED_MAX`] bytes of puts not durable yet.
//!
//! Why: the sync of each 8 MiB group took 5–10 ms on the development machine, during which the
//! download's request read nothing from its stream, and a peer on loopback or a fast LAN
//! waited on it (a single-peer download over loopback went from a median of 0.43 to 0.47 × a
//! plain HTTP download with the syncs moved off its path; README, Benchmarks).

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Weak};

use tracing::warn;

use super::{ChunkStore, Inner};
use crate::error::IoContext;
use crate::Result;

/// The store's handle on its drain thread. Dropped with the store, which ends the thread.
pub(super) struct Drainer {
    kick: SyncSender<()>,
}

impl Drainer {
    /// A drainer, and what its thread (see [`start`]) waits on.
    pub(super) fn new() -> (Self, Receiver<()>) {
        let (kick, kicks) = sync_channel(1);
        (Self { kick }, kicks)
    }

    /// Ask for a drain; a kick while one is already queued folds into it.
    pub(super) fn kick(&self) {
        let _ = self.kick.try_send(());
    }
}

/// Start the drain thread of the store `inner`. It holds the store only while it drains, so
/// closing the store (dropping its last handle) is not held up by it for longer than one drain.
pub(super) fn start(inner: &Arc<Inner>, kicks: Receiver<()>, dir: &std::path::Path) -> Result<()> {
    let weak = Arc::downgrade(inner);
    std::thread::Builder::new()
        .name("peerix-drain".into())
        .spawn(move || run(&weak, &kicks))
        .at(dir)?;
    Ok(())
}

fn run(inner: &Weak<Inner>, kicks: &Receiver<()>) {
    // Ends once the store is gone: its sender went with it.
    while kicks.recv().is_ok() {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let store = ChunkStore { inner };
        // A kick queued during the last drain may find less than a group left.
        if store.inner.pending.bytes() < crate::PUT_SYNC_BYTES {
            continue;
        }
        let _gc = store.inner.gc.read().expect("gc lock");
        if let Err(e) = store.drain_pending() {
            // The puts stay pending: the next drain tries again, and a download's finish,
            // which drains on its own thread, reports the error.
            warn!(error = %e, "chunks put were not made durable yet");
        }
    }
}
