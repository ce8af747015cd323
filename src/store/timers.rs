//! Timer keys: `[due ms, big-endian][kind][id]`, so sled's order is due order
//! and the scheduler's next wake-up is the first key.

use jitbot_core::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TimerKind {
    /// Continue a grant whose lease is `Granting` (after a crash, or a retry).
    Grant = 1,
    /// An active lease reaches its end.
    Expire = 2,
    /// Remove the membership of a `Revoking` lease (first try and retries).
    Revoke = 3,
    /// A pending request's approval window closes.
    RequestTimeout = 4,
    /// Warn the holder that the lease ends soon.
    Warn = 5,
    /// Look once more, a settle delay after a lease whose add got no
    /// answer has ended, for that add arriving late (`engine/recheck.rs`).
    Recheck = 6,
    /// The same re-check (`engine/recheck.rs`) once it has found a late
    /// add and committed its removal (`lease.late_add_found`): while this
    /// timer is pending a removal may be on its way, so no grant of the
    /// same user and directory group may take the membership for its own.
    RecheckRemoval = 7,
}

impl TimerKind {
    /// The kinds of the re-check after an ambiguous add: the same handler
    /// runs both (`engine/recheck.rs`), and a lease has at most one.
    pub const RECHECKS: [TimerKind; 2] = [TimerKind::Recheck, TimerKind::RecheckRemoval];

    pub const MAX: TimerKind = TimerKind::RecheckRemoval;

    fn from_byte(b: u8) -> Option<TimerKind> {
        Some(match b {
            1 => TimerKind::Grant,
            2 => TimerKind::Expire,
            3 => TimerKind::Revoke,
            4 => TimerKind::RequestTimeout,
            5 => TimerKind::Warn,
            6 => TimerKind::Recheck,
            7 => TimerKind::RecheckRemoval,
            _ => return None,
        })
    }
}

/// A due piece of work for the scheduler.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Timer {
    pub due: Instant,
    pub kind: TimerKind,
    /// A lease id, or a request id for `RequestTimeout`.
    pub id: String,
}

/// `at` in whole milliseconds, rounded up: a timer never fires before its
/// instant. Rounded down, an expiry 0.4 ms into a millisecond would fire
/// early, find the lease not yet due, re-arm at the same key and spin until
/// the instant passed, committing each time.
fn millis(at: Instant) -> u64 {
    let ms = at.timestamp_millis();
    let ceil = if at.timestamp_subsec_nanos() % 1_000_000 == 0 {
        ms
    } else {
        ms.saturating_add(1)
    };
    u64::try_from(ceil).unwrap_or(0)
}

pub(super) fn timer_key(due: Instant, kind: TimerKind, id: &str) -> Vec<u8> {
    let mut k = millis(due).to_be_bytes().to_vec();
    k.push(kind as u8);
    k.extend_from_slice(id.as_bytes());
    k
}

pub(super) fn index_key(kind: TimerKind, id: &str) -> Vec<u8> {
    let mut k = vec![kind as u8];
    k.extend_from_slice(id.as_bytes());
    k
}

pub(super) fn parse_key(key: &[u8]) -> Option<Timer> {
    if key.len() < 9 {
        return None;
    }
    let mut ms = [0u8; 8];
    ms.copy_from_slice(&key[..8]);
    let due = chrono::DateTime::from_timestamp_millis(i64::try_from(u64::from_be_bytes(ms)).ok()?)?;
    Some(Timer {
        due,
        kind: TimerKind::from_byte(key[8])?,
        id: String::from_utf8(key[9..].to_vec()).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timer_key_never_comes_before_its_instant() {
        let whole = chrono::DateTime::from_timestamp_millis(1_700_000_000_123).expect("instant");
        let key = parse_key(&timer_key(whole, TimerKind::Expire, "l-1")).expect("parses");
        assert_eq!(key.due, whole, "a whole millisecond is kept as it is");
        let inside = whole + chrono::Duration::microseconds(400);
        let key = parse_key(&timer_key(inside, TimerKind::Expire, "l-1")).expect("parses");
        assert!(key.due >= inside, "{} is before {}", key.due, inside);
        assert_eq!(key.due, whole + chrono::Duration::milliseconds(1));
    }
}
