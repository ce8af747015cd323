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
}

impl TimerKind {
    pub const MAX: TimerKind = TimerKind::Warn;

    fn from_byte(b: u8) -> Option<TimerKind> {
        Some(match b {
            1 => TimerKind::Grant,
            2 => TimerKind::Expire,
            3 => TimerKind::Revoke,
            4 => TimerKind::RequestTimeout,
            5 => TimerKind::Warn,
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

fn millis(at: Instant) -> u64 {
    u64::try_from(at.timestamp_millis()).unwrap_or(0)
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
