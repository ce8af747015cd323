//! `TestBot`: the engine with an in-memory directory, a real sled store in a
//! temporary directory (or, with `.postgres()`, a replica of a new database
//! on the test PostgreSQL) and a clock the test moves. Built with a builder
//! so each test says only what differs.

use super::postgres::Database;
use chrono::{Duration, TimeZone, Utc};
use jitbot::clock::ManualClock;
use jitbot::directory::memory::MemoryDirectory;
use jitbot::engine::{Caller, Engine, EngineSettings, Reply};
use jitbot::ports::Directory;
use jitbot::store::Store;
use jitbot_core::policy::{GroupPolicy, Policy};
use jitbot_core::{Command, Span, UserId};
use std::path::PathBuf;
use std::sync::Arc;

pub const DB: &str = "cn=db-admins,ou=groups,dc=example,dc=org";
pub const WEB: &str = "cn=web-admins,ou=groups,dc=example,dc=org";

/// The default policy: `db-admins` (ZSP, bob or carol approve) and
/// `web-admins` (dave is a standing member; bob approves).
pub fn policy() -> Policy {
    let mut db = GroupPolicy::new("db-admins", DB);
    db.zsp = true;
    for u in ["alice", "dave", "erin"] {
        db.requesters.users.insert(UserId::new(u));
    }
    for u in ["bob", "carol"] {
        db.approvers.users.insert(UserId::new(u));
    }
    db.max_duration = Span::from_hours(4);
    db.max_total_duration = Span::from_hours(8);
    let mut web = GroupPolicy::new("web-admins", WEB);
    for u in ["alice", "dave"] {
        web.requesters.users.insert(UserId::new(u));
    }
    web.approvers.users.insert(UserId::new("bob"));
    let mut admins = jitbot_core::Principals::default();
    admins.users.insert(UserId::new("root"));
    Policy {
        groups: vec![db, web],
        admins,
    }
}

pub struct TestBot {
    pub engine: Engine,
    pub dir: Arc<MemoryDirectory>,
    pub clock: ManualClock,
    pub path: PathBuf,
    /// The database, when the store is on PostgreSQL.
    pub pg: Option<Arc<Database>>,
    _tmp: Arc<tempfile::TempDir>,
}

pub struct Builder {
    policy: Policy,
    settings: EngineSettings,
    directory: Option<Arc<dyn Directory>>,
    postgres: bool,
}

/// Opens the store at `path`: sled, or a replica of `pg`.
pub fn open_store(path: &std::path::Path, pg: Option<&Database>) -> Result<Store, jitbot::store::StoreError> {
    match pg {
        Some(db) => Store::open_postgres(path, 16, &db.settings()),
        None => Store::open(path, 16),
    }
}

impl Builder {
    pub fn policy(mut self, f: impl FnOnce(&mut Policy)) -> Self {
        f(&mut self.policy);
        self
    }
    pub fn settings(mut self, f: impl FnOnce(&mut EngineSettings)) -> Self {
        f(&mut self.settings);
        self
    }
    /// Puts a wrapper (fault injection) in front of the in-memory directory.
    pub fn wrap(mut self, f: impl FnOnce(Arc<MemoryDirectory>) -> Arc<dyn Directory>) -> Self {
        let dir = seeded();
        self.directory = Some(f(dir));
        self
    }
    /// Uses another directory (a real slapd) instead of the in-memory one.
    pub fn directory(mut self, directory: Arc<dyn Directory>) -> Self {
        self.directory = Some(directory);
        self
    }
    /// Keeps the store in a new database on the test PostgreSQL (the sled
    /// directory is this replica's mirror).
    pub fn postgres(mut self) -> Self {
        self.postgres = true;
        self
    }
    pub fn build(self) -> TestBot {
        let tmp = Arc::new(tempfile::tempdir().expect("tempdir"));
        let path = tmp.path().join("db");
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0).unwrap());
        let memory = seeded();
        let directory: Arc<dyn Directory> = self.directory.unwrap_or_else(|| memory.clone());
        let pg = self.postgres.then(|| Arc::new(Database::create()));
        let store = open_store(&path, pg.as_deref()).expect("open store");
        let engine = Engine::new(
            self.policy,
            store,
            directory,
            Arc::new(clock.clone()),
            self.settings,
        );
        TestBot {
            engine,
            dir: memory,
            clock,
            path,
            pg,
            _tmp: tmp,
        }
    }
}

pub fn seeded() -> Arc<MemoryDirectory> {
    let dir = MemoryDirectory::new();
    for u in ["alice", "bob", "carol", "dave", "erin", "root"] {
        let mail = format!("{u}@example.org");
        dir.add_user(u, [("mail", mail.as_str())]);
    }
    dir.add_group(DB, []);
    dir.add_group(WEB, ["dave"]);
    Arc::new(dir)
}

impl TestBot {
    pub fn builder() -> Builder {
        Builder {
            policy: policy(),
            settings: EngineSettings {
                retry_base: Span::from_secs(5),
                retry_max: Span::from_mins(5),
                alert_after: 3,
                ..EngineSettings::default()
            },
            directory: None,
            postgres: false,
        }
    }

    pub fn new() -> TestBot {
        Self::builder().build()
    }

    /// Runs `/jit <text>` as `user` and returns the reply.
    pub async fn say(&self, user: &str, text: &str) -> Reply {
        let cmd = Command::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        self.engine.execute(&Caller::new(user, None), cmd).await
    }

    /// Like `say`, but the command must succeed.
    pub async fn ok(&self, user: &str, text: &str) -> String {
        let reply = self.say(user, text).await;
        assert!(reply.ok, "{user}: /jit {text} was refused: {}", reply.text);
        reply.text
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Fires every timer due now, repeatedly, as the scheduler would.
    pub async fn run_due(&self) {
        for _ in 0..100 {
            let due = self
                .engine
                .store()
                .due_timers(self.engine.now(), 1000)
                .expect("timers");
            if due.is_empty() {
                return;
            }
            for t in due {
                self.engine.fire(t).await;
            }
        }
        panic!("timers keep firing: something never clears its timer");
    }

    pub fn is_member(&self, group_dn: &str, user: &str) -> bool {
        self.dir.members(group_dn).contains(user)
    }

    /// The only lease in the store.
    pub fn lease(&self) -> jitbot_core::Lease {
        let mut all = self.engine.store().leases().expect("leases");
        assert_eq!(all.len(), 1, "expected exactly one lease: {all:?}");
        all.remove(0).lease
    }

    pub fn audit_actions(&self) -> Vec<String> {
        self.engine
            .store()
            .audit(0)
            .map(|e| e.expect("audit").action)
            .collect()
    }

    /// The id in a reply such as "Request r-3 for ...".
    pub fn request_id(text: &str) -> String {
        text.split_whitespace()
            .find(|w| w.starts_with("r-"))
            .unwrap_or_else(|| panic!("no request id in {text:?}"))
            .trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
            .to_string()
    }

    /// Drops the engine (a crash: nothing more runs) and opens a new one on
    /// the same store, with `directory` standing for the real directory.
    pub fn restart(self, directory: Arc<dyn Directory>, policy: Policy) -> TestBot {
        let TestBot {
            engine,
            dir,
            clock,
            path,
            pg,
            _tmp,
        } = self;
        let settings = engine.settings().clone();
        drop(engine);
        // A flush still finishing on the blocking pool holds the database
        // for a moment after the engine is gone.
        let mut tries = 0;
        let store = loop {
            match open_store(&path, pg.as_deref()) {
                Err(jitbot::store::StoreError::Locked { .. }) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other.expect("reopen store after crash"),
            }
        };
        let engine = Engine::new(policy, store, directory, Arc::new(clock.clone()), settings);
        TestBot {
            engine,
            dir,
            clock,
            path,
            pg,
            _tmp,
        }
    }
}

/// Which store a test runs on: store-level behaviour is written once and
/// run on both (see [`both_stores!`](crate::both_stores)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sled,
    /// A new database on the test PostgreSQL for every store opened.
    Postgres,
}

impl Backend {
    /// Opens a new store at `path` (a new database with PostgreSQL).
    pub fn open(self, path: &std::path::Path) -> Store {
        match self {
            Backend::Sled => Store::open(path, 16).expect("open sled store"),
            Backend::Postgres => {
                let db = Database::create();
                Store::open_postgres(path, 16, &db.settings()).expect("open PostgreSQL store")
            }
        }
    }

    /// A test bot builder on this store.
    pub fn builder(self) -> Builder {
        match self {
            Backend::Sled => TestBot::builder(),
            Backend::Postgres => TestBot::builder().postgres(),
        }
    }

    /// A test bot on this store, with the defaults.
    pub fn bot(self) -> TestBot {
        self.builder().build()
    }

    /// Where a `jitbot run` process keeps its store on this backend (a new
    /// database with PostgreSQL).
    pub fn run_store(self) -> RunStore {
        RunStore {
            db: match self {
                Backend::Sled => None,
                Backend::Postgres => Some(Database::create()),
            },
        }
    }
}

/// The store of a `jitbot run` process under test: sled in the config's
/// `[store] path`, or a database on the test PostgreSQL with that path as
/// the replica's mirror.
pub struct RunStore {
    /// The database, on PostgreSQL.
    pub db: Option<Database>,
}

/// The environment variable a PostgreSQL `[store]` reads its password from.
const PG_PASSWORD_ENV: &str = "JITBOT_TEST_PGPW";

impl RunStore {
    /// `config` (a TOML text with a `[store]` table) with this store's keys
    /// added at the top of that table: nothing for sled; `kind`, `url` and
    /// `password` for PostgreSQL.
    pub fn config(&self, config: &str) -> String {
        let Some(db) = &self.db else {
            return config.to_string();
        };
        assert!(
            config.contains("[store]\n"),
            "the config has no [store] table to put the PostgreSQL keys in:\n{config}"
        );
        let keys = format!(
            "[store]\nkind = \"postgres\"\nurl = \"{}\"\npassword = {{ env = \"{PG_PASSWORD_ENV}\" }}\n",
            db.settings().url
        );
        config.replacen("[store]\n", &keys, 1)
    }

    /// The environment the keys of [`RunStore::config`] read.
    pub fn env(&self) -> &'static [(&'static str, &'static str)] {
        match self.db {
            Some(_) => &[(PG_PASSWORD_ENV, super::postgres::PASSWORD)],
            None => &[],
        }
    }

    /// `env` followed by [`RunStore::env`].
    pub fn with_env<'a>(&self, env: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        env.iter().chain(self.env()).copied().collect()
    }

    /// Opens the store a stopped process kept at `path` (its sled directory,
    /// or its mirror of the database).
    pub fn open(&self, path: &std::path::Path) -> Store {
        open_store(path, self.db.as_ref()).expect("open the store the process kept")
    }
}

/// Runs `async fn $name(backend: Backend)` as two tests, `$name::sled` and
/// `$name::postgres`; a tokio test flavor may follow the name.
#[macro_export]
macro_rules! both_stores {
    ($name:ident $(, $($flavor:tt)*)?) => {
        mod $name {
            use $crate::support::bot::Backend;
            #[tokio::test $( ( $($flavor)* ) )?]
            async fn sled() {
                super::$name(Backend::Sled).await
            }
            #[tokio::test $( ( $($flavor)* ) )?]
            async fn postgres() {
                super::$name(Backend::Postgres).await
            }
        }
    };
}
