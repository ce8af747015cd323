//! The whole engine flow against a real OpenLDAP server: request, approval
//! by an approver who qualifies through a nested group, membership checked
//! with a separate connection, expiry, membership gone; on sled and on
//! PostgreSQL.

use crate::support::bot::{Backend, TestBot};
use crate::support::slapd::{self, Slapd, DB_ADMINS};
use chrono::Duration;
use jitbot::directory::ldap::LdapDirectory;
use jitbot_core::policy::Policy;
use jitbot_core::LeaseState;
use std::sync::Arc;

fn alice_dn() -> String {
    format!("uid=alice,{}", slapd::PEOPLE)
}

/// A directory on `server` and a policy over the test groups it holds.
fn directory_and_policy(server: &Slapd) -> (LdapDirectory, Policy) {
    let groups = slapd::group_configs();
    let directory = LdapDirectory::new(&server.ldap_config(), &groups).expect("directory");
    let policy = Policy {
        groups: groups.iter().map(|g| g.to_policy()).collect(),
        admins: Default::default(),
    };
    (directory, policy)
}

crate::both_stores!(request_approve_expire_against_slapd);
async fn request_approve_expire_against_slapd(backend: Backend) {
    let server = Slapd::start();
    let (directory, policy) = directory_and_policy(&server);
    let bot = backend
        .builder()
        .policy(|p| *p = policy)
        .directory(Arc::new(directory))
        .build();

    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 2h fixing replication").await);
    let refused = bot.say("dave", &format!("approve {id}")).await;
    assert!(!refused.ok, "dave is no approver: {}", refused.text);
    assert!(!server.values(DB_ADMINS, "member").await.contains(&alice_dn()));

    // carol approves through cn=approvers ⊃ cn=security ∋ carol.
    bot.ok("carol", &format!("approve {id}")).await;
    assert_eq!(bot.lease().state, LeaseState::Active);
    let members = server.values(DB_ADMINS, "member").await;
    assert!(
        members.contains(&alice_dn()),
        "membership present in slapd: {members:?}"
    );
    assert!(
        bot.engine.check_zsp().await.unwrap().is_empty(),
        "a leased member is no drift"
    );

    bot.advance(Duration::hours(2));
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    let members = server.values(DB_ADMINS, "member").await;
    assert!(
        !members.contains(&alice_dn()),
        "membership gone after expiry: {members:?}"
    );
    assert!(
        members.contains(&slapd::SERVICE_DN.to_string()),
        "the placeholder stays"
    );
}

crate::both_stores!(directory_outage_across_expiries);
/// The directory down across a batch of expiries: nothing is dropped, an
/// alert goes out, and every membership is removed once it is back.
async fn directory_outage_across_expiries(backend: Backend) {
    let mut server = Slapd::start();
    let (directory, policy) = directory_and_policy(&server);
    let bot = backend
        .builder()
        .policy(|p| *p = policy)
        .settings(|s| s.alert_after = 2)
        .directory(Arc::new(directory))
        .build();
    for user in ["alice", "bob"] {
        let id = TestBot::request_id(&bot.ok(user, "request db-admins 1h batch").await);
        bot.ok("carol", &format!("approve {id}")).await;
    }
    assert_eq!(
        server.values(DB_ADMINS, "member").await.len(),
        3,
        "two members and the placeholder"
    );

    server.stop();
    bot.advance(Duration::hours(1));
    for _ in 0..3 {
        bot.run_due().await;
        let next = bot
            .engine
            .store()
            .next_due()
            .unwrap()
            .expect("revocations stay scheduled");
        bot.clock.set(next);
    }
    let leases = bot.engine.store().leases().unwrap();
    assert!(
        leases.iter().all(|l| l.lease.state == LeaseState::Revoking),
        "{leases:?}"
    );
    assert!(leases
        .iter()
        .all(|l| l.lease.alerted && l.lease.revoke_attempts >= 2));
    let outbox = format!("{:?}", bot.engine.store().outbox(100).unwrap());
    assert!(
        outbox.contains("cannot remove alice") && outbox.contains("cannot remove bob"),
        "{outbox}"
    );

    server.restart();
    bot.advance(Duration::minutes(10));
    bot.run_due().await;
    let leases = bot.engine.store().leases().unwrap();
    assert!(
        leases.iter().all(|l| l.lease.state == LeaseState::Ended),
        "{leases:?}"
    );
    assert_eq!(
        server.values(DB_ADMINS, "member").await,
        vec![slapd::SERVICE_DN.to_string()]
    );
}

/// A bot on `server` whose rules name users only, so approving makes no
/// directory call of its own: the grant is the first thing to meet an outage.
fn users_only_bot(
    backend: Backend,
    server: &Slapd,
    settings: impl FnOnce(&mut jitbot::engine::EngineSettings),
) -> TestBot {
    let groups = slapd::group_configs();
    let directory = LdapDirectory::new(&server.ldap_config(), &groups).expect("directory");
    let mut policy = Policy {
        groups: groups.iter().map(|g| g.to_policy()).collect(),
        admins: Default::default(),
    };
    for g in &mut policy.groups {
        g.requesters.groups.clear();
        g.approvers.groups.clear();
        g.approvers.users.insert(jitbot_core::UserId::new("carol"));
    }
    backend
        .builder()
        .policy(|p| *p = policy)
        .settings(settings)
        .directory(Arc::new(directory))
        .build()
}

crate::both_stores!(grant_waits_out_a_directory_outage);
/// The directory goes down between the approval and the grant's membership
/// check: the lease stays granting and its `Grant` timer tries again with a
/// growing backoff, each try audited, the requester told once; when slapd
/// is back the grant finishes (checked in slapd on a separate connection).
async fn grant_waits_out_a_directory_outage(backend: Backend) {
    let mut server = Slapd::start();
    let bot = users_only_bot(backend, &server, |_| {});
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 2h outage").await);
    server.stop();
    bot.ok("carol", &format!("approve {id}")).await;
    assert_eq!(
        bot.lease().state,
        LeaseState::Granting,
        "a transient error before the add fails nothing: {:?}",
        bot.lease()
    );
    let mut waits = Vec::new();
    for _ in 0..3 {
        let next = bot
            .engine
            .store()
            .next_due()
            .unwrap()
            .expect("the Grant timer retries");
        waits.push((next - bot.engine.now()).num_seconds());
        bot.clock.set(next);
        bot.run_due().await;
        assert_eq!(bot.lease().state, LeaseState::Granting);
    }
    assert!(waits[0] >= 5, "the first retry waits retry_base: {waits:?}");
    assert!(
        waits.windows(2).all(|w| w[1] >= w[0]) && waits[2] > waits[0],
        "backoff grows: {waits:?}"
    );
    let actions = bot.audit_actions();
    assert_eq!(
        actions.iter().filter(|a| *a == "lease.grant_retry").count(),
        4,
        "every try is audited: {actions:?}"
    );
    assert!(!actions.iter().any(|a| a == "lease.grant_failed"), "{actions:?}");
    let outbox = format!("{:?}", bot.engine.store().outbox(100).unwrap());
    assert_eq!(
        outbox.matches("cannot reach the directory right now").count(),
        1,
        "the requester is told once: {outbox}"
    );

    server.restart();
    let next = bot.engine.store().next_due().unwrap().expect("the Grant timer");
    bot.clock.set(next);
    bot.run_due().await;
    let lease = bot.lease();
    assert_eq!(lease.state, LeaseState::Active, "{lease:?}");
    assert_eq!(lease.last_error, None);
    assert!(server.values(DB_ADMINS, "member").await.contains(&alice_dn()));
}

crate::both_stores!(waiting_revocations_run_as_soon_as_the_directory_is_back);
/// Revocations that failed during an outage do not wait out their backoff
/// once slapd is back: the scheduler probes the directory while failures
/// are outstanding and pulls their timers forward. The test's clock stands
/// still, so only that wake-up can end the leases; the lag from slapd's
/// return to both leases ended (durable, read back) is printed.
async fn waiting_revocations_run_as_soon_as_the_directory_is_back(backend: Backend) {
    let mut server = Slapd::start();
    let bot = users_only_bot(backend, &server, |s| {
        s.retry_base = jitbot_core::Span::from_mins(2);
        s.retry_max = jitbot_core::Span::from_mins(10);
    });
    for user in ["alice", "bob"] {
        let id = TestBot::request_id(&bot.ok(user, "request db-admins 1h outage").await);
        bot.ok("carol", &format!("approve {id}")).await;
    }
    server.stop();
    bot.advance(Duration::hours(1));
    bot.run_due().await;
    let leases = bot.engine.store().leases().unwrap();
    assert!(
        leases.iter().all(|l| l.lease.state == LeaseState::Revoking),
        "{leases:?}"
    );
    let waiting = bot
        .engine
        .store()
        .next_due()
        .unwrap()
        .expect("revocations stay scheduled");
    let backoff = (waiting - bot.engine.now()).num_seconds();
    assert!(
        backoff >= 60,
        "the revocations wait {backoff} s before their next try"
    );

    server.restart();
    let back = std::time::Instant::now();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let settings = jitbot::scheduler::SchedulerSettings {
        max_wait: std::time::Duration::from_millis(100),
        concurrency: 4,
    };
    let task = tokio::spawn(jitbot::scheduler::run(bot.engine.clone(), settings, rx));
    let deadline = back + std::time::Duration::from_secs(15);
    loop {
        let leases = bot.engine.store().leases().unwrap();
        if leases.iter().all(|l| l.lease.state == LeaseState::Ended) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "revocations still wait for their backoff ({backoff} s) after the directory came back: {leases:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let lag = back.elapsed();
    println!("directory back → both revocations ended: {lag:?} (their backoff: {backoff} s)");
    stop.send(true).unwrap();
    task.await.unwrap();
    assert!(lag < std::time::Duration::from_secs(5), "lag {lag:?}");
    assert_eq!(
        server.values(DB_ADMINS, "member").await,
        vec![slapd::SERVICE_DN.to_string()]
    );
}

crate::both_stores!(commands_during_an_outage_say_what_to_do);
/// Commands during an outage are refused in words that say what happened,
/// that nothing was done, and what to do.
async fn commands_during_an_outage_say_what_to_do(backend: Backend) {
    let mut server = Slapd::start();
    let (directory, policy) = directory_and_policy(&server);
    let bot = backend
        .builder()
        .policy(|p| *p = policy)
        .directory(Arc::new(directory))
        .build();
    server.stop();
    let who = bot
        .engine
        .identify("mail", "alice@example.org")
        .await
        .unwrap_err();
    let request = bot.say("alice", "request db-admins 1h outage").await;
    for text in [&who.text, &request.text] {
        assert!(
            text.contains("cannot reach the directory"),
            "what happened: {text}"
        );
        assert!(text.contains("nothing was"), "that nothing happened: {text}");
        assert!(text.contains("Try again in a minute"), "what to do: {text}");
        assert!(
            text.contains("tell your jitbot admins"),
            "and if it lasts: {text}"
        );
    }
    assert!(!request.ok);
    assert!(bot.engine.store().requests().unwrap().is_empty());
}
