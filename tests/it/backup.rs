//! Backups are point-in-time copies, and a restore refuses a copy whose
//! trees disagree (issue 12, defect 4).

use crate::support::bot::Backend;
use chrono::Utc;
use jitbot::chat::view::{Audience, Notice};
use jitbot::store::{AuditCheck, AuditDraft, LeaseRecord, OutboxItem, Store, StoreError, TimerKind};
use jitbot_core::lease::EndReason;
use jitbot_core::policy::GroupPolicy;
use jitbot_core::{GroupDn, Lease, LeaseId, Membership, RequestId, Span, UserId};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// Leases each writer takes through their whole life.
const LIFECYCLES: usize = 60;

fn audit(action: &str, lease: &str) -> AuditDraft {
    AuditDraft {
        actor: "test".into(),
        action: action.into(),
        lease: Some(lease.into()),
        ..Default::default()
    }
}

fn alert(text: String) -> OutboxItem {
    OutboxItem::Send {
        notice: Notice {
            to: Audience::Alert,
            text,
            buttons: vec![],
            tone: Default::default(),
        },
    }
}

/// Takes one lease through granting → active → revoking → ended, one
/// committed step at a time, each step moving timers, the live index, the
/// audit chain and the outbox together. Returns the lease id.
async fn lease_lifecycle(store: &Store, policy: &GroupPolicy, user: &str) -> String {
    let now = Utc::now();
    let id = store
        .update(now, |tx| {
            let id = tx.new_id("l")?;
            let lease = Lease::start(
                LeaseId::new(&id),
                RequestId::new("r-0"),
                policy,
                UserId::new(user),
                Span::from_hours(1),
                now,
            );
            tx.put_lease(LeaseRecord { lease, origin: None });
            tx.set_timer(TimerKind::Grant, &id, now);
            tx.audit(audit("lease.granting", &id));
            tx.outbox(alert(format!("granting {id}")));
            Ok::<_, StoreError>(id)
        })
        .await
        .expect("start");
    let step = |f: fn(&mut Lease, &str, &mut jitbot::store::Tx<'_>)| {
        let id = id.clone();
        async move {
            store
                .update(Utc::now(), |tx| {
                    let mut rec = tx.lease(&LeaseId::new(&id))?.expect("lease");
                    f(&mut rec.lease, &id, tx);
                    tx.put_lease(rec);
                    Ok::<_, StoreError>(())
                })
                .await
                .expect("step");
        }
    };
    step(|l, id, tx| {
        let membership = Membership {
            group: GroupDn::new("cn=db-admins,dc=example,dc=org"),
            attribute: "member".into(),
            value: format!("uid={},ou=people,dc=example,dc=org", l.user),
            identity: None,
        };
        l.record_preexisting(false, membership);
        l.activate().expect("activate");
        tx.clear_timer(TimerKind::Grant, id);
        tx.set_timer(TimerKind::Expire, id, l.expires_at);
        tx.audit(audit("lease.granted", id));
    })
    .await;
    step(|l, id, tx| {
        l.begin_revoke(EndReason::Released, tx.now()).expect("revoke");
        tx.clear_timer(TimerKind::Expire, id);
        tx.set_timer(TimerKind::Revoke, id, tx.now());
        tx.audit(audit("lease.revoking", id));
    })
    .await;
    step(|l, id, tx| {
        l.finish().expect("finish");
        tx.clear_timer(TimerKind::Revoke, id);
        tx.audit(audit("lease.revoked", id));
        tx.outbox(alert(format!("ended {id}")));
    })
    .await;
    id
}

crate::both_stores!(
    backup_taken_while_writers_commit_restores_consistently,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn backup_taken_while_writers_commit_restores_consistently(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let store = backend.open(&tmp.path().join("db"));
    let writing = Arc::new(AtomicUsize::new(3));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..3 {
        let (store, writing) = (store.clone(), writing.clone());
        writers.spawn(async move {
            let policy = GroupPolicy::new("db-admins", "cn=db-admins,dc=example,dc=org");
            for n in 0..LIFECYCLES {
                lease_lifecycle(&store, &policy, &format!("u{w}-{n}")).await;
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            writing.fetch_sub(1, Ordering::SeqCst);
        });
    }
    // The outbox worker's writes interleave too.
    let (outbox_store, outbox_stop) = (store.clone(), stop.clone());
    writers.spawn(async move {
        while !outbox_stop.load(Ordering::SeqCst) {
            let now = Utc::now();
            outbox_store
                .outbox_fan_out(now, 100, |_| vec!["slack".into(), "discord".into()])
                .unwrap();
            for job in outbox_store.outbox_due("slack", now, 100).unwrap() {
                outbox_store.outbox_finish(job.id, "slack").unwrap();
            }
            for job in outbox_store.outbox_due("discord", now, 100).unwrap() {
                let later = now + chrono::Duration::milliseconds(5);
                outbox_store
                    .outbox_failed(job.id, "discord", later, "down", false)
                    .unwrap();
            }
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
    });
    // Backups as fast as they come while the writers commit; restored after.
    let mut copies = Vec::new();
    while writing.load(Ordering::SeqCst) > 0 {
        let mut copy = Vec::new();
        store.backup(&mut copy).expect("backup");
        copies.push(copy);
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    stop.store(true, Ordering::SeqCst);
    while let Some(r) = writers.join_next().await {
        r.unwrap();
    }
    assert!(
        copies.len() >= 20,
        "only {} backups were taken during the writes",
        copies.len()
    );
    let step = copies.len() / 40 + 1;
    for (round, copy) in copies.iter().enumerate().step_by(step) {
        let target = backend.open(&tmp.path().join(format!("restored-{round}")));
        if let Err(e) = target.restore(copy.as_slice()).await {
            panic!(
                "backup {round} of {} taken during commits does not restore: {e}",
                copies.len()
            );
        }
        assert!(
            matches!(target.verify_audit().unwrap(), AuditCheck::Intact { .. }),
            "backup {round}: audit chain {:?}",
            target.verify_audit()
        );
        assert_eq!(
            target.check_consistency().unwrap(),
            Vec::<String>::new(),
            "backup {round}"
        );
    }
    assert_eq!(store.check_consistency().unwrap(), Vec::<String>::new());
}

/// A backup of a store holding one granting lease (with its timer, live
/// slot, audit record and a queued notice), as lines.
async fn good_backup(backend: Backend) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let store = backend.open(&tmp.path().join("db"));
    let now = Utc::now();
    store
        .update(now, |tx| {
            let id = tx.new_id("l")?;
            let policy = GroupPolicy::new("db-admins", "cn=db-admins,dc=example,dc=org");
            let lease = Lease::start(
                LeaseId::new(&id),
                RequestId::new("r-0"),
                &policy,
                UserId::new("alice"),
                Span::from_hours(1),
                now,
            );
            tx.put_lease(LeaseRecord { lease, origin: None });
            tx.set_timer(TimerKind::Grant, &id, now);
            tx.audit(audit("lease.granting", &id));
            tx.audit(audit("lease.note", &id));
            tx.outbox(alert("granting".into()));
            Ok::<_, StoreError>(())
        })
        .await
        .unwrap();
    let mut copy = Vec::new();
    store.backup(&mut copy).unwrap();
    String::from_utf8(copy)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn without(lines: &[String], tree: &str, which: fn(usize, usize) -> bool) -> String {
    let tag = format!("\"tree\":\"{tree}\"");
    let total = lines.iter().filter(|l| l.contains(&tag)).count();
    assert!(total > 0, "the good backup has a {tree} line");
    let mut seen = 0;
    let mut out = String::new();
    for l in lines {
        if l.contains(&tag) {
            seen += 1;
            if which(seen, total) {
                continue;
            }
        }
        out.push_str(l);
        out.push('\n');
    }
    out
}

crate::both_stores!(inconsistent_backup_is_refused_with_the_problem_named);
async fn inconsistent_backup_is_refused_with_the_problem_named(backend: Backend) {
    let lines = good_backup(backend).await;
    let all = |_: usize, _: usize| true;
    let last = |seen: usize, total: usize| seen == total;
    let cases = [
        (
            without(
                &without(&lines, "timers", all)
                    .lines()
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
                "timer_ix",
                all,
            ),
            "lease l-1 is Granting but has no Grant timer",
        ),
        (
            without(&lines, "timer_ix", all),
            "is not the one timer_ix points to",
        ),
        (without(&lines, "timers", all), "which is not in the timers tree"),
        (
            without(&lines, "live", all),
            "lease l-1 (db-admins for alice) has not ended but the live index does not point to it",
        ),
        (without(&lines, "audit", last), "the audit chain does not verify"),
        (
            without(&lines, "outbox_due", all),
            "outbox entry 1 is new but not queued",
        ),
    ];
    let good = lines.join("\n");
    let tmp = tempfile::tempdir().unwrap();
    let fresh = backend.open(&tmp.path().join("good"));
    fresh
        .restore(good.as_bytes())
        .await
        .expect("the untouched backup restores");
    for (i, (file, expected)) in cases.iter().enumerate() {
        let target = backend.open(&tmp.path().join(format!("bad-{i}")));
        match target.restore(file.as_bytes()).await {
            Err(e @ StoreError::Inconsistent { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains(expected),
                    "case {i}: expected {expected:?} in {text}"
                );
                assert!(text.contains("nothing was restored"), "{text}");
            }
            other => panic!("case {i} ({expected}): restore gave {other:?}"),
        }
        assert!(
            target.leases().unwrap().is_empty()
                && target.audit(0).next().is_none()
                && target.timer_count() == 0,
            "case {i}: nothing written"
        );
    }
}

crate::both_stores!(a_restored_store_remembers_the_payload_ids_it_took_within_the_replay_window);
/// Issue 13 item 6 (review brk13b): the backup carries the `seen` tree (payload ids kept against
/// replays), so a store restored from a backup taken a minute ago still refuses a Slack click or
/// Discord interaction it already took, for the rest of the 600 s window; expired ids are left out.
async fn a_restored_store_remembers_the_payload_ids_it_took_within_the_replay_window(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let store = backend.open(&tmp.path().join("db"));
    let now = Utc::now();
    let until = jitbot::store::seen::REPLAY_WINDOW.after(now);
    assert!(store.first_sighting("discord:1234", until, now).await.unwrap());
    // An id whose window has passed protects nothing: it is not carried.
    let past = now - chrono::Duration::seconds(700);
    assert!(store
        .first_sighting(
            "discord:old",
            jitbot::store::seen::REPLAY_WINDOW.after(past),
            past
        )
        .await
        .unwrap());
    let mut copy = Vec::new();
    store.backup(&mut copy).expect("backup");
    drop(store);
    let target = backend.open(&tmp.path().join("restored"));
    target.restore(copy.as_slice()).await.expect("restore");
    assert!(
        !target.first_sighting("discord:1234", until, now).await.unwrap(),
        "an interaction taken before the backup is taken again after the restore, within its replay window"
    );
    assert_eq!(target.seen_len(), 1, "only the unexpired id is restored");
}
