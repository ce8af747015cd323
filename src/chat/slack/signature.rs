//! Slack request signing (v0): who may call jitbot's Slack endpoints.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

/// Largest accepted distance between Slack's timestamp and our clock.
pub const MAX_SKEW_SECS: i64 = 300;

/// Why a request was refused. Never carries the secret or the signature.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignatureError {
    #[error("missing X-Slack-Request-Timestamp or X-Slack-Signature")]
    Missing,
    #[error("the timestamp is not a number")]
    BadTimestamp,
    #[error("the timestamp is {0} s away from our clock (replay or clock skew)")]
    Stale(i64),
    #[error("the signature is not a v0 hex signature")]
    Malformed,
    #[error("the signature does not match")]
    Mismatch,
}

/// Checks `X-Slack-Signature` (`v0=<hex HMAC-SHA256(secret, "v0:{ts}:{body}")>`)
/// over the raw body, and that `ts` is within [`MAX_SKEW_SECS`] of `now`
/// (Unix seconds, injected so tests can replay Slack's published example).
/// The comparison is constant-time.
pub fn verify_signature(
    secret: &str,
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), SignatureError> {
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
        return Err(SignatureError::Missing);
    };
    let ts: i64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    let skew = now.saturating_sub(ts);
    if skew.abs() > MAX_SKEW_SECS {
        return Err(SignatureError::Stale(skew));
    }
    let hex_sig = signature.strip_prefix("v0=").ok_or(SignatureError::Malformed)?;
    let expected = hex::decode(hex_sig).map_err(|_| SignatureError::Malformed)?;
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(|_| SignatureError::Mismatch)?;
    mac.update(b"v0:");
    mac.update(timestamp.trim().as_bytes());
    mac.update(b":");
    mac.update(body);
    mac.verify_slice(&expected).map_err(|_| SignatureError::Mismatch)
}

/// Signs like Slack does: for tests and tools that drive jitbot's endpoints.
pub fn sign(secret: &str, timestamp: i64, body: &[u8]) -> String {
    // HMAC takes keys of any length, so the error arm is never taken.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return String::new();
    };
    mac.update(format!("v0:{timestamp}:").as_bytes());
    mac.update(body);
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Slack's published example ("Verifying requests from Slack").
    const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
    const TS: &str = "1531420618";
    const BODY: &str = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
    const SIG: &str = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
    const NOW: i64 = 1531420618 + 10;

    fn check(secret: &str, ts: &str, sig: &str, body: &[u8], now: i64) -> Result<(), SignatureError> {
        verify_signature(secret, Some(ts), Some(sig), body, now)
    }

    #[test]
    fn accepts_slacks_published_example() {
        assert_eq!(check(SECRET, TS, SIG, BODY.as_bytes(), NOW), Ok(()));
        assert_eq!(sign(SECRET, 1531420618, BODY.as_bytes()), SIG);
    }

    #[test]
    fn refuses_a_changed_byte() {
        let mut body = BODY.as_bytes().to_vec();
        body[40] ^= 0x01;
        assert_eq!(check(SECRET, TS, SIG, &body, NOW), Err(SignatureError::Mismatch));
        let mut sig = SIG.to_string();
        sig.replace_range(10..11, "0");
        assert_ne!(sig, SIG);
        assert_eq!(
            check(SECRET, TS, &sig, BODY.as_bytes(), NOW),
            Err(SignatureError::Mismatch)
        );
        // The timestamp is signed too.
        assert_eq!(
            check(SECRET, "1531420619", SIG, BODY.as_bytes(), NOW),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn refuses_a_wrong_secret() {
        let wrong = "8f742231b10e8888abcd99yyyzzz85a6";
        assert_eq!(
            check(wrong, TS, SIG, BODY.as_bytes(), NOW),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn refuses_stale_and_future_timestamps() {
        let ts = 1531420618;
        assert_eq!(check(SECRET, TS, SIG, BODY.as_bytes(), ts + 300), Ok(()));
        assert_eq!(
            check(SECRET, TS, SIG, BODY.as_bytes(), ts + 301),
            Err(SignatureError::Stale(301))
        );
        assert_eq!(
            check(SECRET, TS, SIG, BODY.as_bytes(), ts - 301),
            Err(SignatureError::Stale(-301))
        );
    }

    #[test]
    fn refuses_missing_and_malformed_headers() {
        let body = BODY.as_bytes();
        assert_eq!(
            verify_signature(SECRET, None, Some(SIG), body, NOW),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            verify_signature(SECRET, Some(TS), None, body, NOW),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            check(SECRET, "soon", SIG, body, NOW),
            Err(SignatureError::BadTimestamp)
        );
        assert_eq!(
            check(SECRET, TS, &SIG[3..], body, NOW),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            check(SECRET, TS, "v0=zz", body, NOW),
            Err(SignatureError::Malformed)
        );
        assert_eq!(check(SECRET, TS, "v0=", body, NOW), Err(SignatureError::Mismatch));
    }
}
