//! Secrets: named in the config by environment variable or file, never
//! written in it, never printed.

use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;

/// A secret value. `Debug` and `Display` print `[redacted]`; only
/// [`Secret::expose`] gives the value, at the point of use.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where to read a secret from: `{ env = "NAME" }` or `{ file = "/path" }`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    pub env: Option<String>,
    pub file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("name exactly one of `env` or `file`")]
    NotExactlyOne,
    #[error("environment variable {0} is not set (or empty); export it before starting jitbot")]
    MissingEnv(String),
    #[error("cannot read secret file {0}: {1}")]
    File(String, String),
    /// An empty secret would turn a check off (an empty admin token or
    /// signing secret matches an empty header; an empty LDAP password binds
    /// anonymously), so it is refused from every source.
    #[error("{0} is empty or only whitespace; put the secret in it")]
    Empty(String),
    /// An admin token that is short or a known placeholder.
    #[error("{0}")]
    Weak(String),
}

/// Shortest admin token accepted, in bytes.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// Words that mark a value as a placeholder someone forgot to replace,
/// compared with case, `-`, `_`, `.` and spaces ignored.
const PLACEHOLDERS: [&str; 10] = [
    "changeme",
    "replaceme",
    "placeholder",
    "yourtoken",
    "yoursecret",
    "secrethere",
    "tokenhere",
    "example",
    "password",
    "adminadmin",
];

/// Why `token` cannot be the admin token, if it cannot: shorter than
/// [`MIN_ADMIN_TOKEN_LEN`] bytes, one character repeated (`xxxx…`), or a
/// known placeholder such as `change-me`.
pub fn admin_token_weakness(token: &Secret) -> Option<String> {
    let value = token.expose();
    let advice = "generate one with `openssl rand -hex 32`";
    if value.len() < MIN_ADMIN_TOKEN_LEN {
        return Some(format!(
            "is {} bytes long; use at least {MIN_ADMIN_TOKEN_LEN} random bytes ({advice})",
            value.len()
        ));
    }
    let folded: String = value
        .chars()
        .filter(|c| !matches!(c, '-' | '_' | '.' | ' '))
        .flat_map(char::to_lowercase)
        .collect();
    let mut chars = folded.chars();
    let first = chars.next();
    if first.is_some_and(|f| chars.all(|c| c == f)) {
        return Some(format!("is one character repeated, a placeholder; {advice}"));
    }
    if let Some(word) = PLACEHOLDERS.iter().find(|w| folded.contains(*w)) {
        return Some(format!("looks like a placeholder (`{word}`); {advice}"));
    }
    None
}

impl SecretSource {
    pub fn env(name: &str) -> Self {
        SecretSource {
            env: Some(name.to_string()),
            file: None,
        }
    }

    /// Reads the secret. Empty and whitespace-only values are refused from
    /// every source; a file's trailing newline is not part of the secret.
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        match (&self.env, &self.file) {
            (Some(name), None) => match std::env::var(name) {
                Ok(v) if !v.is_empty() => non_blank(v, || format!("environment variable {name}")),
                _ => Err(SecretError::MissingEnv(name.clone())),
            },
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| SecretError::File(path.display().to_string(), e.kind().to_string()))
                .and_then(|v| {
                    non_blank(v.trim_end_matches(['\n', '\r']).to_string(), || {
                        format!("secret file {}", path.display())
                    })
                }),
            _ => Err(SecretError::NotExactlyOne),
        }
    }

    /// Reads an admin token: [`SecretSource::resolve`], then refuses a short
    /// or placeholder token (see [`admin_token_weakness`]).
    pub fn resolve_admin_token(&self) -> Result<Secret, SecretError> {
        let token = self.resolve()?;
        match admin_token_weakness(&token) {
            Some(why) => Err(SecretError::Weak(format!("the admin token {why}"))),
            None => Ok(token),
        }
    }
}

fn non_blank(value: String, source: impl FnOnce() -> String) -> Result<Secret, SecretError> {
    if value.trim().is_empty() {
        Err(SecretError::Empty(source()))
    } else {
        Ok(Secret(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "[redacted] [redacted]");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn reads_file_and_reports_missing_env() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        let src = SecretSource {
            env: None,
            file: Some(path),
        };
        assert_eq!(src.resolve().unwrap().expose(), "s3cret");
        let missing = SecretSource::env("JITBOT_TEST_SURELY_UNSET_VARIABLE");
        assert!(matches!(missing.resolve(), Err(SecretError::MissingEnv(_))));
        let both = SecretSource {
            env: Some("A".into()),
            file: Some("/x".into()),
        };
        assert_eq!(both.resolve().unwrap_err(), SecretError::NotExactlyOne);
    }

    fn file_source(dir: &tempfile::TempDir, name: &str, content: &str) -> SecretSource {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        SecretSource {
            env: None,
            file: Some(path),
        }
    }

    #[test]
    fn empty_or_blank_secrets_are_refused_from_every_source() {
        let dir = tempfile::tempdir().unwrap();
        for content in ["", "\n", "   \n", "\t \r\n"] {
            let err = file_source(&dir, "blank", content).resolve().unwrap_err();
            assert!(matches!(err, SecretError::Empty(_)), "{content:?}: {err:?}");
            assert!(err.to_string().contains("blank"), "names the file: {err}");
        }
        // Set only in this test, under a name no other test uses.
        std::env::set_var("JITBOT_TEST_BLANK_SECRET_ONLY_HERE", "  ");
        let err = SecretSource::env("JITBOT_TEST_BLANK_SECRET_ONLY_HERE")
            .resolve()
            .unwrap_err();
        assert!(
            err.to_string().contains("JITBOT_TEST_BLANK_SECRET_ONLY_HERE")
                && matches!(err, SecretError::Empty(_)),
            "{err}"
        );
        // Inner spaces are part of a real secret.
        let ok = file_source(&dir, "spaced", " a b \n").resolve().unwrap();
        assert_eq!(ok.expose(), " a b ");
    }

    #[test]
    fn weak_admin_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for weak in [
            "short",
            "change-me",
            "change-me-change-me",
            "CHANGE_ME_BEFORE_PRODUCTION",
            "replace-me-with-a-real-token",
            "xxxxxxxxxxxxxxxxxxxxxxxx",
            "0000000000000000",
            "your-token-here-0123456789",
            "placeholder-token-123456",
        ] {
            let err = file_source(&dir, "t", weak).resolve_admin_token().unwrap_err();
            assert!(matches!(err, SecretError::Weak(_)), "{weak}: {err:?}");
            assert!(err.to_string().contains("openssl rand"), "{err}");
        }
        let good = "3f9c1d7a0b5e42c8a6d1f0e9b7c3a215";
        assert_eq!(
            file_source(&dir, "t", good)
                .resolve_admin_token()
                .unwrap()
                .expose(),
            good
        );
        assert_eq!(MIN_ADMIN_TOKEN_LEN, 16);
        assert!(admin_token_weakness(&Secret::new("0123456789abcdef")).is_none());
        assert!(admin_token_weakness(&Secret::new("0123456789abcde")).is_some());
    }
}
