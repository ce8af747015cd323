//! Wall-clock time for the adapters. The core never reads a clock; the engine
//! reads this one and passes `now` in, so tests can move time by hand.

use jitbot_core::Instant;
use std::sync::{Arc, Mutex};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Instant;
}

/// The system's UTC clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        chrono::Utc::now()
    }
}

/// A clock that moves only when told: for tests.
#[derive(Clone, Debug)]
pub struct ManualClock(Arc<Mutex<Instant>>);

impl ManualClock {
    pub fn new(start: Instant) -> Self {
        ManualClock(Arc::new(Mutex::new(start)))
    }
    pub fn advance(&self, by: chrono::Duration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t += by;
    }
    pub fn set(&self, at: Instant) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Wall-clock time that never runs backward, for the engine and scheduler.
///
/// Due times are stored in wall-clock time (they must survive restarts),
/// but a wall clock can be stepped back (NTP, an operator, a VM restored
/// from a snapshot): compared with a stepped-back clock, every stored due
/// time would seem further away by the size of the step, and every
/// revocation would be late by that much. So this clock anchors the wall
/// clock to the monotonic clock: it follows the wall clock forward, and
/// when the wall clock goes back it keeps counting monotonic time from the
/// last reading instead (logged and counted). Leases then end early rather
/// than late, which is the safe side. A restart re-reads the wall clock.
pub struct SteadyClock {
    wall: Box<dyn Fn() -> Instant + Send + Sync>,
    /// Monotonic time since an arbitrary origin.
    mono: Box<dyn Fn() -> std::time::Duration + Send + Sync>,
    /// The last wall reading followed, with the monotonic time it was taken
    /// at; and whether the wall clock is behind (so a step is logged once).
    anchor: Mutex<(Instant, std::time::Duration, bool)>,
}

impl SteadyClock {
    /// The system's wall clock anchored to its monotonic clock.
    pub fn system() -> Self {
        let origin = std::time::Instant::now();
        Self::with_sources(chrono::Utc::now, move || origin.elapsed())
    }

    /// Any wall and monotonic sources (tests step the wall clock by hand).
    pub fn with_sources(
        wall: impl Fn() -> Instant + Send + Sync + 'static,
        mono: impl Fn() -> std::time::Duration + Send + Sync + 'static,
    ) -> Self {
        let anchor = Mutex::new((wall(), mono(), false));
        SteadyClock {
            wall: Box::new(wall),
            mono: Box::new(mono),
            anchor,
        }
    }
}

impl Clock for SteadyClock {
    fn now(&self) -> Instant {
        let wall = (self.wall)();
        let mono = (self.mono)();
        let mut anchor = self.anchor.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = chrono::Duration::from_std(mono.saturating_sub(anchor.1)).unwrap_or_default();
        let steady = anchor.0 + elapsed;
        if wall >= steady {
            *anchor = (wall, mono, false);
            return wall;
        }
        let behind = steady - wall;
        if behind > chrono::Duration::seconds(1) && !anchor.2 {
            anchor.2 = true;
            crate::metrics::clock_stepped_back();
            tracing::warn!(
                behind_secs = behind.num_seconds(),
                "the wall clock went back; jitbot keeps counting from before the step, so no revocation is delayed"
            );
        }
        steady
    }
}

/// A clock that never starts behind the store: `SteadyClock` keeps time
/// across a backward wall-clock step only in memory, so after a restart
/// during the step the wall clock would be behind the commits already made
/// and every revocation would wait out the step again. Started behind the
/// latest commit, it runs on from that commit's time (an offset kept for
/// the life of the process, as `SteadyClock` does after a step).
pub struct NotBefore {
    inner: Arc<dyn Clock>,
    offset: chrono::Duration,
}

impl NotBefore {
    pub fn new(inner: Arc<dyn Clock>, floor: Option<Instant>) -> Self {
        let now = inner.now();
        let offset = floor
            .map(|f| (f - now).max(chrono::Duration::zero()))
            .unwrap_or_else(chrono::Duration::zero);
        if offset > chrono::Duration::seconds(1) {
            crate::metrics::clock_stepped_back();
            tracing::warn!(
                behind_secs = offset.num_seconds(),
                "the wall clock is behind the store's latest commit; jitbot counts on from that commit, so no revocation is delayed"
            );
        }
        NotBefore { inner, offset }
    }
}

impl Clock for NotBefore {
    fn now(&self) -> Instant {
        self.inner.now() + self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone, Utc};

    #[test]
    fn a_backward_wall_clock_step_does_not_stop_time() {
        let wall = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0).unwrap());
        let mono = Arc::new(Mutex::new(std::time::Duration::ZERO));
        let (w, m) = (wall.clone(), mono.clone());
        let clock = SteadyClock::with_sources(move || w.now(), move || *m.lock().unwrap());
        let start = clock.now();
        let tick = |secs: u64| *mono.lock().unwrap() += std::time::Duration::from_secs(secs);

        // Forward: follows the wall clock.
        tick(10);
        wall.advance(Duration::seconds(10));
        assert_eq!(clock.now(), start + Duration::seconds(10));

        // An hour back: time goes on from before the step.
        wall.advance(Duration::hours(-1));
        tick(5);
        assert_eq!(clock.now(), start + Duration::seconds(15));
        tick(60);
        wall.advance(Duration::seconds(60));
        assert_eq!(clock.now(), start + Duration::seconds(75), "never behind");

        // A forward step is followed at once (revocations come early, never late).
        wall.advance(Duration::hours(2));
        assert_eq!(clock.now(), start + Duration::hours(1) + Duration::seconds(70));
    }
}
