//! Approver DMs on Slack under Slack's own failures: transient error codes,
//! outages, a per-method rate limit smaller than the copies of a card, users
//! of another workspace, and accounts replaced while jitbot runs. The engine,
//! the outbox and the Slack adapter run against the Web API fake (as
//! `slack.rs` runs them), with the scheduler and the outbox worker running.

use crate::support::bot::{Backend, TestBot, DB};
use crate::support::fake_slack::{Call, FakeSlack};
use crate::support::net::eventually;
use jitbot::chat::slack::SlackAdapter;
use jitbot::ports::Notifier;
use jitbot::scheduler::SchedulerSettings;
use jitbot::secret::Secret;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(20);

const SEC: &str = "cn=security,ou=groups,dc=example,dc=org";
const ONCALL: &str = "cn=oncall,ou=groups,dc=example,dc=org";
/// db-admins' Slack channel (`slack::config`).
const CDB: &str = "CDB";

fn slack_id(user: &str) -> String {
    format!("U{}", user.to_uppercase())
}

/// db-admins with `approval_cards = delivery`, two approvals needed,
/// approvers bob and frank by name and `security` (alice, the requester,
/// and through `oncall` carol). frank has no Slack account.
fn dm_bot(backend: Backend, delivery: jitbot_core::policy::CardDelivery) -> TestBot {
    dm_bot_with(backend, delivery, &[])
}

/// [`dm_bot`] with `more` approvers by name.
fn dm_bot_with(backend: Backend, delivery: jitbot_core::policy::CardDelivery, more: &[&str]) -> TestBot {
    let bot = backend
        .builder()
        .policy(|p| {
            let db = &mut p.groups[0];
            for user in more {
                db.approvers.users.insert(jitbot_core::UserId::new(*user));
            }
            db.approval_cards = delivery;
            db.approvals_required = 2;
            db.approvers.users.insert(jitbot_core::UserId::new("frank"));
            db.approvers.groups.insert(jitbot_core::GroupDn::new(SEC));
        })
        .settings(|s| {
            s.retry_base = jitbot_core::Span::from_secs(1);
            s.retry_max = jitbot_core::Span::from_secs(2);
        })
        .build();
    bot.dir.add_user("frank", [("mail", "frank@example.org")]);
    bot.dir.add_group(ONCALL, ["carol"]);
    bot.dir.add_group(SEC, ["alice", ONCALL]);
    bot
}

/// The engine with the Slack adapter as its notifier, the outbox and the
/// scheduler running; the fake knows alice, bob, carol, dave and erin.
struct SlackDms {
    bot: TestBot,
    slack: FakeSlack,
    _stop: watch::Sender<bool>,
}

async fn slack_dms(bot: TestBot, prepare: impl FnOnce(&FakeSlack)) -> SlackDms {
    let slack = FakeSlack::start().await;
    for u in ["alice", "bob", "carol", "dave", "erin"] {
        slack.add_user(&slack_id(u), &format!("{u}@example.org"));
    }
    prepare(&slack);
    let adapter = Arc::new(
        SlackAdapter::with_token(&crate::slack::config(slack.api_url()), Secret::new("xoxb-test"))
            .expect("adapter"),
    );
    let (stop, rx) = watch::channel(false);
    let notifier: Arc<dyn Notifier> = adapter;
    tokio::spawn(jitbot::chat::outbox::run(
        bot.engine.clone(),
        notifier,
        rx.clone(),
    ));
    let settings = SchedulerSettings {
        max_wait: Duration::from_millis(200),
        concurrency: 4,
    };
    tokio::spawn(jitbot::scheduler::run(bot.engine.clone(), settings, rx));
    SlackDms {
        bot,
        slack,
        _stop: stop,
    }
}

impl SlackDms {
    /// The posts of request `id`'s card (those with its Approve button).
    fn card_posts(&self, id: &str) -> Vec<Call> {
        let approve = format!("jit:approve:{id}");
        self.slack
            .calls_to("chat.postMessage")
            .into_iter()
            .filter(|c| c.body.to_string().contains(&approve))
            .collect()
    }
}

crate::both_stores!(a_dm_card_never_goes_to_a_user_of_another_workspace);
/// `users.lookupByEmail` answers with whoever has that address anywhere
/// Slack can see, so the user it returns can belong to another workspace
/// (`team_id` not `slack.team_id`), whose clicks jitbot refuses. Such an
/// approver (like a deactivated or bot account) is unreachable: no DM copy
/// with buttons that could never work, and the channel card lists them.
async fn a_dm_card_never_goes_to_a_user_of_another_workspace(backend: Backend) {
    let h = slack_dms(dm_bot(backend, jitbot_core::policy::CardDelivery::Dm), |slack| {
        slack.answer_with("users.lookupByEmail", |c| {
            let email = c.body["email"].as_str().unwrap_or_default().to_ascii_lowercase();
            let Some(name) = email.strip_suffix("@example.org") else {
                return json!({"ok": false, "error": "users_not_found"});
            };
            if !["alice", "bob", "carol", "dave", "erin"].contains(&name) {
                return json!({"ok": false, "error": "users_not_found"});
            }
            // bob's address belongs to an account of another workspace.
            let team = if name == "bob" { "T2" } else { "T1" };
            json!({"ok": true, "user": {"id": slack_id(name), "team_id": team, "name": name,
                   "deleted": false, "is_bot": false, "profile": {"email": email}}})
        });
    })
    .await;
    let id = TestBot::request_id(&h.bot.ok("alice", "request db-admins 2h fixing replication").await);
    // carol's DM and the channel card (frank has no Slack account).
    let posts = eventually(WAIT, "carol's DM and the channel card", || {
        let posts = h.card_posts(&id);
        let channels: Vec<String> = posts
            .iter()
            .map(|c| c.body["channel"].as_str().unwrap_or_default().to_string())
            .collect();
        (channels.iter().any(|c| c == "DUCAROL") && channels.iter().any(|c| c == CDB)).then_some(posts)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let posts = h
        .card_posts(&id)
        .into_iter()
        .skip(posts.len())
        .chain(posts)
        .collect::<Vec<_>>();
    assert!(
        !posts.iter().any(|c| c.body["channel"] == "DUBOB"),
        "the card went to bob's DM although Slack says his account belongs to workspace T2, \
         whose clicks jitbot refuses: {:#?}",
        posts
            .iter()
            .map(|c| c.body["channel"].clone())
            .collect::<Vec<_>>()
    );
    let channel_card = posts
        .iter()
        .find(|c| c.body["channel"] == CDB)
        .map(|c| c.body.to_string())
        .unwrap_or_default();
    assert!(
        channel_card.contains("Could not reach by DM") && channel_card.contains("bob"),
        "the channel card must list bob as unreachable: {channel_card}"
    );
    assert!(!h.bot.is_member(DB, "alice"));
}

crate::both_stores!(a_transient_slack_error_on_the_decision_is_retried_until_every_copy_shows_it);
/// Slack reports its own hiccups inside HTTP 200 answers: `internal_error`,
/// `fatal_error`, `service_unavailable` and `request_timeout` are in the
/// documented error list of `chat.update` ("likely due to a transient issue
/// on our end"). They are retried like an outage, never taken as a
/// permanent "no": two `internal_error` answers on carol's DM copy while
/// the decision goes out (the decision's update and the one after the
/// grant) still leave her copy showing the decision, not live buttons.
async fn a_transient_slack_error_on_the_decision_is_retried_until_every_copy_shows_it(backend: Backend) {
    let failed = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let shown = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = {
        let failed = failed.clone();
        let shown = shown.clone();
        slack_dms(
            dm_bot(backend, jitbot_core::policy::CardDelivery::Both),
            move |slack| {
                slack.answer_with("chat.update", move |c| {
                    let decision = c.body.to_string().contains("approved by bob, carol");
                    // Slack's hiccup: the first two decision updates of
                    // carol's DM copy are answered internal_error.
                    if c.body["channel"] == "DUCAROL" && decision {
                        if failed.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 2 {
                            return json!({"ok": false, "error": "internal_error"});
                        }
                        shown.store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                    json!({"ok": true, "channel": c.body["channel"], "ts": c.body["ts"],
                       "text": c.body["text"], "message": {"text": c.body["text"]}})
                });
            },
        )
        .await
    };
    let id = TestBot::request_id(&h.bot.ok("alice", "request db-admins 2h fixing replication").await);
    eventually(WAIT, "the channel card and the DMs to bob and carol", || {
        let channels: Vec<String> = h
            .card_posts(&id)
            .iter()
            .map(|c| c.body["channel"].as_str().unwrap_or_default().to_string())
            .collect();
        (["DUBOB", "DUCAROL", CDB]
            .iter()
            .all(|c| channels.iter().any(|x| x == c)))
        .then_some(())
    })
    .await;
    h.bot.ok("bob", &format!("approve {id}")).await;
    h.bot.ok("carol", &format!("approve {id}")).await;
    eventually(WAIT, "alice in db-admins", || {
        h.bot.is_member(DB, "alice").then_some(())
    })
    .await;
    eventually(WAIT, "Slack's internal_error on carol's copy", || {
        (failed.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    // The outbox retries after retry_base (1 s in tests); give it a few.
    let decided = crate::support::net::within(Duration::from_secs(10), || {
        shown.load(std::sync::atomic::Ordering::SeqCst).then_some(())
    })
    .await;
    assert!(
        decided.is_some(),
        "carol's DM copy was never updated with the decision after two transient internal_error answers; \
         it still shows live buttons. chat.update calls: {:#?}",
        h.slack
            .calls_to("chat.update")
            .iter()
            .map(|c| (
                c.body["channel"].clone(),
                c.body.to_string().contains("approved by bob, carol")
            ))
            .collect::<Vec<_>>()
    );
}

crate::both_stores!(a_rate_limit_smaller_than_the_copies_still_brings_every_copy_up_to_date);
/// With `approval_cards = "dm"`/`"both"` every decision is one `chat.update`
/// per copy, and Slack's per-method budget (Tier 3 for chat.update: about
/// 50 a minute per workspace) is shared by all of them, so a large approver
/// group has more copies than one window's budget. Each copy updated is
/// recorded with what it shows and a 429 stops the pass, so the retry
/// resumes at the copies still behind instead of spending the budget again
/// on those already up to date. Here: 5 copies and a budget of 3 per 2 s
/// window; all 5 show the decision within a few windows.
async fn a_rate_limit_smaller_than_the_copies_still_brings_every_copy_up_to_date(backend: Backend) {
    let bot = dm_bot_with(
        backend,
        jitbot_core::policy::CardDelivery::Both,
        &["dave", "erin"],
    );
    let h = slack_dms(bot, |_| {}).await;
    let id = TestBot::request_id(&h.bot.ok("alice", "request db-admins 2h fixing replication").await);
    let copies = ["DUBOB", "DUCAROL", "DUDAVE", "DUERIN", CDB];
    eventually(WAIT, "the channel card and four DMs", || {
        let channels: Vec<String> = h
            .card_posts(&id)
            .iter()
            .map(|c| c.body["channel"].as_str().unwrap_or_default().to_string())
            .collect();
        copies
            .iter()
            .all(|c| channels.iter().any(|x| x == c))
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.slack.budget("chat.update", 3, Duration::from_secs(2), 1);
    h.bot.ok("bob", &format!("approve {id}")).await;
    h.bot.ok("carol", &format!("approve {id}")).await;
    let decided = |channel: &str| {
        h.slack.calls_to("chat.update").iter().any(|c| {
            c.body["channel"] == channel
                && !c.rate_limited
                && c.body.to_string().contains("approved by bob, carol")
        })
    };
    crate::support::net::within(Duration::from_secs(14), || {
        copies.iter().all(|c| decided(c)).then_some(())
    })
    .await;
    let stale: Vec<&str> = copies.iter().copied().filter(|c| !decided(c)).collect();
    let limited = h
        .slack
        .calls_to("chat.update")
        .iter()
        .filter(|c| c.rate_limited)
        .count();
    assert!(
        stale.is_empty(),
        "after 14 s (7 budget windows) these copies still show the request as pending with live \
         buttons: {stale:?}; chat.update was rate limited {limited} times"
    );
}

crate::both_stores!(a_replaced_slack_account_is_found_again_when_slack_refuses_the_cached_id);
/// `users.lookupByEmail` answers are cached (for an hour). When a person's
/// Slack account is replaced (deactivated and provisioned again by SCIM, or
/// moved between workspaces of an org), the mail belongs to a new Slack user
/// and the old id is disabled: when Slack refuses the cached id
/// (`user_disabled`), the cache entry is dropped and the mail looked up
/// again, so bob's new account gets the next card.
async fn a_replaced_slack_account_is_found_again_when_slack_refuses_the_cached_id(backend: Backend) {
    let replaced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = {
        let replaced_lookup = replaced.clone();
        let replaced_open = replaced.clone();
        slack_dms(
            dm_bot(backend, jitbot_core::policy::CardDelivery::Both),
            move |slack| {
                slack.answer_with("users.lookupByEmail", move |c| {
                    let email = c.body["email"].as_str().unwrap_or_default().to_ascii_lowercase();
                    let Some(name) = email.strip_suffix("@example.org") else {
                        return json!({"ok": false, "error": "users_not_found"});
                    };
                    if !["alice", "bob", "carol", "dave", "erin"].contains(&name) {
                        return json!({"ok": false, "error": "users_not_found"});
                    }
                    let mut id = slack_id(name);
                    if name == "bob" && replaced_lookup.load(std::sync::atomic::Ordering::SeqCst) {
                        id = "UBOB2".into();
                    }
                    json!({"ok": true, "user": {"id": id, "team_id": "T1", "name": name,
                       "deleted": false, "is_bot": false, "profile": {"email": email}}})
                });
                slack.answer_with("conversations.open", move |c| {
                    let user = match &c.body["users"] {
                        Value::Array(a) => a.first().and_then(Value::as_str).unwrap_or_default().to_string(),
                        Value::String(s) => s.clone(),
                        _ => String::new(),
                    };
                    if user == "UBOB" && replaced_open.load(std::sync::atomic::Ordering::SeqCst) {
                        return json!({"ok": false, "error": "user_disabled"});
                    }
                    json!({"ok": true, "channel": {"id": format!("D{user}")}})
                });
            },
        )
        .await
    };
    let first = TestBot::request_id(&h.bot.ok("alice", "request db-admins 2h fixing replication").await);
    eventually(WAIT, "bob's DM copy of the first card", || {
        h.card_posts(&first)
            .into_iter()
            .find(|c| c.body["channel"] == "DUBOB")
    })
    .await;
    // bob's Slack account is replaced: the old one is disabled.
    replaced.store(true, std::sync::atomic::Ordering::SeqCst);
    let second = TestBot::request_id(&h.bot.ok("dave", "request db-admins 1h another").await);
    eventually(WAIT, "the second card's channel copy", || {
        h.card_posts(&second)
            .into_iter()
            .find(|c| c.body["channel"] == CDB)
    })
    .await;
    let bob = crate::support::net::within(Duration::from_secs(6), || {
        h.card_posts(&second)
            .into_iter()
            .find(|c| c.body["channel"] == "DUBOB2")
    })
    .await;
    let lookups = h
        .slack
        .calls_to("users.lookupByEmail")
        .iter()
        .filter(|c| c.body["email"] == "bob@example.org")
        .count();
    assert!(
        bob.is_some(),
        "bob's new Slack account never got the second card: the cached id of his disabled \
         account was used ({lookups} lookup(s) of bob's mail in all); channels: {:?}",
        h.card_posts(&second)
            .iter()
            .map(|c| c.body["channel"].clone())
            .collect::<Vec<_>>()
    );
}

crate::both_stores!(an_outage_answer_to_a_dm_open_delays_the_copy_and_never_drops_it);
/// ARCHITECTURE.md: "a rate limit or outage is never 'unreachable': the
/// approver is listed as pending on the channel card and the post fails
/// for later". Slack reports its outages inside HTTP 200 answers
/// (`service_unavailable`, `internal_error`, `fatal_error`,
/// `request_timeout` are documented errors of `conversations.open` and
/// `users.lookupByEmail`): one `service_unavailable` while the card goes
/// out delays bob's DM copy, it does not cost it.
async fn an_outage_answer_to_a_dm_open_delays_the_copy_and_never_drops_it(backend: Backend) {
    let h = slack_dms(
        dm_bot(backend, jitbot_core::policy::CardDelivery::Both),
        |slack| {
            let once = std::sync::atomic::AtomicBool::new(false);
            slack.answer_with("conversations.open", move |c| {
                let user = match &c.body["users"] {
                    Value::Array(a) => a.first().and_then(Value::as_str).unwrap_or_default().to_string(),
                    Value::String(s) => s.clone(),
                    _ => String::new(),
                };
                if user == "UBOB" && !once.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    return json!({"ok": false, "error": "service_unavailable"});
                }
                json!({"ok": true, "channel": {"id": format!("D{user}")}})
            });
        },
    )
    .await;
    let id = TestBot::request_id(&h.bot.ok("alice", "request db-admins 2h fixing replication").await);
    eventually(WAIT, "the channel card and carol's DM", || {
        let channels: Vec<String> = h
            .card_posts(&id)
            .iter()
            .map(|c| c.body["channel"].as_str().unwrap_or_default().to_string())
            .collect();
        (channels.iter().any(|c| c == "DUCAROL") && channels.iter().any(|c| c == CDB)).then_some(())
    })
    .await;
    // The outbox retries after retry_base (1 s here); give it several.
    let bob = crate::support::net::within(Duration::from_secs(8), || {
        h.card_posts(&id)
            .into_iter()
            .find(|c| c.body["channel"] == "DUBOB")
    })
    .await;
    let channel_card = h
        .slack
        .calls()
        .into_iter()
        .filter(|c| (c.method == "chat.postMessage" || c.method == "chat.update") && c.body["channel"] == CDB)
        .map(|c| c.body.to_string())
        .next_back()
        .unwrap_or_default();
    assert!(
        bob.is_some(),
        "one service_unavailable from conversations.open made bob unreachable for good: \
         he never got his DM copy. The channel card says: {channel_card}"
    );
}
