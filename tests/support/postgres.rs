//! A real PostgreSQL 15 for tests: one cluster per test process (started on
//! first use, in a temporary directory, on a free loopback port), one new
//! database per test. The server runs under a `sh` wrapper whose stdin is a
//! pipe this process holds: when the test process ends, even by SIGKILL,
//! the pipe closes and the wrapper stops the server and removes its files.

use jitbot::secret::Secret;
use jitbot::store::PgSettings;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const BIN: &str = "/usr/lib/postgresql/15/bin";
/// The superuser's password (scram-sha-256 over TCP).
pub const PASSWORD: &str = "pg-test-secret";

pub struct Cluster {
    pub port: u16,
    /// The CA that signed the server's certificate (for 127.0.0.1): the
    /// server offers TLS, and `sslmode=verify-full` checks it against this.
    pub ca_file: std::path::PathBuf,
    /// Held open: closing it (this process ending) stops the server.
    _stdin: Mutex<ChildStdin>,
    _child: Mutex<Child>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `cmd` run as the `postgres` user when we are root (PostgreSQL refuses
/// to run as root).
fn as_postgres(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--clear-groups", program]);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// The process's cluster, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(start)
}

fn start() -> Cluster {
    let initdb = format!("{BIN}/initdb");
    if !Path::new(&initdb).exists() {
        panic!(
            "PostgreSQL 15 is not installed ({initdb} is missing): run `sudo apt-get install -y postgresql` \
             (or ./scripts/test, which does it)"
        );
    }
    // Kept past this function on purpose: the wrapper removes it when the
    // server stops.
    let dir = tempfile::Builder::new()
        .prefix("jitbot-pg-")
        .tempdir()
        .expect("temp dir")
        .keep();
    let d = dir.display().to_string();
    std::fs::create_dir(dir.join("sock")).expect("socket dir");
    std::fs::write(dir.join("pw"), PASSWORD).expect("password file");
    write_certificates(&dir);
    if is_root() {
        let out = Command::new("chown")
            .args(["-R", "postgres:", &d])
            .output()
            .expect("chown");
        assert!(
            out.status.success(),
            "chown: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = as_postgres(&initdb)
        .args(["-D", &format!("{d}/data"), "-U", "postgres"])
        .arg(format!("--pwfile={d}/pw"))
        .args([
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
            "--no-instructions",
        ])
        .output()
        .expect("run initdb");
    assert!(
        out.status.success(),
        "initdb failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    // fsync off: these tests kill jitbot, never the database server. The
    // benchmark turns it on (JITBOT_PG_FSYNC=on) to measure durable commits.
    let fsync = match std::env::var("JITBOT_PG_FSYNC").as_deref() {
        Ok("on") => "on",
        _ => "off",
    };
    let script = format!(
        "{BIN}/postgres -D {d}/data -c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={d}/sock \
         -c fsync={fsync} -c max_connections=300 -c ssl=on -c ssl_cert_file={d}/server.crt \
         -c ssl_key_file={d}/server.key >{d}/pg.log 2>&1 & p=$!; cat >/dev/null; kill -INT $p; wait $p; rm -rf {d}"
    );
    let mut child = as_postgres("sh")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn postgres");
    let stdin = child.stdin.take().expect("wrapper stdin");
    let cluster = Cluster {
        port,
        ca_file: dir.join("ca.pem"),
        _stdin: Mutex::new(stdin),
        _child: Mutex::new(child),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match cluster.admin("SELECT 1") {
            Ok(()) => return cluster,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                let log = std::fs::read_to_string(dir.join("pg.log")).unwrap_or_default();
                panic!("PostgreSQL did not start on port {port}: {e}\n{log}");
            }
        }
    }
}

/// A CA (`ca.pem`) and the server's certificate for 127.0.0.1 signed by
/// it (`server.crt`, `server.key`, readable by its owner only, as
/// PostgreSQL requires), in `dir`.
fn write_certificates(dir: &Path) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "jitbot test PostgreSQL CA");
    let ca = ca.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let server = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("server params")
        .signed_by(&key, &ca, &ca_key)
        .expect("server certificate");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("ca.pem");
    std::fs::write(dir.join("server.crt"), server.pem()).expect("server.crt");
    let key_path = dir.join("server.key");
    std::fs::write(&key_path, key.serialize_pem()).expect("server.key");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod server.key");
}

impl Cluster {
    /// The URL of database `name` (the password is given apart).
    pub fn url(&self, name: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{name}?sslmode=disable",
            self.port
        )
    }

    /// Runs `sql` as the superuser on the `postgres` database, on a thread
    /// of its own (the blocking client must not run on a tokio thread).
    pub fn admin(&self, sql: &str) -> Result<(), String> {
        self.run_on("postgres", sql)
    }

    /// Runs `sql` on database `db`.
    pub fn run_on(&self, db: &str, sql: &str) -> Result<(), String> {
        let url = self.url(db);
        let sql = sql.to_string();
        std::thread::spawn(move || {
            let mut config: postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
            config.password(PASSWORD);
            let mut client = config.connect(postgres::NoTls).map_err(|e| format!("{e}"))?;
            client.batch_execute(&sql).map_err(|e| format!("{e}"))
        })
        .join()
        .expect("admin thread")
    }

    /// One value of `sql` on database `db`, as text.
    pub fn query_one(&self, db: &str, sql: &str) -> String {
        let url = self.url(db);
        let sql = sql.to_string();
        std::thread::spawn(move || {
            let mut config: postgres::Config = url.parse().expect("url");
            config.password(PASSWORD);
            let mut client = config.connect(postgres::NoTls).expect("connect");
            let row = client.query_one(&sql, &[]).expect("query");
            row.get::<_, String>(0)
        })
        .join()
        .expect("query thread")
    }
}

/// A new, empty database on the process's cluster.
pub struct Database {
    pub name: String,
}

impl Database {
    pub fn create() -> Database {
        let c = cluster();
        let name = format!(
            "t{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::SeqCst)
        );
        c.admin(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        Database { name }
    }

    /// How jitbot reaches it: URL plus password, migrating on open.
    pub fn settings(&self) -> PgSettings {
        PgSettings {
            url: cluster().url(&self.name),
            password: Some(Secret::new(PASSWORD)),
            migrate: true,
            ca_file: None,
            mirror_compression: Default::default(),
        }
    }

    /// Runs `sql` in this database.
    pub fn run(&self, sql: &str) {
        cluster()
            .run_on(&self.name, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    /// One value as text.
    pub fn value(&self, sql: &str) -> String {
        cluster().query_one(&self.name, sql)
    }
}

/// The `[server]` and `[store]` sections of a `jitbot run` replica on
/// database `url` (its password from `JITBOT_TEST_PGPW`); `{listen}`,
/// `{admin}` and `{store}` are left for `process.rs` to fill.
pub fn replica_sections(url: &str) -> String {
    format!(
        r#"
[server]
listen = "{{listen}}"
admin_token = {{admin}}
shutdown_grace = "2s"

[store]
kind = "postgres"
url = "{url}"
password = {{ env = "JITBOT_TEST_PGPW" }}
path = "{{store}}"
cache_mb = 16
"#
    )
}

/// The config of a `jitbot run` replica on database `url`
/// ([`replica_sections`]), with a memory directory where alice is in
/// db-admins, the group db-admins that alice may request and bob approve,
/// and `chat`'s sections (none: no chat platform).
pub fn memory_replica_config(url: &str, chat: &str) -> String {
    let head = replica_sections(url);
    format!(
        r#"{head}
[scheduler]
max_wait = "1s"
retry_base = "1s"

[directory]
kind = "memory"

[memory]
groups = {{ "cn=db-admins,ou=groups,dc=example,dc=org" = ["alice"] }}
{chat}
[[group]]
name = "db-admins"
dn = "cn=db-admins,ou=groups,dc=example,dc=org"
requesters = {{ users = ["alice"] }}
approvers = {{ users = ["bob"] }}
default_duration = "1h"
max_duration = "4h"
"#
    )
}
