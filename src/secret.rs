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
}

impl SecretSource {
    pub fn env(name: &str) -> Self {
        SecretSource {
            env: Some(name.to_string()),
            file: None,
        }
    }

    pub fn resolve(&self) -> Result<Secret, SecretError> {
        match (&self.env, &self.file) {
            (Some(name), None) => match std::env::var(name) {
                Ok(v) if !v.is_empty() => Ok(Secret(v)),
                _ => Err(SecretError::MissingEnv(name.clone())),
            },
            (None, Some(path)) => std::fs::read_to_string(path)
                .map(|v| Secret(v.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|e| SecretError::File(path.display().to_string(), e.kind().to_string())),
            _ => Err(SecretError::NotExactlyOne),
        }
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
}
