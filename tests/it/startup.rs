//! `jitbot run`'s start-up checks over the store (`app::start_up_checks`):
//! the adoption of leases from an older release runs until a store has
//! been adopted once, and the leases outside the config are found by
//! reading only the groups whose DN changed or that left the config.

use crate::support::bot::{policy, Backend, TestBot, DB, WEB};
use jitbot::store::{LeaseRecord, StoreError};
use jitbot_core::{GroupDn, LeaseId, LeaseState, UserId};

/// Writes a lease as the release before recorded memberships left it:
/// active, jitbot's own (`preexisting = false`), no `Membership`.
async fn plant_legacy(bot: &TestBot, id: &str, user: &str) {
    let group = policy().groups[0].clone();
    bot.engine
        .store()
        .update(bot.engine.now(), |tx| {
            let mut lease = jitbot_core::Lease::start(
                LeaseId::new(id),
                jitbot_core::RequestId::new(format!("r-{id}")),
                &group,
                UserId::new(user),
                jitbot_core::Span::from_hours(1),
                tx.now(),
            );
            lease.preexisting = Some(false);
            lease.activate().expect("activate");
            tx.set_timer(jitbot::store::TimerKind::Expire, id, lease.expires_at);
            tx.put_lease(LeaseRecord { lease, origin: None });
            Ok::<_, StoreError>(())
        })
        .await
        .expect("legacy lease");
}

/// Writes an active lease of `db-admins` recorded as granted in `dn`.
async fn plant_granted_in(bot: &TestBot, id: &str, user: &str, dn: &str) {
    let group = policy().groups[0].clone();
    bot.engine
        .store()
        .update(bot.engine.now(), |tx| {
            let mut lease = jitbot_core::Lease::start(
                LeaseId::new(id),
                jitbot_core::RequestId::new(format!("r-{id}")),
                &group,
                UserId::new(user),
                jitbot_core::Span::from_hours(1),
                tx.now(),
            );
            let membership = jitbot_core::Membership {
                group: GroupDn::new(dn),
                attribute: "member".into(),
                value: user.to_string(),
                identity: None,
            };
            lease.record_preexisting(false, membership);
            lease.activate().expect("activate");
            tx.set_timer(jitbot::store::TimerKind::Expire, id, lease.expires_at);
            tx.put_lease(LeaseRecord { lease, origin: None });
            Ok::<_, StoreError>(())
        })
        .await
        .expect("lease");
}

fn membership_of(bot: &TestBot, id: &str) -> Option<jitbot_core::Membership> {
    bot.engine
        .store()
        .lease(&LeaseId::new(id))
        .expect("read")
        .expect("the lease")
        .lease
        .membership
}

/// The live lease `user` holds on `db-admins`.
fn live_lease_of(bot: &TestBot, user: &str) -> String {
    bot.engine
        .store()
        .live_lease(&policy().groups[0].name, &UserId::new(user))
        .expect("read")
        .unwrap_or_else(|| panic!("{user} holds no lease"))
        .to_string()
}

crate::both_stores!(a_start_after_the_store_was_adopted_reads_no_lease);
/// Once a pass leaves nothing to adopt, the store says so and later
/// starts read no lease. Shown with a legacy lease planted after the mark
/// (no release since writes one): a pass that read the live leases would
/// adopt it, as the first pass adopts the one planted before.
async fn a_start_after_the_store_was_adopted_reads_no_lease(backend: Backend) {
    let bot = backend.builder().build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    plant_legacy(&bot, "l-old", "dave").await;
    assert!(!bot.engine.store().legacy_adopted().expect("read"));

    let memory = bot.dir.clone();
    let bot = bot.restart(memory.clone(), policy());
    assert_eq!(bot.engine.adopt_legacy_leases().await.expect("adopt"), 1);
    assert!(membership_of(&bot, "l-old").is_some());
    assert!(
        bot.engine.store().legacy_adopted().expect("read"),
        "nothing was left to adopt, so the store is marked"
    );

    plant_legacy(&bot, "l-planted", "erin").await;
    let bot = bot.restart(memory, policy());
    assert_eq!(bot.engine.adopt_legacy_leases().await.expect("adopt"), 0);
    assert!(
        membership_of(&bot, "l-planted").is_none(),
        "a start after the store was adopted read the live leases"
    );
}

crate::both_stores!(a_lease_the_adoption_cannot_resolve_keeps_the_pass_pending);
/// The directory is down during the upgrade start: the legacy lease keeps
/// no membership, the store is not marked, and the next start adopts it.
async fn a_lease_the_adoption_cannot_resolve_keeps_the_pass_pending(backend: Backend) {
    let bot = backend.builder().build();
    plant_legacy(&bot, "l-old", "alice").await;
    let memory = bot.dir.clone();
    let bot = bot.restart(memory.clone(), policy());
    memory.fail_next(1);
    assert_eq!(bot.engine.adopt_legacy_leases().await.expect("adopt"), 0);
    assert!(membership_of(&bot, "l-old").is_none());
    assert!(
        !bot.engine.store().legacy_adopted().expect("read"),
        "marked adopted with a lease left unresolved"
    );

    let bot = bot.restart(memory, policy());
    assert_eq!(bot.engine.adopt_legacy_leases().await.expect("adopt"), 1);
    let m = membership_of(&bot, "l-old").expect("recorded at the next start");
    assert_eq!(m.group.as_str(), DB);
    assert!(bot.engine.store().legacy_adopted().expect("read"));
}

/// A store without leases is never marked: `jitbot restore` fills a
/// store that has no lease yet and keeps the `meta` keys the backup lacks,
/// so a mark written there would skip the legacy leases of a backup taken
/// by an older release.
#[tokio::test]
async fn a_backup_from_an_older_release_restored_into_a_started_store_is_still_adopted() {
    let old = TestBot::new();
    plant_legacy(&old, "l-old", "alice").await;
    let mut backup = Vec::new();
    old.engine.store().backup(&mut backup).expect("backup");

    let new = TestBot::new();
    jitbot::app::start_up_checks(&new.engine).await.expect("start-up");
    assert!(!new.engine.store().legacy_adopted().expect("read"));
    new.engine.store().restore(&backup[..]).await.expect("restore");
    let memory = new.dir.clone();
    let new = new.restart(memory, policy());
    assert_eq!(new.engine.adopt_legacy_leases().await.expect("adopt"), 1);
    assert_eq!(
        new.engine.leases_outside_config().expect("check"),
        Vec::<String>::new()
    );
}

crate::both_stores!(start_up_names_the_leases_outside_the_config_at_every_start_until_they_end);
/// A lease granted before its group's `dn` changed is named by
/// `check-config` and by every start while it lives; so is one granted
/// under the new DN once the config goes back to the old one (the DN all
/// leases were once found under), and every lease of a group that left
/// the config.
async fn start_up_names_the_leases_outside_the_config_at_every_start_until_they_end(backend: Backend) {
    let bot = backend.builder().build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    assert_eq!(
        bot.engine.leases_outside_config().expect("check"),
        Vec::<String>::new()
    );
    let alices = live_lease_of(&bot, "alice");

    let mut moved = policy();
    moved.groups[0].dn = GroupDn::new(WEB);
    let memory = bot.dir.clone();
    let bot = bot.restart(memory.clone(), moved.clone());
    let check = jitbot::engine::leases_outside_config(&moved, bot.engine.store()).expect("check-config");
    assert_eq!(
        check,
        vec![format!(
            "lease {alices} (alice on `db-admins`) was granted in {DB}, but the config now says {WEB}; it will be removed from {DB} when it ends"
        )]
    );
    for start in 0..2 {
        assert_eq!(
            bot.engine.leases_outside_config().expect("check"),
            check,
            "start {start}"
        );
    }

    // Under the new DN, dave's lease is granted in it.
    let id = TestBot::request_id(&bot.ok("dave", "request db-admins 1h y").await);
    bot.ok("carol", &format!("approve {id}")).await;
    let daves = live_lease_of(&bot, "dave");
    let bot = bot.restart(memory.clone(), policy());
    let notes = bot.engine.leases_outside_config().expect("check");
    assert_eq!(
        notes,
        vec![format!(
            "lease {daves} (dave on `db-admins`) was granted in {WEB}, but the config now says {DB}; it will be removed from {WEB} when it ends"
        )]
    );

    let mut without = policy();
    without.groups.retain(|g| g.name.as_str() != "db-admins");
    let bot = bot.restart(memory, without.clone());
    let notes = bot.engine.leases_outside_config().expect("check");
    assert_eq!(
        notes,
        vec![
            format!("lease {alices} (alice on `db-admins`, active) is for a group no longer in the config; it will still be removed from {DB} when it ends"),
            format!("lease {daves} (dave on `db-admins`, active) is for a group no longer in the config; it will still be removed from {WEB} when it ends"),
        ]
    );
    assert_eq!(
        jitbot::engine::leases_outside_config(&without, bot.engine.store()).expect("check-config"),
        notes
    );
    assert!(bot
        .engine
        .store()
        .live_leases()
        .expect("read")
        .iter()
        .all(|r| r.lease.state == LeaseState::Active));
}

crate::both_stores!(a_start_reads_no_lease_of_a_group_whose_dn_it_found_all_leases_under);
/// Once a start found every live lease of a group under the group's DN,
/// later starts read none of its leases while the DN stays: shown with a
/// lease planted afterwards under another DN (no jitbot grants one while
/// the config says otherwise), which only a read would find. When the DN
/// changes, the group's leases are read again and both are named.
async fn a_start_reads_no_lease_of_a_group_whose_dn_it_found_all_leases_under(backend: Backend) {
    let bot = backend.builder().build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    assert_eq!(
        bot.engine.leases_outside_config().expect("check"),
        Vec::<String>::new()
    );

    plant_granted_in(&bot, "l-planted", "erin", WEB).await;
    let memory = bot.dir.clone();
    let bot = bot.restart(memory.clone(), policy());
    assert_eq!(
        bot.engine.leases_outside_config().expect("check"),
        Vec::<String>::new(),
        "a start read the leases of a group whose DN did not change"
    );
    assert_eq!(
        jitbot::engine::leases_outside_config(&policy(), bot.engine.store()).expect("check-config"),
        Vec::<String>::new(),
    );

    let elsewhere = "cn=elsewhere,ou=groups,dc=example,dc=org";
    let mut moved = policy();
    moved.groups[0].dn = GroupDn::new(elsewhere);
    let bot = bot.restart(memory, moved);
    let notes = bot.engine.leases_outside_config().expect("check");
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(
        notes[1].contains(&format!(
            "lease l-planted (erin on `db-admins`) was granted in {WEB}"
        )),
        "{notes:?}"
    );
}

/// Review brk16d, finding 7. The DN marker is not written on a store
/// without lease records, and retention can empty the `leases` tree of a
/// store that has markers. web-admins at DN W; start-up marks W; every
/// lease is pruned; the DN is changed to W2 (nothing to record, so the
/// old W must be forgotten, not kept); alice is granted web-admins under
/// W2; the change is rolled back to W. The start-up after the rollback
/// must read the group's leases and name alice's, granted in W2.
#[tokio::test]
async fn a_dn_changed_and_rolled_back_after_retention_emptied_the_leases_is_still_reported() {
    use jitbot::store::retention::RetentionSettings;
    use jitbot_core::Span;
    const WEB2: &str = "cn=web-admins-2,ou=groups,dc=example,dc=org";
    let memory = crate::support::bot::seeded();
    memory.add_group(WEB2, []);
    let dir: std::sync::Arc<dyn jitbot::ports::Directory> = memory.clone();
    let bot = TestBot::builder().directory(dir.clone()).build();
    let store = bot.engine.store().clone();
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 1h first").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    bot.advance(chrono::Duration::hours(2));
    bot.run_due().await;
    assert_eq!(bot.lease().state, LeaseState::Ended);
    assert!(bot.engine.leases_outside_config().unwrap().is_empty());
    assert_eq!(
        store
            .group_dn_checked(&jitbot_core::GroupName::new("web-admins"))
            .unwrap()
            .as_deref(),
        Some(WEB),
        "start-up marked web-admins' DN"
    );
    // Retention empties the leases tree (an outbox entry naming a lease
    // keeps it, so the notices are delivered first).
    bot.advance(chrono::Duration::days(40));
    let now = bot.engine.now();
    store.outbox_fan_out(now, 100_000, |_| Vec::new()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let settings = RetentionSettings::new(Span::parse_long("30d").unwrap(), tmp.path().join("archive"));
    let pruned = store.prune(now, &settings).await.unwrap();
    assert_eq!(pruned.leases, 1, "{pruned:?}");
    drop(store);

    // A restart with web-admins moved to W2; alice is granted it there.
    let mut moved = policy();
    moved.groups[1].dn = GroupDn::new(WEB2);
    let bot = bot.restart(dir.clone(), moved);
    assert!(bot.engine.leases_outside_config().unwrap().is_empty());
    let id = TestBot::request_id(&bot.ok("alice", "request web-admins 4h second").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    assert!(memory.members(WEB2).contains("alice"), "granted under W2");

    // The DN change is rolled back.
    let bot = bot.restart(dir, policy());
    let notes = bot.engine.leases_outside_config().unwrap();
    assert!(
        notes.iter().any(|n| n.contains(WEB2)),
        "alice's live lease was granted in {WEB2} and the config now says {WEB}, yet start-up says \
         nothing about it (notes: {notes:?}): the group's DN marker still names the DN of before the change",
    );
}
