//! TLS to PostgreSQL: `sslmode=verify-full` in `[store] url` with the CA
//! of `[store] ca_file`, spoken with rustls (the TLS stack jitbot already
//! uses for LDAP and the chat platforms) through `tokio-postgres-rustls`.
//! Unverified or half-verified TLS (`require`, `verify-ca`) is refused.

use super::StoreError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use std::path::Path;
use std::sync::Arc;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How a replica's connection is carried.
pub(super) enum Transport {
    /// No TLS (`sslmode=disable`, or `prefer` without TLS on offer).
    Plain,
    /// TLS, the server's certificate checked against `ca_file` and its
    /// name against the url's host.
    Verified(MakeRustlsConnect),
}

/// The `sslmode` the url asks for, lowercased (`None`: not given).
fn sslmode(url: &str) -> Option<(usize, String)> {
    let lowered = url.to_ascii_lowercase();
    let at = lowered.find("sslmode=")?;
    let value: String = lowered[at + "sslmode=".len()..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    Some((at, value))
}

/// The url as the driver reads it: `verify-full`, which the driver does
/// not know, becomes `require` (the verification is ours, in
/// [`transport`]). Refuses TLS modes that do not check the server's name,
/// `verify-full` without a CA, and a CA with no `verify-full`.
pub(super) fn driver_url(url: &str, ca_file: Option<&Path>) -> Result<String, StoreError> {
    let mode = sslmode(url);
    match (mode.as_ref().map(|(_, m)| m.as_str()), ca_file) {
        (Some("verify-full"), Some(_)) => {
            let (at, _) = mode.as_ref().map(|(at, m)| (*at, m.len())).unwrap_or_default();
            let end = at + "sslmode=".len() + "verify-full".len();
            Ok(format!("{}sslmode=require{}", &url[..at], &url[end..]))
        }
        (Some("verify-full"), None) => Err(StoreError::Io(
            "[store] url asks for sslmode=verify-full but [store] ca_file is not set: set it to the PEM file \
             of the CA that signed the PostgreSQL server's certificate"
                .into(),
        )),
        (Some(m @ ("require" | "verify-ca")), _) => Err(StoreError::Io(format!(
            "[store] url asks for sslmode={m}, which does not check that the certificate names the server; \
             use sslmode=verify-full with [store] ca_file set to the CA that signed the server's certificate"
        ))),
        (_, Some(path)) => Err(StoreError::Io(format!(
            "[store] ca_file ({}) is set but [store] url does not ask for sslmode=verify-full; add \
             ?sslmode=verify-full to the url, or remove ca_file",
            path.display()
        ))),
        _ => Ok(url.to_string()),
    }
}

/// How to connect: TLS verified against `ca_file` with `verify-full`,
/// plain otherwise (after [`driver_url`] has refused the rest).
pub(super) fn transport(url: &str, ca_file: Option<&Path>) -> Result<Transport, StoreError> {
    let Some(path) = ca_file else {
        return Ok(Transport::Plain);
    };
    driver_url(url, ca_file)?;
    let bad = |why: String| StoreError::Io(format!("[store] ca_file {}: {why}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| {
            bad(format!(
                "{e}; give the PEM file of the CA that signed the server's certificate"
            ))
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    let config = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Io(format!("TLS setup for PostgreSQL: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Transport::Verified(MakeRustlsConnect::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_full_needs_a_ca_and_is_handed_to_the_driver_as_require() {
        let ca = Some(Path::new("/etc/jitbot/pg-ca.pem"));
        let url = "postgres://jitbot@db:5432/jitbot?sslmode=verify-full&connect_timeout=5";
        assert_eq!(
            driver_url(url, ca).unwrap(),
            "postgres://jitbot@db:5432/jitbot?sslmode=require&connect_timeout=5"
        );
        assert_eq!(
            driver_url("host=db sslmode=VERIFY-FULL dbname=j", ca).unwrap(),
            "host=db sslmode=require dbname=j"
        );
        let refused = |url: &str, ca: Option<&Path>| driver_url(url, ca).unwrap_err().to_string();
        assert!(refused(url, None).contains("ca_file is not set"));
        assert!(refused("postgres://db/j?sslmode=require", ca).contains("verify-full"));
        assert!(refused("postgres://db/j?sslmode=verify-ca", None).contains("verify-full"));
        assert!(refused("postgres://db/j?sslmode=disable", ca).contains("remove ca_file"));
        assert_eq!(
            driver_url("postgres://db/j?sslmode=disable", None).unwrap(),
            "postgres://db/j?sslmode=disable"
        );
    }
}
