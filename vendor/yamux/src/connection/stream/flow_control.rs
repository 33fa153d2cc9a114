use std::{cmp, sync::Arc};

use parking_lot::Mutex;
use web_time::{Duration, Instant};

use crate::{connection::rtt::Rtt, Config, ConnectionError, DEFAULT_CREDIT};

/// The most an outbound stream's first receive window is (peerix): enough for the
/// bandwidth-delay product of 1 Gbit/s at 34 ms, or 100 Mbit/s at 340 ms; beyond it a stream
/// grows as upstream's do.
pub(crate) const MAX_INITIAL_STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// The rate an outbound stream's first receive window is sized for, over its connection's round
/// trip (peerix), in bytes per second: 1 Gbit/s.
pub(crate) const INITIAL_WINDOW_RATE: u64 = 125_000_000;

/// The shortest round trip over which a new outbound stream starts with a window for its round
/// trip (peerix): below it, streams start at [`DEFAULT_CREDIT`] as upstream's do.
pub(crate) const MIN_RTT_FOR_WINDOW: Duration = Duration::from_millis(10);

/// The window an outbound stream that opened with less is raised to once its answer flows
/// (peerix). On a short path the round trip is not what a window waits on: the receiver's
/// turnaround is (its reader taking half the window, the update going out through the
/// connection's task, the sender woken), about a millisecond on a busy machine, and a peer
/// answers one request at a time, so the window of the stream it answers is all that is in
/// flight to it.
pub(crate) const ANSWER_WINDOW: u32 = 1024 * 1024;

/// The most a connection's stream windows together may exceed [`DEFAULT_CREDIT`] by for a
/// stream to be raised to [`ANSWER_WINDOW`] (peerix): room for two, the answer flowing and the
/// one ending before it. Streams opened with 1 MiB each let the receiving daemon of a 4 GiB
/// path peak 10 MiB higher: streams whose reader stalled held a window each.
pub(crate) const ANSWER_WINDOWS_EXTRA: usize = 2 * (ANSWER_WINDOW - DEFAULT_CREDIT) as usize;

#[derive(Debug)]
pub(crate) struct FlowController {
    config: Arc<Config>,
    last_window_update: Instant,
    /// See [`Connection::rtt`].
    rtt: Rtt,
    /// See [`Connection::accumulated_max_stream_windows`].
    accumulated_max_stream_windows: Arc<Mutex<usize>>,
    /// peerix: whether any data has come in on this stream yet (see
    /// [`FlowController::consume_receive_window`]).
    received: bool,
    /// peerix: whether this side opened the stream: only such a stream is raised to
    /// [`ANSWER_WINDOW`] (see [`FlowController::raise_for_answer`]).
    outbound: bool,
    receive_window: u32,
    max_receive_window: u32,
    send_window: u32,
}

impl FlowController {
    /// `receive_window` is also the stream's first maximum: [`DEFAULT_CREDIT`], or for an
    /// outbound stream what [`FlowController::reserve_initial_window`] reserved (peerix).
    pub(crate) fn new(
        receive_window: u32,
        send_window: u32,
        accumulated_max_stream_windows: Arc<Mutex<usize>>,
        rtt: Rtt,
        config: Arc<Config>,
        outbound: bool,
    ) -> Self {
        Self {
            outbound,
            receive_window,
            send_window,
            config,
            rtt,
            accumulated_max_stream_windows,
            received: false,
            max_receive_window: receive_window,
            last_window_update: Instant::now(),
        }
    }

    /// The receive window a new outbound stream starts with (peerix): the bandwidth-delay
    /// product of [`INITIAL_WINDOW_RATE`] over the connection's round trip, at most
    /// [`MAX_INITIAL_STREAM_WINDOW`] and within the connection limit, its excess over
    /// [`DEFAULT_CREDIT`] reserved in `accumulated_max_stream_windows` as a grown window's is.
    /// A stream that starts at [`DEFAULT_CREDIT`] on a long path is held to 256 KiB per round
    /// trip until auto-tuning has doubled its window enough: a request of a few MiB, as a
    /// download sends each peer, then took four round trips where one was enough, and four
    /// peers over a 100 ms round trip reached 0.86 of their links where plain HTTP over the
    /// same links reached 0.94. What a stream's peer can make this side buffer is its window:
    /// the same 4 MiB at most as before, when a stream started with the largest window its
    /// connection's streams had grown to; only now from a connection's first streams on.
    pub(crate) fn reserve_initial_window(
        accumulated_max_stream_windows: &Mutex<usize>,
        config: &Config,
        rtt: Option<Duration>,
    ) -> u32 {
        // On a short path the window's growth from 256 KiB costs a few milliseconds, and a
        // larger first window would only let a fast peer fill this side's buffers while its
        // reader is slower than the link (on loopback a receiving daemon peaked 22 MiB higher).
        // Before the round trip is known (the connection's first ping is out), upstream's too.
        let Some(rtt) = rtt.filter(|rtt| *rtt >= MIN_RTT_FOR_WINDOW) else {
            return DEFAULT_CREDIT;
        };
        let bdp = (rtt.as_secs_f64() * INITIAL_WINDOW_RATE as f64) as u64;
        let initial = bdp.clamp(DEFAULT_CREDIT.into(), MAX_INITIAL_STREAM_WINDOW.into()) as u32;
        let mut accumulated = accumulated_max_stream_windows.lock();
        let room = Self::room_beyond_default(config).saturating_sub(*accumulated);
        let extra = cmp::min((initial - DEFAULT_CREDIT) as usize, room);
        *accumulated += extra;
        DEFAULT_CREDIT + extra as u32
    }

    /// Calculate the number of additional window bytes the receiving side (local) should grant the
    /// sending side (remote) via a window update message.
    ///
    /// Returns `None` if too small to justify a window update message.
    pub(crate) fn next_window_update(&mut self, buffer_len: usize) -> Option<u32> {
        self.assert_invariants(buffer_len);

        let raised = self.raise_for_answer();

        let bytes_received = self.max_receive_window - self.receive_window;
        let mut next_window_update =
            bytes_received.saturating_sub(buffer_len.try_into().unwrap_or(u32::MAX));

        // Don't send an update in case half or more of the window is still available to the sender.
        if next_window_update < self.max_receive_window / 2 {
            return None;
        }

        log::trace!(
            "received {} mb in {} seconds ({} mbit/s)",
            next_window_update as f64 / crate::MIB as f64,
            self.last_window_update.elapsed().as_secs_f64(),
            next_window_update as f64 / crate::MIB as f64 * 8.0
                / self.last_window_update.elapsed().as_secs_f64()
        );

        // Auto-tuning `max_receive_window`
        //
        // The ideal `max_receive_window` is equal to the bandwidth-delay-product (BDP), thus
        // allowing the remote sender to exhaust the entire available bandwidth on a single stream.
        // Choosing `max_receive_window` too small prevents the remote sender from exhausting the
        // available bandwidth. Choosing `max_receive_window` to large is wasteful and delays
        // backpressure from the receiver to the sender on the stream.
        //
        // In case the remote sender has exhausted half or more of its credit in less than 2
        // round-trips, try to double `max_receive_window`.
        //
        // For simplicity `max_receive_window` is never decreased.
        //
        // This implementation is heavily influenced by QUIC. See document below for rational on the
        // above strategy.
        //
        // https://docs.google.com/document/d/1F2YfdDXKpy20WVKJueEf4abn_LVZHhMUMS5gX6Pgjl4/edit?usp=sharing
        if !raised
            && self
                .rtt
                .get()
                .map(|rtt| self.last_window_update.elapsed() < rtt * 2)
                .unwrap_or(false)
        {
            let mut accumulated_max_stream_windows = self.accumulated_max_stream_windows.lock();

            // Ideally one can just double it:
            let new_max = self.max_receive_window.saturating_mul(2);

            // But one has to consider the configured connection limit:
            let new_max = {
                let connection_limit: usize = self.max_receive_window as usize +
                    // the overall configured conneciton limit
                    (self.config.max_connection_receive_window.unwrap_or(usize::MAX)
                    // minus the minimum amount of window guaranteed to each stream
                    - self.config.max_num_streams * DEFAULT_CREDIT as usize
                    // minus the amount of bytes beyond the minimum amount (`DEFAULT_CREDIT`)
                    // already allocated by this and other streams on the connection.
                    - *accumulated_max_stream_windows);

                cmp::min(new_max, connection_limit.try_into().unwrap_or(u32::MAX))
            };

            // Account for the additional credit on the accumulated connection counter.
            *accumulated_max_stream_windows += (new_max - self.max_receive_window) as usize;
            drop(accumulated_max_stream_windows);

            log::debug!(
                "old window_max: {} mb, new window_max: {} mb",
                self.max_receive_window as f64 / crate::MIB as f64,
                new_max as f64 / crate::MIB as f64
            );

            self.max_receive_window = new_max;

            // Recalculate `next_window_update` with the new `max_receive_window`.
            let bytes_received = self.max_receive_window - self.receive_window;
            next_window_update =
                bytes_received.saturating_sub(buffer_len.try_into().unwrap_or(u32::MAX));
        }

        self.last_window_update = Instant::now();
        self.receive_window += next_window_update;

        self.assert_invariants(buffer_len);

        Some(next_window_update)
    }

    /// peerix: raise an outbound stream's window to [`ANSWER_WINDOW`] once its answer flows
    /// and its reader reads, if the connection's streams together stay within
    /// [`ANSWER_WINDOWS_EXTRA`] beyond the default; true when it did (the window update that
    /// grants it is then at least half the window, so it goes out at once). Not when the stream
    /// opens: a request waits at its peer behind the ones before it, and a reader that stalls
    /// (on its disk) stops raising, so only the streams being answered and read hold the larger
    /// window, whatever the number in flight. Tried again at every read while the room is
    /// taken.
    fn raise_for_answer(&mut self) -> bool {
        // A window grows only once a round trip is known (upstream's invariant).
        if !self.outbound
            || !self.received
            || self.max_receive_window >= ANSWER_WINDOW
            || self.rtt.get().is_none()
        {
            return false;
        }
        let extra = (ANSWER_WINDOW - self.max_receive_window) as usize;
        let mut accumulated = self.accumulated_max_stream_windows.lock();
        let limit = cmp::min(Self::room_beyond_default(&self.config), ANSWER_WINDOWS_EXTRA);
        if *accumulated + extra > limit {
            return false;
        }
        *accumulated += extra;
        self.max_receive_window = ANSWER_WINDOW;
        true
    }

    /// peerix: what a connection's stream windows together may exceed [`DEFAULT_CREDIT`] by:
    /// its limit, less the default every stream it allows is guaranteed.
    fn room_beyond_default(config: &Config) -> usize {
        config
            .max_connection_receive_window
            .unwrap_or(usize::MAX)
            .saturating_sub(config.max_num_streams * DEFAULT_CREDIT as usize)
    }

    fn assert_invariants(&self, buffer_len: usize) {
        if !cfg!(debug_assertions) {
            return;
        }

        let config = &self.config;
        let rtt = self.rtt.get();
        let accumulated_max_stream_windows = *self.accumulated_max_stream_windows.lock();

        assert!(
            buffer_len <= self.max_receive_window as usize,
            "The current buffer size never exceeds the maximum stream receive window."
        );
        assert!(
            self.receive_window <= self.max_receive_window,
            "The current window never exceeds the maximum."
        );
        assert!(
            (self.max_receive_window - DEFAULT_CREDIT) as usize
                <= config.max_connection_receive_window.unwrap_or(usize::MAX)
                    - config.max_num_streams * DEFAULT_CREDIT as usize,
            "The maximum never exceeds its maximum portion of the configured connection limit."
        );
        assert!(
            (self.max_receive_window - DEFAULT_CREDIT) as usize
                <= accumulated_max_stream_windows,
            "The amount by which the stream maximum exceeds DEFAULT_CREDIT is tracked in accumulated_max_stream_windows."
        );
        if rtt.is_none() {
            assert_eq!(
                self.max_receive_window, DEFAULT_CREDIT,
                "The maximum is only increased iff an rtt measurement is available."
            );
        }
    }

    pub(crate) fn send_window(&self) -> u32 {
        self.send_window
    }

    pub(crate) fn consume_send_window(&mut self, i: u32) -> Result<(), ConnectionError> {
        self.send_window = self
            .send_window
            .checked_sub(i)
            .ok_or(ConnectionError::InvalidWindowUpdate)?;
        Ok(())
    }

    pub(crate) fn increase_send_window_by(&mut self, i: u32) -> Result<(), ConnectionError> {
        self.send_window = self
            .send_window
            .checked_add(i)
            .ok_or(ConnectionError::InvalidWindowUpdate)?;
        Ok(())
    }

    pub(crate) fn consume_receive_window(&mut self, i: u32) -> Result<(), ConnectionError> {
        // peerix: the first window is timed from its first data, not from the stream's
        // opening. A request's stream may wait at the remote (behind the requests before it)
        // before any data flows; timed from its opening, its window never looked fast enough to
        // grow, however fast the data then came.
        if !self.received {
            self.received = true;
            self.last_window_update = Instant::now();
        }
        self.receive_window = self
            .receive_window
            .checked_sub(i)
            .ok_or(ConnectionError::InvalidWindowUpdate)?;
        Ok(())
    }
}

impl Drop for FlowController {
    fn drop(&mut self) {
        let mut accumulated_max_stream_windows = self.accumulated_max_stream_windows.lock();

        debug_assert!(
            *accumulated_max_stream_windows >= (self.max_receive_window - DEFAULT_CREDIT) as usize,
            "{accumulated_max_stream_windows} {}",
            self.max_receive_window
        );

        *accumulated_max_stream_windows -= (self.max_receive_window - DEFAULT_CREDIT) as usize;
    }
}
