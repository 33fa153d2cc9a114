//! The upload cap (`ServeLimits::max_upload_rate`): chunk bytes sent to all peers together
//! stay within a rate, so a node serving the internet from a home uplink leaves room for the
//! rest of the household.
//!
//! Fair between peers by construction: each peer holds its share of the upload slots, and each
//! slot waits for the same bucket before every chunk it sends. The slots shrink with the cap,
//! so that every slot still moves at least [`MIN_SLOT_RATE`]: a requester's timeouts assume
//! about that, and a request that crawls behind fifteen others would time out and count
//! against us, where a request that finds no slot is answered Busy and goes elsewhere.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// The least rate one upload slot is left with (a requester allows 4 s per MiB).
pub const MIN_SLOT_RATE: u32 = 512 * 1024;

pub(super) struct UploadCap {
    bucket: DefaultDirectRateLimiter,
    /// Bytes that went through the bucket, since the start.
    pub(super) paced: std::sync::atomic::AtomicU64,
    /// The most bytes taken from the bucket at once: 100 ms at the cap, at least 64 KiB.
    piece: NonZeroU32,
    /// Chunks take the bucket in the order they came to it (tokio's mutex is fair). Waiters
    /// of the bucket alone race when it refills, and the one that slept last won here each
    /// time: with one run of a peer sent at a time, one peer then had the cap to itself.
    queue: tokio::sync::Mutex<()>,
}

impl UploadCap {
    pub(super) fn new(bytes_per_sec: NonZeroU32) -> Self {
        let piece = NonZeroU32::new((bytes_per_sec.get() / 10).max(64 * 1024)).expect("positive");
        Self {
            bucket: RateLimiter::direct(Quota::per_second(bytes_per_sec).allow_burst(piece)),
            paced: Default::default(),
            piece,
            queue: Default::default(),
        }
    }

    /// Waits until `n` more bytes may go out.
    pub(super) async fn pace(&self, mut n: usize) {
        self.paced
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        let _turn = self.queue.lock().await;
        while n > 0 {
            let take = n.min(self.piece.get() as usize);
            let cells = NonZeroU32::new(take as u32).expect("positive");
            // Never more than the burst, so the bucket can always grant it.
            let _ = self.bucket.until_n_ready(cells).await;
            n -= take;
        }
    }
}

/// Chunk requests served at once under a cap of `bytes_per_sec`: at most `max`, and few
/// enough that each moves at least [`MIN_SLOT_RATE`] (at least one).
pub(super) fn slots(bytes_per_sec: Option<NonZeroU32>, max: usize) -> usize {
    match bytes_per_sec {
        Some(r) => max.min((r.get() / MIN_SLOT_RATE).max(1) as usize),
        None => max,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_shrink_with_the_cap() {
        let r = |b| NonZeroU32::new(b);
        assert_eq!(slots(None, 16), 16);
        assert_eq!(slots(r(100 << 20), 16), 16);
        assert_eq!(slots(r(4 << 20), 16), 8);
        assert_eq!(slots(r(1 << 20), 16), 2);
        assert_eq!(slots(r(64 << 10), 16), 1);
    }

    #[tokio::test]
    async fn the_bucket_paces_bytes_beyond_its_burst() {
        // 1 MiB/s, a 100 KiB piece: 600 KiB beyond the first burst take about half a second.
        let cap = UploadCap::new(NonZeroU32::new(1 << 20).unwrap());
        let t = std::time::Instant::now();
        cap.pace(700 << 10).await;
        assert!(
            t.elapsed() >= std::time::Duration::from_millis(450),
            "{:?}",
            t.elapsed()
        );
    }
}
