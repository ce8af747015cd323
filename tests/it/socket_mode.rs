//! Slack Socket Mode, the default Slack mode, end to end: the real
//! `jitbot run` binary (its store on sled or PostgreSQL) against a real
//! slapd and a Socket Mode fake written from Slack's protocol description
//! (`support::fake_socket_mode`).

use crate::support::bot::Backend;
use crate::support::fake_slack::{Call, FakeSlack};
use crate::support::fake_socket_mode::{slash_payload, FakeSocketMode};
use crate::support::net::eventually;
use crate::support::process::Jitbot;
use crate::support::slapd::{self, Slapd, APPROVERS, DB_ADMINS};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const APP_TOKEN: &str = "xapp-1-A0JITBOT-socket-test";
const BOT_TOKEN: &str = "xoxb-socket-test";
const CHANNEL: &str = "CJIT";
const WAIT: Duration = Duration::from_secs(15);

fn slack_id(user: &str) -> String {
    format!("U{}", user.to_uppercase())
}

fn dn(user: &str) -> String {
    format!("uid={user},{}", slapd::PEOPLE)
}

/// A Socket Mode config: no signing secret, no public URL. Leases of
/// db-admins last 3 s unless asked otherwise.
fn config(server: &Slapd, slack: &FakeSlack) -> String {
    let ldap = server.ldap_config();
    format!(
        r#"
[server]
listen = "{{listen}}"
admin_token = {{admin}}
shutdown_grace = "2s"

[store]
path = "{{store}}"
cache_mb = 16

[scheduler]
max_wait = "1s"
retry_base = "1s"
retry_max = "2s"

[directory]
kind = "ldap"

[ldap]
url = "{url}"
allow_plaintext_bind = true
bind_dn = "{bind}"
password = {{ file = "{pw}" }}
user_base = "{people}"
placeholder_dn = "{bind}"
connect_timeout = "2s"
operation_timeout = "5s"

[slack]
mode = "socket"
bot_token = {{ env = "SM_BOT_TOKEN" }}
app_token = {{ env = "SM_APP_TOKEN" }}
team_id = "T1"
api_url = "{api}"
default_channel = "{CHANNEL}"

[[group]]
name = "db-admins"
dn = "{DB_ADMINS}"
zsp = true
requesters = {{ users = ["alice", "bob", "dave", "eve"] }}
approvers = {{ groups = ["{APPROVERS}"] }}
default_duration = "3s"
max_duration = "1h"
reason_required = false
"#,
        url = ldap.url,
        bind = ldap.bind_dn,
        pw = ldap.password.file.as_ref().expect("password file").display(),
        people = ldap.user_base,
        api = slack.api_url(),
    )
}

pub(crate) struct Setup {
    server: Slapd,
    sm: FakeSocketMode,
    bot: Jitbot,
}

async fn setup(backend: Backend) -> Setup {
    setup_with(backend, "").await
}

/// [`setup`] with `extra` appended to the config.
async fn setup_with(backend: Backend, extra: &str) -> Setup {
    let server = Slapd::start();
    let slack = FakeSlack::start().await;
    for user in ["alice", "bob", "carol", "eve"] {
        slack.add_user(&slack_id(user), &format!("{user}@example.org"));
    }
    let sm = FakeSocketMode::start(slack.clone(), APP_TOKEN).await;
    let store = backend.run_store();
    let bot = Jitbot::start(
        &store.config(&(config(&server, &slack) + extra)),
        &store.with_env(&[("SM_BOT_TOKEN", BOT_TOKEN), ("SM_APP_TOKEN", APP_TOKEN)]),
    )
    .await;
    Setup { server, sm, bot }
}

/// What the contract adds to this mode's config: one request waiting per
/// person, and a second group alice may request.
fn contract_config() -> String {
    format!(
        r#"
[policy]
max_pending_per_user = 1

[[group]]
name = "web-admins"
dn = "{}"
requesters = {{ users = ["alice"] }}
approvers = {{ groups = ["{APPROVERS}"] }}
default_duration = "30m"
max_duration = "1h"
reason_required = false
"#,
        slapd::WEB_ADMINS
    )
}

impl Setup {
    fn slack(&self) -> &FakeSlack {
        &self.sm.slack
    }

    /// Approval cards posted to the channel, as (request id, call).
    fn cards(&self) -> Vec<(String, Call)> {
        self.slack()
            .calls_to("chat.postMessage")
            .into_iter()
            .filter(|c| c.body["channel"] == CHANNEL)
            .filter_map(|c| {
                action_id(&c.body, "jit:approve:").map(|a| (a["jit:approve:".len()..].to_string(), c))
            })
            .collect()
    }

    async fn card(&self, n: usize) -> String {
        eventually(WAIT, &format!("approval card #{n}"), || {
            self.cards().get(n - 1).map(|(id, _)| id.clone())
        })
        .await
    }

    async fn member(&self, user: &str) -> bool {
        self.server.values(DB_ADMINS, "member").await.contains(&dn(user))
    }

    async fn wait_member(&self, user: &str, present: bool) {
        let deadline = Instant::now() + WAIT;
        while self.member(user).await != present {
            assert!(
                Instant::now() < deadline,
                "{user} never became {} of db-admins; jitbot's log:\n{}",
                if present { "a member" } else { "no member" },
                self.bot.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What jitbot answered a person, through a response_url or ephemerally.
    fn answers_to(&self, user: &str) -> Vec<String> {
        self.slack()
            .calls()
            .into_iter()
            .filter(|c| {
                c.method.starts_with("response/")
                    || (c.method == "chat.postEphemeral" && c.body["user"] == slack_id(user))
            })
            .map(|c| c.body["text"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    async fn request_state(&self, id: &str) -> String {
        let requests = self.bot.admin("requests").await;
        let found = requests.iter().find(|r| r["id"] == id);
        found
            .map(|r| r["state"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    }
}

/// The first `action_id` in a message body starting with `prefix`.
fn action_id(body: &Value, prefix: &str) -> Option<String> {
    let text = body.to_string();
    let start = text.find(prefix)?;
    let end = text[start..].find('"')? + start;
    Some(text[start..end].to_string())
}

crate::both_stores!(
    request_approve_expire_through_socket_mode,
    flavor = "multi_thread",
    worker_threads = 2
);
/// `/jit request` → card → a refused self-approval → a double click by an
/// approver (one grant) → member in slapd → expiry → removed → notice.
async fn request_approve_expire_through_socket_mode(backend: Backend) {
    let s = setup(backend).await;
    s.sm.wait_live(1).await;
    let opened = s.sm.opens();
    assert!(opened[0].granted, "apps.connections.open with the app token");

    let env =
        s.sm.slash(
            &slack_id("alice"),
            CHANNEL,
            "request db-admins 3s fixing replication",
        )
        .await;
    let ack = s.sm.ack(&env).await;
    let reply = ack.payload.expect("a slash command is answered in its ack");
    assert!(reply["text"].as_str().is_some_and(|t| !t.is_empty()), "{reply}");
    let id = s.card(1).await;
    assert_eq!(s.request_state(&id).await, "pending");

    // alice may not approve her own request.
    let env =
        s.sm.click(
            &slack_id("alice"),
            CHANNEL,
            "1700000000.000001",
            &format!("jit:approve:{id}"),
        )
        .await;
    s.sm.ack(&env).await;
    eventually(WAIT, "alice told she cannot approve", || {
        s.answers_to("alice")
            .into_iter()
            .find(|t| t.contains("your own request"))
    })
    .await;
    assert_eq!(s.request_state(&id).await, "pending");
    assert!(!s.member("alice").await);

    // carol (security ⊂ approvers) clicks Approve twice in a row.
    let first =
        s.sm.click(
            &slack_id("carol"),
            CHANNEL,
            "1700000000.000001",
            &format!("jit:approve:{id}"),
        )
        .await;
    let second =
        s.sm.click(
            &slack_id("carol"),
            CHANNEL,
            "1700000000.000001",
            &format!("jit:approve:{id}"),
        )
        .await;
    s.sm.ack(&first).await;
    s.sm.ack(&second).await;
    s.wait_member("alice", true).await;
    assert_eq!(s.request_state(&id).await, "approved");
    let leases = s.bot.admin("leases").await;
    assert_eq!(leases.len(), 1, "one grant for two clicks: {leases:#?}");
    s.slack()
        .wait_for(WAIT, |c| {
            c.method == "chat.update" && c.body["channel"] == CHANNEL
        })
        .await
        .expect("the card is updated in place");

    // The 3 s lease runs out: membership gone, the channel told.
    s.wait_member("alice", false).await;
    assert!(
        s.server
            .values(DB_ADMINS, "member")
            .await
            .contains(&slapd::SERVICE_DN.to_string()),
        "the placeholder stays"
    );
    let notice = s
        .slack()
        .wait_for(WAIT, |c| {
            c.method == "chat.postMessage"
                && c.body["channel"] == CHANNEL
                && c.body.to_string().contains("ended (expired)")
        })
        .await;
    assert!(
        notice.is_some(),
        "no expiry notice in the channel: {:#?}",
        s.slack().calls()
    );
    let leases = s.bot.admin("leases").await;
    assert_eq!(leases[0]["state"], "ended", "{leases:#?}");

    let log = s.bot.log_text();
    assert!(log.contains("Slack Socket Mode connected"), "{log}");
    for secret in [APP_TOKEN, BOT_TOKEN] {
        assert!(!log.contains(secret), "a token leaked into the debug log");
    }
    let delivered = s.sm.assert_all_acked();
    assert_eq!(delivered, 4);
    assert_eq!(s.sm.refused(), 0, "no ticket was used twice");
    assert_eq!(s.cards().len(), 1);
}

crate::both_stores!(
    reconnects_and_redeliveries_lose_nothing_and_repeat_nothing,
    flavor = "multi_thread",
    worker_threads = 2
);
/// Connections rotated by Slack (`disconnect`: refresh_requested, warning)
/// or dropped without a word are reopened with a fresh ticket; an envelope
/// redelivered after a lost ack is acknowledged again but acted on once;
/// a deny reason arrives as a `view_submission`.
async fn reconnects_and_redeliveries_lose_nothing_and_repeat_nothing(backend: Backend) {
    let s = setup(backend).await;
    // slack-morphism keeps two connections; the second opens a little later.
    s.sm.wait_live(2).await;
    let live = s.sm.live();

    s.sm.disconnect(live[1], "refresh_requested", Duration::from_millis(200))
        .await;
    let refreshed = s.sm.wait_new_connection(&live, WAIT).await;
    s.sm.disconnect(refreshed, "warning", Duration::from_millis(200))
        .await;
    let warned =
        s.sm.wait_new_connection(&[live[0], live[1], refreshed], WAIT)
            .await;
    s.sm.drop_socket(live[0]);
    let dropped =
        s.sm.wait_new_connection(&[live[0], live[1], refreshed, warned], WAIT)
            .await;
    let opens = s.sm.opens();
    assert_eq!(
        opens.len(),
        5,
        "one apps.connections.open per connection: {opens:?}"
    );
    assert!(opens.iter().all(|o| o.granted));
    assert_eq!(s.sm.refused(), 0, "a ticket is used once");
    assert_eq!(s.sm.accepted(), 5);
    assert_eq!(s.sm.live().len(), 2, "{:?}", s.sm.live());
    assert!(s.sm.live().contains(&dropped));

    // The command's ack is lost: Slack delivers it again.
    let payload = slash_payload(
        s.slack(),
        &slack_id("alice"),
        CHANNEL,
        "request db-admins 1h redelivered",
        900,
    );
    let env = s.sm.deliver_losing_ack("slash_commands", payload, true).await;
    s.sm.ack(&env).await;
    let tries: Vec<_> =
        s.sm.deliveries()
            .into_iter()
            .filter(|d| d.envelope_id == env)
            .collect();
    assert_eq!(tries.len(), 2, "{tries:?}");
    assert!(tries[0].retry_attempt == 0 && tries[1].retry_attempt == 1 && tries[1].kind == "slash_commands");
    let id = s.card(1).await;
    // And so is the approval's.
    let click = crate::support::fake_socket_mode::block_actions_payload(
        s.slack(),
        &slack_id("carol"),
        CHANNEL,
        "1700000000.000001",
        &format!("jit:approve:{id}"),
        901,
    );
    let env = s.sm.deliver_losing_ack("interactive", click, false).await;
    s.sm.ack(&env).await;
    s.wait_member("alice", true).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        s.bot.admin("requests").await.len(),
        1,
        "one request for two deliveries"
    );
    assert_eq!(s.cards().len(), 1, "one card");
    assert_eq!(s.bot.admin("leases").await.len(), 1, "one grant");

    // Deny with a reason: the click opens a modal, its submission denies.
    let env =
        s.sm.slash(&slack_id("eve"), CHANNEL, "request db-admins 1h second")
            .await;
    s.sm.ack(&env).await;
    let denied = s.card(2).await;
    let env =
        s.sm.click(
            &slack_id("carol"),
            CHANNEL,
            "1700000000.000002",
            &format!("jit:deny:{denied}"),
        )
        .await;
    s.sm.ack(&env).await;
    let open = s
        .slack()
        .wait_for(WAIT, |c| c.method == "views.open")
        .await
        .expect("deny modal opened");
    let metadata = open.body["view"]["private_metadata"].as_str().unwrap_or_default();
    let submit = json!({
        "type": "view_submission",
        "team": {"id": "T1", "domain": "example"},
        "user": {"id": slack_id("carol"), "username": "carol", "team_id": "T1"},
        "api_app_id": crate::support::fake_socket_mode::APP_ID,
        "trigger_id": "submit.1.trigger",
        "view": {
            "id": "V1", "team_id": "T1", "type": "modal", "hash": "1.abc",
            "callback_id": "jit:deny", "private_metadata": metadata,
            "title": {"type": "plain_text", "text": "Deny request"}, "blocks": [],
            "state": {"values": {"reason": {"reason": {"type": "plain_text_input", "value": "not during the freeze"}}}}
        }
    });
    let env = s.sm.deliver("interactive", submit, true).await;
    s.sm.ack(&env).await;
    let deadline = Instant::now() + WAIT;
    while s.request_state(&denied).await != "denied" {
        assert!(
            Instant::now() < deadline,
            "never denied; log:\n{}",
            s.bot.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!s.member("eve").await);

    s.sm.assert_all_acked();
}

crate::both_stores!(
    a_failed_reconnect_is_retried_after_a_pause,
    flavor = "multi_thread",
    worker_threads = 2
);
/// A reconnect that fails (`apps.connections.open` errors) is retried after
/// a pause, not in a tight loop, and the connection comes back.
async fn a_failed_reconnect_is_retried_after_a_pause(backend: Backend) {
    let s = setup(backend).await;
    let first = s.sm.wait_live(1).await;
    s.sm.wait_live(2).await;
    let before = s.sm.opens().len();
    let old = s.sm.live();
    s.sm.fail_next_opens(1);
    s.sm.drop_socket(first);
    let back = s.sm.wait_new_connection(&old, Duration::from_secs(60)).await;
    let opens = s.sm.opens();
    let tries = &opens[before..];
    assert!(tries.len() >= 2, "{tries:?}");
    assert!(!tries[0].granted && tries[1].granted, "{tries:?}");
    let pause = tries[1].at - tries[0].at;
    assert!(pause >= Duration::from_secs(5), "retried after only {pause:?}");
    assert!(s.sm.live().contains(&back));

    // The restored connection carries commands.
    let env =
        s.sm.slash(
            &slack_id("alice"),
            CHANNEL,
            "request db-admins 1h after the outage",
        )
        .await;
    s.sm.ack(&env).await;
    s.card(1).await;
}

// From the adversarial review of issue 14.

crate::both_stores!(
    a_deny_reason_is_taken_in_socket_mode_with_app_id_set,
    flavor = "multi_thread",
    worker_threads = 2
);
/// With `slack.app_id` set (as SECURITY.md recommends for a shared
/// workspace), a deny reason submitted in Socket Mode must still deny.
/// slack-morphism's `view_submission` type has no `api_app_id`, so a
/// handler that re-serialised its event read the payload as coming from app
/// `(none)` and refused it: the deny modal opened, the submit did nothing.
/// Clicks carry the field and pass.
async fn a_deny_reason_is_taken_in_socket_mode_with_app_id_set(backend: Backend) {
    let server = Slapd::start();
    let slack = FakeSlack::start().await;
    for user in ["alice", "bob", "carol", "eve"] {
        slack.add_user(&slack_id(user), &format!("{user}@example.org"));
    }
    let sm = FakeSocketMode::start(slack.clone(), APP_TOKEN).await;
    let cfg = config(&server, &slack).replace(
        "team_id = \"T1\"",
        &format!(
            "team_id = \"T1\"\napp_id = \"{}\"",
            crate::support::fake_socket_mode::APP_ID
        ),
    );
    assert!(cfg.contains("app_id = "));
    let store = backend.run_store();
    let bot = Jitbot::start(
        &store.config(&cfg),
        &store.with_env(&[("SM_BOT_TOKEN", BOT_TOKEN), ("SM_APP_TOKEN", APP_TOKEN)]),
    )
    .await;
    let s = Setup { server, sm, bot };
    s.sm.wait_live(1).await;

    let env =
        s.sm.slash(&slack_id("eve"), CHANNEL, "request db-admins 1h second")
            .await;
    s.sm.ack(&env).await;
    let denied = s.card(1).await;
    let env =
        s.sm.click(
            &slack_id("carol"),
            CHANNEL,
            "1700000000.000002",
            &format!("jit:deny:{denied}"),
        )
        .await;
    s.sm.ack(&env).await;
    let open = s
        .slack()
        .wait_for(WAIT, |c| c.method == "views.open")
        .await
        .expect("deny modal opened (the click passed the app check)");
    let metadata = open.body["view"]["private_metadata"].as_str().unwrap_or_default();
    let submit = json!({
        "type": "view_submission",
        "team": {"id": "T1", "domain": "example"},
        "user": {"id": slack_id("carol"), "username": "carol", "team_id": "T1"},
        "api_app_id": crate::support::fake_socket_mode::APP_ID,
        "trigger_id": "submit.1.trigger",
        "view": {
            "id": "V1", "team_id": "T1", "type": "modal", "hash": "1.abc",
            "callback_id": "jit:deny", "private_metadata": metadata,
            "title": {"type": "plain_text", "text": "Deny request"}, "blocks": [],
            "state": {"values": {"reason": {"reason": {"type": "plain_text_input", "value": "not during the freeze"}}}}
        }
    });
    let env = s.sm.deliver("interactive", submit, true).await;
    s.sm.ack(&env).await;
    let deadline = Instant::now() + WAIT;
    while s.request_state(&denied).await != "denied" {
        assert!(
            Instant::now() < deadline,
            "the deny reason was never taken; log:\n{}",
            s.bot.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Slack's Socket Mode, through the real binary, as a
/// [`crate::contract::Platform`].
pub(crate) async fn contract_platform(backend: Backend) -> Setup {
    let s = setup_with(backend, &contract_config()).await;
    s.sm.wait_live(1).await;
    s
}

impl Setup {
    /// A click whose payload (trigger, `action_ts`, response_url) is fixed
    /// by `n`, so that delivering it again is a redelivery; returns the
    /// response_url's call name once the envelope is acknowledged.
    async fn press_n(&self, user: &str, action: &str, n: u64) -> String {
        let payload = crate::support::fake_socket_mode::block_actions_payload(
            self.slack(),
            &slack_id(user),
            CHANNEL,
            "1700000000.000001",
            action,
            n,
        );
        let env = self.sm.deliver("interactive", payload, false).await;
        self.sm.ack(&env).await;
        format!("response/{n}")
    }

    /// Waits for the `k`th call named `method` (1-based); its text.
    async fn nth_answer(&self, method: &str, k: usize) -> String {
        eventually(WAIT, &format!("answer #{k} on {method}"), || {
            self.slack()
                .calls()
                .into_iter()
                .filter(|c| c.method == method)
                .nth(k - 1)
                .map(|c| c.body["text"].as_str().unwrap_or_default().to_string())
        })
        .await
    }
}

/// Click numbers of the contract, far from the fake's own counter.
const CONTRACT_CLICKS: u64 = 900;

#[async_trait::async_trait]
impl crate::contract::Platform for Setup {
    fn mode(&self) -> &'static str {
        "Slack Socket Mode"
    }

    fn approver(&self) -> &'static str {
        "carol"
    }

    async fn type_command(&self, user: &str, text: &str) -> String {
        // The ack says "working on it"; the answer follows on response_url.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(CONTRACT_CLICKS + 100);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let payload = slash_payload(self.slack(), &slack_id(user), CHANNEL, text, n);
        let env = self.sm.deliver("slash_commands", payload, true).await;
        self.sm.ack(&env).await;
        self.nth_answer(&format!("response/{n}"), 1).await
    }

    async fn press(&self, user: &str, action: &str, click: u32) -> String {
        let method = self
            .press_n(user, action, CONTRACT_CLICKS + u64::from(click))
            .await;
        self.nth_answer(&method, 1).await
    }

    async fn press_again(&self, user: &str, action: &str, click: u32) -> crate::contract::Replay {
        let method = self
            .press_n(user, action, CONTRACT_CLICKS + u64::from(click))
            .await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let answers: Vec<String> = self
            .slack()
            .calls()
            .into_iter()
            .filter(|c| c.method == method)
            .map(|c| c.body["text"].as_str().unwrap_or_default().to_string())
            .collect();
        match answers.as_slice() {
            [_] => crate::contract::Replay::Dropped,
            [_, .., again] => crate::contract::Replay::Answered(again.clone()),
            [] => panic!("the first click was never answered"),
        }
    }

    async fn deny_with_reason(&self, user: &str, request: &str, reason: &str) -> String {
        let n = CONTRACT_CLICKS + 50;
        self.press_n(user, &format!("jit:deny:{request}"), n).await;
        let trigger = format!("{n}.2.trigger");
        let open = self
            .slack()
            .wait_for(WAIT, |c| {
                c.method == "views.open" && c.body["trigger_id"] == trigger
            })
            .await
            .expect("the deny modal opened");
        let before = self.answers_to(user).len();
        let submit = json!({
            "type": "view_submission",
            "team": {"id": "T1", "domain": "example"},
            "user": {"id": slack_id(user), "username": user, "team_id": "T1"},
            "api_app_id": crate::support::fake_socket_mode::APP_ID,
            "trigger_id": "submit.contract.trigger",
            "view": {
                "id": "VCONTRACT", "team_id": "T1", "type": "modal", "hash": "1.abc",
                "callback_id": "jit:deny", "private_metadata": open.body["view"]["private_metadata"],
                "title": {"type": "plain_text", "text": "Deny request"}, "blocks": [],
                "state": {"values": {"reason": {"reason": {"type": "plain_text_input", "value": reason}}}}
            }
        });
        let env = self.sm.deliver("interactive", submit, true).await;
        self.sm.ack(&env).await;
        eventually(WAIT, "the answer to the deny form", || {
            self.answers_to(user).into_iter().nth(before)
        })
        .await
    }

    async fn card(&self, request: &str, ready: &(dyn for<'x> Fn(&'x str) -> bool + Sync)) -> String {
        eventually(WAIT, &format!("the card of {request}"), || {
            self.slack()
                .calls()
                .into_iter()
                .filter(|c| matches!(c.method.as_str(), "chat.postMessage" | "chat.update"))
                .filter(|c| c.body["channel"] == CHANNEL && !c.rate_limited)
                .map(|c| c.body.to_string())
                .rfind(|b| b.contains(request))
                .filter(|b| ready(b))
        })
        .await
    }

    async fn direct_message(&self, user: &str, needle: &str) -> String {
        let dm = format!("D{}", slack_id(user));
        eventually(WAIT, &format!("a DM to {user}"), || {
            self.slack()
                .calls_to("chat.postMessage")
                .into_iter()
                .filter(|c| c.body["channel"] == dm.as_str())
                .map(|c| c.body.to_string())
                .rfind(|b| b.contains(needle))
        })
        .await
    }

    async fn wait_member(&self, user: &str, member: bool) {
        Setup::wait_member(self, user, member).await
    }

    async fn forged_command(&self) -> Option<u16> {
        // Envelopes arrive on a socket opened with the app token: nothing
        // in them is signed.
        None
    }

    async fn rate_limit_next_card(&self) -> bool {
        self.slack().rate_limit_in("chat.postMessage", CHANNEL, 1, 1);
        true
    }

    async fn card_posts(&self, request: &str) -> crate::contract::Posts {
        let posts: Vec<Call> = self
            .slack()
            .calls_to("chat.postMessage")
            .into_iter()
            .filter(|c| c.body["channel"] == CHANNEL)
            .filter(|c| crate::contract::mentions(&c.body.to_string(), request))
            .collect();
        crate::contract::Posts::from_flags(posts.iter().map(|c| c.rate_limited))
    }
}

crate::both_stores!(
    a_graceful_stop_finishes_an_acknowledged_command,
    flavor = "multi_thread",
    worker_threads = 2
);
/// Socket Mode acknowledges an envelope as soon as the work is spawned (as
/// slack-morphism requires), so once acked Slack never delivers it again:
/// jitbot alone owes the person the command. A graceful stop (SIGTERM, as
/// every deploy sends) lets work already acknowledged finish within
/// `server.shutdown_grace` before the process exits. Here the command's
/// `users.info` is held until jitbot is stopping (it logged that it waits,
/// or it exited), then answered: the command must still be carried out.
async fn a_graceful_stop_finishes_an_acknowledged_command(backend: Backend) {
    let mut s = setup(backend).await;
    let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let held = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stopping = stopping.clone();
        let held = held.clone();
        s.slack().answer_with("users.info", move |c| {
            held.store(true, std::sync::atomic::Ordering::SeqCst);
            // Held off the runtime's worker: a worker blocked in place would
            // keep the task in its LIFO slot (here, the fake's socket taking
            // jitbot's ack) from running until the hold ends.
            tokio::task::block_in_place(|| {
                let deadline = Instant::now() + Duration::from_secs(10);
                while !stopping.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
            });
            let user = c.body["user"].as_str().unwrap_or_default().to_string();
            let name = user.trim_start_matches('U').to_ascii_lowercase();
            json!({"ok": true, "user": {"id": user, "team_id": "T1", "name": name,
                   "profile": {"email": format!("{name}@example.org")}}})
        });
    }
    s.sm.wait_live(1).await;
    let env =
        s.sm.slash(
            &slack_id("alice"),
            CHANNEL,
            "request db-admins 30m fixing replication",
        )
        .await;
    let ack = s.sm.ack(&env).await;
    assert!(ack.payload.is_some(), "the command was taken: {ack:?}");
    eventually(WAIT, "the command's users.info call", || {
        held.load(std::sync::atomic::Ordering::SeqCst).then_some(())
    })
    .await;

    let term = std::process::Command::new("kill")
        .args(["-TERM", &s.bot.pid().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    eventually(WAIT, "jitbot stopping (waiting for the command, or gone)", || {
        (s.bot
            .log_text()
            .contains("waiting for acknowledged chat commands")
            || s.bot.has_exited())
        .then_some(())
    })
    .await;
    stopping.store(true, std::sync::atomic::Ordering::SeqCst);

    // Whatever the command leads to: an answer on its response_url, or the
    // approval card in the channel.
    let done = crate::support::net::within(WAIT, || {
        s.slack()
            .calls()
            .into_iter()
            .find(|c| {
                c.method.starts_with("response/")
                    || (c.method == "chat.postMessage" && c.body.to_string().contains("jit:approve:"))
            })
            .map(|c| c.method)
    })
    .await;
    assert!(
        done.is_some(),
        "alice's acknowledged /jit request was dropped by a graceful stop (jitbot exited: {}); \
         Slack calls: {:#?}\njitbot's log:\n{}",
        s.bot.has_exited(),
        s.slack()
            .calls()
            .iter()
            .map(|c| c.method.clone())
            .collect::<Vec<_>>(),
        s.bot.log_text()
    );
}

crate::both_stores!(
    a_command_from_another_workspace_is_acknowledged_with_the_refusal,
    flavor = "multi_thread",
    worker_threads = 2
);
/// A slash command from another workspace (an org-wide install on
/// Enterprise Grid delivers every workspace's commands over the one socket)
/// is refused by the workspace binding and nothing more happens, so its ack
/// carries the refusal, not a promise of work ("Working on it…") that never
/// comes. (HTTP mode answers 403 with the same explanation.)
async fn a_command_from_another_workspace_is_acknowledged_with_the_refusal(backend: Backend) {
    let s = setup(backend).await;
    s.sm.wait_live(1).await;
    let mut payload = slash_payload(
        s.slack(),
        &slack_id("alice"),
        CHANNEL,
        "request db-admins 30m fixing replication",
        77,
    );
    payload["team_id"] = json!("T2");
    let env = s.sm.deliver("slash_commands", payload, true).await;
    let ack = s.sm.ack(&env).await;
    let text = ack
        .payload
        .as_ref()
        .and_then(|p| p["text"].as_str())
        .unwrap_or_default()
        .to_string();
    assert!(
        !text.contains("Working on it") && text.contains("T2") && text.contains("slack.team_id"),
        "a command refused as coming from another workspace is acknowledged with {text:?}"
    );
    // Nothing is done for it: a command from the right workspace, sent
    // after it, is answered first and alone.
    let env = s.sm.slash(&slack_id("alice"), CHANNEL, "list").await;
    s.sm.ack(&env).await;
    eventually(WAIT, "the answer to alice's list", || {
        s.slack()
            .calls()
            .iter()
            .any(|c| c.method.starts_with("response/") && c.method != "response/77")
            .then_some(())
    })
    .await;
    assert!(
        s.slack().calls_to("response/77").is_empty(),
        "{:#?}",
        s.slack().calls()
    );
}
