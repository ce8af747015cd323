//! A real Samba Active Directory domain controller for tests.
//!
//! One template is provisioned and seeded per test-binary run (≈ 15 s, the
//! first test that asks pays it; the others wait for it), never started.
//! Each test gets its own copy of it ([`SambaDc::start`], ≈ 1 s), so tests may
//! change the directory freely and run in parallel. LDAP ports are fixed, so
//! each copy listens on its own loopback address `127.0.0.N`, held for its
//! life by a listening socket on [`LOCK_PORT`] (the kernel frees it when the
//! process dies, so no lock file goes stale). A CA and a server certificate
//! made here (for every address of the pool) let LDAPS and StartTLS verify
//! by IP. Samba runs with `-i` and its standard input is a pipe this process
//! holds: when the test process dies, even by SIGKILL, the pipe closes and
//! Samba exits. Directories left by killed runs are removed by the next run.
//!
//! The seed is what an AD admin would build: users with `sAMAccountName`,
//! `userPrincipalName` and `mail` in `OU=Staff` and a sub-OU, managed groups
//! in `OU=JIT Groups`, approvers through groups nested two deep in
//! `OU=Role Groups`, a service account that is no domain admin and may write
//! `member` of the managed groups only, and 1,600 load-test users in one
//! zero-standing-privilege group.

use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, Scope, SearchEntry};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub const SAMBA: &str = "/usr/sbin/samba";
pub const SAMBA_TOOL: &str = "/usr/bin/samba-tool";
/// Samba's own Python (its modules are not on other interpreters' path).
const PYTHON: &str = "/usr/bin/python3";
const INSTALL: &str =
    "Samba is not installed: run `sudo apt-get install -y samba` (or ./scripts/test, which does it)";

pub const REALM: &str = "EXAMPLE.TEST";
pub const DOMAIN: &str = "DC=example,DC=test";
pub const ADMIN: &str = "Administrator@example.test";
pub const ADMIN_PW: &str = "Passw0rd!Admin";
pub const STAFF: &str = "OU=Staff,DC=example,DC=test";
pub const CONTRACTORS: &str = "OU=Contractors,OU=Staff,DC=example,DC=test";
pub const LOAD: &str = "OU=Load Test,OU=Staff,DC=example,DC=test";
pub const SERVICE_DN: &str = "CN=svc-jitbot,OU=Service Accounts,DC=example,DC=test";
pub const SERVICE_PW: &str = "Jitbot-Svc-Passw0rd!";
/// Managed groups the service account may write `member` of.
pub const DB_ADMINS: &str = "CN=DB Admins,OU=JIT Groups,DC=example,DC=test";
pub const WEB_ADMINS: &str = "CN=Web Admins,OU=JIT Groups,DC=example,DC=test";
/// A zero-standing-privilege group with [`LOAD_USERS`] members.
pub const FLEET_ROOT: &str = "CN=Fleet Root,OU=JIT Groups,DC=example,DC=test";
/// A group in the same OU whose `member` the service account may not write.
pub const FINANCE: &str = "CN=Finance Approvers,OU=JIT Groups,DC=example,DC=test";
/// Protected by AdminSDHolder; the service account was given `member`
/// there too, as an admin might (AD's SDProp would take it away again).
pub const DOMAIN_ADMINS: &str = "CN=Domain Admins,CN=Users,DC=example,DC=test";
/// Approvers: DB Approvers ∋ DBA Leads ∋ DBA Leads EMEA ∋ carol.
pub const DB_APPROVERS: &str = "CN=DB Approvers,OU=Role Groups,DC=example,DC=test";
pub const DBA_LEADS: &str = "CN=DBA Leads,OU=Role Groups,DC=example,DC=test";
pub const DBA_LEADS_EMEA: &str = "CN=DBA Leads EMEA,OU=Role Groups,DC=example,DC=test";
/// Requesters: alice, bob, dave.
pub const ENGINEERS: &str = "CN=Engineers,OU=Role Groups,DC=example,DC=test";
/// A role group erin belongs to (for nested members of managed groups).
pub const LEGACY_DBAS: &str = "CN=Legacy DBAs,OU=Role Groups,DC=example,DC=test";
pub const LOAD_USERS: usize = 1600;
/// The port each DC's loopback address is held by while it runs.
pub const LOCK_PORT: u16 = 38_389;
/// The loopback addresses DCs are given, `127.0.0.N` for N in this range.
const POOL: std::ops::RangeInclusive<u8> = 20..=59;

/// A seeded user: `(sAMAccountName, DN, mail, userPrincipalName)`.
pub struct User {
    pub sam: &'static str,
    pub dn: &'static str,
    pub mail: &'static str,
    pub upn: &'static str,
}

pub const USERS: [User; 5] = [
    User {
        sam: "alice",
        dn: "CN=Alice Archer,OU=Staff,DC=example,DC=test",
        mail: "alice.archer@example.com",
        upn: "alice@example.test",
    },
    User {
        sam: "bob",
        dn: "CN=Bob Baker,OU=Staff,DC=example,DC=test",
        mail: "bob.baker@example.com",
        upn: "bob@example.test",
    },
    User {
        sam: "carol",
        dn: "CN=Carol Clark,OU=Staff,DC=example,DC=test",
        mail: "carol.clark@example.com",
        upn: "carol@example.test",
    },
    User {
        sam: "dave",
        dn: "CN=Dave Dunn,OU=Contractors,OU=Staff,DC=example,DC=test",
        mail: "dave.dunn@example.com",
        upn: "dave@example.test",
    },
    User {
        sam: "erin",
        dn: "CN=Erin Evans,OU=Staff,DC=example,DC=test",
        mail: "erin.evans@example.com",
        upn: "erin@example.test",
    },
];

/// A seeded user by `sAMAccountName`.
pub fn user(sam: &str) -> &'static User {
    USERS
        .iter()
        .find(|u| u.sam == sam)
        .unwrap_or_else(|| panic!("no seeded user {sam}"))
}

/// The DN of load-test user `i` (1-based).
pub fn load_user_dn(i: usize) -> String {
    format!("CN=load{i:04},{LOAD}")
}

/// The template every DC is copied from, and the TLS files they share.
struct Template {
    dir: PathBuf,
    ca_pem: String,
}

static TEMPLATE: OnceLock<Result<Arc<Template>, String>> = OnceLock::new();

fn template() -> Arc<Template> {
    match TEMPLATE.get_or_init(|| build_template().map(Arc::new)) {
        Ok(t) => t.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// A running domain controller, stopped and removed on drop.
pub struct SambaDc {
    dir: TempDir,
    ip: Ipv4Addr,
    child: Child,
    /// Samba exits when this closes (on drop, or when the process dies).
    _stdin: ChildStdin,
    /// Holds `ip` for this DC.
    _lock: TcpListener,
}

impl SambaDc {
    /// Copies the template onto a free loopback address and starts it; returns
    /// once LDAP and LDAPS answer.
    pub async fn start() -> SambaDc {
        let template = tokio::task::spawn_blocking(template)
            .await
            .expect("template thread");
        let dir = tempfile::Builder::new()
            .prefix(&format!("jitbot-samba-{}-", std::process::id()))
            .tempdir()
            .expect("temp dir");
        copy_dir(&template.dir, dir.path());
        let (ip, lock) = claim_address();
        let conf_path = dir.path().join("etc/smb.conf");
        let conf = std::fs::read_to_string(&conf_path).expect("read smb.conf");
        let from = template.dir.display().to_string();
        let conf: String = conf
            .replace(&from, &dir.path().display().to_string())
            .lines()
            .map(|line| {
                if line.trim_start().starts_with("interfaces =") {
                    format!("\tinterfaces = {ip}/8\n")
                } else {
                    format!("{line}\n")
                }
            })
            .collect();
        std::fs::write(&conf_path, conf).expect("write smb.conf");
        let log = std::fs::File::create(dir.path().join("samba.out")).expect("log file");
        let mut child = Command::new(SAMBA)
            .args(["-i", "-M", "single", "--maximum-runtime=3600", "-s"])
            .arg(&conf_path)
            .stdin(Stdio::piped())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn samba");
        let stdin = child.stdin.take().expect("samba stdin");
        let mut dc = SambaDc {
            dir,
            ip,
            child,
            _stdin: stdin,
            _lock: lock,
        };
        dc.wait_until_listening();
        dc.wait_until_bound().await;
        dc
    }

    fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if [389, 636]
                .iter()
                .all(|p| TcpStream::connect((self.ip, *p)).is_ok())
            {
                return;
            }
            let exited = self.child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "samba did not start on {} ({exited:?}):\n{}",
                    self.ip,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Samba listens a moment before its directory answers binds.
    async fn wait_until_bound(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.try_admin().await {
                Ok(mut ldap) => {
                    let _ = ldap.unbind().await;
                    return;
                }
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "samba on {} never accepted the admin bind: {e}\n{}",
                        self.ip,
                        self.logs()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn logs(&self) -> String {
        let mut out = std::fs::read_to_string(self.dir.path().join("samba.out")).unwrap_or_default();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("log")) {
            for e in entries.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let _ = write!(out, "\n--- {}\n{text}", e.path().display());
            }
        }
        out
    }

    /// `ldaps://127.0.0.N` (port 636).
    pub fn ldaps_url(&self) -> String {
        format!("ldaps://{}", self.ip)
    }

    /// `ldap://127.0.0.N` (port 389), for StartTLS.
    pub fn ldap_url(&self) -> String {
        format!("ldap://{}", self.ip)
    }

    /// The PEM file of the CA that signed the DC's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("tls/ca.pem")
    }

    /// A file holding the service account's password.
    pub fn password_file(&self) -> PathBuf {
        self.dir.path().join("service.pw")
    }

    /// A file in the DC's directory (another CA, a wrong password, ...).
    pub fn write_file(&self, name: &str, content: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, content).expect("write file");
        path
    }

    async fn try_admin(&self) -> Result<Ldap, String> {
        let ca = template().ca_pem.clone();
        let settings = LdapConnSettings::new()
            .set_conn_timeout(Duration::from_secs(5))
            .set_config(client_tls(&ca));
        let (conn, mut ldap) = LdapConnAsync::with_settings(settings, &self.ldaps_url())
            .await
            .map_err(|e| e.to_string())?;
        ldap3::drive!(conn);
        ldap.simple_bind(ADMIN, ADMIN_PW)
            .await
            .and_then(|r| r.success())
            .map_err(|e| e.to_string())?;
        Ok(ldap)
    }

    /// An LDAPS connection bound as the domain's Administrator, independent
    /// of the code under test.
    pub async fn admin(&self) -> Ldap {
        self.try_admin().await.expect("admin bind")
    }

    /// The values of `attr` on `dn`, read as Administrator, sorted.
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

    /// Adds (`true`) or deletes a `member` value as Administrator.
    pub async fn set_member(&self, group: &str, member: &str, present: bool) {
        let mut ldap = self.admin().await;
        let value = std::collections::HashSet::from([member.to_string()]);
        let change = if present {
            ldap3::Mod::Add("member".to_string(), value)
        } else {
            ldap3::Mod::Delete("member".to_string(), value)
        };
        ldap.modify(group, vec![change])
            .await
            .and_then(|r| r.success())
            .expect("admin modify of member");
        let _ = ldap.unbind().await;
    }
}

impl Drop for SambaDc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A rustls client config trusting only `ca_pem`, for the admin connection.
fn client_tls(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

/// The first address of the pool that no other DC (of this process or
/// another) holds, with its lock socket.
fn claim_address() -> (Ipv4Addr, TcpListener) {
    for n in POOL {
        let ip = Ipv4Addr::new(127, 0, 0, n);
        let Ok(lock) = TcpListener::bind((ip, LOCK_PORT)) else {
            continue;
        };
        // Something else (a DC of a run that predates the lock) may hold
        // the LDAP ports themselves.
        if [389u16, 636, 3268, 3269]
            .iter()
            .all(|p| TcpListener::bind((ip, *p)).is_ok())
        {
            return (ip, lock);
        }
    }
    panic!("no free loopback address for a Samba DC in 127.0.0.{POOL:?}");
}

/// Provisions and seeds the template: the slow part, once per run.
fn build_template() -> Result<Template, String> {
    for bin in [SAMBA, SAMBA_TOOL, PYTHON] {
        if !Path::new(bin).exists() {
            return Err(format!("{INSTALL} ({bin} is missing)"));
        }
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if !status.lines().any(|l| l.starts_with("Uid:\t0\t")) {
        return Err(
            "the Samba AD DC tests need root: provisioning does, and a DC listens on the \
                    fixed ports 389 and 636"
                .into(),
        );
    }
    remove_dead_runs();
    let dir = std::env::temp_dir().join(format!("jitbot-samba-template-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for sub in ["run", "log", "ncalrpc", "winbindd", "ntp_signd", "cache", "tls"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    set_mode(&dir.join("ntp_signd"), 0o750);
    let d = dir.display();
    let started = Instant::now();
    run(Command::new(SAMBA_TOOL).args([
        "domain",
        "provision",
        &format!("--realm={REALM}"),
        "--domain=EXAMPLE",
        "--server-role=dc",
        "--dns-backend=NONE",
        "--use-rfc2307",
        "--host-name=dc1",
        &format!("--adminpass={ADMIN_PW}"),
        &format!("--targetdir={d}"),
        // Rewritten per copy.
        "--option=interfaces=127.0.0.1/8",
        "--option=bind interfaces only=yes",
        &format!("--option=pid directory={d}/run"),
        &format!("--option=log file={d}/log/log.%m"),
        &format!("--option=ncalrpc dir={d}/ncalrpc"),
        &format!("--option=winbindd socket directory={d}/winbindd"),
        &format!("--option=ntp signd socket directory={d}/ntp_signd"),
        "--option=server services=ldap",
    ]))?;
    let provisioned = started.elapsed();

    let (cert, key, ca) = certificates();
    std::fs::write(dir.join("tls/cert.pem"), cert).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("tls/key.pem"), key).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("tls/ca.pem"), &ca).map_err(|e| e.to_string())?;
    set_mode(&dir.join("tls/key.pem"), 0o600);
    let conf_path = dir.join("etc/smb.conf");
    let conf = std::fs::read_to_string(&conf_path).map_err(|e| e.to_string())?;
    // Provisioning drops TLS options given on its command line; they go in
    // by hand. `ldap server require strong auth` stays at Samba's default
    // (yes): simple binds need LDAPS or StartTLS, as on a hardened AD.
    let tls = format!(
        "[global]\n\ttls enabled = yes\n\ttls keyfile = {d}/tls/key.pem\n\
         \ttls certfile = {d}/tls/cert.pem\n\ttls cafile = {d}/tls/ca.pem\n"
    );
    std::fs::write(&conf_path, conf.replacen("[global]\n", &tls, 1)).map_err(|e| e.to_string())?;

    std::fs::write(dir.join("service.pw"), SERVICE_PW).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("seed.ldif"), seed_ldif()).map_err(|e| e.to_string())?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ad-seed.py");
    run(Command::new(PYTHON)
        .arg(script)
        .arg(&conf_path)
        .arg(dir.join("private/sam.ldb"))
        .arg(dir.join("seed.ldif"))
        .arg(SERVICE_DN)
        .arg(dir.join("service.pw"))
        .args([DB_ADMINS, WEB_ADMINS, FLEET_ROOT, DOMAIN_ADMINS]))?;
    eprintln!(
        "samba template ready in {:.1?} (provision {:.1?}) at {d}",
        started.elapsed(),
        provisioned
    );
    Ok(Template { dir, ca_pem: ca })
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Removes templates and copies left behind by test processes that are gone
/// (killed before their drops ran).
fn remove_dead_runs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("jitbot-samba-") else {
            continue;
        };
        let pid = rest
            .trim_start_matches("template-")
            .split('-')
            .next()
            .unwrap_or("");
        if let Ok(pid) = pid.parse::<u32>() {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// `cp -a`: Samba's databases are sparse-free files; a plain copy will do.
fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", from.display()))
        .arg(to)
        .status()
        .expect("run cp");
    assert!(
        status.success(),
        "cp -a {} {} failed",
        from.display(),
        to.display()
    );
}

/// A CA, and a server certificate it signed for `dc1.example.test` and
/// every address of the pool.
fn certificates() -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
        SanType,
    };
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "jitbot test AD CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let mut server = CertificateParams::new(vec!["dc1.example.test".to_string()]).expect("server params");
    for n in POOL {
        server
            .subject_alt_names
            .push(SanType::IpAddress(Ipv4Addr::new(127, 0, 0, n).into()));
    }
    server
        .distinguished_name
        .push(DnType::CommonName, "dc1.example.test");
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = server
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("server certificate");
    (cert.pem(), key.serialize_pem(), ca_cert.pem())
}

/// The directory an AD admin would have built (see the module doc).
fn seed_ldif() -> String {
    let mut l = String::new();
    for ou in [
        STAFF,
        CONTRACTORS,
        LOAD,
        "OU=Service Accounts,DC=example,DC=test",
        "OU=JIT Groups,DC=example,DC=test",
        "OU=Role Groups,DC=example,DC=test",
    ] {
        let _ = write!(l, "dn: {ou}\nobjectClass: organizationalUnit\n\n");
    }
    for u in &USERS {
        let (given, sn) = cn(u.dn).split_once(' ').expect("two-word CN");
        let _ = write!(
            l,
            "dn: {}\nobjectClass: user\nsAMAccountName: {}\nuserPrincipalName: {}\nmail: {}\n\
             givenName: {given}\nsn: {sn}\ndisplayName: {given} {sn}\n\n",
            u.dn, u.sam, u.upn, u.mail
        );
    }
    let _ = write!(
        l,
        "dn: {SERVICE_DN}\nobjectClass: user\nsAMAccountName: svc-jitbot\n\
         userPrincipalName: svc-jitbot@example.test\ndescription: jitbot (delegated: member of OU=JIT Groups)\n\n"
    );
    for i in 1..=LOAD_USERS {
        let _ = write!(
            l,
            "dn: {}\nobjectClass: user\nsAMAccountName: load{i:04}\n\n",
            load_user_dn(i)
        );
    }
    let members = |dns: &[&str]| -> String { dns.iter().map(|d| format!("member: {d}\n")).collect() };
    let groups: Vec<(&str, String)> = vec![
        (DBA_LEADS_EMEA, members(&[user("carol").dn])),
        (DBA_LEADS, members(&[DBA_LEADS_EMEA])),
        (DB_APPROVERS, members(&[DBA_LEADS])),
        (
            ENGINEERS,
            members(&[user("alice").dn, user("bob").dn, user("dave").dn]),
        ),
        (LEGACY_DBAS, members(&[user("erin").dn])),
        (DB_ADMINS, String::new()),
        (WEB_ADMINS, String::new()),
        (FINANCE, String::new()),
        (
            FLEET_ROOT,
            (1..=LOAD_USERS)
                .map(|i| format!("member: {}\n", load_user_dn(i)))
                .collect(),
        ),
    ];
    for (dn, members) in groups {
        let sam = cn(dn).to_lowercase().replace(' ', "-");
        let _ = write!(
            l,
            "dn: {dn}\nobjectClass: group\nsAMAccountName: {sam}\n{members}\n"
        );
    }
    l
}

/// The value of a DN's first RDN (`CN=Alice Archer,...` → `Alice Archer`).
fn cn(dn: &str) -> &str {
    dn.split(',')
        .next()
        .and_then(|rdn| rdn.split_once('='))
        .map(|(_, v)| v)
        .expect("CN=")
}
