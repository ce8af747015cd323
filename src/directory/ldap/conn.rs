//! The supervised LDAP connection: one shared `ldap3::Ldap` handle, bound as
//! the service account, rebuilt on the next operation after the server drops
//! it. ldap3 has neither a pool nor reconnection of its own.

use crate::config::LdapConfig;
use crate::ports::DirectoryError;
use crate::secret::Secret;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, LdapResult};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// LDAP result codes jitbot acts on (RFC 4511).
pub mod rc {
    pub const SUCCESS: u32 = 0;
    pub const TIME_LIMIT: u32 = 3;
    pub const STRONGER_AUTH_REQUIRED: u32 = 8;
    pub const REFERRAL: u32 = 10;
    pub const NO_SUCH_ATTRIBUTE: u32 = 16;
    pub const ATTRIBUTE_EXISTS: u32 = 20;
    pub const NO_SUCH_OBJECT: u32 = 32;
    pub const INVALID_CREDENTIALS: u32 = 49;
    pub const INSUFFICIENT_ACCESS: u32 = 50;
    pub const BUSY: u32 = 51;
    pub const UNAVAILABLE: u32 = 52;
    /// Active Directory's answer to removing a `member` that is not there.
    pub const UNWILLING_TO_PERFORM: u32 = 53;
    pub const OBJECT_CLASS_VIOLATION: u32 = 65;
    /// Active Directory's answer to adding a `member` that is already there.
    pub const ENTRY_ALREADY_EXISTS: u32 = 68;
}

pub struct Supervisor {
    url: String,
    settings: LdapConnSettings,
    bind_dn: String,
    password: Secret,
    op_timeout: Duration,
    slot: Mutex<Slot>,
}

#[derive(Default)]
struct Slot {
    /// Bumped on every new connection, so that a failure seen on an old
    /// handle does not throw away a fresh one made by a concurrent call.
    generation: u64,
    ldap: Option<Ldap>,
}

/// What went wrong with one attempt, before it is worded for the caller.
enum Failure {
    /// The connection is gone: reconnect and retry once.
    Transport(String),
    /// No answer in time: reconnect next time, but do not wait twice now.
    Hung(String),
    Final(DirectoryError),
}

impl Supervisor {
    pub fn new(config: &LdapConfig, password: Secret) -> Result<Self, DirectoryError> {
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(config.connect_timeout.to_std())
            .set_starttls(config.starttls);
        let tls = config.starttls || config.url.starts_with("ldaps://");
        if tls && (config.ca_file.is_some() || !config.verify_hostname) {
            settings = settings.set_config(tls_config(config)?);
        }
        Ok(Supervisor {
            url: config.url.clone(),
            settings,
            bind_dn: config.bind_dn.clone(),
            password,
            op_timeout: config.operation_timeout.to_std(),
            slot: Mutex::new(Slot::default()),
        })
    }

    pub fn bind_dn(&self) -> &str {
        &self.bind_dn
    }

    /// Runs `op` on the shared connection (with the operation timeout set),
    /// connecting and binding first when needed. A transport failure on a
    /// connection that had been working is retried once on a new one; after
    /// that the caller gets [`DirectoryError::Unavailable`].
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, DirectoryError>
    where
        F: Fn(Ldap) -> Fut,
        Fut: Future<Output = Result<T, LdapError>>,
    {
        Ok(self.run_tracked(op).await?.0)
    }

    /// Like [`Supervisor::run`], and also tells whether the operation was
    /// sent a second time after a lost connection: its first send may have
    /// reached the server, so "already done" answers are then ambiguous.
    pub async fn run_tracked<T, F, Fut>(&self, op: F) -> Result<(T, bool), DirectoryError>
    where
        F: Fn(Ldap) -> Fut,
        Fut: Future<Output = Result<T, LdapError>>,
    {
        let mut retried = false;
        loop {
            let (generation, fresh, mut ldap) = self.handle().await?;
            ldap.with_timeout(self.op_timeout);
            match op(ldap).await {
                Ok(v) => return Ok((v, retried)),
                Err(e) => match classify(e) {
                    Failure::Final(e) => return Err(e),
                    Failure::Hung(why) => {
                        self.discard(generation).await;
                        return Err(DirectoryError::Unavailable(format!("{}: {why}", self.url)));
                    }
                    Failure::Transport(why) => {
                        self.discard(generation).await;
                        // A freshly made connection that fails is not stale:
                        // the server itself is in trouble.
                        if fresh || retried {
                            return Err(DirectoryError::Unavailable(format!("{}: {why}", self.url)));
                        }
                        tracing::info!(url = %self.url, error = %why, "LDAP connection lost; reconnecting");
                        retried = true;
                    }
                },
            }
        }
    }

    /// The current handle, or a new bound one. `fresh` tells whether it was
    /// made by this call.
    async fn handle(&self) -> Result<(u64, bool, Ldap), DirectoryError> {
        let mut slot = self.slot.lock().await;
        let generation = slot.generation;
        if let Some(ldap) = slot.ldap.as_mut() {
            if !ldap.is_closed() {
                return Ok((generation, false, ldap.clone()));
            }
        }
        slot.ldap = None;
        let ldap = self.connect().await?;
        slot.generation += 1;
        slot.ldap = Some(ldap.clone());
        Ok((slot.generation, true, ldap))
    }

    async fn discard(&self, generation: u64) {
        let mut slot = self.slot.lock().await;
        if slot.generation == generation {
            slot.ldap = None;
        }
    }

    async fn connect(&self) -> Result<Ldap, DirectoryError> {
        let (conn, mut ldap) = LdapConnAsync::with_settings(self.settings.clone(), &self.url)
            .await
            .map_err(|e| connect_error(&self.url, e))?;
        ldap3::drive!(conn);
        ldap.with_timeout(self.op_timeout);
        let bound = ldap.simple_bind(&self.bind_dn, self.password.expose()).await;
        let result = bound.map_err(|e| match classify(e) {
            Failure::Transport(why) | Failure::Hung(why) => {
                DirectoryError::Unavailable(format!("{}: bind: {why}", self.url))
            }
            Failure::Final(e) => e,
        })?;
        match result.rc {
            rc::SUCCESS => {
                tracing::debug!(url = %self.url, bind_dn = %self.bind_dn, "LDAP connection bound");
                Ok(ldap)
            }
            rc::INVALID_CREDENTIALS => match ad_bind_problem(&result.text) {
                Some(problem) => {
                    tracing::warn!(url = %self.url, bind_dn = %self.bind_dn, problem, "LDAP bind refused: the account cannot log on");
                    Err(DirectoryError::Refused(format!(
                        "bind as {} refused: {problem} (the DC said: {})",
                        self.bind_dn,
                        describe(&result)
                    )))
                }
                None => {
                    tracing::warn!(url = %self.url, bind_dn = %self.bind_dn, "LDAP bind refused: invalid credentials");
                    Err(DirectoryError::Refused(
                        "bind failed: check ldap.bind_dn and the password source".into(),
                    ))
                }
            },
            // Active Directory (and Samba by default) refuse simple binds on
            // a connection without TLS.
            rc::STRONGER_AUTH_REQUIRED => Err(DirectoryError::Refused(format!(
                "bind as {} refused: the DC requires LDAPS or StartTLS for simple binds \
                 (ldap server require strong auth); use an ldaps:// URL or set ldap.starttls = true \
                 (the DC said: {})",
                self.bind_dn,
                describe(&result)
            ))),
            rc::BUSY | rc::UNAVAILABLE => Err(DirectoryError::Unavailable(format!(
                "{}: bind: {}",
                self.url,
                describe(&result)
            ))),
            _ => Err(DirectoryError::Refused(format!(
                "bind as {} failed: {}",
                self.bind_dn,
                describe(&result)
            ))),
        }
    }
}

/// Active Directory words a refused bind (49) in its diagnostic as `data
/// <code>`: what is wrong with the account, when it is not the password.
/// `None` for a wrong password (`52e`) or any other server.
fn ad_bind_problem(text: &str) -> Option<&'static str> {
    let code = text
        .split([',', ':'])
        .map(str::trim)
        .find_map(|part| part.strip_prefix("data "))?
        .split_whitespace()
        .next()?;
    Some(match code.to_ascii_lowercase().as_str() {
        "525" => "the DC knows no account with this bind DN; check ldap.bind_dn",
        "530" => "the account may not log on at this time of day; ask an AD admin to lift its logon hours",
        "531" => "the account may not log on from this computer; ask an AD admin to lift its workstation restriction",
        "532" => "the account's password has expired; set a new password in AD and in jitbot's password source",
        "533" => "the account is disabled; ask an AD admin to enable it",
        "701" => "the account has expired; ask an AD admin to extend its expiry date",
        "773" => {
            "the account must change its password before it can log on; set a new password in AD \
             (and uncheck \"must change password\") and put it in jitbot's password source"
        }
        "775" => {
            "the account is locked out; ask an AD admin to unlock it, and do not retry the password \
             until then (each failed try keeps it locked)"
        }
        _ => return None,
    })
}

/// Words a result for an operator: the server's message and the code.
pub fn describe(result: &LdapResult) -> String {
    if result.text.is_empty() {
        format!("result code {}", result.rc)
    } else {
        format!("{} (result code {})", result.text, result.rc)
    }
}

fn classify(e: LdapError) -> Failure {
    match e {
        LdapError::LdapResult { result } => match result.rc {
            rc::BUSY | rc::UNAVAILABLE | rc::TIME_LIMIT => {
                Failure::Final(DirectoryError::Unavailable(describe(&result)))
            }
            _ => Failure::Final(DirectoryError::Refused(describe(&result))),
        },
        LdapError::Timeout { .. } => Failure::Hung("operation timed out".into()),
        LdapError::FilterParsing => Failure::Final(DirectoryError::Refused("invalid search filter".into())),
        other => Failure::Transport(other.to_string()),
    }
}

fn connect_error(url: &str, e: LdapError) -> DirectoryError {
    let tls = match &e {
        LdapError::Rustls { source } => Some(source.to_string()),
        LdapError::Io { source } => source
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(ToString::to_string),
        _ => None,
    };
    match (tls, e) {
        (Some(why), _) => DirectoryError::Refused(format!(
            "TLS with {url} failed: {why}; check ldap.ca_file and the host name in ldap.url"
        )),
        (None, LdapError::Timeout { .. }) => DirectoryError::Unavailable(format!("{url}: connect timed out")),
        (None, e) => DirectoryError::Unavailable(format!("cannot connect to {url}: {e}")),
    }
}

/// The rustls configuration: the CA from `ldap.ca_file` (or the system's
/// roots), and host name checking unless `verify_hostname = false`.
fn tls_config(config: &LdapConfig) -> Result<Arc<ClientConfig>, DirectoryError> {
    let mut roots = RootCertStore::empty();
    match &config.ca_file {
        Some(path) => {
            let bad =
                |why: String| DirectoryError::Refused(format!("ldap.ca_file {}: {why}", path.display()));
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| bad(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no PEM certificate in it".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls_error = |e: rustls::Error| DirectoryError::Refused(format!("TLS setup: {e}"));
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?;
    let config = if config.verify_hostname {
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| DirectoryError::Refused(format!("TLS setup: {e}")))?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyHostname(inner)))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// Checks the certificate chain like the default verifier but accepts any
/// host name (`verify_hostname = false`). The chain is verified before the
/// name, so a name mismatch is the only error this forgives.
#[derive(Debug)]
struct AnyHostname(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyHostname {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::ad_bind_problem;

    #[test]
    fn ad_bind_diagnostics_say_what_is_wrong_with_the_account() {
        let said = |code: &str| {
            format!("80090308: LdapErr: DSID-0C0903A9, comment: AcceptSecurityContext error, data {code}, v1db1\0")
        };
        assert!(ad_bind_problem(&said("533")).unwrap().contains("disabled"));
        assert!(ad_bind_problem(&said("775")).unwrap().contains("locked out"));
        assert!(ad_bind_problem(&said("532")).unwrap().contains("expired"));
        assert!(ad_bind_problem(&said("701"))
            .unwrap()
            .contains("account has expired"));
        assert!(ad_bind_problem(&said("773")).unwrap().contains("must change"));
        // A wrong password, and servers that say nothing of the kind.
        assert_eq!(ad_bind_problem(&said("52e")), None);
        assert_eq!(ad_bind_problem("Invalid credentials"), None);
        assert_eq!(ad_bind_problem(""), None);
    }
}
