//! A real OpenLDAP `slapd` for tests: its own temporary directory, a free
//! loopback port, seeded from `tests/fixtures/seed.ldif`, killed on drop.

use jitbot::config::{GroupConfig, LdapConfig};
use jitbot::secret::SecretSource;
use jitbot_core::Span;
use ldap3::{Ldap, LdapConnAsync, Scope, SearchEntry};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub const SLAPD: &str = "/usr/sbin/slapd";
pub const SLAPADD: &str = "/usr/sbin/slapadd";
pub const SUFFIX: &str = "dc=example,dc=org";
pub const PEOPLE: &str = "ou=people,dc=example,dc=org";
pub const ADMIN_DN: &str = "cn=admin,dc=example,dc=org";
pub const ADMIN_PW: &str = "admin-secret";
pub const SERVICE_DN: &str = "cn=jitbot,ou=services,dc=example,dc=org";
pub const SERVICE_PW: &str = "jitbot-service-pw";
pub const DB_ADMINS: &str = "cn=db-admins,ou=groups,dc=example,dc=org";
pub const WEB_ADMINS: &str = "cn=web-admins,ou=groups,dc=example,dc=org";
pub const OPS: &str = "cn=ops,ou=groups,dc=example,dc=org";
pub const POSIX_ADMINS: &str = "cn=posix-admins,ou=groups,dc=example,dc=org";
pub const SECURITY: &str = "cn=security,ou=groups,dc=example,dc=org";
pub const APPROVERS: &str = "cn=approvers,ou=groups,dc=example,dc=org";
pub const CHANGE_BOARD: &str = "cn=change-board,ou=groups,dc=example,dc=org";
/// A group the service account may read but not modify.
pub const AUDITORS: &str = "cn=auditors,ou=services,dc=example,dc=org";

/// Server certificate, key and CA, all PEM, for [`Slapd::start_tls`].
struct Tls<'a> {
    cert: &'a str,
    key: &'a str,
    ca: &'a str,
}

pub struct Slapd {
    dir: TempDir,
    port: u16,
    ldaps_port: Option<u16>,
    child: Option<Child>,
}

impl Slapd {
    /// Starts a seeded slapd listening on `ldap://127.0.0.1:<free port>`.
    pub fn start() -> Slapd {
        Self::launch(None)
    }

    /// Like [`Slapd::start`], with TLS (StartTLS on the plain port) and an
    /// extra `ldaps://` listener on a second free port.
    pub fn start_tls(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Slapd {
        Self::launch(Some(Tls {
            cert: cert_pem,
            key: key_pem,
            ca: ca_pem,
        }))
    }

    fn launch(tls: Option<Tls<'_>>) -> Slapd {
        if !Path::new(SLAPD).exists() || !Path::new(SLAPADD).exists() {
            panic!("slapd is not installed: run `sudo apt-get install -y slapd ldap-utils` (or ./scripts/test, which does it)");
        }
        let dir = tempfile::Builder::new()
            .prefix("jitbot-slapd-")
            .tempdir()
            .expect("temp dir");
        std::fs::create_dir(dir.path().join("data")).expect("data dir");
        if let Some(tls) = &tls {
            std::fs::write(dir.path().join("server.pem"), tls.cert).expect("write cert");
            std::fs::write(dir.path().join("server.key"), tls.key).expect("write key");
            std::fs::write(dir.path().join("ca.pem"), tls.ca).expect("write ca");
        }
        std::fs::write(dir.path().join("service.pw"), SERVICE_PW).expect("write password");
        let conf = slapd_conf(dir.path(), tls.is_some());
        std::fs::write(dir.path().join("slapd.conf"), conf).expect("write slapd.conf");
        let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/seed.ldif");
        let out = Command::new(SLAPADD)
            .arg("-f")
            .arg(dir.path().join("slapd.conf"))
            .arg("-l")
            .arg(&seed)
            .output()
            .expect("run slapadd");
        assert!(
            out.status.success(),
            "slapadd failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut slapd = Slapd {
            dir,
            port: free_port(),
            ldaps_port: tls.is_some().then(free_port),
            child: None,
        };
        slapd.restart();
        slapd
    }

    /// (Re)starts the server on the same ports and data, after [`Slapd::stop`].
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "slapd is already running");
        let mut urls = format!("ldap://127.0.0.1:{}/", self.port);
        if let Some(p) = self.ldaps_port {
            urls.push_str(&format!(" ldaps://127.0.0.1:{p}/"));
        }
        let log = std::fs::File::create(self.dir.path().join("slapd.log")).expect("log file");
        let child = Command::new(SLAPD)
            .arg("-f")
            .arg(self.dir.path().join("slapd.conf"))
            .arg("-h")
            .arg(&urls)
            // `-d` keeps slapd in the foreground so that we own the process.
            .args(["-d", "0"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn slapd");
        self.child = Some(child);
        self.wait_until_listening();
    }

    /// Kills the server (the data stays, for [`Slapd::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `sig` (as `kill` spells it: `-STOP`, `-CONT`) to the server:
    /// a stopped slapd accepts connections and requests and answers none,
    /// so the test decides when a modify in flight finishes.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("slapd is running").id();
        let ok = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        let ports: Vec<u16> = std::iter::once(self.port).chain(self.ldaps_port).collect();
        loop {
            if ports
                .iter()
                .all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok())
            {
                return;
            }
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                self.stop();
                let log = std::fs::read_to_string(self.dir.path().join("slapd.log")).unwrap_or_default();
                panic!("slapd did not start on port(s) {ports:?}:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("ldap://127.0.0.1:{}", self.port)
    }

    /// The `ldaps://` URL, by host name (`localhost`) so that the
    /// certificate's name can be checked.
    pub fn ldaps_url(&self) -> String {
        format!(
            "ldaps://localhost:{}",
            self.ldaps_port.expect("started with start_tls")
        )
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Config for jitbot's LDAP directory, bound as the service account
    /// (password from a file), with the service DN as placeholder.
    pub fn ldap_config(&self) -> LdapConfig {
        LdapConfig {
            url: self.url(),
            starttls: false,
            ca_file: None,
            verify_hostname: true,
            // The test slapd listens on loopback without TLS (the TLS tests
            // turn on starttls).
            allow_plaintext_bind: true,
            bind_dn: SERVICE_DN.into(),
            password: SecretSource {
                env: None,
                file: Some(self.dir.path().join("service.pw")),
            },
            user_base: PEOPLE.into(),
            user_id_attribute: "uid".into(),
            connect_timeout: Span::from_secs(2),
            operation_timeout: Span::from_secs(5),
            nested_depth: 3,
            active_directory: false,
            placeholder_dn: Some(SERVICE_DN.into()),
        }
    }

    /// A password file with other content, for wrong-password tests.
    pub fn password_file(&self, name: &str, content: &str) -> SecretSource {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).expect("write password file");
        SecretSource {
            env: None,
            file: Some(path),
        }
    }

    /// A plain ldap3 connection bound as the directory's root, independent
    /// of the code under test.
    pub async fn admin(&self) -> Ldap {
        let (conn, mut ldap) = LdapConnAsync::new(&self.url()).await.expect("admin connect");
        ldap3::drive!(conn);
        ldap.simple_bind(ADMIN_DN, ADMIN_PW)
            .await
            .and_then(|r| r.success())
            .expect("admin bind");
        ldap
    }

    /// The values of `attr` on `dn`, read as the root.
    pub async fn values(&self, dn: &str, attr: &str) -> Vec<String> {
        let mut ldap = self.admin().await;
        let (entries, _) = ldap
            .search(dn, Scope::Base, "(objectClass=*)", vec![attr])
            .await
            .and_then(|r| r.success())
            .expect("admin search");
        let _ = ldap.unbind().await;
        let entry = SearchEntry::construct(entries.into_iter().next().expect("entry"));
        let mut values: Vec<String> = entry
            .attrs
            .into_iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case(attr))
            .flat_map(|(_, v)| v)
            .collect();
        values.sort();
        values
    }
}

impl Drop for Slapd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The managed groups of the seed, as `[[group]]` config.
pub fn group_configs() -> Vec<GroupConfig> {
    #[derive(serde::Deserialize)]
    struct Groups {
        group: Vec<GroupConfig>,
    }
    let text = format!(
        r#"
[[group]]
name = "db-admins"
dn = "{DB_ADMINS}"
zsp = true
requesters = {{ users = ["alice", "bob"] }}
approvers = {{ groups = ["{APPROVERS}"] }}
default_duration = "1h"
max_duration = "4h"

[[group]]
name = "web-admins"
dn = "{WEB_ADMINS}"
requesters = {{ users = ["alice"] }}
approvers = {{ users = ["carol"] }}
default_duration = "1h"
max_duration = "4h"

[[group]]
name = "ops"
dn = "{OPS}"
membership = "uniqueMember"
requesters = {{ users = ["alice"] }}
approvers = {{ users = ["carol"] }}
default_duration = "1h"
max_duration = "4h"

[[group]]
name = "posix-admins"
dn = "{POSIX_ADMINS}"
membership = "memberUid"
requesters = {{ users = ["alice"] }}
approvers = {{ users = ["carol"] }}
default_duration = "1h"
max_duration = "4h"
"#
    );
    toml::from_str::<Groups>(&text).expect("group config").group
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn slapd_conf(dir: &Path, tls: bool) -> String {
    let d = dir.display();
    let tls = if tls {
        format!("TLSCACertificateFile {d}/ca.pem\nTLSCertificateFile {d}/server.pem\nTLSCertificateKeyFile {d}/server.key\n")
    } else {
        String::new()
    };
    format!(
        r#"include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
pidfile {d}/slapd.pid
argsfile {d}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
{tls}
database mdb
maxsize 536870912
suffix "{SUFFIX}"
rootdn "{ADMIN_DN}"
rootpw {ADMIN_PW}
directory {d}/data
# The equality indexes any production directory has on these.
index objectClass eq
index uid,mail,cn eq
index member,uniqueMember,memberUid eq

access to dn.base=""
  by * read
access to attrs=userPassword
  by anonymous auth
  by * none
access to dn.subtree="ou=groups,{SUFFIX}"
  by dn.exact="{SERVICE_DN}" write
  by users read
  by * none
access to *
  by users read
  by * none
"#
    )
}
