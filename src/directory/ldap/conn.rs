//! The supervised LDAP connection: one shared `ldap3::Ldap` handle, bound as
//! the service account, rebuilt on the next operation after the server drops
//! it. ldap3 has neither a pool nor reconnection of its own.
//!
//! jitbot opens the TCP connection itself and hands it to ldap3
//! (`set_std_stream`), so that the socket carries `TCP_USER_TIMEOUT` (the
//! operation timeout: bytes left unacknowledged that long make the kernel
//! drop the connection, and the request with it, instead of retransmitting
//! for many minutes), and so that a call given up on — ldap3's own timeout,
//! or the caller dropping it at its bound (`ports::given_up_on_closes`:
//! the engine's act-until bound with replicas) — closes its connection at once
//! with a reset (linger 0), throwing away whatever the kernel had not sent
//! yet, rather than leaving the request to be delivered later. Bytes the
//! server's kernel already acknowledged still execute: the engine's
//! re-check (`engine/recheck.rs`) is the net for those.

use crate::config::LdapConfig;
use crate::ports::DirectoryError;
use crate::secret::Secret;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, LdapResult, StdStream};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
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
    connect_timeout: Duration,
    slot: Mutex<Slot>,
    /// A second handle on the current connection's TCP socket, with the
    /// generation it belongs to: what [`Supervisor::close`] resets.
    socket: std::sync::Mutex<Option<(u64, std::net::TcpStream)>>,
    /// The latest generation closed by an abandoned call: never handed out
    /// again, even before ldap3 has noticed the reset.
    closed: AtomicU64,
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
            connect_timeout: config.connect_timeout.to_std(),
            slot: Mutex::new(Slot::default()),
            socket: std::sync::Mutex::new(None),
            closed: AtomicU64::new(0),
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
            // Dropped before the answer under the caller's bound
            // (`ports::given_up_on_closes`): the guard closes the
            // connection the request went out on.
            let mut in_flight = InFlight {
                supervisor: self,
                generation,
                answered: !crate::ports::closes_when_given_up(),
            };
            let outcome = op(ldap).await;
            in_flight.answered = true;
            match outcome {
                Ok(v) => return Ok((v, retried)),
                Err(e) => match classify(e) {
                    Failure::Final(e) => return Err(e),
                    Failure::Hung(why) => {
                        self.close(generation);
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
            if !ldap.is_closed() && self.closed.load(Ordering::SeqCst) != generation {
                return Ok((generation, false, ldap.clone()));
            }
        }
        slot.ldap = None;
        let (ldap, socket) = self.connect().await?;
        slot.generation += 1;
        slot.ldap = Some(ldap.clone());
        *lock(&self.socket) = socket.map(|s| (slot.generation, s));
        Ok((slot.generation, true, ldap))
    }

    /// Resets the connection of `generation` (if it is still the current
    /// one): linger 0, so the final close sends a reset and drops what the
    /// kernel has not sent yet, and the read side shut, so ldap3's task
    /// sees the end at once and closes its side. Every call still on it
    /// fails as a lost connection.
    fn close(&self, generation: u64) {
        self.closed.fetch_max(generation, Ordering::SeqCst);
        let mut socket = lock(&self.socket);
        if let Some((g, stream)) = socket.as_ref() {
            if *g == generation {
                let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
                let _ = stream.shutdown(std::net::Shutdown::Read);
                *socket = None;
                tracing::info!(url = %self.url, "LDAP call given up on; its connection is reset, not reused");
            }
        }
    }

    /// A TCP connection to the server of an `ldap://` or `ldaps://` URL
    /// with `TCP_USER_TIMEOUT` set to the operation timeout, for ldap3 to
    /// run over, and a second handle on it for [`Supervisor::close`].
    /// `None` for other URLs (`ldapi://`: a local socket), which ldap3 opens.
    async fn tcp(&self) -> Result<Option<(std::net::TcpStream, std::net::TcpStream)>, DirectoryError> {
        let url = url::Url::parse(&self.url)
            .map_err(|e| DirectoryError::Refused(format!("ldap.url {}: {e}", self.url)))?;
        let port = match url.scheme() {
            "ldap" => url.port().unwrap_or(389),
            "ldaps" => url.port().unwrap_or(636),
            _ => return Ok(None),
        };
        let host = match url.host_str() {
            Some("") | None => "localhost",
            Some(h) => h,
        };
        let address = format!("{host}:{port}");
        let cannot =
            |e: std::io::Error| DirectoryError::Unavailable(format!("cannot connect to {}: {e}", self.url));
        let stream = tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect(&address))
            .await
            .map_err(|_| DirectoryError::Unavailable(format!("{}: connect timed out", self.url)))?
            .map_err(cannot)?;
        socket2::SockRef::from(&stream)
            .set_tcp_user_timeout(Some(self.op_timeout))
            .map_err(cannot)?;
        let stream = stream.into_std().map_err(cannot)?;
        let second = stream.try_clone().map_err(cannot)?;
        Ok(Some((stream, second)))
    }

    async fn discard(&self, generation: u64) {
        let mut slot = self.slot.lock().await;
        if slot.generation == generation {
            slot.ldap = None;
        }
    }

    async fn connect(&self) -> Result<(Ldap, Option<std::net::TcpStream>), DirectoryError> {
        let mut settings = self.settings.clone();
        let mut second = None;
        if let Some((stream, kept)) = self.tcp().await? {
            settings = settings.set_std_stream(StdStream::Tcp(stream));
            second = Some(kept);
        }
        let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &self.url)
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
                Ok((ldap, second))
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

/// A call under way on the connection of `generation`: dropped before
/// its answer, it closes that connection ([`Supervisor::close`]).
struct InFlight<'a> {
    supervisor: &'a Supervisor,
    generation: u64,
    answered: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.supervisor.close(self.generation);
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
