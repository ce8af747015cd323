//! Repeated failover through the real binaries, measured: a real slapd and
//! PostgreSQL, two `jitbot run` replicas on one database, a lease ending
//! every second, and the leader SIGKILLed at random (seeded) points, the
//! killed replica started again each time. Each kill yields one sample:
//! the time from the kill until the survivor has ended every lease due by
//! then and ended one of its own (its first revocation). At the end the
//! invariants are checked over connections of their own: every lease
//! created has ended, `lease.ended` once per lease in the audit, the audit
//! chain intact, and no leased membership left in slapd.
//!
//! Shared by the failover test (`tests/it/failover.rs`) and the bench
//! (`benches/failover.rs`), which differ in the number of kills and what
//! they do with the figures.

use super::postgres::{cluster, Database, PASSWORD};
use super::process::Jitbot;
use super::slapd::{self, Slapd};
use chrono::{DateTime, Utc};
use jitbot::store::{LeaseRecord, Store, TimerKind};
use jitbot_core::policy::GroupPolicy;
use jitbot_core::{Lease, LeaseId, LeaseState, RequestId, Span, UserId};
use ldap3::Mod;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a failover run goes.
#[derive(Clone, Debug)]
pub struct Plan {
    /// How many times the leader is killed.
    pub kills: usize,
    /// Seeds the random kill points.
    pub seed: u64,
    /// The kill comes this long (uniformly at random within the range)
    /// after the previous failover settled: the survivor leads and the
    /// killed replica runs again.
    pub pause: (Duration, Duration),
    /// How long each lease lasts; one is created every second.
    pub lease_life: Duration,
    /// The longest a failover may take before the run gives up on it.
    pub give_up: Duration,
}

impl Plan {
    /// `kills` kills, seeded by `JITBOT_FAILOVER_SEED` or a fixed seed.
    pub fn new(kills: usize) -> Plan {
        let seed = std::env::var("JITBOT_FAILOVER_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(16);
        Plan {
            kills,
            seed,
            pause: (Duration::from_millis(500), Duration::from_millis(4500)),
            lease_life: Duration::from_secs(3),
            give_up: Duration::from_secs(60),
        }
    }
}

/// One kill and its failover.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Kill → every lease due at the kill ended and the survivor's first
    /// revocation committed (by the audit records' times).
    pub revoked: Duration,
    /// Kill → the survivor's `/readyz` says it leads (polled every 100 ms).
    pub leads: Duration,
    /// Leases due at the kill that were not ended yet.
    pub overdue_at_kill: usize,
}

/// What a run measured and found.
#[derive(Debug)]
pub struct Report {
    pub samples: Vec<Sample>,
    /// Leases created during the run.
    pub leases: usize,
    /// Broken invariants, each worded; empty when all held.
    pub broken: Vec<String>,
}

/// The replicas' config on database `url` against `server`: jitbot's
/// defaults for leadership, the scheduler capped at 1 s waits.
fn config(url: &str, server: &Slapd) -> String {
    let ldap = server.ldap_config();
    let pw = ldap
        .password
        .file
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let head = super::postgres::replica_sections(url);
    format!(
        r#"{head}
[scheduler]
max_wait = "1s"
retry_base = "1s"
retry_max = "2s"

[directory]
kind = "ldap"

[ldap]
url = "{ldap_url}"
allow_plaintext_bind = true
bind_dn = "{bind}"
password = {{ file = "{pw}" }}
user_base = "{people}"
placeholder_dn = "{bind}"
connect_timeout = "2s"
operation_timeout = "5s"

[[group]]
name = "db-admins"
dn = "{group}"
requesters = {{ users = ["alice"] }}
approvers = {{ users = ["bob"] }}
default_duration = "1h"
max_duration = "4h"
"#,
        ldap_url = ldap.url,
        bind = slapd::SERVICE_DN,
        people = slapd::PEOPLE,
        group = slapd::DB_ADMINS,
    )
}

/// Each lease created: its id and when it ends.
type Created = Arc<Mutex<Vec<(String, DateTime<Utc>)>>>;

const ENV: [(&str, &str); 1] = [("JITBOT_TEST_PGPW", PASSWORD)];

/// `/readyz` of `bot`'s admin listener ("" when it does not answer).
async fn readyz(bot: &Jitbot) -> String {
    let url = format!("{}/readyz", bot.admin_base);
    match reqwest::get(url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn leads(bot: &Jitbot) -> bool {
    readyz(bot).await == "ready (leader)\n"
}

/// The membership value of lease `i`'s person.
fn member(i: usize) -> String {
    format!("uid=fo{i:05},{}", slapd::PEOPLE)
}

/// Creates a lease every second until `stop`: the person and their
/// membership in slapd first (as a grant would have), then the active
/// lease with its expiry timer, committed by `store` (a replica that never
/// leads). Records each lease's id and end in `created`.
async fn create_leases(
    server: Arc<Slapd>,
    store: Store,
    life: Duration,
    created: Created,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let group = GroupPolicy::new("db-admins", slapd::DB_ADMINS);
    let mut ldap = server.admin().await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for i in 0.. {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let uid = format!("fo{i:05}");
        let dn = member(i);
        let person = vec![
            ("objectClass", HashSet::from(["inetOrgPerson"])),
            ("uid", HashSet::from([uid.as_str()])),
            ("cn", HashSet::from([uid.as_str()])),
            ("sn", HashSet::from(["failover"])),
        ];
        ldap.add(&dn, person)
            .await
            .expect("add person")
            .success()
            .expect("add person");
        ldap.modify(
            slapd::DB_ADMINS,
            vec![Mod::Add("member", HashSet::from([dn.as_str()]))],
        )
        .await
        .expect("add member")
        .success()
        .expect("add member");
        let now = Utc::now();
        let end = now + chrono::Duration::from_std(life).expect("lease life");
        let id = format!("l-fo{i:05}");
        let mut lease = Lease::start(
            LeaseId::new(&id),
            RequestId::new(format!("r-fo{i:05}")),
            &group,
            UserId::new(&uid),
            Span::from_hours(1),
            now,
        );
        lease.expires_at = end;
        lease.record_preexisting(
            false,
            jitbot_core::Membership {
                group: group.dn.clone(),
                attribute: "member".into(),
                value: dn.clone(),
                identity: None,
            },
        );
        lease.state = LeaseState::Active;
        let committed = store
            .update(now, |tx| {
                tx.set_timer(TimerKind::Expire, lease.id.as_str(), lease.expires_at);
                tx.put_lease(LeaseRecord {
                    lease: lease.clone(),
                    origin: None,
                });
                Ok::<(), jitbot::store::StoreError>(())
            })
            .await;
        committed.unwrap_or_else(|e| panic!("commit lease {id}: {e}"));
        created.lock().expect("created").push((id, end));
    }
}

/// The `lease.ended` records so far: lease id → the times it ended at.
fn ended(store: &Store) -> BTreeMap<String, Vec<DateTime<Utc>>> {
    let mut out: BTreeMap<String, Vec<DateTime<Utc>>> = BTreeMap::new();
    for entry in store.audit(0) {
        let entry = entry.expect("audit record");
        if entry.action == "lease.ended" {
            if let Some(lease) = entry.lease {
                out.entry(lease).or_default().push(entry.at);
            }
        }
    }
    out
}

/// Logs of both replicas, for a failure message.
fn logs(replicas: &[Option<Jitbot>]) -> String {
    replicas
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.as_ref().map(|r| (i, r)))
        .map(|(i, r)| {
            let log = r.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            format!("--- replica {i}, last lines:\n{}", tail.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Which of `replicas` says it leads, asked once each.
async fn leading(replicas: &[Option<Jitbot>]) -> Option<usize> {
    for (i, r) in replicas.iter().enumerate() {
        if let Some(r) = r {
            if leads(r).await {
                return Some(i);
            }
        }
    }
    None
}

/// Waits until one of `replicas` leads; its index.
async fn leader(replicas: &[Option<Jitbot>], within: Duration) -> Result<usize, String> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(i) = leading(replicas).await {
            return Ok(i);
        }
        if Instant::now() > deadline {
            return Err(format!("no replica led within {within:?}\n{}", logs(replicas)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `plan`; `Err` when the run itself could not go on (a failover
/// that never came, a replica that did not start), `Ok` with the figures
/// and any broken invariant otherwise.
pub async fn run(plan: &Plan) -> Result<Report, String> {
    let server = Arc::new(Slapd::start());
    let db = Database::create();
    let url = cluster().url(&db.name);
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    // The driver's own replica: it migrates the database, commits the
    // leases and reads the outcome; it never asks to lead.
    let store = Store::open_postgres(&tmp.path().join("driver"), 16, &db.settings())
        .map_err(|e| format!("open the driver's replica: {e}"))?;
    let config = config(&url, &server);
    let mut replicas = vec![Some(Jitbot::start(&config, &ENV).await), None];
    leader(&replicas, Duration::from_secs(30)).await?;
    replicas[1] = Some(Jitbot::start(&config, &ENV).await);

    let created: Created = Arc::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let creator = tokio::spawn(create_leases(
        server.clone(),
        store.clone(),
        plan.lease_life,
        created.clone(),
        stopped,
    ));
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
    let mut samples = Vec::new();
    // Leases flow before the first kill.
    tokio::time::sleep(plan.lease_life).await;
    for kill in 0..plan.kills {
        let pause = rng.gen_range(plan.pause.0..=plan.pause.1);
        tokio::time::sleep(pause).await;
        let old = leader(&replicas, plan.give_up).await?;
        let survivor = 1 - old;
        let killed_at = Utc::now();
        let killed = Instant::now();
        // SIGKILL, and reaped: nothing of the old leader runs after this.
        replicas[old] = None;
        let dead_at = Utc::now();
        let due: Vec<String> = created
            .lock()
            .expect("created")
            .iter()
            .filter(|(_, end)| *end <= killed_at)
            .map(|(id, _)| id.clone())
            .collect();
        store.refresh().map_err(|e| e.to_string())?;
        let before = ended(&store);
        let overdue: Vec<String> = due.into_iter().filter(|id| !before.contains_key(id)).collect();
        let mut leads_after = None;
        let revoked = loop {
            if leads_after.is_none() && leading(&replicas).await == Some(survivor) {
                leads_after = Some(killed.elapsed());
            }
            store.refresh().map_err(|e| e.to_string())?;
            let now_ended = ended(&store);
            let first_own = now_ended
                .values()
                .flatten()
                .filter(|at| **at > dead_at)
                .min()
                .copied();
            let last_overdue = overdue
                .iter()
                .map(|id| now_ended.get(id).and_then(|ats| ats.first().copied()))
                .collect::<Option<Vec<_>>>()
                .map(|ats| ats.into_iter().max());
            if let (Some(first), Some(last)) = (first_own, last_overdue) {
                let done = last.map_or(first, |l| l.max(first));
                break (done - killed_at).to_std().unwrap_or_default();
            }
            if killed.elapsed() > plan.give_up {
                return Err(format!(
                    "kill {kill}: the survivor had not revoked what was due {:?} after the leader was killed (overdue at the kill: {overdue:?})\n{}",
                    plan.give_up,
                    logs(&replicas)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let leads_after = match leads_after {
            Some(d) => d,
            None => {
                leader(&replicas, plan.give_up).await?;
                killed.elapsed()
            }
        };
        let sample = Sample {
            revoked,
            leads: leads_after,
            overdue_at_kill: overdue.len(),
        };
        println!(
            "failover {}: leader killed after a pause of {:.2}s; survivor leads after {:.2}s, has revoked what was due after {:.2}s ({} leases overdue at the kill)",
            kill + 1,
            pause.as_secs_f64(),
            sample.leads.as_secs_f64(),
            sample.revoked.as_secs_f64(),
            sample.overdue_at_kill
        );
        samples.push(sample);
        // The killed replica comes back as a follower.
        replicas[old] = Some(Jitbot::start(&config, &ENV).await);
    }
    let _ = stop.send(true);
    creator
        .await
        .map_err(|e| format!("the lease creator failed: {e}"))?;
    let created: Vec<(String, DateTime<Utc>)> = created.lock().expect("created").clone();
    let last_end = created.iter().map(|(_, end)| *end).max();

    // Every lease created ends, with some slack after the last is due.
    let deadline = Instant::now() + plan.give_up;
    let mut broken = Vec::new();
    loop {
        store.refresh().map_err(|e| e.to_string())?;
        let now_ended = ended(&store);
        let open: Vec<&String> = created
            .iter()
            .map(|(id, _)| id)
            .filter(|id| !now_ended.contains_key(*id))
            .collect();
        let past_last = last_end.is_none_or(|end| Utc::now() > end + chrono::Duration::seconds(2));
        if open.is_empty() && past_last {
            break;
        }
        if Instant::now() > deadline {
            broken.push(format!(
                "lost: {} of {} leases never ended: {open:?}",
                open.len(),
                created.len()
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    check(&store, &server, &created, &mut broken).await;
    if !broken.is_empty() {
        broken.push(logs(&replicas));
    }
    Ok(Report {
        samples,
        leases: created.len(),
        broken,
    })
}

/// The invariants, read from the driver's replica and from slapd over a
/// connection of its own.
async fn check(store: &Store, server: &Slapd, created: &[(String, DateTime<Utc>)], broken: &mut Vec<String>) {
    let now_ended = ended(store);
    for (id, ats) in &now_ended {
        if ats.len() != 1 {
            broken.push(format!("lease {id} ended {} times: {ats:?}", ats.len()));
        }
    }
    let leases: BTreeMap<String, LeaseState> = store
        .leases()
        .expect("leases")
        .into_iter()
        .map(|l| (l.lease.id.to_string(), l.lease.state))
        .collect();
    for (id, _) in created {
        match leases.get(id) {
            Some(LeaseState::Ended) => {}
            other => broken.push(format!("lease {id} is {other:?} in the store, not ended")),
        }
    }
    match store.verify_audit() {
        Ok(jitbot::store::AuditCheck::Intact { .. }) => {}
        other => broken.push(format!("the audit chain is not intact: {other:?}")),
    }
    match store.check_consistency() {
        Ok(problems) if problems.is_empty() => {}
        other => broken.push(format!("the store is inconsistent: {other:?}")),
    }
    let members = server.values(slapd::DB_ADMINS, "member").await;
    let left: Vec<&String> = members.iter().filter(|m| m.starts_with("uid=fo")).collect();
    if !left.is_empty() {
        broken.push(format!(
            "memberships left in slapd after every lease ended: {left:?}"
        ));
    }
}
