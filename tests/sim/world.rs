//! One simulated deployment: the real engine and sled store, the parking
//! directory, a manual clock, a recording chat platform, and the simulator's
//! own record of which memberships are standing (put there by people).

use super::directory::{Gate, Outcome, SimDirectory};
use super::ops::{Op, APPROVERS, GROUP_NAMES, REQUESTERS};
use async_trait::async_trait;
use chrono::{Duration, TimeZone, Utc};
use jitbot::clock::ManualClock;
use jitbot::directory::memory::MemoryDirectory;
use jitbot::engine::{Caller, Engine, EngineSettings};
use jitbot::ports::{ApprovalCard, ChatError, MessageRef, Notice, Notifier};
use jitbot::store::{OutboxItem, Store, StoreError, TimerKind};
use jitbot_core::policy::{GroupPolicy, Policy};
use jitbot_core::request::RequestState;
use jitbot_core::{Command, GroupDn, GroupName, LeaseState, Principals, Span, UserId};
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use tokio::task::JoinHandle;

pub const DB: &str = "cn=db-admins,ou=groups,dc=sim";
pub const WEB: &str = "cn=web-admins,ou=groups,dc=sim";
pub const WEB2: &str = "cn=web-ops,ou=groups,dc=sim";
pub const OPS: &str = "cn=ops-admins,ou=groups,dc=sim";
/// Approvers of `ops-admins` by group (so every command asks the directory).
pub const SEC: &str = "cn=security,ou=groups,dc=sim";
/// The groups whose members the invariants check.
pub const MANAGED: [&str; 4] = [DB, WEB, WEB2, OPS];

/// The DNs a group name has had in any configuration.
pub fn dns_of(group: &str) -> &'static [&'static str] {
    match group {
        "db-admins" | "database-admins" => &[DB],
        "web-admins" => &[WEB, WEB2],
        "ops-admins" => &[OPS],
        _ => &[],
    }
}

fn users(names: &[&str]) -> Principals {
    let mut p = Principals::default();
    for n in names {
        p.users.insert(UserId::new(*n));
    }
    p
}

/// Configuration `variant`: 0 the base, 1 drops `web-admins`, 2 renames
/// `db-admins`, 3 moves `web-admins` to another DN, 4 lowers limits.
pub fn policy(variant: u8) -> Policy {
    let mut db = GroupPolicy::new("db-admins", DB);
    db.zsp = true;
    db.requesters = users(&REQUESTERS);
    db.approvers = users(&["bob", "carol"]);
    db.max_duration = Span::from_hours(4);
    db.max_total_duration = Span::from_hours(8);
    db.expiry_warning = Some(Span::from_mins(10));
    let mut web = GroupPolicy::new("web-admins", WEB);
    web.requesters = users(&REQUESTERS);
    web.approvers = users(&["bob"]);
    web.break_glass = true;
    let mut ops = GroupPolicy::new("ops-admins", OPS);
    ops.requesters = users(&["alice", "erin"]);
    ops.approvers = users(&["bob"]);
    ops.approvers.groups.insert(GroupDn::new(SEC));
    ops.approvals_required = 2;
    ops.extension_requires_approval = true;
    // Members without a lease are removed by the ZSP monitor here.
    ops.zsp = true;
    ops.remediate = true;
    match variant {
        1 => return with_admins(vec![db, ops]),
        2 => db.name = GroupName::new("database-admins"),
        3 => web.dn = GroupDn::new(WEB2),
        4 => {
            db.max_duration = Span::from_hours(1);
            db.max_total_duration = Span::from_hours(2);
            ops.max_total_duration = Span::from_hours(2);
        }
        _ => {}
    }
    with_admins(vec![db, web, ops])
}

fn with_admins(groups: Vec<GroupPolicy>) -> Policy {
    Policy {
        groups,
        admins: users(&["root"]),
    }
}

/// A chat platform that records what it was asked to send, and fails while
/// "down".
#[derive(Default)]
pub struct SimChat {
    pub down: AtomicBool,
    pub sent: Mutex<Vec<Notice>>,
    cards: AtomicU64,
}

impl SimChat {
    fn up(&self) -> Result<(), ChatError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(ChatError::Unavailable("sim: chat down".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl Notifier for SimChat {
    async fn post_approval(&self, _card: &ApprovalCard) -> Result<Vec<MessageRef>, ChatError> {
        self.up()?;
        let n = self.cards.fetch_add(1, Ordering::SeqCst);
        Ok(vec![MessageRef {
            platform: "sim".into(),
            channel: "approvals".into(),
            id: n.to_string(),
            copy: Default::default(),
            shows: None,
        }])
    }
    async fn update_approval(&self, _at: &MessageRef, _card: &ApprovalCard) -> Result<(), ChatError> {
        self.up()
    }
    async fn send(&self, notice: &Notice) -> Result<(), ChatError> {
        self.up()?;
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(notice.clone());
        Ok(())
    }
}

/// What broke, and where.
#[derive(Clone, Debug)]
pub struct Violation {
    /// `I1` … `I6`, `standing` or `stuck`.
    pub invariant: &'static str,
    pub detail: String,
}

struct Task {
    label: String,
    handle: JoinHandle<()>,
    /// A timer task, as (kind, id): the scheduler runs one at a time.
    timer: Option<(TimerKind, String)>,
    /// Its last poll returned `Pending` and nothing has woken it since.
    idle: Arc<AtomicBool>,
}

/// A task's future, watched: `idle` is set when a poll returns `Pending`
/// without the task having woken itself, and cleared when it is woken.
struct Tracked {
    work: Pin<Box<dyn Future<Output = ()> + Send>>,
    idle: Arc<AtomicBool>,
}

struct TrackedWaker {
    idle: Arc<AtomicBool>,
    inner: Waker,
}

impl Wake for TrackedWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.idle.store(false, Ordering::SeqCst);
        self.inner.wake_by_ref();
    }
}

impl Future for Tracked {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.idle.store(true, Ordering::SeqCst);
        let waker = Waker::from(Arc::new(TrackedWaker {
            idle: self.idle.clone(),
            inner: cx.waker().clone(),
        }));
        let poll = self.work.as_mut().poll(&mut Context::from_waker(&waker));
        if poll.is_ready() {
            self.idle.store(false, Ordering::SeqCst);
        }
        poll
    }
}

pub struct World {
    pub engine: Option<Engine>,
    pub clock: ManualClock,
    pub dir: Arc<MemoryDirectory>,
    pub gate: Arc<Gate>,
    /// Adds held on the wire (`Outcome::Late`), landed by [`World::land`].
    pub on_the_wire: Arc<Mutex<Vec<jitbot::ports::Membership>>>,
    pub chat: Arc<SimChat>,
    pub variant: u8,
    /// Members people put in groups (not jitbot), by group DN.
    pub standing: BTreeMap<&'static str, BTreeSet<String>>,
    /// Outbox entries seen, by id (for I6).
    pub outbox_seen: BTreeMap<u64, Notice>,
    /// What each step and each finished task did, for the trace.
    pub log: Arc<Mutex<Vec<String>>>,
    /// Steps applied so far.
    pub steps: u64,
    /// Seconds the clock was stepped back since the last quiesce: timers
    /// are fired by their wall-clock due time here (the scheduler is not
    /// simulated), so a step back delays them by as much.
    stepped_back: i64,
    tasks: Vec<Task>,
    tmp: tempfile::TempDir,
    path: PathBuf,
    stores: u32,
    jitter: Arc<AtomicU64>,
}

pub const SETTINGS_RETRY_MAX_SECS: i64 = 300;
pub const MAX_WAIT_SECS: i64 = 60;

fn settings() -> EngineSettings {
    EngineSettings {
        retry_base: Span::from_secs(5),
        retry_max: Span::from_secs(SETTINGS_RETRY_MAX_SECS as u64),
        alert_after: 3,
        // The simulator checks the lease guarantees, not flood control: no
        // cap, so its request mix is not thinned out.
        max_pending_per_user: usize::MAX,
        recheck_after: Span::from_secs(30),
    }
}

/// A RAM-backed place for stores where there is one: the simulator opens
/// thousands, and a flush there costs nothing.
fn tempdir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::tempdir_in(shm) {
            return dir;
        }
    }
    tempfile::tempdir().expect("a temporary directory for the simulated store")
}

/// Opens the store at `path`. After a crash sled's background threads may
/// hold the old handle's file lock for a moment: wait for them.
fn open_store(path: &std::path::Path) -> Store {
    for _ in 0..400 {
        match Store::open(path, 4) {
            Ok(store) => return store,
            Err(StoreError::Locked { .. }) => std::thread::sleep(std::time::Duration::from_millis(5)),
            Err(e) => panic!("cannot open the simulated store at {}: {e}", path.display()),
        }
    }
    panic!(
        "the simulated store at {} stayed locked for 2 s after a crash",
        path.display()
    )
}

impl World {
    pub fn new(seed: u64) -> World {
        let dir = MemoryDirectory::new();
        for u in REQUESTERS.iter().chain(APPROVERS.iter()) {
            dir.add_user(u, [("mail", format!("{u}@sim").as_str())]);
        }
        dir.add_group(DB, []);
        dir.add_group(WEB, ["dave"]);
        dir.add_group(WEB2, []);
        dir.add_group(OPS, []);
        dir.add_group(SEC, ["carol"]);
        let mut standing: BTreeMap<&'static str, BTreeSet<String>> =
            MANAGED.iter().map(|g| (*g, BTreeSet::new())).collect();
        standing.entry(WEB).or_default().insert("dave".into());
        let tmp = tempdir();
        let mut world = World {
            engine: None,
            clock: ManualClock::new(
                Utc.with_ymd_and_hms(2026, 3, 1, 9, 0, 0)
                    .single()
                    .expect("a valid start time"),
            ),
            dir: Arc::new(dir),
            gate: Arc::new(Gate::default()),
            on_the_wire: Default::default(),
            chat: Arc::new(SimChat::default()),
            variant: 0,
            standing,
            outbox_seen: BTreeMap::new(),
            log: Arc::new(Mutex::new(Vec::new())),
            steps: 0,
            stepped_back: 0,
            tasks: Vec::new(),
            path: tmp.path().join("store-0"),
            tmp,
            stores: 0,
            jitter: Arc::new(AtomicU64::new(seed)),
        };
        let store = open_store(&world.path);
        world.start(store);
        world
    }

    fn start(&mut self, store: Store) {
        store.flush_inline();
        let directory = Arc::new(SimDirectory {
            inner: self.dir.clone(),
            gate: self.gate.clone(),
            on_the_wire: self.on_the_wire.clone(),
        });
        let jitter = self.jitter.clone();
        let engine = Engine::new(
            policy(self.variant),
            store,
            directory,
            Arc::new(self.clock.clone()),
            settings(),
        )
        .with_jitter(move || {
            // splitmix64: deterministic and spread out.
            let mut z = jitter.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::SeqCst);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as f64 / u64::MAX as f64
        });
        self.engine = Some(engine);
    }

    pub fn engine(&self) -> &Engine {
        self.engine.as_ref().expect("the engine runs between steps")
    }

    pub fn note(&self, line: String) {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push(line);
    }

    /// Starts `work` as a task and runs until everything in flight has
    /// finished or waits (on the directory, or on another task).
    async fn spawn(
        &mut self,
        label: String,
        timer: Option<(TimerKind, String)>,
        work: impl Future<Output = String> + Send + 'static,
    ) -> Result<(), Violation> {
        let log = self.log.clone();
        let name = label.clone();
        let idle = Arc::new(AtomicBool::new(false));
        let handle = tokio::spawn(Tracked {
            work: Box::pin(async move {
                let said = work.await;
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("    {name} → {said}"));
            }),
            idle: idle.clone(),
        });
        self.tasks.push(Task {
            label,
            handle,
            timer,
            idle,
        });
        self.settle().await
    }

    /// Runs the tasks until every one has finished or waits with nothing to
    /// wake it but the simulator (a parked directory call, or a lock held by
    /// a task that is parked). Nothing outside this thread wakes a task (the
    /// store flushes inline), so the order of everything is the seed's.
    pub async fn settle(&mut self) -> Result<(), Violation> {
        for _ in 0..1_000_000 {
            self.tasks.retain(|t| !t.handle.is_finished());
            if self.tasks.iter().all(|t| t.idle.load(Ordering::SeqCst)) {
                return Ok(());
            }
            tokio::task::yield_now().await;
        }
        Err(Violation {
            invariant: "stuck",
            detail: format!(
                "tasks {:?} keep running without finishing or waiting (parked: {:?})",
                self.tasks.iter().map(|t| &t.label).collect::<Vec<_>>(),
                self.gate.describe()
            ),
        })
    }

    fn caller(user: &str) -> Caller {
        Caller::new(user, None)
    }

    async fn command(&mut self, user: &str, command: Command) -> Result<(), Violation> {
        let engine = self.engine().clone();
        let label = format!("{user}: {command:?}");
        let caller = Self::caller(user);
        self.spawn(label, None, async move {
            let reply = engine.execute(&caller, command).await;
            format!("{} {}", if reply.ok { "ok" } else { "refused" }, reply.text)
        })
        .await
    }

    fn requests(&self, prefer_pending: bool) -> Vec<(String, String)> {
        let all = self.engine().store().requests().unwrap_or_default();
        let pending: Vec<_> = all
            .iter()
            .filter(|r| r.request.state == RequestState::Pending)
            .map(|r| (r.request.id.to_string(), r.request.requester.to_string()))
            .collect();
        if prefer_pending && !pending.is_empty() {
            return pending;
        }
        all.iter()
            .map(|r| (r.request.id.to_string(), r.request.requester.to_string()))
            .collect()
    }

    /// Leases, live ones first in line for picks.
    fn leases(&self) -> Vec<(String, String)> {
        let all = self.engine().store().leases().unwrap_or_default();
        let live: Vec<_> = all
            .iter()
            .filter(|l| l.lease.state != LeaseState::Ended)
            .map(|l| (l.lease.id.to_string(), l.lease.user.to_string()))
            .collect();
        if !live.is_empty() {
            return live;
        }
        all.iter()
            .map(|l| (l.lease.id.to_string(), l.lease.user.to_string()))
            .collect()
    }

    fn pick<T: Clone>(items: &[T], pick: u32) -> Option<T> {
        (!items.is_empty()).then(|| items[pick as usize % items.len()].clone())
    }

    /// Applies one operation. Uses no randomness: the operation holds its
    /// choices, so a trace replays exactly.
    pub async fn apply(&mut self, op: &Op) -> Result<(), Violation> {
        match *op {
            Op::Request {
                user,
                group,
                hours,
                break_glass,
            } => {
                let group = GroupName::new(GROUP_NAMES[group as usize % GROUP_NAMES.len()]);
                let duration = hours.map(|h| Span::from_hours(u64::from(h)));
                let reason = "sim".to_string();
                let command = if break_glass {
                    Command::BreakGlass {
                        group,
                        duration,
                        reason,
                    }
                } else {
                    Command::Request {
                        group,
                        duration,
                        reason,
                    }
                };
                self.command(REQUESTERS[user as usize % 3], command).await
            }
            Op::Approve { by, pick } => match Self::pick(&self.requests(true), pick) {
                Some((request, _)) => {
                    self.command(
                        APPROVERS[by as usize % 3],
                        Command::Approve {
                            request,
                            duration: None,
                        },
                    )
                    .await
                }
                None => Ok(()),
            },
            Op::Deny { by, pick } => match Self::pick(&self.requests(true), pick) {
                Some((request, _)) => {
                    let reason = "sim says no".into();
                    self.command(APPROVERS[by as usize % 3], Command::Deny { request, reason })
                        .await
                }
                None => Ok(()),
            },
            Op::Cancel { pick } => match Self::pick(&self.requests(true), pick) {
                Some((request, who)) => self.command(&who, Command::Cancel { request }).await,
                None => Ok(()),
            },
            Op::Release { pick } => match Self::pick(&self.leases(), pick) {
                Some((target, who)) => self.command(&who, Command::Release { target }).await,
                None => Ok(()),
            },
            Op::Extend { pick, hours } => match Self::pick(&self.leases(), pick) {
                Some((target, who)) => {
                    let duration = Span::from_hours(u64::from(hours));
                    self.command(&who, Command::Extend { target, duration }).await
                }
                None => Ok(()),
            },
            Op::Revoke { by, pick } => match Self::pick(&self.leases(), pick) {
                Some((lease, _)) => {
                    let reason = "sim revokes".into();
                    self.command(APPROVERS[by as usize % 3], Command::Revoke { lease, reason })
                        .await
                }
                None => Ok(()),
            },
            Op::AdminRevoke { pick } => match Self::pick(&self.leases(), pick) {
                Some((lease, _)) => {
                    let engine = self.engine().clone();
                    self.spawn(format!("admin API: revoke {lease}"), None, async move {
                        match engine.revoke_as_admin(&lease, "sim admin", "root").await {
                            Ok(s) => s,
                            Err(e) => format!("error: {e}"),
                        }
                    })
                    .await
                }
                None => Ok(()),
            },
            Op::Directory { pick, outcome } => self.release(pick, outcome).await,
            Op::Fire => self.fire().await,
            Op::Advance { secs } => {
                self.land().await;
                self.clock.advance(Duration::seconds(i64::from(secs)));
                Ok(())
            }
            Op::Back { secs } => {
                self.clock.advance(-Duration::seconds(i64::from(secs)));
                self.stepped_back += i64::from(secs);
                Ok(())
            }
            Op::Operator { add, user, group } => {
                let dn = MANAGED[group as usize % MANAGED.len()];
                let user = REQUESTERS[user as usize % 3];
                let present = self.dir.members(dn).contains(user);
                let gid = GroupDn::new(dn);
                let uid = UserId::new(user);
                use jitbot::ports::Directory as _;
                if add && !present {
                    let _ = self.dir.add_member(&gid, &uid).await;
                    // While a live lease of this user already owns this
                    // membership (granted, or being revoked), the value in
                    // the directory is that lease's: jitbot cannot tell a
                    // person's add of the same value from its own, and the
                    // lease's end removes it (ARCHITECTURE.md, "A lease
                    // removes exactly what it wrote"). Only an add while no
                    // lease owns it makes a standing membership.
                    let owned = self
                        .engine()
                        .store()
                        .live_leases()
                        .unwrap_or_default()
                        .iter()
                        .any(|l| {
                            l.lease.user.as_str().eq_ignore_ascii_case(user)
                                && l.lease.owns_membership()
                            // A lease still granting has not added yet: its
                            // add finds the value present and leaves it as
                            // the person's.
                            && matches!(l.lease.state, LeaseState::Active | LeaseState::Revoking)
                                && l.lease
                                    .membership
                                    .as_ref()
                                    .is_some_and(|m| m.group.as_str() == dn)
                        });
                    if owned {
                        self.note(format!(
                            "    operator added {user} to {dn} (absorbed by a live lease)"
                        ));
                    } else {
                        self.standing.entry(dn).or_default().insert(user.to_string());
                        self.note(format!("    operator added {user} to {dn}"));
                    }
                } else if !add && present {
                    let _ = self.dir.remove_member(&gid, &uid).await;
                    self.standing.entry(dn).or_default().remove(user);
                    self.note(format!("    operator removed {user} from {dn}"));
                }
                Ok(())
            }
            Op::Drain => {
                self.observe_outbox();
                let engine = self.engine().clone();
                jitbot::chat::outbox::drain(&engine, self.chat.as_ref()).await;
                Ok(())
            }
            Op::Chat { down } => {
                self.chat.down.store(down, Ordering::SeqCst);
                Ok(())
            }
            Op::Zsp => {
                let engine = self.engine().clone();
                self.spawn("ZSP monitor".into(), None, async move {
                    match engine.check_zsp().await {
                        Ok(found) => format!("drift {found:?}"),
                        Err(e) => format!("error: {e}"),
                    }
                })
                .await
            }
            Op::Crash => {
                self.crash().await;
                let store = open_store(&self.path);
                self.start(store);
                self.fire().await
            }
            Op::Reload { variant } => {
                self.crash().await;
                self.variant = variant % 5;
                self.note(format!("    restarted with configuration {}", self.variant));
                let store = open_store(&self.path);
                self.start(store);
                self.fire().await
            }
            Op::BackupRestore => {
                let mut backup = Vec::new();
                if let Err(e) = self.engine().store().backup(&mut backup) {
                    return Err(Violation {
                        invariant: "backup",
                        detail: format!("backup failed: {e}"),
                    });
                }
                self.crash().await;
                self.stores += 1;
                self.path = self.tmp.path().join(format!("store-{}", self.stores));
                let store = open_store(&self.path);
                if let Err(e) = store.restore(&backup[..]).await {
                    return Err(Violation {
                        invariant: "backup",
                        detail: format!("restoring a backup taken a moment ago failed: {e}"),
                    });
                }
                self.start(store);
                self.fire().await
            }
            Op::Quiesce => self.quiesce().await,
            Op::DiskFull => {
                self.engine().store().fail_next_flush();
                Ok(())
            }
        }
    }

    /// A store that failed closed (a flush failed) stops jitbot: restart it
    /// from disk, as its supervisor would.
    pub async fn restart_if_failed(&mut self) -> Result<(), Violation> {
        if self.engine().store().check_healthy().is_ok() {
            return Ok(());
        }
        self.note("    store failed closed; restarting".into());
        self.crash().await;
        let store = open_store(&self.path);
        self.start(store);
        self.fire().await
    }

    /// Adds held on the wire reach the directory now: always before the
    /// clock moves on, so within any settle delay after they were sent.
    async fn land(&mut self) {
        let held = std::mem::take(&mut *self.on_the_wire.lock().unwrap_or_else(|p| p.into_inner()));
        for m in held {
            self.note(format!(
                "    directory: late add of {} to {} lands",
                m.value, m.group
            ));
            let _ = jitbot::ports::Directory::add_membership(self.dir.as_ref(), &m).await;
        }
    }

    /// Answers one parked directory call; its task runs to its next park.
    async fn release(&mut self, pick: u32, outcome: Outcome) -> Result<(), Violation> {
        if let Some(call) = self.gate.take(pick as usize) {
            self.note(format!("    directory: {} ← {outcome:?}", call.what));
            call.release(outcome);
        }
        self.settle().await
    }

    /// Starts every due timer that is not already running, one at a time.
    async fn fire(&mut self) -> Result<(), Violation> {
        let now = self.engine().now();
        let due = self.engine().store().due_timers(now, 16).unwrap_or_default();
        let running: HashSet<(TimerKind, String)> =
            self.tasks.iter().filter_map(|t| t.timer.clone()).collect();
        for timer in due {
            let key = (timer.kind, timer.id.clone());
            if running.contains(&key) {
                continue;
            }
            let engine = self.engine().clone();
            let label = format!("timer {:?} {}", timer.kind, timer.id);
            self.spawn(label, Some(key), async move {
                engine.fire(timer).await;
                "done".into()
            })
            .await?;
        }
        Ok(())
    }

    /// A crash: every task dies wherever it is; the engine and store go.
    async fn crash(&mut self) {
        for t in &self.tasks {
            t.handle.abort();
        }
        for t in self.tasks.drain(..) {
            let _ = t.handle.await;
        }
        self.gate.parked.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.engine = None;
        self.note("    crash".into());
    }

    /// Directory up, every parked call answered, every due timer run, again
    /// until nothing moves; then one retry window later the same. Leases
    /// that were past their end before must have ended (I3).
    pub async fn quiesce(&mut self) -> Result<(), Violation> {
        self.land().await;
        self.run_out().await?;
        let now0 = self.engine().now();
        let overdue: Vec<String> = self
            .engine()
            .store()
            .leases()
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l.lease.state != LeaseState::Ended && l.lease.expires_at <= now0)
            .map(|l| l.lease.id.to_string())
            .collect();
        let window = MAX_WAIT_SECS + SETTINGS_RETRY_MAX_SECS + std::mem::take(&mut self.stepped_back);
        self.clock.advance(Duration::seconds(window));
        self.run_out().await?;
        for id in overdue {
            let lease = self
                .engine()
                .store()
                .lease(&jitbot_core::LeaseId::new(id.as_str()))
                .ok()
                .flatten();
            if let Some(l) = lease.filter(|l| l.lease.state != LeaseState::Ended) {
                return Err(Violation {
                    invariant: "I3",
                    detail: format!(
                        "lease {id} ({} on {}) was past its end at {now0} and is still {:?} {} later with the directory up (attempts {}, last error {:?})",
                        l.lease.user,
                        l.lease.group,
                        l.lease.state,
                        Span::from_secs(window.max(1) as u64),
                        l.lease.revoke_attempts,
                        l.lease.last_error
                    ),
                });
            }
        }
        Ok(())
    }

    async fn run_out(&mut self) -> Result<(), Violation> {
        for _ in 0..200 {
            while self.gate.parked_len() > 0 {
                self.release(0, Outcome::Ok).await?;
            }
            let now = self.engine().now();
            if self
                .engine()
                .store()
                .due_timers(now, 1)
                .unwrap_or_default()
                .is_empty()
            {
                if !self.tasks.is_empty() {
                    return Err(Violation {
                        invariant: "stuck",
                        detail: format!(
                            "with every directory call answered, tasks {:?} still wait (a deadlock)",
                            self.tasks.iter().map(|t| &t.label).collect::<Vec<_>>()
                        ),
                    });
                }
                return Ok(());
            }
            self.fire().await?;
        }
        Err(Violation {
            invariant: "I3",
            detail: format!(
                "timers keep firing with the directory up: {:?}",
                self.engine()
                    .store()
                    .due_timers(self.engine().now(), 5)
                    .unwrap_or_default()
            ),
        })
    }

    /// Records outbox entries as they appear (for I6).
    pub fn observe_outbox(&mut self) {
        for (id, item, _) in self.engine().store().outbox(10_000).unwrap_or_default() {
            if let OutboxItem::Send { notice } = item {
                self.outbox_seen.entry(id).or_insert(notice);
            }
        }
    }
}
