//! TLS to PostgreSQL: `sslmode=verify-full` in `[store] url` with the CA
//! of `[store] ca_file`, spoken with rustls (the TLS stack jitbot already
//! uses for LDAP and the chat platforms) through `tokio-postgres-rustls`.
//! Unverified or half-verified TLS (`require`, `verify-ca`) is refused.

use super::StoreError;
use postgres::config::SslMode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use std::ops::Range;
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

/// One connection parameter of `[store] url`, as the driver reads it:
/// the query of a `postgres://` URL, or the `key=value` form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Param {
    /// The key, percent-decoded (URL) or unescaped (key=value).
    pub key: String,
    /// The value, percent-decoded (URL) or unquoted and unescaped.
    pub value: String,
    /// Where the value's text is in the url.
    span: Range<usize>,
}

/// The connection parameters of `url`, in order, read the way the driver
/// (`tokio-postgres`, like libpq) reads them: in a URL, from the first `?`
/// after the user info, `key=value` pairs split on `&` and percent-decoded;
/// otherwise whitespace-separated `key = value`, values quoted with `'`
/// and escaped with `\`. Where the text stops making sense the list
/// stops; the driver then refuses the url itself.
pub(crate) fn parameters(url: &str) -> Vec<Param> {
    let rest = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|prefix| url.strip_prefix(prefix));
    match rest {
        Some(rest) => url_parameters(url, url.len() - rest.len()),
        None => keyword_parameters(url),
    }
}

fn url_parameters(url: &str, from: usize) -> Vec<Param> {
    // The driver takes everything up to the first `@` as the user info,
    // then the host and path up to the first `?`.
    let after_user = url[from..].find('@').map_or(from, |at| from + at + 1);
    let Some(query) = url[after_user..].find('?').map(|q| after_user + q + 1) else {
        return Vec::new();
    };
    let mut params = Vec::new();
    let mut at = query;
    while at < url.len() {
        let Some(eq) = url[at..].find('=').map(|e| at + e) else {
            break;
        };
        let end = url[eq + 1..].find('&').map_or(url.len(), |a| eq + 1 + a);
        params.push(Param {
            key: percent_decode(&url[at..eq]),
            value: percent_decode(&url[eq + 1..end]),
            span: eq + 1..end,
        });
        at = end + 1;
    }
    params
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn keyword_parameters(text: &str) -> Vec<Param> {
    let mut params = Vec::new();
    let mut chars = text.char_indices().peekable();
    let skip_ws = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
    };
    loop {
        skip_ws(&mut chars);
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            break;
        }
        skip_ws(&mut chars);
        if chars.next_if(|(_, c)| *c == '=').is_none() {
            break;
        }
        skip_ws(&mut chars);
        let start = chars.peek().map_or(text.len(), |(i, _)| *i);
        let quoted = chars.next_if(|(_, c)| *c == '\'').is_some();
        let mut value = String::new();
        let mut closed = !quoted;
        while let Some((_, c)) = chars.peek().copied() {
            if quoted && c == '\'' {
                chars.next();
                closed = true;
                break;
            }
            if !quoted && c.is_whitespace() {
                break;
            }
            chars.next();
            match c {
                '\\' => value.extend(chars.next().map(|(_, c)| c)),
                c => value.push(c),
            }
        }
        let end = chars.peek().map_or(text.len(), |(i, _)| *i);
        if !closed {
            break;
        }
        params.push(Param {
            key,
            value,
            span: start..end,
        });
    }
    params
}

/// What the url asks for, once its parameters are known to be unambiguous.
enum Asked {
    /// `sslmode=verify-full`, at this span of the url.
    VerifyFull(Range<usize>),
    /// `sslmode=disable`.
    Disable,
    /// No `sslmode` (the driver's default, `prefer`), or `prefer`.
    Prefer,
}

/// Reads the url's `sslmode`, refusing what would make the check and the
/// connection disagree or not verify the server: a parameter given twice
/// (the driver uses the last one, a reader the first), `sslrootcert` and
/// its kin (the CA is `[store] ca_file`), and TLS modes that do not check
/// the server's name.
fn asked(url: &str, ca_file: Option<&Path>) -> Result<Asked, StoreError> {
    let params = parameters(url);
    for (i, p) in params.iter().enumerate() {
        if params[..i].iter().any(|q| q.key.eq_ignore_ascii_case(&p.key)) {
            return Err(StoreError::Io(format!(
                "[store] url gives the connection parameter `{}` more than once; the PostgreSQL driver would \
                 use the last one, so which TLS mode, CA or server applies would depend on the order. Give each \
                 parameter once (e.g. a single sslmode=verify-full)",
                p.key
            )));
        }
        let key = p.key.to_ascii_lowercase();
        if matches!(
            key.as_str(),
            "sslrootcert" | "sslcert" | "sslkey" | "sslcrl" | "sslcrldir"
        ) {
            return Err(StoreError::Io(format!(
                "[store] url sets `{key}`, which jitbot does not read; remove it and give the CA that signed the \
                 PostgreSQL server's certificate as [store] ca_file (with sslmode=verify-full)"
            )));
        }
    }
    let mode = params
        .iter()
        .find(|p| p.key.eq_ignore_ascii_case("sslmode"))
        .map(|p| (p.value.to_ascii_lowercase(), p.span.clone()));
    match (mode, ca_file) {
        (Some((m, span)), Some(_)) if m == "verify-full" => Ok(Asked::VerifyFull(span)),
        (Some((m, _)), None) if m == "verify-full" => Err(StoreError::Io(
            "[store] url asks for sslmode=verify-full but [store] ca_file is not set: set it to the PEM file \
             of the CA that signed the PostgreSQL server's certificate"
                .into(),
        )),
        (Some((m, _)), _) if m == "require" || m == "verify-ca" => Err(StoreError::Io(format!(
            "[store] url asks for sslmode={m}, which does not check that the certificate names the server; \
             use sslmode=verify-full with [store] ca_file set to the CA that signed the server's certificate"
        ))),
        (_, Some(path)) => Err(StoreError::Io(format!(
            "[store] ca_file ({}) is set but [store] url does not ask for sslmode=verify-full; add \
             ?sslmode=verify-full to the url, or remove ca_file",
            path.display()
        ))),
        (Some((m, _)), None) if m == "disable" => Ok(Asked::Disable),
        _ => Ok(Asked::Prefer),
    }
}

/// The driver's configuration for `url`. `verify-full`, which the driver
/// does not know, is handed to it as `require` (the verification is ours,
/// in [`transport`]); the TLS mode checked here is then set on the parsed
/// configuration, so no other text in the url can change it. Refuses TLS
/// modes that do not check the server's name, `verify-full` without a CA,
/// a CA with no `verify-full`, and ambiguous urls (see [`asked`]).
pub(super) fn driver_config(url: &str, ca_file: Option<&Path>) -> Result<postgres::Config, StoreError> {
    let asked = asked(url, ca_file)?;
    let text = match &asked {
        Asked::VerifyFull(span) => format!("{}require{}", &url[..span.start], &url[span.end..]),
        Asked::Disable | Asked::Prefer => url.to_string(),
    };
    let mut config: postgres::Config = text.parse().map_err(|e| {
        StoreError::Io(format!(
            "[store] url is not a PostgreSQL connection URL ({e}); write it as postgres://user@host:5432/dbname"
        ))
    })?;
    config.ssl_mode(match asked {
        Asked::VerifyFull(_) => SslMode::Require,
        Asked::Disable => SslMode::Disable,
        Asked::Prefer => SslMode::Prefer,
    });
    Ok(config)
}

/// How to connect: TLS verified against `ca_file` with `verify-full`,
/// plain otherwise (after [`driver_config`] has refused the rest).
pub(super) fn transport(url: &str, ca_file: Option<&Path>) -> Result<Transport, StoreError> {
    let Some(path) = ca_file else {
        return Ok(Transport::Plain);
    };
    asked(url, ca_file)?;
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

    fn mode(url: &str, ca: Option<&Path>) -> SslMode {
        driver_config(url, ca).unwrap().get_ssl_mode()
    }

    #[test]
    fn verify_full_needs_a_ca_and_is_handed_to_the_driver_as_require() {
        let ca = Some(Path::new("/etc/jitbot/pg-ca.pem"));
        let url = "postgres://jitbot@db:5432/jitbot?sslmode=verify-full&connect_timeout=5";
        let config = driver_config(url, ca).unwrap();
        assert_eq!(config.get_ssl_mode(), SslMode::Require);
        assert_eq!(
            config.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(5))
        );
        assert_eq!(config.get_dbname(), Some("jitbot"));
        assert_eq!(mode("host=db sslmode=VERIFY-FULL dbname=j", ca), SslMode::Require);
        assert_eq!(
            mode("host=db sslmode = 'verify-full' dbname=j", ca),
            SslMode::Require
        );
        assert_eq!(
            mode("postgres://db/j?sslmode=verify%2Dfull", ca),
            SslMode::Require
        );
        let refused = |url: &str, ca: Option<&Path>| driver_config(url, ca).unwrap_err().to_string();
        assert!(refused(url, None).contains("ca_file is not set"));
        assert!(refused("postgres://db/j?sslmode=require", ca).contains("verify-full"));
        assert!(refused("postgres://db/j?sslmode=verify-ca", None).contains("verify-full"));
        assert!(refused("postgres://db/j?sslmode=disable", ca).contains("remove ca_file"));
        assert_eq!(mode("postgres://db/j?sslmode=disable", None), SslMode::Disable);
        assert_eq!(mode("postgres://db/j", None), SslMode::Prefer);
    }

    #[test]
    fn a_parameter_given_twice_is_refused_in_both_forms() {
        let ca = Some(Path::new("/etc/jitbot/pg-ca.pem"));
        let refused = |url: &str| driver_config(url, ca).unwrap_err().to_string();
        for url in [
            "postgres://db/j?sslmode=verify-full&sslmode=disable",
            "postgres://db/j?sslmode=verify-full&SSLMODE=disable",
            // Percent-encoded keys are decoded by the driver, so here too.
            "postgres://db/j?sslmode=verify-full&ssl%6dode=disable",
            "postgres://db/j?sslmode=verify-full&host=a&host=b",
            "host=db sslmode=verify-full sslmode=disable",
            "host=db sslmode=verify-full sslmode='disable'",
        ] {
            let err = refused(url);
            assert!(err.contains("more than once"), "{url}: {err}");
        }
        assert!(refused("postgres://db/j?sslmode=verify-full&sslrootcert=/x.pem").contains("ca_file"));
        assert!(refused("host=db sslmode=verify-full sslrootcert=/x.pem").contains("ca_file"));
    }

    #[test]
    fn parameters_are_read_as_the_driver_reads_them() {
        let kv = |params: Vec<Param>| params.into_iter().map(|p| (p.key, p.value)).collect::<Vec<_>>();
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        // The user info ends at the first `@`; the query starts at the next `?`.
        assert_eq!(
            kv(parameters(
                "postgres://u%3F@db/j?application_name=a%20b&sslmode=disable"
            )),
            [pair("application_name", "a b"), pair("sslmode", "disable")]
        );
        assert_eq!(kv(parameters("postgresql://db/j")), []);
        assert_eq!(
            kv(parameters(
                r"host=db  application_name = 'it\'s x'  sslmode=disable"
            )),
            [
                pair("host", "db"),
                pair("application_name", "it's x"),
                pair("sslmode", "disable")
            ]
        );
    }
}
