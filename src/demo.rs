//! `jitbot demo`: the whole bot (engine, scheduler, outbox, store) with an
//! in-memory directory of demo people and groups, and the web console as its
//! only chat platform. No Slack, Discord or LDAP account needed.

use crate::app::{self, Parts, Running};
use crate::chat::web::{self, WebConsole};
use crate::clock::{Clock, SystemClock};
use crate::directory::memory::MemoryDirectory;
use crate::engine::{Engine, EngineSettings};
use crate::ports::Notifier;
use crate::scheduler::SchedulerSettings;
use crate::store::Store;
use anyhow::Context;
use jitbot_core::policy::{GroupPolicy, Policy, Principals};
use jitbot_core::{Span, UserId};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Options of `jitbot demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Where the console and dashboard listen.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Keep the store in this directory instead of a temporary one.
    #[arg(long)]
    pub data: Option<PathBuf>,
}

/// The demo people: (id, what they do).
pub const USERS: [(&str, &str); 4] = [
    ("alice", "requester"),
    ("bob", "approver"),
    ("carol", "approver, jitbot admin"),
    ("dave", "requester, standing member of web-admins"),
];

const GROUPS_OU: &str = "ou=groups,dc=demo,dc=example";

fn dn(cn: &str) -> String {
    format!("cn={cn},{GROUPS_OU}")
}

fn users(ids: &[&str]) -> Principals {
    Principals {
        users: ids.iter().map(|id| UserId::new(*id)).collect(),
        groups: Default::default(),
    }
}

/// The directory: four people with `mail`, and the four demo groups (only
/// web-admins has a standing member).
pub fn directory() -> MemoryDirectory {
    let dir = MemoryDirectory::new();
    for (id, _) in USERS {
        let mail = format!("{id}@demo.example");
        dir.add_user(id, [("mail", mail.as_str())]);
    }
    dir.add_group(&dn("db-admins"), []);
    dir.add_group(&dn("web-admins"), ["dave"]);
    dir.add_group(&dn("prod-breakglass"), []);
    dir.add_group(&dn("on-call"), []);
    dir
}

/// The policy, built in code so that the demo needs no config file.
pub fn policy() -> Policy {
    let mut db = GroupPolicy::new("db-admins", &dn("db-admins"));
    db.description = "production databases (zero standing privilege)".into();
    db.requesters = users(&["alice", "dave"]);
    db.approvers = users(&["bob", "carol"]);
    db.default_duration = Span::from_mins(15);
    db.max_duration = Span::from_hours(4);
    db.zsp = true;

    let mut web = GroupPolicy::new("web-admins", &dn("web-admins"));
    web.description = "web servers (dave is a standing member)".into();
    web.requesters = users(&["alice", "carol", "dave"]);
    web.approvers = users(&["bob"]);
    web.default_duration = Span::from_mins(30);
    web.max_duration = Span::from_hours(8);

    let mut glass = GroupPolicy::new("prod-breakglass", &dn("prod-breakglass"));
    glass.description = "emergency production access: self-approve, every approver is alerted".into();
    glass.requesters = users(&["alice", "dave"]);
    glass.approvers = users(&["bob", "carol"]);
    glass.default_duration = Span::from_mins(30);
    glass.max_duration = Span::from_hours(1);
    glass.break_glass = true;
    glass.zsp = true;

    let mut on_call = GroupPolicy::new("on-call", &dn("on-call"));
    on_call.description = "pager rotation tools: granted without approval".into();
    on_call.requesters = users(&["alice", "bob", "carol", "dave"]);
    on_call.approvers = users(&["carol"]);
    on_call.default_duration = Span::from_hours(1);
    on_call.max_duration = Span::from_hours(12);
    on_call.auto_approve = true;

    Policy {
        groups: vec![db, web, glass, on_call],
        admins: users(&["carol"]),
    }
}

/// Where the demo keeps its store; a temporary directory is removed on drop.
pub enum DemoData {
    Temporary(tempfile::TempDir),
    Kept(PathBuf),
}

impl DemoData {
    pub fn path(&self) -> &Path {
        match self {
            DemoData::Temporary(t) => t.path(),
            DemoData::Kept(p) => p,
        }
    }
}

/// What a test may change about the demo.
pub struct DemoOptions {
    pub listen: SocketAddr,
    pub data: Option<PathBuf>,
    /// The engine's and console's clock; tests pass a `ManualClock` to make
    /// leases expire without waiting.
    pub clock: Arc<dyn Clock>,
    /// The engine's settings (tests tighten its limits).
    pub settings: EngineSettings,
    /// An open store to use instead of a sled store in the data directory
    /// (tests pass one on PostgreSQL).
    pub store: Option<Store>,
}

/// Starts the demo on `listen` (use port 0 in tests: see [`Running::addr`]).
pub async fn start_demo(listen: SocketAddr, data: Option<PathBuf>) -> anyhow::Result<(Running, DemoData)> {
    start_demo_with(DemoOptions {
        listen,
        data,
        clock: Arc::new(SystemClock),
        settings: EngineSettings::default(),
        store: None,
    })
    .await
}

/// [`start_demo`] with every option.
pub async fn start_demo_with(options: DemoOptions) -> anyhow::Result<(Running, DemoData)> {
    let data = match options.data {
        Some(path) => {
            std::fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
            DemoData::Kept(path)
        }
        None => DemoData::Temporary(
            tempfile::Builder::new()
                .prefix("jitbot-demo-")
                .tempdir()
                .context("cannot create a temporary directory for the demo store")?,
        ),
    };
    let store = match options.store {
        Some(store) => store,
        None => Store::open(&data.path().join("store"), 16)?,
    };
    let directory = Arc::new(directory());
    let engine = Engine::new(
        policy(),
        store,
        directory,
        options.clock.clone(),
        options.settings,
    );
    let console = Arc::new(WebConsole::new(options.clock));
    let ids = USERS.iter().map(|(id, _)| id.to_string()).collect();
    let listener = TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let running = app::start(
        Parts {
            engine: engine.clone(),
            notifier: console.clone() as Arc<dyn Notifier>,
            // The console and its open dashboard: on loopback, for one person
            // trying jitbot. No admin listener: the admin API needs a token.
            routers: vec![web::routes(engine, console, ids)],
            admin_routers: Vec::new(),
            admin_token: None,
            limits: Default::default(),
            scheduler: SchedulerSettings {
                // Short waits keep a one-minute lease's expiry visibly on time.
                max_wait: Duration::from_secs(1),
                concurrency: 8,
            },
            zsp_interval: Duration::from_secs(30),
            leader: None,
            leader_tasks: Vec::new(),
        },
        listener,
        None,
    )?;
    Ok((running, data))
}

/// `jitbot demo`: runs until Ctrl-C or SIGTERM.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let (running, data) = start_demo(args.listen, args.data).await?;
    println!(
        "jitbot demo is running: open http://{}/ (dashboard: /dashboard). Ctrl-C to stop.",
        running.addr
    );
    println!(
        "Demo people: {}.",
        USERS.map(|(id, role)| format!("{id} ({role})")).join(", ")
    );
    match &data {
        DemoData::Temporary(t) => println!("The store is in {} and is removed at exit.", t.path().display()),
        DemoData::Kept(p) => println!("The store is kept in {}.", p.display()),
    }
    app::wait_for_signal().await;
    println!("jitbot demo: stopping");
    running.stop(Duration::from_secs(5)).await;
    drop(data);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_policy_allows_a_one_minute_db_lease() {
        let p = policy();
        let db = p.group(&jitbot_core::GroupName::new("db-admins")).unwrap();
        assert_eq!(
            db.duration_for(Some(Span::from_mins(1))).unwrap(),
            Span::from_mins(1)
        );
        assert!(db.duration_for(Some(Span::from_hours(5))).is_err());
        assert_eq!(
            db.dn,
            jitbot_core::GroupDn::new("cn=db-admins,ou=groups,dc=demo,dc=example")
        );
        for g in &p.groups {
            assert!(!g.requesters.is_empty() && !g.approvers.is_empty(), "{}", g.name);
        }
    }
}
