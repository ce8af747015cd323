//! `Span`: a positive length of time, as typed by people ("2h", "90m").

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A length of time with second precision. Parsing accepts humantime's forms
/// (`90s`, `15m`, `2h`, `1h30m`, `1d`); zero, negative and longer than
/// [`Span::MAX`] are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span(u64);

/// The most seconds chrono's `Duration::seconds` takes without panicking.
const CHRONO_MAX_SECS: u64 = (i64::MAX / 1000) as u64;

impl Span {
    /// The longest duration jitbot reads from people or config: 366 days.
    /// Nothing jitbot times (a lease, a decision window, a retry) needs more,
    /// and a cap keeps every instant it computes far from chrono's limits,
    /// so "unlimited" written as `1000y` is refused instead of panicking.
    pub const MAX: Span = Span(366 * 86_400);

    /// The longest retention period jitbot reads (`[store] retain`): 100
    /// years. Records are kept for years, not days, so [`Span::MAX`] is too
    /// short there; this still keeps every instant far from chrono's limits.
    pub const LONG_MAX: Span = Span(100 * 366 * 86_400);

    /// Parses a long span such as a retention period (`400d`, `7years`):
    /// the forms [`Span`]'s `FromStr` takes, up to [`Span::LONG_MAX`].
    pub fn parse_long(s: &str) -> Result<Span, SpanError> {
        parse_up_to(s, Span::LONG_MAX, SpanError::TooLongForRetention)
    }

    pub const fn from_secs(secs: u64) -> Self {
        Self(secs)
    }
    pub const fn from_mins(mins: u64) -> Self {
        Self(mins * 60)
    }
    pub const fn from_hours(hours: u64) -> Self {
        Self(hours * 3600)
    }
    pub const fn as_secs(self) -> u64 {
        self.0
    }
    pub fn to_chrono(self) -> chrono::Duration {
        // Parsed spans are at most `MAX`, but one built with `from_secs` from
        // a stored number could be anything: saturate rather than panic.
        chrono::Duration::seconds(self.0.min(CHRONO_MAX_SECS) as i64)
    }
    /// `t` plus this span, saturating at the latest time chrono can hold.
    pub fn after(self, t: crate::Instant) -> crate::Instant {
        t.checked_add_signed(self.to_chrono())
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
    }
    /// `t` minus this span, saturating at the earliest time chrono can hold.
    pub fn before(self, t: crate::Instant) -> crate::Instant {
        t.checked_sub_signed(self.to_chrono())
            .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC)
    }
    pub fn to_std(self) -> std::time::Duration {
        std::time::Duration::from_secs(self.0)
    }
}

/// Why a duration could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpanError {
    #[error("`{0}` is not a duration; write it like 30m, 2h or 1h30m")]
    Invalid(String),
    #[error("a duration must be longer than zero")]
    Zero,
    #[error("`{0}` is too long: jitbot takes durations of at most 366 days (366d); there is no unlimited")]
    TooLong(String),
    #[error("`{0}` is too long: a retention period is at most 100 years; leave it unset to keep everything")]
    TooLongForRetention(String),
}

/// Parses `s` as a span of at most `max`; `too_long` words the refusal.
fn parse_up_to(s: &str, max: Span, too_long: fn(String) -> SpanError) -> Result<Span, SpanError> {
    let d = humantime::parse_duration(s.trim()).map_err(|_| SpanError::Invalid(s.to_string()))?;
    if d.as_secs() == 0 {
        return Err(SpanError::Zero);
    }
    if d.as_secs() > max.0 {
        return Err(too_long(s.trim().chars().take(40).collect()));
    }
    Ok(Span(d.as_secs()))
}

impl FromStr for Span {
    type Err = SpanError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_up_to(s, Span::MAX, SpanError::TooLong)
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (d, rem) = (self.0 / 86_400, self.0 % 86_400);
        let (h, rem) = (rem / 3600, rem % 3600);
        let (m, s) = (rem / 60, rem % 60);
        let mut out = String::new();
        for (v, unit) in [(d, "d"), (h, "h"), (m, "m"), (s, "s")] {
            if v > 0 {
                out.push_str(&format!("{v}{unit}"));
            }
        }
        if out.is_empty() {
            out.push_str("0s");
        }
        f.write_str(&out)
    }
}

impl Serialize for Span {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_people_forms() {
        for (input, secs, shown) in [
            ("90s", 90, "1m30s"),
            ("15m", 900, "15m"),
            ("2h", 7200, "2h"),
            ("1h30m", 5400, "1h30m"),
            ("1d", 86_400, "1d"),
        ] {
            let span: Span = input.parse().unwrap();
            assert_eq!(span.as_secs(), secs, "{input}");
            assert_eq!(span.to_string(), shown, "{input}");
        }
    }

    #[test]
    fn refuses_nonsense_and_zero() {
        assert!(matches!("forever".parse::<Span>(), Err(SpanError::Invalid(_))));
        assert!(matches!("-2h".parse::<Span>(), Err(SpanError::Invalid(_))));
        assert_eq!("0s".parse::<Span>(), Err(SpanError::Zero));
        assert!("99999999999999999999h".parse::<Span>().is_err());
    }

    #[test]
    fn refuses_more_than_the_cap() {
        assert_eq!("366d".parse::<Span>(), Ok(Span::MAX));
        for long in ["367d", "99999y", "1000years", "9000000000000000s"] {
            assert!(
                matches!(long.parse::<Span>(), Err(SpanError::TooLong(_))),
                "{long}"
            );
        }
        let msg = "99999y".parse::<Span>().unwrap_err().to_string();
        assert!(msg.contains("366 days"), "{msg}");
    }

    #[test]
    fn a_retention_period_may_be_longer_than_a_year() {
        assert_eq!(Span::parse_long("400d"), Ok(Span::from_secs(400 * 86_400)));
        assert!(Span::parse_long("7years").is_ok());
        assert_eq!(Span::parse_long("0d"), Err(SpanError::Zero));
        assert!(matches!(Span::parse_long("ever"), Err(SpanError::Invalid(_))));
        let msg = Span::parse_long("1000y").unwrap_err().to_string();
        assert!(msg.contains("100 years"), "{msg}");
        assert!("400d".parse::<Span>().is_err(), "the short form keeps its cap");
    }

    #[test]
    fn arithmetic_saturates_instead_of_panicking() {
        use chrono::{DateTime, TimeZone, Utc};
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let huge = Span::from_secs(u64::MAX);
        assert_eq!(huge.after(now), DateTime::<Utc>::MAX_UTC);
        assert_eq!(huge.before(now), DateTime::<Utc>::MIN_UTC);
        assert_eq!(
            Span::from_secs(CHRONO_MAX_SECS + 1).to_chrono().num_seconds(),
            CHRONO_MAX_SECS as i64
        );
        assert_eq!(Span::from_hours(1).after(now), now + chrono::Duration::hours(1));
    }
}
