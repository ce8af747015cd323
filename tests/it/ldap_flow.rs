//! The whole engine flow against a real OpenLDAP server: request, approval
//! by an approver who qualifies through a nested group, membership checked
//! with a separate connection, expiry, membership gone.

use crate::support::bot::TestBot;
use crate::support::slapd::{self, Slapd, DB_ADMINS};
use chrono::Duration;
use jitbot::directory::ldap::LdapDirectory;
use jitbot_core::policy::Policy;
use jitbot_core::LeaseState;
use std::sync::Arc;

fn alice_dn() -> String {
    format!("uid=alice,{}", slapd::PEOPLE)
}

#[tokio::test]
async fn request_approve_expire_against_slapd() {
    let server = Slapd::start();
    let groups = slapd::group_configs();
    let directory = LdapDirectory::new(&server.ldap_config(), &groups).expect("directory");
    let policy = Policy {
        groups: groups.iter().map(|g| g.to_policy()).collect(),
        admins: Default::default(),
    };
    let bot = TestBot::builder()
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

/// The directory down across a batch of expiries: nothing is dropped, an
/// alert goes out, and every membership is removed once it is back.
#[tokio::test]
async fn directory_outage_across_expiries() {
    let mut server = Slapd::start();
    let groups = slapd::group_configs();
    let directory = LdapDirectory::new(&server.ldap_config(), &groups).expect("directory");
    let policy = Policy {
        groups: groups.iter().map(|g| g.to_policy()).collect(),
        admins: Default::default(),
    };
    let bot = TestBot::builder()
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
