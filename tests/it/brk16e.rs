//! Issue 16, fifth review (brk16e): where the re-check's membership lock
//! and the replicas' guarantees still break. Every test here fails on
//! `main` at 84315a8 with an assertion that says what went wrong; the
//! findings are written up in `/work/notes/brk16e-findings.md`. (Findings
//! 1–3, the re-check's, are fixed; their tests are in `recheck.rs`.) The
//! leadership tests run on the real PostgreSQL of `support::postgres`.

use jitbot::store::TimerKind;

/// A slow but working database: `commits_unanswered` counts a round trip
/// of the commit session under way for more than `LOCK_WAIT` (12 s) as no
/// answer, although the session sets `statement_timeout = 30s` and the
/// server is answering it. A leader whose commit takes 14 s (here a
/// trigger sleeps; in production synchronous replication to a slow
/// standby, a checkpoint on a slow disk, a big retention or mass-expiry
/// commit) declines its next renewal and gives up its term (two thirds
/// of the 6 s default term after its "silence" began), and `/readyz`
/// says the store is unavailable — though the commit is answered, and
/// succeeds, well inside the statement timeout. The next leader's
/// commits go through the same slow database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brk16e_a_leader_whose_commit_is_slow_but_answered_gives_up_its_term() {
    use crate::support::postgres::Database;
    use jitbot::store::{AuditDraft, Store};
    let db = Database::create();
    let tmp = tempfile::tempdir().unwrap();
    let a = Store::open_postgres(&tmp.path().join("a"), 16, &db.settings()).unwrap();
    let term = jitbot::app::LEADER_TTL;
    let token = a.lead("a", term).unwrap().expect("a takes the term");

    // The next statement writing jitbot_kv takes 14 s (once).
    db.run(
        "CREATE TABLE brk16e_slow (once boolean); INSERT INTO brk16e_slow VALUES (true); \
         CREATE FUNCTION brk16e_slow() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$ \
         BEGIN IF EXISTS (SELECT 1 FROM brk16e_slow) THEN DELETE FROM brk16e_slow; \
         PERFORM pg_sleep(14); END IF; RETURN NULL; END $$; \
         CREATE TRIGGER brk16e_slow BEFORE INSERT OR UPDATE ON jitbot_kv \
         FOR EACH STATEMENT EXECUTE FUNCTION brk16e_slow();",
    );

    let writer = a.clone();
    let started = std::time::Instant::now();
    let committing = tokio::spawn(async move {
        writer
            .update(chrono::Utc::now(), |tx| {
                tx.set_timer(TimerKind::Warn, "slow", chrono::Utc::now());
                tx.audit(AuditDraft {
                    actor: "test".into(),
                    action: "test.slow_commit".into(),
                    ..Default::default()
                });
                Ok::<(), jitbot::store::StoreError>(())
            })
            .await
    });
    // The leader renews every third of a term, as `app.rs` does.
    let mut renewals = Vec::new();
    while !committing.is_finished() {
        tokio::time::sleep(term / 3).await;
        let renewed = tokio::task::block_in_place(|| a.lead("a", term));
        renewals.push((
            started.elapsed().as_secs_f64().round(),
            format!("{renewed:?}"),
            a.commits_unanswered().map(|d| d.as_secs_f64().round()),
        ));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(40),
            "the commit did not end within 40 s"
        );
    }
    let committed = committing.await.unwrap();
    let took = started.elapsed();
    assert!(
        committed.is_ok(),
        "the slow commit itself failed after {took:?}: {committed:?}"
    );
    let expected = format!("Ok(Some({token}))");
    assert!(
        renewals.iter().all(|(_, r, _)| *r == expected),
        "a commit answered and successful after {took:?} (the session's statement_timeout is 30 s) made \
         the leader give up its term: renewals (seconds, lead(), commits_unanswered) = {renewals:?}"
    );
}

/// The other side of the same rule: a leader whose commit session alone
/// stops answering (the link black-holed, the leadership's connection
/// fine) keeps its term until that round trip has been under way for
/// `LOCK_WAIT` (12 s), then resigns at its next renewal; the follower
/// takes the term and acts a third of a term later. Meanwhile the leader
/// can commit nothing, so nothing is revoked: the failover goal is 10 s.
/// Here a's commit hangs (a trigger sleeps 25 s once; b's commits are not
/// slowed) and b asks for the term every half second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brk16e_a_leader_whose_commit_session_hangs_is_replaced_after_the_failover_goal() {
    use crate::support::postgres::Database;
    use jitbot::store::{AuditDraft, Store};
    let db = Database::create();
    let tmp = tempfile::tempdir().unwrap();
    let a = Store::open_postgres(&tmp.path().join("a"), 16, &db.settings()).unwrap();
    let b = Store::open_postgres(&tmp.path().join("b"), 16, &db.settings()).unwrap();
    let term = jitbot::app::LEADER_TTL;
    a.lead("a", term).unwrap().expect("a takes the term");
    assert_eq!(b.lead("b", term).unwrap(), None, "a leads");

    db.run(
        "CREATE TABLE brk16e_hang (once boolean); INSERT INTO brk16e_hang VALUES (true); \
         CREATE FUNCTION brk16e_hang() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$ \
         BEGIN IF EXISTS (SELECT 1 FROM brk16e_hang) THEN DELETE FROM brk16e_hang; \
         PERFORM pg_sleep(25); END IF; RETURN NULL; END $$; \
         CREATE TRIGGER brk16e_hang BEFORE INSERT OR UPDATE ON jitbot_kv \
         FOR EACH STATEMENT EXECUTE FUNCTION brk16e_hang();",
    );

    let writer = a.clone();
    let started = std::time::Instant::now();
    let committing = tokio::spawn(async move {
        writer
            .update(chrono::Utc::now(), |tx| {
                tx.set_timer(TimerKind::Warn, "hung", chrono::Utc::now());
                tx.audit(AuditDraft {
                    actor: "test".into(),
                    action: "test.hung_commit".into(),
                    ..Default::default()
                });
                Ok::<(), jitbot::store::StoreError>(())
            })
            .await
    });
    // a renews every third of a term, as `app.rs` does; b asks often.
    let mut next_renewal = std::time::Duration::ZERO;
    let mut b_leads = None;
    while b_leads.is_none() && started.elapsed() < std::time::Duration::from_secs(24) {
        if started.elapsed() >= next_renewal {
            let _ = tokio::task::block_in_place(|| a.lead("a", term));
            next_renewal += term / 3;
        }
        if let Some(token) = tokio::task::block_in_place(|| b.lead("b", term)).unwrap() {
            b_leads = Some((token, started.elapsed()));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    // b acts a third of a term after it took the term (`Store::acts_from`).
    let acts = b_leads.map(|(_, at)| at + term / 3);
    let _ = committing.await;
    let goal = std::time::Duration::from_secs(10);
    assert!(
        acts.is_some_and(|at| at <= goal),
        "a's commit session stopped answering at 0 s and a could commit nothing from then on, yet b could \
         act (revoke) only at {acts:?} (b took the term at {:?}); the failover goal is {goal:?}",
        b_leads.map(|(_, at)| at)
    );
}
