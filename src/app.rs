//! Wiring: builds the engine and its adapters from a config, starts the
//! HTTP server, the scheduler, the outbox worker and the ZSP monitor, and
//! drains them on shutdown.

use crate::chat::fanout::{Fanout, LogNotifier};
use crate::clock::{Clock, SteadyClock};
use crate::config::{Config, DirectoryKind};
use crate::directory::memory::MemoryDirectory;
use crate::engine::{Engine, EngineSettings};
use crate::http::{self, HttpState};
use crate::ports::{Directory, Notifier};
use crate::scheduler::{self, SchedulerSettings};
use crate::secret::Secret;
use crate::store::leader::Window;
use crate::store::retention::RetentionSettings;
use crate::store::Store;
use anyhow::Context;
use axum::Router;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Everything `start` needs, already built.
pub struct Parts {
    pub engine: Engine,
    pub notifier: Arc<dyn Notifier>,
    /// Routes of the chat adapters and the console, for the public listener.
    pub routers: Vec<Router>,
    /// Routes for the admin listener besides the built-in ones (the dashboard).
    pub admin_routers: Vec<Router>,
    pub admin_token: Option<Secret>,
    /// Connection cap and timeouts of both listeners.
    pub limits: http::Limits,
    pub scheduler: SchedulerSettings,
    /// How often the ZSP monitor runs (it also runs at start-up).
    pub zsp_interval: Duration,
    /// With replicas (PostgreSQL): the scheduler, the outbox worker, the
    /// ZSP monitor and `leader_tasks` run only while this replica leads.
    /// `None`: always.
    pub leader: Option<LeaderSettings>,
    /// The chat adapters' leader-only tasks (the Discord gateway), started
    /// with each term and stopped with it.
    pub leader_tasks: Vec<crate::chat::LeaderTask>,
}

/// How this replica takes part in leadership (`store::leader`).
#[derive(Clone, Debug)]
pub struct LeaderSettings {
    /// This replica's name in `jitbot_leader` (unique per process).
    pub holder: String,
    /// A term's length; the leader renews every third of it, and stops its
    /// work two thirds of it after its last renewal.
    pub ttl: Duration,
}

/// A leader's term: long enough to ride out a slow renewal, short enough
/// that another replica revokes on time after a leader dies (it takes over
/// at most this plus a twelfth of it after the last renewal, and acts a
/// third of a term after that).
pub const LEADER_TTL: Duration = Duration::from_secs(6);

/// A running jitbot.
pub struct Running {
    pub engine: Engine,
    /// The public listener's address.
    pub addr: SocketAddr,
    /// The admin listener's address, when there is one.
    pub admin_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Running {
    /// A receiver that turns true at shutdown, for extra tasks (Socket Mode).
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Runs another task that must stop with the rest.
    pub fn spawn(&mut self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Stops taking commands, lets in-flight directory work finish (within
    /// `grace`), and flushes the store. Leases are re-armed at the next start.
    pub async fn stop(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        let pending = crate::chat::work::in_flight();
        if pending > 0 {
            tracing::info!(
                pending,
                "waiting for acknowledged chat commands and clicks to finish"
            );
        }
        let drained = tokio::time::timeout(grace, async {
            // Work already acknowledged to a chat platform is owed to a
            // person: nobody would deliver it again.
            crate::chat::work::finished().await;
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            let dropped = crate::chat::work::in_flight();
            if dropped > 0 {
                tracing::error!(dropped, "shutdown grace ran out with acknowledged chat commands or clicks unfinished; they were dropped and the people who sent them get no answer");
            }
            tracing::warn!("shutdown grace ran out; unfinished work resumes at the next start");
            self.tasks.abort_all();
        }
        if let Err(e) = self.engine.store().flush().await {
            tracing::error!(error = %e, "final flush failed");
        }
        tracing::info!("jitbot stopped");
    }
}

/// Starts the servers and background workers on already-bound listeners:
/// `listener` is public (chat endpoints, bare health), `admin` serves the
/// admin API, dashboard, metrics and detailed readiness. Without `admin`,
/// those are not served at all (the demo).
pub fn start(parts: Parts, listener: TcpListener, admin: Option<TcpListener>) -> anyhow::Result<Running> {
    let addr = listener.local_addr()?;
    let admin_addr = admin.as_ref().map(TcpListener::local_addr).transpose()?;
    let (tx, rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let engine = parts.engine.clone();
    let state = HttpState::new(
        engine.clone(),
        parts.admin_token,
        crate::metrics::install(),
        Some(parts.notifier.clone()),
    );
    let limits = parts.limits;
    let public = http::public_router(state.clone(), parts.routers);
    let server_rx = rx.clone();
    tasks.spawn(async move {
        if let Err(e) = http::serve(listener, public, limits, server_rx).await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    if let Some(admin) = admin {
        let router = http::admin_router(state, parts.admin_routers);
        let server_rx = rx.clone();
        tasks.spawn(async move {
            if let Err(e) = http::serve(admin, router, limits, server_rx).await {
                tracing::error!(error = %e, "admin HTTP server failed");
            }
        });
    }
    let (work_engine, notifier, schedule, zsp, leader_tasks) = (
        engine.clone(),
        parts.notifier,
        parts.scheduler,
        parts.zsp_interval,
        parts.leader_tasks,
    );
    // Tells the outbox a stop at shutdown (a last pass) from a lost term.
    let shutdown = rx.clone();
    // The work only one replica does at a time.
    let work = move |stop: watch::Receiver<bool>| {
        let mut set = JoinSet::new();
        set.spawn(scheduler::run(
            work_engine.clone(),
            schedule.clone(),
            stop.clone(),
        ));
        set.spawn(crate::chat::outbox::run_for_term(
            work_engine.clone(),
            notifier.clone(),
            stop.clone(),
            shutdown.clone(),
        ));
        for task in &leader_tasks {
            set.spawn(task(stop.clone()));
        }
        set.spawn(zsp_monitor(work_engine.clone(), zsp, stop));
        set
    };
    let kind = if engine.store().is_postgres() {
        "postgres"
    } else {
        "sled"
    };
    // A follower until `lead` takes a term; alone (sled), always the leader.
    crate::metrics::set_leader(kind, parts.leader.is_none());
    match parts.leader {
        None => {
            let mut set = work(rx);
            tasks.spawn(async move { while set.join_next().await.is_some() {} });
        }
        Some(settings) => {
            // On a thread and runtime of its own: renewals and the step-down
            // timer go on even while async code that waits for the store
            // holds every worker of the main runtime. The work itself runs
            // on the main runtime.
            let (store, main) = (engine.store().clone(), tokio::runtime::Handle::current());
            let (done, finished) = tokio::sync::oneshot::channel::<()>();
            std::thread::Builder::new()
                .name("jitbot-leadership".into())
                .spawn(move || {
                    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                        Ok(rt) => rt.block_on(lead(store, settings, rx, work, main)),
                        Err(e) => tracing::error!(error = %e, "cannot start the leadership runtime; this replica never leads"),
                    }
                    let _ = done.send(());
                })
                .context("cannot start the leadership thread")?;
            tasks.spawn(async move {
                let _ = finished.await;
            });
        }
    }
    match admin_addr {
        Some(admin) => tracing::info!(%addr, %admin, "jitbot listening"),
        None => tracing::info!(%addr, "jitbot listening"),
    }
    Ok(Running {
        engine,
        addr,
        admin_addr,
        shutdown: tx,
        tasks,
    })
}

/// Runs `blocking` on tokio's blocking pool (the store waits for the
/// database there).
async fn off_runtime<T: Send + 'static>(
    store: &Store,
    blocking: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, crate::store::StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || blocking(&store))
        .await
        .map_err(|e| crate::store::StoreError::Io(format!("the leadership task failed: {e}")))?
}

/// Takes part in leadership until shutdown: while this replica leads, its
/// store is fenced with the term's token and `work` runs (a new term
/// first waits out the old leader's calls: `Store::acts_from`); when the term is lost (another
/// replica holds it, or no renewal succeeded within two thirds of a term
/// after the last one began, whether the renewals failed or hang), the
/// work is stopped (aborted if it does not stop within a sixth of a term),
/// then the fence lifted, all before the term can expire.
async fn lead<F>(
    store: Store,
    settings: LeaderSettings,
    mut shutdown: watch::Receiver<bool>,
    work: F,
    main: tokio::runtime::Handle,
) where
    F: Fn(watch::Receiver<bool>) -> JoinSet<()> + Send + 'static,
{
    use tokio::time::{sleep_until, timeout_at, Instant};
    let renew = settings.ttl / 3;
    // A follower asks for the term this often: the term expires a whole
    // term after the leader's last renewal whenever the leader dies, and
    // each try is one cheap statement, so trying only every renewal
    // period would add up to that period to every failover.
    let follow = settings.ttl / 12;
    let kind = if store.is_postgres() { "postgres" } else { "sled" };
    let renewal = || {
        let (holder, ttl) = (settings.holder.clone(), settings.ttl);
        off_runtime(&store, move |s| s.lead(&holder, ttl))
    };
    loop {
        let started = Instant::now();
        // Even the attempt to take the term is bounded: a hung connection
        // must not keep this loop from trying again.
        let token = match timeout_at(started + renew, renewal()).await {
            Ok(Ok(Some(token))) => token,
            Ok(Ok(None)) => {
                tokio::select! {
                    _ = sleep_until(started + follow) => continue,
                    _ = shutdown.changed() => return,
                }
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "no answer in time".to_string(),
                };
                tracing::warn!(%error, "cannot reach PostgreSQL for the leadership; trying again");
                tokio::select! {
                    _ = sleep_until(started + renew) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        store.set_fence(Some(token));
        crate::metrics::set_leader(kind, true);
        crate::metrics::leadership_taken();
        let (stop, stopped) = watch::channel(false);
        let mut running: Option<JoinSet<()>> = None;
        let mut renewed = started;
        let mut next_try = started + renew;
        let shutting_down = loop {
            // A new term first waits out the old leader's last directory
            // calls (`Store::acts_from`), then acts from a renewal on.
            if running.is_none() && store.directory_window() != Window::Closed {
                tracing::info!(token, holder = %settings.holder, "this replica leads: it runs the scheduler, the outbox and the ZSP monitor");
                let _on_main = main.enter();
                running = Some(work(stopped.clone()));
            }
            let step_down_at = renewed + settings.ttl * 2 / 3;
            // Until the work runs, wake when the takeover wait ends, not
            // only at the next renewal: that would add up to a renewal
            // period to every failover.
            let wait_over = match (&running, store.acts_from()) {
                (None, Some(from)) if Instant::from_std(from) > Instant::now() => {
                    Some(Instant::from_std(from))
                }
                _ => None,
            };
            tokio::select! {
                _ = sleep_until(step_down_at) => {
                    tracing::warn!(token, "cannot renew the leadership in time; stopping this replica's work");
                    break false;
                }
                _ = sleep_until(next_try) => {}
                _ = sleep_until(wait_over.unwrap_or(next_try)), if wait_over.is_some() => continue,
                _ = shutdown.changed() => break true,
            }
            let attempt = Instant::now();
            match timeout_at(step_down_at, renewal()).await {
                Ok(Ok(Some(t))) if t == token => {
                    renewed = attempt;
                    next_try = attempt + renew;
                }
                Ok(Ok(_)) => {
                    tracing::warn!(
                        token,
                        "this replica lost the leadership to another; stopping its work"
                    );
                    break false;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot renew the leadership; trying again");
                    next_try = Instant::now() + renew / 4;
                }
                Err(_) => {
                    tracing::warn!(
                        token,
                        "cannot renew the leadership in time (no answer); stopping this replica's work"
                    );
                    break false;
                }
            }
        };
        // No directory call starts from here on.
        store.step_down();
        let _ = stop.send(true);
        if let Some(mut running) = running {
            let drained = tokio::time::timeout(settings.ttl / 6, async {
                while running.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(token, "the leader's work did not stop in time; aborting it");
                running.abort_all();
                // A task stuck on a blocked worker ends when it next runs;
                // the fence goes now, before the term can expire.
                let _ = tokio::time::timeout(settings.ttl / 12, async {
                    while running.join_next().await.is_some() {}
                })
                .await;
            }
        }
        store.set_fence(None);
        crate::metrics::set_leader(kind, false);
        if shutting_down {
            let holder = settings.holder.clone();
            if let Err(e) = off_runtime(&store, move |s| s.resign(&holder, token)).await {
                tracing::warn!(error = %e, "cannot resign the leadership; another replica takes over when it expires");
            }
            return;
        }
    }
}

/// Retention with replicas: a pass runs only on the leader (its commits
/// are fenced), so two replicas never archive the same records.
async fn retention_on_the_leader(
    store: Store,
    clock: Arc<dyn Clock>,
    settings: RetentionSettings,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        if store.fence().is_some() {
            match store.prune(clock.now(), &settings).await {
                Ok(p) => tracing::debug!(?p, "retention pass on the leader"),
                Err(e) => {
                    tracing::warn!(error = %e, "retention pass failed; it runs again at the next interval")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(settings.every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn zsp_monitor(engine: Engine, every: Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        match engine.check_zsp().await {
            Ok(drift) if !drift.is_empty() => tracing::warn!(count = drift.len(), "ZSP drift found"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "ZSP check failed; will try again"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Builds the directory a config names.
pub async fn directory(config: &Config) -> anyhow::Result<Arc<dyn Directory>> {
    Ok(match config.directory.kind {
        DirectoryKind::Memory => Arc::new(MemoryDirectory::from_config(
            config
                .memory
                .as_ref()
                .context("directory.kind = memory needs a [memory] section")?,
        )),
        DirectoryKind::Ldap => {
            let ldap = config
                .ldap
                .as_ref()
                .context("directory.kind = ldap needs an [ldap] section")?;
            let groups: Vec<_> = config.group_configs().cloned().collect();
            Arc::new(crate::directory::ldap::LdapDirectory::new(ldap, &groups)?)
        }
    })
}

/// How long after a lease whose add got no answer has ended jitbot looks
/// for that add once more: one LDAP operation timeout for the request to
/// reach the server's kernel (`TCP_USER_TIMEOUT` on the LDAP sockets is the
/// operation timeout: bytes unacknowledged that long make the kernel drop
/// the connection and the request with it), one more for the server to
/// execute it, and one leadership term, the longest a deposed leader's
/// call can be issued before a new leader acts. A request held longer (a
/// proxy that keeps it, a server stalled past that) can still land later:
/// the bound narrows the window, it cannot close it.
fn recheck_after(config: &Config) -> jitbot_core::Span {
    let operation = config
        .ldap
        .as_ref()
        .map(|l| l.operation_timeout.to_std())
        .unwrap_or(Duration::from_secs(10));
    jitbot_core::Span::from_secs((2 * operation + LEADER_TTL).as_secs().max(1))
}

/// Engine settings from a config.
pub fn engine_settings(config: &Config) -> EngineSettings {
    EngineSettings {
        retry_base: config.scheduler.retry_base,
        retry_max: config.scheduler.retry_max,
        alert_after: config.scheduler.alert_after,
        max_pending_per_user: config.policy.max_pending_per_user,
        recheck_after: recheck_after(config),
    }
}

/// The `[audit] key`, refused when too short to resist guessing.
pub fn audit_key(src: &crate::secret::SecretSource) -> anyhow::Result<crate::secret::Secret> {
    let key = src.resolve().context("audit.key")?;
    let len = key.expose().trim().len();
    if len < crate::config::MIN_AUDIT_KEY_BYTES {
        anyhow::bail!(
            "audit.key: is {len} bytes; use at least {} random bytes (e.g. `openssl rand -hex 32`)",
            crate::config::MIN_AUDIT_KEY_BYTES
        );
    }
    Ok(key)
}

/// How often a PostgreSQL replica pulls other replicas' commits between
/// its own transactions (every transaction pulls first anyway).
const MIRROR_REFRESH: Duration = Duration::from_secs(1);

/// How `[store]` reaches PostgreSQL, when `kind = "postgres"`.
pub fn pg_settings(store: &crate::config::StoreConfig) -> anyhow::Result<Option<crate::store::PgSettings>> {
    if store.kind != crate::config::StoreKind::Postgres {
        return Ok(None);
    }
    let url = store.url.clone().context(
        "store.url: is missing; kind = \"postgres\" needs url = \"postgres://user@host:5432/dbname\"",
    )?;
    let password = match &store.password {
        Some(src) => Some(src.resolve().context("store.password")?),
        None => None,
    };
    Ok(Some(crate::store::PgSettings {
        url,
        password,
        migrate: store.migrate,
        ca_file: store.ca_file.clone(),
        mirror_compression: store.compression,
    }))
}

/// Opens the store `[store]` names: the sled directory, or a replica of
/// the PostgreSQL database with its mirror in `path`.
pub fn open_store(store: &crate::config::StoreConfig) -> anyhow::Result<Store> {
    let opened = match pg_settings(store)? {
        Some(settings) => Store::open_postgres(&store.path, store.cache_mb, &settings)?,
        None => Store::open_with(&store.path, store.cache_mb, store.compression)?,
    };
    if opened.compression() != store.compression {
        let change = match store.kind {
            crate::config::StoreKind::Sled => {
                "`jitbot backup` this store and `jitbot restore --compression …` it into a new, empty directory"
            }
            crate::config::StoreKind::Postgres => {
                "stop this replica and give [store] path a new, empty directory: the mirror is rebuilt from the database"
            }
        };
        tracing::warn!(
            "[store] compression = \"{}\", but the store at {} was created with \"{}\" and keeps it \
             (sled fixes it at creation); to change it, {change}",
            store.compression,
            store.path.display(),
            opened.compression()
        );
    }
    Ok(opened)
}

/// A rollback of the chain with its meta verifies under the key; the last
/// anchor jitbot published outside the store (`[audit] anchor_file`)
/// catches it. Checked in the background once jitbot runs, through the
/// archive when retention is on (the anchor may lie in the archived part):
/// what it reads lives outside the store, and a file someone damaged or
/// replaced (a FIFO, a copy that differs, a huge file) must neither stop
/// nor delay start-up, and with it the revocations. Whatever it finds is
/// reported as tampering, through the alert path.
fn check_against_the_last_anchor(engine: &Engine, archive: Option<std::path::PathBuf>) {
    use crate::store::{AuditCheck, Sealing};
    let engine = engine.clone();
    tokio::spawn(async move {
        let store = engine.store().clone();
        let checked = tokio::task::spawn_blocking(move || match store.last_published_anchor() {
            Ok(None) => Ok(AuditCheck::Intact { records: 0 }),
            Ok(Some(anchor)) => match &archive {
                Some(dir) => store.verify_audit_with_archive(dir, Some(&anchor)).map_err(|e| {
                    (
                        anchor.seq,
                        format!("the audit archive in {} cannot be checked: {e}", dir.display()),
                    )
                }),
                None => store
                    .verify_audit_against(Some(&anchor))
                    .map_err(|e| (anchor.seq, format!("the store's audit chain cannot be read: {e}"))),
            },
            Err(e) => Err((0, format!("it cannot be read: {e}"))),
        })
        .await;
        let (seq, problem) = match checked {
            Ok(Ok(AuditCheck::Intact { .. })) => return,
            Ok(Ok(AuditCheck::Broken { seq, problem })) | Ok(Err((seq, problem))) => (seq, problem),
            Err(e) => {
                tracing::error!(error = %e, "the check against the last published anchor did not finish");
                return;
            }
        };
        let tampered = Sealing::Tampered {
            seq,
            problem: format!("against the last anchor in audit.anchor_file: {problem}"),
            recorded: false,
        };
        if let Err(e) = engine.report_audit_keying(&tampered).await {
            tracing::error!(error = %e, "cannot queue the audit chain alert: {tampered:?}");
        }
    });
}

/// `jitbot run`: everything from the config, until SIGTERM or Ctrl-C.
pub async fn run(config: Config) -> anyhow::Result<()> {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let admin_token = match &config.server.admin_token {
        Some(src) => Some(src.resolve_admin_token().context("server.admin_token")?),
        None => None,
    };
    let store = open_store(&config.store)?;
    if let Some(src) = &config.audit.key {
        store.set_audit_key(audit_key(src)?);
    }
    // Before anything is written: a keyed chain opened without its key, or
    // with another key, is refused here (`StoreError::AuditKey`, exit 64).
    let sealing = store.seal_unkeyed_history(chrono::Utc::now()).await?;
    let retention = config.store.retain.map(|retain| {
        let settings = RetentionSettings::new(retain, config.store.archive_dir());
        // Not fatal: revocations must run whatever the archive's state;
        // every failing pass is counted and alerted on.
        if let Err(e) = crate::store::check_archive_dir(&settings.archive_dir) {
            tracing::error!("retention cannot archive audit records until this is fixed: {e}");
        }
        store.set_archive_dir(settings.archive_dir.clone());
        settings
    });
    if let Some(path) = &config.audit.anchor_file {
        store.set_anchor_file(path.clone());
    }
    let directory = directory(&config).await?;
    let clock: Arc<dyn Clock> = Arc::new(SteadyClock::system());
    let retention_clock = clock.clone();
    let engine = Engine::new(
        config.policy(),
        store,
        directory,
        clock.clone(),
        engine_settings(&config),
    );
    // Through the alert path: delivered once the platforms are up.
    if let Err(e) = engine.report_audit_keying(&sealing).await {
        tracing::error!(error = %e, "cannot queue the audit chain alert: {sealing:?}");
    }
    if config.audit.anchor_file.is_some() && !matches!(sealing, crate::store::Sealing::Tampered { .. }) {
        check_against_the_last_anchor(&engine, retention.as_ref().map(|s| s.archive_dir.clone()));
    }
    let anchor_engine = engine.clone();
    let mut platforms: Vec<(String, Arc<dyn Notifier>)> = Vec::new();
    let routers: Vec<Router> = Vec::new();
    let extra = crate::chat::configure(&config, &engine, clock, &mut platforms)?;
    let notifier: Arc<dyn Notifier> = if platforms.is_empty() {
        Arc::new(LogNotifier)
    } else {
        Arc::new(Fanout::new(platforms))
    };
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("server.listen: cannot listen on {}", config.server.listen))?;
    let admin_listener = TcpListener::bind(config.server.admin_listen)
        .await
        .with_context(|| {
            format!(
                "server.admin_listen: cannot listen on {}",
                config.server.admin_listen
            )
        })?;
    start_up_checks(&engine).await?;
    let store_watch = engine.store().clone();
    let mut running = start(
        Parts {
            engine,
            notifier,
            routers: routers.into_iter().chain(extra.routers).collect(),
            admin_routers: extra.admin_routers,
            admin_token,
            limits: config.server.limits(),
            scheduler: SchedulerSettings {
                max_wait: config.scheduler.max_wait.to_std(),
                concurrency: config.scheduler.concurrency,
            },
            zsp_interval: config.scheduler.zsp_interval.to_std(),
            leader: store_watch.is_postgres().then(|| LeaderSettings {
                holder: format!("{}-{}", std::process::id(), uuid::Uuid::new_v4()),
                ttl: LEADER_TTL,
            }),
            leader_tasks: extra.leader_tasks,
        },
        listener,
        Some(admin_listener),
    )?;
    for task in extra.tasks {
        let rx = running.shutdown_signal();
        running.spawn(task(rx));
    }
    if let Some(every) = config.audit.anchor_every {
        let rx = running.shutdown_signal();
        running.spawn(crate::engine::anchor::run_anchors(
            anchor_engine,
            every.to_std(),
            rx,
        ));
    }
    if let Some(settings) = retention {
        let rx = running.shutdown_signal();
        if store_watch.is_postgres() {
            running.spawn(retention_on_the_leader(
                store_watch.clone(),
                retention_clock,
                settings,
                rx,
            ));
        } else {
            running.spawn(crate::store::retention::run(
                store_watch.clone(),
                retention_clock,
                settings,
                rx,
            ));
        }
    }
    if store_watch.is_postgres() {
        let rx = running.shutdown_signal();
        let engine = running.engine.clone();
        running.spawn(crate::store::pg::refresh_every(
            store_watch.clone(),
            MIRROR_REFRESH,
            move || {
                engine.timers_changed().notify_one();
                engine.outbox_changed().notify_one();
            },
            rx,
        ));
    }
    let failed = store_failure(store_watch);
    tokio::select! {
        _ = wait_for_signal() => {}
        why = failed => {
            // Fail closed: stop, and let the next start recover from disk.
            running.stop(config.server.shutdown_grace.to_std()).await;
            anyhow::bail!("{why}");
        }
    }
    tracing::info!("shutting down");
    running.stop(config.server.shutdown_grace.to_std()).await;
    Ok(())
}

/// `jitbot run`'s start-up work over the store, before the scheduler
/// starts: records the memberships of leases from an older release (until
/// a store has been adopted once), logs the live leases whose group left
/// the config or whose DN changed (reading only the groups that need it),
/// then gives the heap that opening the store and these reads freed back
/// to the operating system (with 1,000,000 live leases, about 30 MiB that
/// glibc would otherwise keep for good).
pub async fn start_up_checks(engine: &Engine) -> anyhow::Result<()> {
    match engine.adopt_legacy_leases().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            leases = n,
            "recorded the memberships of leases from an older jitbot"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot record the memberships of leases from an older jitbot"),
    }
    for note in engine.leases_outside_config()? {
        tracing::warn!("{note}");
    }
    jitbot_heap::release_free_memory();
    Ok(())
}

/// Resolves with the error once the store has failed closed.
async fn store_failure(store: crate::store::Store) -> String {
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Err(e) = store.check_healthy() {
            return e.to_string();
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
