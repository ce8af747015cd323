//! The operations a simulation is made of, and how the seed picks them.
//!
//! An operation holds raw choices (`pick` numbers taken modulo whatever is
//! there to choose from when it runs), never ids: a trace with operations
//! removed still replays, which is what shrinking needs.

use super::directory::Outcome;
use rand::rngs::StdRng;
use rand::Rng;

/// Requesters, approvers (and an admin), in the order picks index them.
pub const REQUESTERS: [&str; 3] = ["alice", "dave", "erin"];
pub const APPROVERS: [&str; 3] = ["bob", "carol", "root"];
/// Group names across every configuration the simulation reloads into.
pub const GROUP_NAMES: [&str; 4] = ["db-admins", "web-admins", "ops-admins", "database-admins"];

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `/jit request` (or `breakglass`) by a requester.
    Request {
        user: u8,
        group: u8,
        hours: Option<u8>,
        break_glass: bool,
    },
    /// `/jit approve` of a request (pending ones mostly).
    Approve {
        by: u8,
        pick: u32,
    },
    Deny {
        by: u8,
        pick: u32,
    },
    /// The requester cancels.
    Cancel {
        pick: u32,
    },
    /// The holder releases a lease.
    Release {
        pick: u32,
    },
    /// The holder extends a lease.
    Extend {
        pick: u32,
        hours: u8,
    },
    /// `/jit revoke` by an approver or admin.
    Revoke {
        by: u8,
        pick: u32,
    },
    /// The admin API's revoke.
    AdminRevoke {
        pick: u32,
    },
    /// Releases one parked directory call with this outcome.
    Directory {
        pick: u32,
        outcome: Outcome,
    },
    /// Starts every due timer not already running, as the scheduler would.
    Fire,
    /// Moves the clock forward.
    Advance {
        secs: u32,
    },
    /// Steps the clock back.
    Back {
        secs: u32,
    },
    /// An operator adds or removes a member by hand.
    Operator {
        add: bool,
        user: u8,
        group: u8,
    },
    /// One pass of the outbox worker.
    Drain,
    /// The chat platform goes down or comes back.
    Chat {
        down: bool,
    },
    /// One pass of the ZSP monitor.
    Zsp,
    /// Everything in flight dies; the store is reopened from disk.
    Crash,
    /// A restart into another configuration.
    Reload {
        variant: u8,
    },
    /// Backup now, crash, restore the backup into a new store.
    BackupRestore,
    /// Directory up, all work run to quiescence, then the expiry check (I3).
    Quiesce,
    /// The next store flush fails (a full disk): the store fails closed and
    /// jitbot is restarted, as its supervisor would.
    DiskFull,
}

/// Picks the next operation. Reads the world only for how many directory
/// calls are parked, so that they get released often enough.
pub fn generate(rng: &mut StdRng, parked: usize) -> Op {
    let pick = rng.gen::<u32>();
    if parked > 0 && rng.gen_bool(0.35) {
        let outcome = match rng.gen_range(0..100u32) {
            0..=69 => Outcome::Ok,
            70..=84 => Outcome::Unavailable,
            85..=91 => Outcome::AppliedButLost,
            92..=94 => Outcome::Late,
            _ => Outcome::Refused,
        };
        return Op::Directory { pick, outcome };
    }
    let approver = rng.gen_range(0..APPROVERS.len() as u8);
    let requester = rng.gen_range(0..REQUESTERS.len() as u8);
    // Weights out of 100.
    match rng.gen_range(0..100u32) {
        0..=19 => Op::Request {
            user: requester,
            group: rng.gen_range(0..GROUP_NAMES.len() as u8),
            hours: rng.gen_bool(0.8).then(|| rng.gen_range(1..=5)),
            break_glass: rng.gen_bool(0.05),
        },
        20..=35 => Op::Approve { by: approver, pick },
        36..=38 => Op::Deny { by: approver, pick },
        39..=40 => Op::Cancel { pick },
        41..=44 => Op::Release { pick },
        45..=49 => Op::Extend {
            pick,
            hours: rng.gen_range(1..=4),
        },
        50..=52 => Op::Revoke { by: approver, pick },
        53 => Op::AdminRevoke { pick },
        54..=64 => Op::Fire,
        65..=72 => Op::Advance {
            secs: [1, 10, 60, 300, 1200, 3600, 7200][rng.gen_range(0..7)],
        },
        73 => Op::Back {
            secs: [30, 300, 3600][rng.gen_range(0..3)],
        },
        74..=76 => Op::Operator {
            add: rng.gen_bool(0.5),
            user: requester,
            group: rng.gen_range(0..4),
        },
        77..=84 => Op::Drain,
        85..=86 => Op::Chat {
            down: rng.gen_bool(0.5),
        },
        87..=88 => Op::Zsp,
        89..=92 => Op::Crash,
        93..=94 => Op::Reload {
            variant: rng.gen_range(0..5),
        },
        95..=96 => Op::BackupRestore,
        97 => Op::DiskFull,
        _ => Op::Quiesce,
    }
}
