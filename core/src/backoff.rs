//! Retry delays: exponential backoff with full jitter, capped.

use crate::Span;

/// Delay before retry number `attempt` (1 for the first retry):
/// `min(cap, base * 2^(attempt-1))`, scaled by `jitter` in `[0.5, 1.0]` so that
/// many leases failing together do not retry in lockstep. `jitter` is an input
/// (drawn by the caller) to keep this function pure.
pub fn retry_delay(attempt: u32, base: Span, cap: Span, jitter: f64) -> Span {
    let exp = attempt.saturating_sub(1).min(32);
    let raw = base.as_secs().saturating_mul(1u64 << exp).min(cap.as_secs());
    let factor = jitter.clamp(0.5, 1.0);
    Span::from_secs(((raw as f64) * factor).round().max(1.0) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let base = Span::from_secs(5);
        let cap = Span::from_secs(60);
        let delays: Vec<u64> = (1..=6)
            .map(|a| retry_delay(a, base, cap, 1.0).as_secs())
            .collect();
        assert_eq!(delays, vec![5, 10, 20, 40, 60, 60]);
    }

    #[test]
    fn jitter_shrinks_but_never_below_half_or_one_second() {
        let base = Span::from_secs(10);
        let cap = Span::from_secs(600);
        assert_eq!(retry_delay(1, base, cap, 0.0).as_secs(), 5);
        assert_eq!(retry_delay(1, base, cap, 0.75).as_secs(), 8);
        assert_eq!(retry_delay(1, Span::from_secs(1), cap, 0.5).as_secs(), 1);
        assert_eq!(retry_delay(u32::MAX, base, cap, 1.0).as_secs(), 600);
    }
}
