// Copyright (c) 2023 Protocol Labs.
//
// Licensed under the Apache License, Version 2.0 or MIT license, at your option.
//
// A copy of the Apache License, Version 2.0 is included in the software as
// LICENSE-APACHE and a copy of the MIT license is included in the software
// as LICENSE-MIT. You may also obtain a copy of the Apache License, Version 2.0
// at https://www.apache.org/licenses/LICENSE-2.0 and a copy of the MIT license
// at https://opensource.org/licenses/MIT.

//! Connection round-trip time measurement

use std::sync::{
    atomic::{AtomicU32, Ordering},
    Arc,
};

use parking_lot::Mutex;
use web_time::{Duration, Instant};

use crate::connection::Action;
use crate::frame::{header::Ping, Frame};

const PING_INTERVAL: Duration = Duration::from_secs(10);

/// peerix: pings sent back to back as the connection opens, before [`PING_INTERVAL`] paces
/// them. One sample taken on a loaded machine can be many times the path's round trip; the
/// least of a few is close to it from the start.
const FIRST_PINGS: u32 = 4;

#[derive(Clone, Debug)]
pub(crate) struct Rtt {
    inner: Arc<Mutex<RttInner>>,
    /// Next ping identifier, used for matching pongs.
    next_id: Arc<AtomicU32>,
}

impl Rtt {
    pub(crate) fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(RttInner {
                rtt: None,
                least: None,
                samples: 0,
                state: RttState::Waiting {
                    next: Instant::now(),
                },
            })),
            next_id: Arc::new(AtomicU32::new(0)),
        }
    }

    pub(crate) fn next_ping(&mut self) -> Option<Frame<Ping>> {
        let state = &mut self.inner.lock().state;

        match state {
            RttState::AwaitingPong { .. } => return None,
            RttState::Waiting { next } => {
                if *next > Instant::now() {
                    return None;
                }
            }
        }

        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        *state = RttState::AwaitingPong {
            sent_at: Instant::now(),
            id,
        };
        log::debug!("sending ping {id}");
        Some(Frame::ping(id))
    }

    pub(crate) fn handle_pong(&mut self, received_id: u32) -> Action {
        let inner = &mut self.inner.lock();

        let (sent_at, expected_id) = match inner.state {
            RttState::Waiting { .. } => {
                log::error!("received unexpected pong {received_id}");
                return Action::Terminate(Frame::protocol_error());
            }
            RttState::AwaitingPong { sent_at, id } => (sent_at, id),
        };

        if received_id != expected_id {
            log::error!("received pong with {received_id} but expected {expected_id}");
            return Action::Terminate(Frame::protocol_error());
        }

        let rtt = sent_at.elapsed();
        inner.rtt = Some(rtt);
        // peerix: and the least any ping took. A sample is the path's round trip plus whatever
        // queueing and scheduling delay it met (on a loaded loopback, tens of milliseconds
        // where the path has tens of microseconds); the least is the path's.
        inner.least = Some(inner.least.map_or(rtt, |l| l.min(rtt)));
        inner.samples = inner.samples.saturating_add(1);
        log::debug!("received pong {received_id}, estimated round-trip-time {rtt:?}");

        let next = if inner.samples < FIRST_PINGS {
            Instant::now()
        } else {
            Instant::now() + PING_INTERVAL
        };
        inner.state = RttState::Waiting { next };

        Action::None
    }

    pub(crate) fn get(&self) -> Option<Duration> {
        self.inner.lock().rtt
    }

    /// peerix: the least round trip any ping of this connection took, which a new stream's
    /// first window is sized from (see `FlowController::reserve_initial_window`). An inflated
    /// sample would open every stream with megabytes of window on a short path, and a fast
    /// peer then filled a slow reader's buffers. Auto-tuning keeps the latest sample, as
    /// upstream's does: it grows the window of a stream already running, and on a short path
    /// the least sample (tens of microseconds) would keep it from growing at all, which cost
    /// a loopback download about 8 % of its rate.
    pub(crate) fn least(&self) -> Option<Duration> {
        self.inner.lock().least
    }
}

#[derive(Debug)]
struct RttInner {
    state: RttState,
    rtt: Option<Duration>,
    /// peerix: see [`Rtt::least`].
    least: Option<Duration>,
    /// peerix: pongs received so far.
    samples: u32,
}

#[derive(Debug)]
enum RttState {
    AwaitingPong { sent_at: Instant, id: u32 },
    Waiting { next: Instant },
}
