//! Service tests: the engine with the in-memory directory, a real sled store
//! and a manual clock. Crashes are simulated by dropping the engine while a
//! directory call hangs, then reopening the store.

use crate::support::bot::{policy, Backend, TestBot, DB, WEB};
use crate::support::forward::{Forward, Hooks};
use async_trait::async_trait;
use chrono::Duration;
use jitbot::directory::memory::MemoryDirectory;
use jitbot::ports::{Added, Directory, DirectoryError, Membership};
use jitbot::store::AuditCheck;
use jitbot_core::{EndReason, LeaseState, UserId};
use std::sync::atomic::Ordering;
use std::sync::Arc;

crate::both_stores!(request_approve_expire);
async fn request_approve_expire(backend: Backend) {
    let bot = backend.builder().build();
    let text = bot.ok("alice", "request db-admins 2h fixing replication").await;
    let id = TestBot::request_id(&text);
    assert!(!bot.is_member(DB, "alice"));
    assert!(
        bot.ok("alice", "list").await.contains(&id),
        "a pending request is listed"
    );
    assert!(bot.ok("bob", "pending").await.contains(&id), "and waits for bob");
    let approved = bot.ok("bob", &format!("approve {id}")).await;
    assert!(approved.contains("Approved"), "{approved}");
    assert!(bot.is_member(DB, "alice"), "membership added on approval");
    let lease = bot.lease();
    assert_eq!(lease.state, LeaseState::Active);
    assert_eq!(lease.preexisting, Some(false));
    assert!(bot.ok("alice", "list").await.contains(lease.id.as_str()));
    assert_eq!(bot.engine.counts().unwrap(), (1, 0));

    bot.advance(Duration::minutes(119));
    bot.run_due().await;
    assert!(bot.is_member(DB, "alice"), "not yet");
    bot.advance(Duration::minutes(1));
    bot.run_due().await;
    assert!(!bot.is_member(DB, "alice"), "removed at expiry");
    let lease = bot.lease();
    assert_eq!(lease.state, LeaseState::Ended);
    assert_eq!(lease.end_reason, Some(EndReason::Expired));
    assert!(bot.ok("alice", "list").await.contains("no leases"));
    assert_eq!(bot.engine.counts().unwrap(), (0, 0));
    let actions = bot.audit_actions();
    for want in [
        "request.opened",
        "request.approval",
        "lease.granting",
        "lease.granted",
        "lease.revoking",
        "lease.ended",
    ] {
        assert!(
            actions.iter().any(|a| a == want),
            "audit lacks {want}: {actions:?}"
        );
    }
    assert_eq!(
        bot.engine.store().verify_audit().unwrap(),
        AuditCheck::Intact {
            records: actions.len() as u64
        }
    );
}

crate::both_stores!(refusals_change_nothing);
async fn refusals_change_nothing(backend: Backend) {
    let bot = backend.builder().build();
    let cases = [
        ("mallory", "request db-admins 1h x", "may not request"),
        ("alice", "request nope 1h x", "no group called"),
        ("alice", "request db-admins 9h x", "longer than"),
        ("alice", "request db-admins 1h", "needs a reason"),
    ];
    for (who, text, want) in cases {
        let reply = bot.say(who, text).await;
        assert!(
            !reply.ok && reply.text.contains(want),
            "{who} {text}: {}",
            reply.text
        );
    }
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    for (who, want) in [("alice", "own request"), ("dave", "not an approver")] {
        let reply = bot.say(who, &format!("approve {id}")).await;
        assert!(!reply.ok && reply.text.contains(want), "{who}: {}", reply.text);
    }
    assert!(bot.engine.store().leases().unwrap().is_empty());
    bot.ok("carol", &format!("deny {id} not during the freeze")).await;
    let reply = bot.say("bob", &format!("approve {id}")).await;
    assert!(!reply.ok && reply.text.contains("denied"), "{}", reply.text);
    assert!(bot.engine.store().leases().unwrap().is_empty());
    assert!(!bot.is_member(DB, "alice"));
}

crate::both_stores!(early_release_and_admin_revoke);
async fn early_release_and_admin_revoke(backend: Backend) {
    let bot = backend.builder().build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    let refused = bot.say("dave", "release db-admins").await;
    assert!(!refused.ok, "{}", refused.text);
    bot.ok("alice", "release db-admins").await;
    assert!(!bot.is_member(DB, "alice"));
    assert_eq!(bot.lease().end_reason, Some(EndReason::Released));

    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h again").await);
    bot.ok("bob", &format!("approve {id}")).await;
    let lease = bot
        .engine
        .store()
        .live_lease(&jitbot_core::GroupName::new("db-admins"), &UserId::new("alice"))
        .unwrap()
        .unwrap();
    bot.ok("root", &format!("revoke {lease} left the team")).await;
    assert!(!bot.is_member(DB, "alice"));
    assert!(bot.engine.store().timer_count() == 0, "nothing left scheduled");
}

crate::both_stores!(standing_membership_is_never_removed);
async fn standing_membership_is_never_removed(backend: Backend) {
    let bot = backend.builder().build();
    assert!(bot.is_member(WEB, "dave"));
    let id = TestBot::request_id(&bot.ok("dave", "request web-admins 1h deploy").await);
    bot.ok("bob", &format!("approve {id}")).await;
    assert_eq!(bot.lease().preexisting, Some(true));
    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    assert!(
        bot.is_member(WEB, "dave"),
        "a membership jitbot did not add stays"
    );
    assert_eq!(bot.dir.changes.load(Ordering::SeqCst), 0);
}

crate::both_stores!(second_request_becomes_an_extension);
async fn second_request_becomes_an_extension(backend: Backend) {
    let bot = backend.builder().build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    let first = bot.lease();
    let text = bot.ok("alice", "request db-admins 1h more").await;
    assert!(text.contains("extension"), "{text}");
    let ext = TestBot::request_id(&text);
    bot.ok("carol", &format!("approve {ext}")).await;
    let lease = bot.lease();
    assert_eq!(lease.id, first.id, "never a second lease");
    assert_eq!(lease.expires_at, first.expires_at + Duration::hours(1));
    bot.advance(Duration::minutes(90));
    bot.run_due().await;
    assert!(bot.is_member(DB, "alice"), "the extension holds");
    bot.advance(Duration::minutes(31));
    bot.run_due().await;
    assert!(!bot.is_member(DB, "alice"));
}

crate::both_stores!(pending_request_times_out);
async fn pending_request_times_out(backend: Backend) {
    let bot = backend.builder().build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.advance(Duration::hours(1));
    bot.run_due().await;
    let rec = bot
        .engine
        .store()
        .request(&jitbot_core::RequestId::new(id.as_str()))
        .unwrap()
        .unwrap();
    assert_eq!(rec.request.state, jitbot_core::RequestState::TimedOut);
    let reply = bot.say("bob", &format!("approve {id}")).await;
    assert!(!reply.ok, "{}", reply.text);
    assert!(bot.engine.store().leases().unwrap().is_empty());
}

crate::both_stores!(revocation_retries_with_backoff_until_done);
async fn revocation_retries_with_backoff_until_done(backend: Backend) {
    let bot = backend.builder().settings(|s| s.alert_after = 3).build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.dir.fail_next(4);
    bot.advance(Duration::hours(1));
    bot.run_due().await;
    let lease = bot.lease();
    assert_eq!(lease.state, LeaseState::Revoking);
    assert_eq!(lease.revoke_attempts, 1);
    assert!(bot.is_member(DB, "alice"));
    // Each retry waits longer; step the clock through them.
    let mut waits = Vec::new();
    for _ in 0..10 {
        let next = bot
            .engine
            .store()
            .next_due()
            .unwrap()
            .expect("a revoke timer stays");
        waits.push((next - bot.engine.now()).num_seconds());
        bot.clock.set(next);
        bot.run_due().await;
        if bot.lease().state == LeaseState::Ended {
            break;
        }
    }
    assert_eq!(bot.lease().state, LeaseState::Ended, "revoked in the end");
    assert!(!bot.is_member(DB, "alice"));
    assert_eq!(waits.len(), 4, "three more failures, then success: {waits:?}");
    assert!(waits.windows(2).all(|w| w[1] >= w[0]), "backoff grows: {waits:?}");
    let actions = bot.audit_actions();
    assert_eq!(actions.iter().filter(|a| *a == "lease.revoke_failed").count(), 4);
    assert!(bot.lease().alerted, "an alert went out after repeated failures");
    let alerts = bot.engine.store().outbox(100).unwrap();
    assert!(alerts
        .iter()
        .any(|(_, item, _)| format!("{item:?}").contains("cannot remove alice")));
}

/// A directory that hangs forever at one point, standing for a crash there.
struct Hang {
    inner: Arc<MemoryDirectory>,
    at: &'static str,
}

#[async_trait]
impl Hooks for Hang {
    fn inner(&self) -> &dyn Directory {
        &*self.inner
    }
    async fn add_membership(&self, m: &Membership) -> Result<Added, DirectoryError> {
        if self.at == "before-add" {
            std::future::pending::<()>().await;
        }
        let added = self.inner.add_membership(m).await?;
        if self.at == "after-add" {
            std::future::pending::<()>().await;
        }
        Ok(added)
    }
    async fn remove_membership(&self, m: &Membership) -> Result<(), DirectoryError> {
        if self.at == "before-remove" {
            std::future::pending::<()>().await;
        }
        self.inner.remove_membership(m).await?;
        if self.at == "after-remove" {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

crate::both_stores!(crash_during_grant_is_finished_on_restart);
/// Crash while granting (before or after the directory add): after a
/// restart the grant is finished exactly once, and the lease still ends.
async fn crash_during_grant_is_finished_on_restart(backend: Backend) {
    for at in ["before-add", "after-add"] {
        let memory = crate::support::bot::seeded();
        let hang: Arc<dyn Directory> = Arc::new(Forward(Hang {
            inner: memory.clone(),
            at,
        }));
        let bot = backend.builder().wrap(|_| hang).build();
        let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
        let text = format!("approve {id}");
        let approve = bot.say("bob", &text);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(200), approve)
                .await
                .is_err(),
            "{at}: the approval should hang in the directory"
        );
        assert_eq!(memory.members(DB).contains("alice"), at == "after-add", "{at}");

        let bot = bot.restart(memory.clone(), policy());
        assert_eq!(bot.lease().state, LeaseState::Granting, "{at}");
        bot.run_due().await;
        assert_eq!(bot.lease().state, LeaseState::Active, "{at}: finished on restart");
        assert!(memory.members(DB).contains("alice"), "{at}");
        assert_eq!(
            memory.changes.load(Ordering::SeqCst),
            1,
            "{at}: added exactly once"
        );
        bot.advance(Duration::hours(1));
        bot.run_due().await;
        assert!(!memory.members(DB).contains("alice"), "{at}: and it still ends");
    }
}

crate::both_stores!(crash_during_revoke_is_finished_on_restart);
/// Crash while revoking: after a restart the membership is removed.
async fn crash_during_revoke_is_finished_on_restart(backend: Backend) {
    for at in ["before-remove", "after-remove"] {
        let memory = crate::support::bot::seeded();
        let hang: Arc<dyn Directory> = Arc::new(Forward(Hang {
            inner: memory.clone(),
            at,
        }));
        let bot = backend.builder().wrap(|_| hang).build();
        let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
        bot.ok("bob", &format!("approve {id}")).await;
        bot.advance(Duration::hours(1));
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(200), bot.run_due())
                .await
                .is_err(),
            "{at}: the revocation should hang"
        );
        assert_eq!(
            bot.lease().state,
            LeaseState::Revoking,
            "{at}: durable before the side effect"
        );

        let bot = bot.restart(memory.clone(), policy());
        bot.run_due().await;
        assert_eq!(bot.lease().state, LeaseState::Ended, "{at}");
        assert!(
            !memory.members(DB).contains("alice"),
            "{at}: no membership without a lease"
        );
    }
}

crate::both_stores!(overdue_leases_are_revoked_after_restart);
/// jitbot down across an expiry: the overdue lease is revoked at start.
async fn overdue_leases_are_revoked_after_restart(backend: Backend) {
    let bot = backend.builder().build();
    for user in ["alice", "dave", "erin"] {
        let id = TestBot::request_id(&bot.ok(user, "request db-admins 30m x").await);
        bot.ok("bob", &format!("approve {id}")).await;
    }
    let memory = bot.dir.clone();
    let bot = bot.restart(memory.clone(), policy());
    bot.advance(Duration::hours(3));
    bot.run_due().await;
    assert!(memory.members(DB).is_empty(), "{:?}", memory.members(DB));
    let leases = bot.engine.store().leases().unwrap();
    assert_eq!(leases.len(), 3);
    assert!(leases.iter().all(|l| l.lease.state == LeaseState::Ended));
}

crate::both_stores!(hundred_concurrent_approvals_grant_once);
async fn hundred_concurrent_approvals_grant_once(backend: Backend) {
    let approvers: Vec<String> = (0..100).map(|i| format!("approver{i}")).collect();
    let names = approvers.clone();
    let bot = backend
        .builder()
        .policy(move |p| {
            for a in &names {
                p.groups[0].approvers.users.insert(UserId::new(a));
            }
        })
        .build();
    for a in &approvers {
        bot.dir.add_user(a, []);
    }
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    let mut tasks = tokio::task::JoinSet::new();
    for a in approvers {
        let engine = bot.engine.clone();
        let cmd = jitbot_core::Command::parse(&format!("approve {id}")).unwrap();
        tasks.spawn(async move { engine.execute(&jitbot::engine::Caller::new(&a, None), cmd).await });
    }
    let mut approved = 0;
    while let Some(reply) = tasks.join_next().await {
        let reply = reply.unwrap();
        if reply.ok && reply.text.starts_with("Approved") {
            approved += 1;
        }
    }
    assert_eq!(approved, 1, "exactly one approval wins");
    assert_eq!(bot.engine.store().leases().unwrap().len(), 1, "one lease");
    assert_eq!(bot.dir.changes.load(Ordering::SeqCst), 1, "one membership change");
}

crate::both_stores!(n_of_m_and_break_glass);
async fn n_of_m_and_break_glass(backend: Backend) {
    let bot = backend
        .builder()
        .policy(|p| {
            p.groups[0].approvals_required = 2;
            p.groups[1].break_glass = true;
        })
        .build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    assert!(bot.ok("bob", &format!("approve {id}")).await.contains("1 of 2"));
    assert!(bot.ok("bob", &format!("approve {id}")).await.contains("already"));
    assert!(!bot.is_member(DB, "alice"));
    bot.ok("carol", &format!("approve {id}")).await;
    assert!(bot.is_member(DB, "alice"));

    let refused = bot.say("alice", "breakglass db-admins 1h prod down").await;
    assert!(!refused.ok, "db-admins has no break-glass: {}", refused.text);
    let text = bot.ok("alice", "breakglass web-admins 1h prod down").await;
    assert!(bot.is_member(WEB, "alice"), "{text}");
    let pending = bot.ok("bob", "pending").await;
    assert!(pending.contains("BREAK-GLASS"), "{pending}");
    let bg = TestBot::request_id(&pending);
    bot.ok("bob", &format!("ack {bg}")).await;
    assert!(!bot.ok("bob", "pending").await.contains("BREAK-GLASS"));
}

crate::both_stores!(zsp_drift_is_reported_and_remediated);
async fn zsp_drift_is_reported_and_remediated(backend: Backend) {
    let bot = backend.builder().policy(|p| p.groups[0].remediate = true).build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.dir.add_group(DB, ["alice", "erin"]);
    let drift = bot.engine.check_zsp().await.unwrap();
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert_eq!(drift[0].user.as_str(), "erin");
    assert!(drift[0].remediated);
    assert!(bot.is_member(DB, "alice"), "the leased member stays");
    assert!(!bot.is_member(DB, "erin"));
    let actions = bot.audit_actions();
    assert!(actions.iter().any(|a| a == "zsp.remediating"), "{actions:?}");
    assert!(actions.iter().any(|a| a == "zsp.drift"), "{actions:?}");
}

#[tokio::test]
async fn audit_tampering_is_found_at_the_record() {
    let bot = TestBot::new();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    let records = bot.engine.store().audit(0).count() as u64;
    assert!(records >= 3, "{records} audit records");
    assert_eq!(
        bot.engine.store().verify_audit().unwrap(),
        AuditCheck::Intact { records }
    );
    // The attacker edits the stopped store's files: one letter more in
    // record 3's detail, so it still reads as a record and only the chain
    // can tell.
    let TestBot { engine, path, .. } = bot;
    drop(engine);
    {
        let raw = crate::support::open_raw_sled(&path);
        let tree = raw.open_tree("audit").unwrap();
        let (key, value) = tree.iter().nth(2).unwrap().unwrap();
        let mut bytes = value.to_vec();
        let field = b"\"detail\":\"";
        let pos = bytes.windows(field.len()).position(|w| w == field).unwrap();
        bytes.insert(pos + field.len(), b'x');
        tree.insert(key, bytes).unwrap();
        raw.flush().unwrap();
    }
    let store = crate::support::reopen_store(&path);
    match store.verify_audit().unwrap() {
        AuditCheck::Broken { seq, problem } => {
            assert_eq!(seq, 3, "{problem}");
            assert!(problem.contains("no longer match the hash"), "{problem}");
        }
        other => panic!("tampering not found: {other:?}"),
    }
}

crate::both_stores!(scheduler_actor_revokes_on_time);
async fn scheduler_actor_revokes_on_time(backend: Backend) {
    let bot = backend.builder().build();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let settings = jitbot::scheduler::SchedulerSettings {
        max_wait: std::time::Duration::from_millis(50),
        concurrency: 4,
    };
    let task = tokio::spawn(jitbot::scheduler::run(bot.engine.clone(), settings, rx));
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.advance(Duration::hours(1));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while bot.is_member(DB, "alice") {
        assert!(std::time::Instant::now() < deadline, "scheduler did not revoke");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tx.send(true).unwrap();
    task.await.unwrap();
    assert_eq!(bot.lease().state, LeaseState::Ended);
}

/// A grant whose directory check keeps failing retries while the approved
/// window has time, and gives up only when the next try would come after
/// the lease's end, telling the requester and the group why.
#[tokio::test]
async fn grant_gives_up_only_when_the_approved_time_is_gone() {
    let bot = TestBot::new();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.dir.fail_next(1_000_000);
    bot.ok("bob", &format!("approve {id}")).await;
    let expires = bot.lease().expires_at;
    let mut tries = 1;
    while bot.lease().state == LeaseState::Granting {
        let next = bot.engine.store().next_due().unwrap().expect("the Grant timer");
        assert!(next < expires, "a retry is only scheduled inside the window");
        bot.clock.set(next);
        bot.run_due().await;
        tries += 1;
        assert!(tries < 50, "the grant never gave up");
    }
    let gave_up = bot.engine.now();
    assert!(
        expires - gave_up <= Duration::minutes(5),
        "gave up at {gave_up}, {} before the end: too early",
        expires - gave_up
    );
    bot.dir.fail_next(0);
    bot.run_due().await;
    let lease = bot.lease();
    assert_eq!(lease.state, LeaseState::Ended);
    let actions = bot.audit_actions();
    assert_eq!(
        actions.iter().filter(|a| *a == "lease.grant_retry").count(),
        tries - 1,
        "{actions:?}"
    );
    assert!(actions.iter().any(|a| a == "lease.grant_failed"));
    let outbox = format!("{:?}", bot.engine.store().outbox(100).unwrap());
    assert!(
        outbox.contains("approved time ran out")
            && outbox.contains("Request again once the directory is back"),
        "{outbox}"
    );
    assert!(!bot.is_member(DB, "alice"));
}

/// Leases expiring together end together: their `ended` commits may share
/// one store commit, and still each lease ends once, fenced, with its own
/// audit record and notices, and the audit chain intact.
#[tokio::test]
async fn leases_expiring_together_each_end_once() {
    let bot = TestBot::new();
    for (user, group) in [
        ("alice", "db-admins"),
        ("dave", "db-admins"),
        ("erin", "db-admins"),
        ("alice", "web-admins"),
    ] {
        let id = TestBot::request_id(&bot.ok(user, &format!("request {group} 1h x")).await);
        bot.ok("bob", &format!("approve {id}")).await;
    }
    bot.advance(Duration::hours(1));
    let due = bot.engine.store().due_timers(bot.engine.now(), 100).unwrap();
    assert_eq!(due.len(), 4, "{due:?}");
    // As the scheduler does: all at once.
    let mut all = tokio::task::JoinSet::new();
    for t in due {
        let engine = bot.engine.clone();
        all.spawn(async move { engine.fire(t).await });
    }
    while all.join_next().await.is_some() {}
    let leases = bot.engine.store().leases().unwrap();
    assert!(
        leases.iter().all(|l| l.lease.state == LeaseState::Ended),
        "{leases:?}"
    );
    for user in ["alice", "dave", "erin"] {
        assert!(!bot.is_member(DB, user), "{user}");
    }
    let actions = bot.audit_actions();
    assert_eq!(
        actions.iter().filter(|a| *a == "lease.ended").count(),
        4,
        "{actions:?}"
    );
    let outbox = format!("{:?}", bot.engine.store().outbox(100).unwrap());
    assert_eq!(
        outbox.matches("access to `db-admins` ended").count(),
        6,
        "{outbox}"
    );
    assert_eq!(
        bot.engine.store().verify_audit().unwrap(),
        AuditCheck::Intact {
            records: actions.len() as u64
        }
    );
    bot.run_due().await;
    assert_eq!(bot.audit_actions().len(), actions.len(), "nothing ends twice");
}

/// Expiries handed to the engine together (as the scheduler hands a mass
/// expiry) start revoking in one commit that is durable before any
/// removal, and their removals run at once, not one after the other: a
/// crash right after the removals (the directory never answers) finds
/// every lease revoking and none lost. A lease in the batch that is not
/// due after all (extended meanwhile) stays active with its expiry at its
/// real end. After a restart each ends exactly once.
#[tokio::test]
async fn expiries_due_together_begin_in_one_commit_and_are_removed_at_once() {
    let memory = crate::support::bot::seeded();
    let hang: Arc<dyn Directory> = Arc::new(Forward(Hang {
        inner: memory.clone(),
        at: "after-remove",
    }));
    let bot = TestBot::builder().wrap(|_| hang).build();
    for (user, group, hours) in [
        ("alice", "db-admins", 1),
        ("dave", "db-admins", 1),
        ("alice", "web-admins", 1),
        ("erin", "db-admins", 2),
    ] {
        let id = TestBot::request_id(&bot.ok(user, &format!("request {group} {hours}h x")).await);
        bot.ok("bob", &format!("approve {id}")).await;
    }
    bot.advance(Duration::hours(1));
    let now = bot.engine.now();
    let mut expiring: Vec<jitbot::store::Timer> = bot
        .engine
        .store()
        .due_timers(now, 100)
        .unwrap()
        .into_iter()
        .filter(|t| t.kind == jitbot::store::TimerKind::Expire)
        .collect();
    assert_eq!(expiring.len(), 3, "{expiring:?}");
    let leases = bot.engine.store().leases().unwrap();
    let erin = leases
        .iter()
        .find(|l| l.lease.user == UserId::new("erin"))
        .unwrap()
        .lease
        .clone();
    // As if erin's lease had been extended after its timer was read.
    expiring.push(jitbot::store::Timer {
        due: now,
        kind: jitbot::store::TimerKind::Expire,
        id: erin.id.to_string(),
    });
    let batch = bot.engine.fire_revocations(expiring);
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), batch)
            .await
            .is_err(),
        "the removals should hang after reaching the directory"
    );
    assert!(!memory.members(DB).contains("alice"));
    assert!(
        !memory.members(DB).contains("dave"),
        "removed at once, not after alice's"
    );
    assert!(
        !memory.members(WEB).contains("alice"),
        "removed at once, not after the others"
    );
    assert!(memory.members(DB).contains("erin"));
    // The removals' tasks were aborted with the batch: let them go (and
    // their hold on the store) before the restart, as a crash would.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;

    let bot = bot.restart(memory.clone(), policy());
    let states = |bot: &TestBot| -> Vec<(String, LeaseState)> {
        let mut all: Vec<_> = bot
            .engine
            .store()
            .leases()
            .unwrap()
            .into_iter()
            .map(|l| (format!("{}@{}", l.lease.user, l.lease.group), l.lease.state))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    };
    assert_eq!(
        states(&bot),
        vec![
            ("alice@db-admins".into(), LeaseState::Revoking),
            ("alice@web-admins".into(), LeaseState::Revoking),
            ("dave@db-admins".into(), LeaseState::Revoking),
            ("erin@db-admins".into(), LeaseState::Active),
        ]
    );
    let erin_expiry = bot
        .engine
        .store()
        .timers_of(jitbot::store::TimerKind::Expire)
        .unwrap();
    assert_eq!(erin_expiry.len(), 1, "{erin_expiry:?}");
    assert_eq!(
        (erin_expiry[0].id.as_str(), erin_expiry[0].due),
        (erin.id.as_str(), erin.expires_at)
    );

    bot.run_due().await;
    assert_eq!(
        states(&bot),
        vec![
            ("alice@db-admins".into(), LeaseState::Ended),
            ("alice@web-admins".into(), LeaseState::Ended),
            ("dave@db-admins".into(), LeaseState::Ended),
            ("erin@db-admins".into(), LeaseState::Active),
        ]
    );
    let actions = bot.audit_actions();
    for (action, count) in [("lease.revoking", 3), ("lease.ended", 3)] {
        assert_eq!(
            actions.iter().filter(|a| *a == action).count(),
            count,
            "{action}: {actions:?}"
        );
    }
    assert_eq!(
        bot.engine.store().verify_audit().unwrap(),
        AuditCheck::Intact {
            records: actions.len() as u64
        }
    );
}

/// What `/metrics` shows comes from the timer index: active leases,
/// pending requests, and the most overdue lease — an active one whose
/// expiry is due, or one whose revocation keeps failing.
#[tokio::test]
async fn scrape_counts_come_from_the_timer_index() {
    let bot = TestBot::new();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.ok("dave", "request db-admins 1h y").await;
    assert_eq!(
        bot.engine.scrape_counts().unwrap(),
        (1, 1, std::time::Duration::ZERO)
    );
    bot.advance(Duration::hours(1) + Duration::seconds(3));
    let (active, _, overdue) = bot.engine.scrape_counts().unwrap();
    assert_eq!(active, 1, "not yet picked up");
    assert_eq!(overdue, std::time::Duration::from_secs(3), "expiry due, not run");
    bot.dir.fail_next(1);
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Revoking);
    bot.advance(Duration::seconds(2));
    let (active, pending, overdue) = bot.engine.scrape_counts().unwrap();
    assert_eq!(active, 0);
    assert_eq!(pending, 0, "dave's request timed out meanwhile");
    assert_eq!(
        overdue,
        std::time::Duration::from_secs(5),
        "the failing revocation"
    );
}
