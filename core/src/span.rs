//! `Span`: a positive length of time, as typed by people ("2h", "90m").

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// A length of time with second precision. Parsing accepts humantime's forms
/// (`90s`, `15m`, `2h`, `1h30m`, `1d`); zero is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span(u64);

impl Span {
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
        // A Span is parsed from at most humantime's range; i64 seconds cannot overflow
        // for any value a person can type, but saturate anyway rather than panic.
        chrono::Duration::seconds(i64::try_from(self.0).unwrap_or(i64::MAX / 1000))
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
}

impl FromStr for Span {
    type Err = SpanError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let d = humantime::parse_duration(s.trim()).map_err(|_| SpanError::Invalid(s.to_string()))?;
        if d.as_secs() == 0 {
            return Err(SpanError::Zero);
        }
        Ok(Span(d.as_secs()))
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
}
