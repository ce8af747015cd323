//! Slack end to end: real signed HTTP requests into `/slack/*`, the engine
//! with an in-memory directory and a sled or PostgreSQL store, the outbox
//! and scheduler running, and a fake Slack Web API recording what jitbot
//! sends.

use crate::support::bot::{Backend, TestBot, DB};
use crate::support::fake_slack::{Call, FakeSlack};
use jitbot::chat::slack::signature::sign;
use jitbot::chat::slack::{routes, SlackAdapter};
use jitbot::clock::Clock;
use jitbot::config::{SlackConfig, SlackMode};
use jitbot::ports::Notifier;
use jitbot::scheduler::SchedulerSettings;
use jitbot::secret::{Secret, SecretSource};
use jitbot_core::request::RequestState;
use jitbot_core::RequestId;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const SIGNING: &str = "test-signing-secret";
const WAIT: Duration = Duration::from_secs(5);
/// The channel configured for db-admins.
const CDB: &str = "CDB";

struct Harness {
    bot: TestBot,
    slack: FakeSlack,
    base: String,
    http: reqwest::Client,
    next: AtomicU32,
    _stop: watch::Sender<bool>,
}

fn slack_id(user: &str) -> String {
    format!("U{}", user.to_uppercase())
}

pub(crate) fn config(api_url: String) -> SlackConfig {
    SlackConfig {
        mode: SlackMode::Http,
        bot_token: SecretSource::env("JITBOT_TEST_UNUSED_SLACK_TOKEN"),
        signing_secret: None,
        app_token: None,
        team_id: "T1".into(),
        app_id: Some("A1".into()),
        enterprise_id: None,
        api_url,
        user_attribute: "mail".into(),
        default_channel: "CJIT".into(),
        alert_channel: Some("CALERT".into()),
        channels: [("db-admins".to_string(), CDB.to_string())].into(),
    }
}

async fn harness(backend: Backend) -> Harness {
    harness_with(backend.bot()).await
}

async fn harness_with(bot: TestBot) -> Harness {
    let slack = FakeSlack::start().await;
    for u in ["alice", "bob", "carol", "dave", "erin"] {
        slack.add_user(&slack_id(u), &format!("{u}@example.org"));
    }
    let adapter =
        Arc::new(SlackAdapter::with_token(&config(slack.api_url()), Secret::new("xoxb-test")).unwrap());
    let (stop, rx) = watch::channel(false);
    let notifier: Arc<dyn Notifier> = adapter.clone();
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
    let app = routes(
        bot.engine.clone(),
        adapter,
        Secret::new(SIGNING),
        Arc::new(bot.clock.clone()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Harness {
        bot,
        slack,
        base,
        http: reqwest::Client::new(),
        next: AtomicU32::new(0),
        _stop: stop,
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

impl Harness {
    fn n(&self) -> u32 {
        self.next.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn now(&self) -> i64 {
        self.bot.clock.now().timestamp()
    }

    async fn post_raw(&self, path: &str, body: String, ts: i64, secret: &str) -> StatusCode {
        let sig = sign(secret, ts, body.as_bytes());
        self.http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-slack-request-timestamp", ts.to_string())
            .header("x-slack-signature", sig)
            .body(body)
            .send()
            .await
            .unwrap()
            .status()
    }

    async fn post(&self, path: &str, body: String) -> StatusCode {
        self.post_raw(path, body, self.now(), SIGNING).await
    }

    fn command_body(&self, user: &str, text: &str, n: u32) -> String {
        form(&[
            ("token", "legacy"),
            ("team_id", "T1"),
            ("api_app_id", "A1"),
            ("team_domain", "example"),
            ("channel_id", CDB),
            ("channel_name", "db"),
            ("user_id", &slack_id(user)),
            ("user_name", user),
            ("command", "/jit"),
            ("text", text),
            ("response_url", &self.slack.response_url(n)),
            ("trigger_id", &format!("trigger.{n}")),
        ])
    }

    /// `/jit <text>` as `user`; returns the response_url number.
    async fn command(&self, user: &str, text: &str) -> u32 {
        let n = self.n();
        let status = self
            .post("/slack/commands", self.command_body(user, text, n))
            .await;
        assert_eq!(status, StatusCode::OK);
        n
    }

    fn click_payload(&self, user: &str, action_id: &str, action_ts: &str, n: u32) -> String {
        let payload = json!({
            "type": "block_actions",
            "team": {"id": "T1", "domain": "example"},
            "user": {"id": slack_id(user), "username": user, "team_id": "T1"},
            "api_app_id": "A1",
            "container": {"type": "message", "message_ts": "1700000000.000001", "channel_id": CDB, "is_ephemeral": false},
            "trigger_id": format!("trigger.{n}"),
            "channel": {"id": CDB, "name": "db"},
            "response_url": self.slack.response_url(n),
            "actions": [{"type": "button", "action_id": action_id, "block_id": "b1",
                         "text": {"type": "plain_text", "text": "Approve"}, "value": "x", "action_ts": action_ts}]
        });
        form(&[("payload", &payload.to_string())])
    }

    /// A button click; returns the status and the response_url number.
    async fn click(&self, user: &str, action_id: &str, action_ts: &str) -> (StatusCode, u32) {
        let n = self.n();
        let status = self
            .post(
                "/slack/interactions",
                self.click_payload(user, action_id, action_ts, n),
            )
            .await;
        (status, n)
    }

    /// The text posted to response_url `n`.
    async fn answer(&self, n: u32) -> String {
        let method = format!("response/{n}");
        let call = self
            .slack
            .wait_for(WAIT, |c| c.method == method)
            .await
            .unwrap_or_else(|| panic!("no answer on {method}; calls: {:#?}", self.slack.calls()));
        assert_eq!(call.body["response_type"], "ephemeral");
        assert!(
            call.authorization.is_none(),
            "the bot token must not go to response_url"
        );
        call.body["text"].as_str().unwrap_or_default().to_string()
    }

    /// Requests db-admins as alice and returns the request id and the card's ts.
    async fn request_db(&self) -> (String, String) {
        let n = self
            .command("alice", "request db-admins 2h fixing replication")
            .await;
        let text = self.answer(n).await;
        let id = TestBot::request_id(&text);
        let approve = format!("jit:approve:{id}");
        let card = self
            .slack
            .wait_for(WAIT, |c| {
                c.method == "chat.postMessage" && c.body.to_string().contains(&approve)
            })
            .await
            .expect("approval card posted");
        assert_eq!(card.body["channel"], CDB);
        assert_eq!(card.authorization.as_deref(), Some("Bearer xoxb-test"));
        let card_text = card.body.to_string();
        assert!(card_text.contains(&format!("jit:deny:{id}")), "{card_text}");
        assert!(
            card_text.contains("fixing replication") && card_text.contains("0 of 1"),
            "{card_text}"
        );
        let ts = self.slack.calls_to("chat.postMessage").len();
        (id, format!("1700000000.{ts:06}"))
    }

    fn state(&self, id: &str) -> RequestState {
        let rec = self
            .bot
            .engine
            .store()
            .request(&RequestId::new(id))
            .unwrap()
            .unwrap();
        rec.request.state
    }

    fn request_count(&self) -> usize {
        self.bot.engine.store().requests().unwrap().len()
    }

    async fn until(&self, what: &str, f: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !f() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Makes sure response_url `n` gets no answer (work not done twice).
    async fn no_answer(&self, n: u32) {
        let method = format!("response/{n}");
        let got = self
            .slack
            .wait_for(Duration::from_millis(700), |c| c.method == method)
            .await;
        assert!(got.is_none(), "unexpected answer: {got:?}");
    }
}

fn update_for(call: &Call, ts: &str) -> bool {
    call.method == "chat.update" && call.body["ts"] == ts
}

crate::both_stores!(request_approve_grant_expire_through_slack);
async fn request_approve_grant_expire_through_slack(backend: Backend) {
    let h = harness(backend).await;
    let (id, ts) = h.request_db().await;

    let (status, n) = h
        .click("bob", &format!("jit:approve:{id}"), "1700000100.000001")
        .await;
    assert_eq!(status, StatusCode::OK);
    let text = h.answer(n).await;
    assert!(text.contains("Approved"), "{text}");
    h.until("alice in db-admins", || h.bot.is_member(DB, "alice"))
        .await;

    let update = h
        .slack
        .wait_for(WAIT, |c| update_for(c, &ts))
        .await
        .expect("card updated");
    assert_eq!(update.body["channel"], CDB);
    let body = update.body.to_string();
    assert!(!body.contains("action_id"), "buttons must be gone: {body}");
    assert!(body.contains("approved by bob"), "{body}");

    // The requester hears the outcome by DM.
    let dm = h
        .slack
        .wait_for(WAIT, |c| {
            c.method == "chat.postMessage" && c.body["channel"] == "DUALICE"
        })
        .await;
    assert!(dm.is_some(), "no DM to alice: {:#?}", h.slack.calls());
    assert!(!h.slack.calls_to("conversations.open").is_empty());
    // The engine says what kind of news a notice is; Slack marks it with its emoji.
    let text = |c: &Call| c.body["text"].as_str().unwrap_or_default().to_string();
    let granted = h
        .slack
        .wait_for(WAIT, |c| {
            c.method == "chat.postMessage" && c.body["channel"] == CDB && text(c).contains("now has")
        })
        .await
        .expect("a channel notice of the grant");
    assert!(
        text(&granted).starts_with(":key: alice now has `db-admins`"),
        "{granted:#?}"
    );

    // Expiry: the lease was 2h.
    h.bot
        .advance(chrono::Duration::hours(2) + chrono::Duration::seconds(1));
    h.bot.engine.timers_changed().notify_one();
    h.until("alice removed", || !h.bot.is_member(DB, "alice")).await;
    let notice = h
        .slack
        .wait_for(WAIT, |c| {
            c.method == "chat.postMessage" && c.body["channel"] == CDB && c.body.to_string().contains("ended")
        })
        .await;
    assert!(
        notice.is_some(),
        "no channel notice of the expiry: {:#?}",
        h.slack.calls()
    );
    let ended = notice.map(|c| text(&c)).unwrap_or_default();
    assert!(ended.starts_with(":lock: alice's access"), "{ended}");
}

crate::both_stores!(deny_asks_for_a_reason_in_a_modal);
async fn deny_asks_for_a_reason_in_a_modal(backend: Backend) {
    let h = harness(backend).await;
    let (id, ts) = h.request_db().await;

    let (status, n) = h
        .click("bob", &format!("jit:deny:{id}"), "1700000100.000002")
        .await;
    assert_eq!(status, StatusCode::OK);
    let open = h
        .slack
        .wait_for(WAIT, |c| c.method == "views.open")
        .await
        .expect("modal opened");
    assert_eq!(open.body["trigger_id"], format!("trigger.{n}"));
    assert_eq!(open.body["view"]["callback_id"], "jit:deny");
    assert_eq!(
        h.state(&id),
        RequestState::Pending,
        "a click alone denies nothing"
    );

    // Slack hands back the view with what bob typed.
    let metadata = open.body["view"]["private_metadata"]
        .as_str()
        .unwrap()
        .to_string();
    let payload = json!({
        "type": "view_submission",
        "team": {"id": "T1"},
        "user": {"id": "UBOB", "username": "bob", "team_id": "T1"},
        "api_app_id": "A1",
        "trigger_id": "trigger.submit",
        "view": {
            "id": "V1", "team_id": "T1", "type": "modal", "hash": "1.abc",
            "callback_id": "jit:deny", "private_metadata": metadata,
            "title": {"type": "plain_text", "text": "Deny request"}, "blocks": [],
            "state": {"values": {"reason": {"reason": {"type": "plain_text_input", "value": "not during the freeze"}}}}
        }
    });
    let status = h
        .post("/slack/interactions", form(&[("payload", &payload.to_string())]))
        .await;
    assert_eq!(status, StatusCode::OK);
    h.until("request denied", || h.state(&id) == RequestState::Denied)
        .await;
    let eph = h
        .slack
        .wait_for(WAIT, |c| {
            c.method == "chat.postEphemeral" && c.body["user"] == "UBOB"
        })
        .await
        .expect("bob told");
    assert_eq!(eph.body["channel"], CDB);
    let update = h
        .slack
        .wait_for(WAIT, |c| update_for(c, &ts))
        .await
        .expect("card updated");
    let body = update.body.to_string();
    assert!(
        body.contains("not during the freeze") && !body.contains("action_id"),
        "{body}"
    );
    assert!(!h.bot.is_member(DB, "alice"));
}

crate::both_stores!(bare_request_opens_the_request_modal_and_its_submit_requests);
async fn bare_request_opens_the_request_modal_and_its_submit_requests(backend: Backend) {
    let h = harness(backend).await;
    let n = h.command("alice", "request").await;
    let open = h
        .slack
        .wait_for(WAIT, |c| c.method == "views.open")
        .await
        .expect("modal");
    assert_eq!(open.body["trigger_id"], format!("trigger.{n}"));
    assert_eq!(open.body["view"]["callback_id"], "jit:request");
    let metadata = open.body["view"]["private_metadata"]
        .as_str()
        .unwrap()
        .to_string();
    let values = json!({
        "group": {"group": {"type": "plain_text_input", "value": "db-admins"}},
        "duration": {"duration": {"type": "plain_text_input", "value": "1h"}},
        "reason": {"reason": {"type": "plain_text_input", "value": "3 replicas down"}}
    });
    let payload = json!({
        "type": "view_submission", "team": {"id": "T1"}, "api_app_id": "A1", "user": {"id": "UALICE"},
        "view": {"id": "V9", "team_id": "T1", "type": "modal", "hash": "h", "callback_id": "jit:request",
                 "private_metadata": metadata, "state": {"values": values}}
    });
    let status = h
        .post("/slack/interactions", form(&[("payload", &payload.to_string())]))
        .await;
    assert_eq!(status, StatusCode::OK);
    h.until("a request", || h.request_count() == 1).await;
    let rec = h.bot.engine.store().requests().unwrap().remove(0);
    assert_eq!(rec.request.reason, "3 replicas down");
    assert_eq!(rec.request.duration, jitbot_core::Span::from_hours(1));
    assert_eq!(rec.request.requester.as_str(), "alice");
}

crate::both_stores!(refused_clicks_change_nothing);
async fn refused_clicks_change_nothing(backend: Backend) {
    let h = harness(backend).await;
    let (id, _) = h.request_db().await;
    let approve = format!("jit:approve:{id}");

    // Self-approval.
    let (_, n) = h.click("alice", &approve, "1700000100.000010").await;
    let text = h.answer(n).await;
    assert!(text.contains("cannot approve your own request"), "{text}");
    // Not an approver.
    let (_, n) = h.click("dave", &approve, "1700000100.000011").await;
    let text = h.answer(n).await;
    assert!(text.contains("not an approver"), "{text}");
    assert_eq!(h.state(&id), RequestState::Pending);
    assert!(!h.bot.is_member(DB, "alice"));

    // Double click: Slack's retry carries the same action_ts.
    let (_, first) = h.click("bob", &approve, "1700000100.000012").await;
    assert!(h.answer(first).await.contains("Approved"));
    let n = h.n();
    let body = h.click_payload("bob", &approve, "1700000100.000012", n);
    let sig = sign(SIGNING, h.now(), body.as_bytes());
    let status = h
        .http
        .post(format!("{}/slack/interactions", h.base))
        .header("x-slack-request-timestamp", h.now().to_string())
        .header("x-slack-signature", sig)
        .header("x-slack-retry-num", "1")
        .header("x-slack-retry-reason", "http_timeout")
        .body(body)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::OK, "a retry is acknowledged");
    h.no_answer(n).await;
    let rec = h
        .bot
        .engine
        .store()
        .request(&RequestId::new(&id))
        .unwrap()
        .unwrap();
    assert_eq!(rec.request.approvals.len(), 1);
}

crate::both_stores!(a_click_after_the_request_expired_is_answered_and_changes_nothing);
async fn a_click_after_the_request_expired_is_answered_and_changes_nothing(backend: Backend) {
    let h = harness(backend).await;
    let (id, _) = h.request_db().await;
    h.bot.advance(chrono::Duration::hours(2));
    h.bot.engine.timers_changed().notify_one();
    h.until("request timed out", || h.state(&id) == RequestState::TimedOut)
        .await;
    let (status, n) = h
        .click("bob", &format!("jit:approve:{id}"), "1700000100.000020")
        .await;
    assert_eq!(status, StatusCode::OK);
    let text = h.answer(n).await;
    assert!(text.contains("expired") || text.contains("already"), "{text}");
    assert_eq!(h.state(&id), RequestState::TimedOut);
    assert!(!h.bot.is_member(DB, "alice"));
}

crate::both_stores!(forged_stale_malformed_and_oversized_requests_are_refused);
async fn forged_stale_malformed_and_oversized_requests_are_refused(backend: Backend) {
    let h = harness(backend).await;
    let body = h.command_body("alice", "request db-admins 2h x", 1);
    assert_eq!(
        h.post_raw("/slack/commands", body.clone(), h.now(), "wrong-secret")
            .await,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        h.post_raw("/slack/commands", body.clone(), h.now() - 301, SIGNING)
            .await,
        StatusCode::UNAUTHORIZED
    );
    let unsigned = h
        .http
        .post(format!("{}/slack/commands", h.base))
        .body(body.clone())
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(unsigned, StatusCode::UNAUTHORIZED);
    // A signed body changed after signing.
    let ts = h.now();
    let sig = sign(SIGNING, ts, body.as_bytes());
    let tampered = body.replace("db-admins", "db-admin5");
    let status = h
        .http
        .post(format!("{}/slack/commands", h.base))
        .header("x-slack-request-timestamp", ts.to_string())
        .header("x-slack-signature", sig)
        .body(tampered)
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    for payload in [
        form(&[("payload", "{not json")]),
        form(&[("nothing", "here")]),
        form(&[("payload", r#"{"type":"block_actions","user":{"id":"UBOB"}}"#)]),
    ] {
        assert_eq!(
            h.post("/slack/interactions", payload).await,
            StatusCode::BAD_REQUEST
        );
    }
    let (status, _) = h.click("bob", "jit:launch:r-1", "1700000100.000030").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    let huge = form(&[("payload", &"x".repeat(70 * 1024))]);
    assert_eq!(
        h.post("/slack/interactions", huge).await,
        StatusCode::PAYLOAD_TOO_LARGE
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.request_count(), 0);
    assert!(
        h.slack.calls().is_empty(),
        "nothing reached Slack: {:#?}",
        h.slack.calls()
    );
}

crate::both_stores!(payloads_from_elsewhere_and_external_clicks_are_refused);
/// Signed payloads from another workspace or app are refused with 403 and a
/// clear message; a Slack Connect user's click on a shared approval card is
/// answered and changes nothing. Each refusal is logged and counted.
async fn payloads_from_elsewhere_and_external_clicks_are_refused(backend: Backend) {
    let metrics = jitbot::metrics::install().expect("metrics recorder");
    let h = harness(backend).await;
    let (id, _) = h.request_db().await;
    let requests = h.request_count();

    for (from, to) in [("team_id=T1", "team_id=T2"), ("api_app_id=A1", "api_app_id=A2")] {
        let n = h.n();
        let body = h
            .command_body("alice", "request web-admins 1h elsewhere", n)
            .replace(from, to);
        assert!(body.contains(to), "{body}");
        let r = h
            .http
            .post(format!("{}/slack/commands", h.base))
            .header("x-slack-request-timestamp", h.now().to_string())
            .header("x-slack-signature", sign(SIGNING, h.now(), body.as_bytes()))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN, "{to}");
        let text = r.text().await.unwrap();
        assert!(
            text.contains("slack.team_id") || text.contains("slack.app_id"),
            "{text}"
        );
        h.no_answer(n).await;
    }
    assert_eq!(h.request_count(), requests, "nothing was requested");

    let click = |team: &str, app: &str, user_team: &str, n: u32| {
        let payload = json!({
            "type": "block_actions",
            "team": {"id": team},
            "user": {"id": slack_id("bob"), "username": "bob", "team_id": user_team},
            "api_app_id": app,
            "trigger_id": format!("trigger.{n}"),
            "channel": {"id": CDB},
            "response_url": h.slack.response_url(n),
            "actions": [{"type": "button", "action_id": format!("jit:approve:{id}"), "action_ts": format!("{n}.5")}]
        });
        form(&[("payload", &payload.to_string())])
    };
    for (team, app) in [("T2", "A1"), ("T1", "A2")] {
        let n = h.n();
        let status = h.post("/slack/interactions", click(team, app, team, n)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "team {team}, app {app}");
    }
    // Same workspace and app, but bob's account lives in another workspace.
    let n = h.n();
    let status = h
        .post("/slack/interactions", click("T1", "A1", "TOTHER", n))
        .await;
    assert_eq!(status, StatusCode::OK);
    let text = h.answer(n).await;
    assert!(text.contains("own Slack workspace"), "{text}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.state(&id),
        RequestState::Pending,
        "an external click approves nothing"
    );

    // The same click from bob at home still works.
    let n = h.n();
    assert_eq!(
        h.post("/slack/interactions", click("T1", "A1", "T1", n)).await,
        StatusCode::OK
    );
    h.until("approval", || h.state(&id) == RequestState::Approved)
        .await;

    let rendered = metrics.render();
    for reason in ["workspace", "app", "external_user"] {
        let series = format!("jitbot_refused_payloads_total{{platform=\"slack\",reason=\"{reason}\"}} ");
        let count: f64 = rendered
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0);
        assert!(count >= 1.0, "{reason} not counted: {rendered}");
    }
}

crate::both_stores!(rate_limited_card_is_posted_after_retry_after);
async fn rate_limited_card_is_posted_after_retry_after(backend: Backend) {
    let h = harness(backend).await;
    h.slack.rate_limit("chat.postMessage", 1, 1);
    let (id, _) = h.request_db().await;
    // The first post got 429 + Retry-After: 1; the outbox waits, then posts again.
    h.until("the retried post", || {
        h.slack.calls_to("chat.postMessage").len() >= 2
    })
    .await;
    let posts = h.slack.calls_to("chat.postMessage");
    assert_eq!(posts[0].body, posts[1].body);
    assert!(posts[1].body.to_string().contains(&id));
    let stored = || {
        h.bot
            .engine
            .store()
            .request(&RequestId::new(&id))
            .unwrap()
            .unwrap()
            .messages
    };
    h.until("the card's channel and ts stored", || !stored().is_empty())
        .await;
    let messages = stored();
    assert_eq!(messages.len(), 1, "posted once: {messages:?}");
    assert_eq!(
        (messages[0].platform.as_str(), messages[0].channel.as_str()),
        ("slack", CDB)
    );
    assert_eq!(messages[0].id, "1700000000.000001");
}

crate::both_stores!(parse_mistakes_are_explained);
async fn parse_mistakes_are_explained(backend: Backend) {
    let h = harness(backend).await;
    let n = h.command("alice", "request db-admins 5x oops").await;
    let text = h.answer(n).await;
    assert!(text.contains("5x") && !text.contains("waiting"), "{text}");
    let n = h.command("alice", "frobnicate").await;
    assert!(h.answer(n).await.contains("unknown command"));
    let n = h.command("alice", "request nosuch 1h x").await;
    let text = h.answer(n).await;
    assert!(text.to_lowercase().contains("nosuch"), "{text}");
    assert_eq!(h.request_count(), 0);
}

crate::both_stores!(notices_reach_channels_and_people);
async fn notices_reach_channels_and_people(backend: Backend) {
    let h = harness(backend).await;
    let adapter = SlackAdapter::with_token(&config(h.slack.api_url()), Secret::new("xoxb-test")).unwrap();
    let alert = jitbot::ports::Notice {
        to: jitbot::ports::Audience::Alert,
        text: "break-glass <!channel>".into(),
        buttons: vec![jitbot_core::command::Action::Acknowledge("r-9".into())],
        tone: Default::default(),
    };
    adapter.send(&alert).await.unwrap();
    let call = h
        .slack
        .wait_for(WAIT, |c| c.body["channel"] == "CALERT")
        .await
        .unwrap();
    let body: Value = call.body;
    assert!(body.to_string().contains("jit:ack:r-9"), "{body}");
    assert!(body.to_string().contains("&lt;!channel&gt;"), "{body}");
    let fallback = body["text"].as_str().unwrap_or_default();
    assert_eq!(
        fallback, "break-glass &lt;!channel&gt;",
        "the top-level text pings nobody either"
    );

    h.slack.rate_limit("chat.postMessage", 1, 7);
    let err = adapter.send(&alert).await.unwrap_err();
    assert_eq!(err, jitbot::ports::ChatError::RateLimited(7));
}

crate::both_stores!(approval_through_slack_changes_membership_in_slapd);
/// The whole flow against a real slapd: carol approves through nested
/// groups (security ⊂ approvers), alice's DN appears in `member`, and is
/// gone again after expiry.
async fn approval_through_slack_changes_membership_in_slapd(backend: Backend) {
    use crate::support::slapd::{self, Slapd};
    let server = Slapd::start();
    let groups = slapd::group_configs();
    let ldap =
        jitbot::directory::ldap::LdapDirectory::new(&server.ldap_config(), &groups).expect("ldap directory");
    let bot = backend
        .builder()
        .wrap(|_| Arc::new(ldap))
        .policy(|p| p.groups = groups.iter().map(|g| g.to_policy()).collect())
        .build();
    let h = harness_with(bot).await;
    let alice_dn = format!("uid=alice,{}", slapd::PEOPLE);

    let (id, ts) = h.request_db().await;
    let (_, n) = h
        .click("carol", &format!("jit:approve:{id}"), "1700000200.000001")
        .await;
    let text = h.answer(n).await;
    assert!(text.contains("Approved"), "{text}");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !server
        .values(slapd::DB_ADMINS, "member")
        .await
        .contains(&alice_dn)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "alice never added in slapd"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(h.slack.wait_for(WAIT, |c| update_for(c, &ts)).await.is_some());

    h.bot
        .advance(chrono::Duration::hours(2) + chrono::Duration::seconds(1));
    h.bot.engine.timers_changed().notify_one();
    let deadline = tokio::time::Instant::now() + WAIT;
    while server
        .values(slapd::DB_ADMINS, "member")
        .await
        .contains(&alice_dn)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "alice never removed in slapd"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The placeholder keeps the groupOfNames valid.
    assert_eq!(
        server.values(slapd::DB_ADMINS, "member").await,
        vec![slapd::SERVICE_DN.to_string()]
    );
    let notice = h
        .slack
        .wait_for(WAIT, |c| {
            c.method == "chat.postMessage" && c.body.to_string().contains("ended")
        })
        .await;
    assert!(notice.is_some(), "no expiry notice: {:#?}", h.slack.calls());
}

const SEC: &str = "cn=security,ou=groups,dc=example,dc=org";
const ONCALL: &str = "cn=oncall,ou=groups,dc=example,dc=org";

/// db-admins with `approval_cards = "dm"`, two approvals needed, approvers
/// bob and frank by name and the `security` group, which holds alice (the
/// requester) and, through the nested `oncall`, carol. frank has a mail
/// that no Slack user has.
fn dm_bot(backend: Backend, delivery: jitbot_core::policy::CardDelivery) -> TestBot {
    let bot = backend
        .builder()
        .policy(|p| {
            let db = &mut p.groups[0];
            db.approval_cards = delivery;
            db.approvals_required = 2;
            db.approvers.users.insert(jitbot_core::UserId::new("frank"));
            db.approvers.groups.insert(jitbot_core::GroupDn::new(SEC));
        })
        .build();
    bot.dir.add_user("frank", [("mail", "frank@example.org")]);
    bot.dir.add_group(ONCALL, ["carol"]);
    bot.dir.add_group(SEC, ["alice", ONCALL]);
    bot
}

/// The posts of the card of request `id` (those with its Approve button).
fn card_posts(h: &Harness, id: &str) -> Vec<Call> {
    let approve = format!("jit:approve:{id}");
    h.slack
        .calls_to("chat.postMessage")
        .into_iter()
        .filter(|c| c.body.to_string().contains(&approve))
        .collect()
}

/// The last `chat.update` of the message at `channel`/`ts`, once `pred` holds for it.
async fn updated(h: &Harness, channel: &str, ts: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    crate::support::net::eventually(WAIT, what, || {
        h.slack
            .calls_to("chat.update")
            .into_iter()
            .rev()
            .find(|c| c.body["channel"] == channel && c.body["ts"] == ts)
            .map(|c| c.body.to_string())
            .filter(|b| pred(b))
    })
    .await
}

crate::both_stores!(approval_cards_by_dm_reach_every_approver_and_every_copy_is_updated);
async fn approval_cards_by_dm_reach_every_approver_and_every_copy_is_updated(backend: Backend) {
    let h = harness_with(dm_bot(backend, jitbot_core::policy::CardDelivery::Dm)).await;
    let n = h
        .command("alice", "request db-admins 2h fixing replication")
        .await;
    let id = TestBot::request_id(&h.answer(n).await);

    // bob (named) and carol (security ⊃ oncall ∋ carol) get it by DM;
    // alice, the requester, although in security, does not; frank has no
    // Slack user, so the channel card lists him.
    let posts = crate::support::net::eventually(WAIT, "the card's DMs and channel copy", || {
        let posts = card_posts(&h, &id);
        (posts.len() >= 3).then_some(posts)
    })
    .await;
    let channels: std::collections::BTreeSet<String> = posts
        .iter()
        .map(|c| c.body["channel"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        channels,
        ["DUBOB", "DUCAROL", CDB].map(String::from).into(),
        "{posts:#?}"
    );
    assert_eq!(posts.len(), 3, "each copy once: {posts:#?}");
    let opened: Vec<String> = h
        .slack
        .calls_to("conversations.open")
        .iter()
        .map(|c| c.body["users"].to_string())
        .collect();
    assert!(!opened.iter().any(|u| u.contains("UALICE")), "{opened:?}");
    let lookups: Vec<String> = h
        .slack
        .calls_to("users.lookupByEmail")
        .iter()
        .map(|c| c.body["email"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(lookups.contains(&"frank@example.org".to_string()), "{lookups:?}");
    assert!(!lookups.contains(&"alice@example.org".to_string()), "{lookups:?}");
    let channel_card = posts.iter().find(|c| c.body["channel"] == CDB).unwrap();
    let text = channel_card.body.to_string();
    assert!(
        text.contains("Could not reach by DM") && text.contains("frank"),
        "{text}"
    );
    let ts_of = |channel: &str| {
        let post = posts.iter().find(|c| c.body["channel"] == channel).unwrap();
        // The fake numbers messages in posting order.
        let nth = h
            .slack
            .calls_to("chat.postMessage")
            .iter()
            .position(|c| c.body == post.body)
            .unwrap()
            + 1;
        format!("1700000000.{nth:06}")
    };
    let copies: Vec<(String, String)> = ["DUBOB", "DUCAROL", CDB]
        .iter()
        .map(|c| (c.to_string(), ts_of(c)))
        .collect();

    // bob approves from his DM: 1 of 2 shows on every copy, buttons kept,
    // and the channel copy still lists frank.
    let (status, n) = h
        .click("bob", &format!("jit:approve:{id}"), "1700000300.000001")
        .await;
    assert_eq!(status, StatusCode::OK);
    h.answer(n).await;
    for (channel, ts) in &copies {
        let body = updated(&h, channel, ts, "1 of 2 on every copy", |b| b.contains("1 of 2")).await;
        assert!(body.contains(&format!("jit:approve:{id}")), "{channel}: {body}");
        if channel == CDB {
            assert!(body.contains("frank"), "{body}");
        }
    }

    // carol's approval decides: every copy loses its buttons and says who.
    let (_, n) = h
        .click("carol", &format!("jit:approve:{id}"), "1700000300.000002")
        .await;
    assert!(h.answer(n).await.contains("Approved"));
    for (channel, ts) in &copies {
        let body = updated(&h, channel, ts, "the decision on every copy", |b| {
            b.contains("approved by bob, carol")
        })
        .await;
        assert!(
            !body.contains("action_id"),
            "buttons must be gone on {channel}: {body}"
        );
    }
    h.until("alice in db-admins", || h.bot.is_member(DB, "alice"))
        .await;
}

crate::both_stores!(approval_cards_by_dm_skip_the_channel_when_every_approver_is_reached);
async fn approval_cards_by_dm_skip_the_channel_when_every_approver_is_reached(backend: Backend) {
    let bot = dm_bot(backend, jitbot_core::policy::CardDelivery::Dm);
    // frank gets a Slack account with his directory mail.
    let h = harness_with(bot).await;
    h.slack.add_user("UFRANK", "frank@example.org");
    let n = h
        .command("alice", "request db-admins 2h fixing replication")
        .await;
    let id = TestBot::request_id(&h.answer(n).await);
    let posts = crate::support::net::eventually(WAIT, "three DMs", || {
        let posts = card_posts(&h, &id);
        (posts.len() >= 3).then_some(posts)
    })
    .await;
    // Give a stray channel post time to show.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let channels: std::collections::BTreeSet<String> = card_posts(&h, &id)
        .iter()
        .map(|c| c.body["channel"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        channels,
        ["DUBOB", "DUCAROL", "DUFRANK"].map(String::from).into(),
        "{posts:#?}"
    );
    // A second card finds frank through the cache: one lookup per mail.
    let n = h.command("dave", "request db-admins 1h another").await;
    let second = TestBot::request_id(&h.answer(n).await);
    crate::support::net::eventually(WAIT, "the second card's DMs", || {
        (card_posts(&h, &second).len() >= 4).then_some(())
    })
    .await;
    let frank_lookups = h
        .slack
        .calls_to("users.lookupByEmail")
        .iter()
        .filter(|c| c.body["email"] == "frank@example.org")
        .count();
    assert_eq!(frank_lookups, 1, "lookups are cached");
}

crate::both_stores!(approver_lookup_rate_limit_is_retried_after_its_pause);
async fn approver_lookup_rate_limit_is_retried_after_its_pause(backend: Backend) {
    let h = harness_with(dm_bot(backend, jitbot_core::policy::CardDelivery::Both)).await;
    h.slack.rate_limit("users.lookupByEmail", 1, 2);
    let started = tokio::time::Instant::now();
    let n = h
        .command("alice", "request db-admins 2h fixing replication")
        .await;
    let id = TestBot::request_id(&h.answer(n).await);
    crate::support::net::eventually(WAIT, "channel card and DMs to bob and carol", || {
        let channels: Vec<String> = card_posts(&h, &id)
            .iter()
            .map(|c| c.body["channel"].as_str().unwrap_or_default().to_string())
            .collect();
        (["DUBOB", "DUCAROL", CDB]
            .iter()
            .all(|c| channels.iter().any(|x| x == c)))
        .then_some(())
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "the 429's Retry-After of 2 s must be respected"
    );
}

// Adversarial review of issue 14 (approver DMs).

crate::both_stores!(one_uneditable_dm_copy_does_not_keep_the_decision_off_the_others);
/// One copy that Slack will no longer let jitbot edit (the approver was
/// deactivated while the card waited, so their DM is read-only; or, with
/// `both`, the bot was removed from the channel, and the channel copy is the
/// first of the list) must not keep the decision off the other copies.
/// Before the fix the outbox's update loop stops at the first failed copy (`?`), and
/// every retry stops at the same copy, so carol's DM and the channel card
/// keep their Approve buttons and never say the request was decided.
async fn one_uneditable_dm_copy_does_not_keep_the_decision_off_the_others(backend: Backend) {
    let h = harness_with(dm_bot(backend, jitbot_core::policy::CardDelivery::Dm)).await;
    let n = h
        .command("alice", "request db-admins 2h fixing replication")
        .await;
    let id = TestBot::request_id(&h.answer(n).await);
    let posts = crate::support::net::eventually(WAIT, "the card's DMs and channel copy", || {
        let posts = card_posts(&h, &id);
        (posts.len() >= 3).then_some(posts)
    })
    .await;
    assert_eq!(posts.len(), 3, "{posts:#?}");
    // bob's DM copy can no longer be edited.
    h.slack.answer_with("chat.update", |c| {
        if c.body["channel"] == "DUBOB" {
            json!({"ok": false, "error": "message_not_found"})
        } else {
            json!({"ok": true, "channel": c.body["channel"], "ts": c.body["ts"], "text": c.body["text"],
                   "message": {"text": c.body["text"]}})
        }
    });
    let (_, n) = h
        .click("bob", &format!("jit:approve:{id}"), "1700000300.000001")
        .await;
    h.answer(n).await;
    let (_, n) = h
        .click("carol", &format!("jit:approve:{id}"), "1700000300.000002")
        .await;
    assert!(h.answer(n).await.contains("Approved"));
    h.until("alice in db-admins", || h.bot.is_member(DB, "alice"))
        .await;
    // carol's DM and the channel card must both show the decision.
    for channel in ["DUCAROL", CDB] {
        let decided = crate::support::net::eventually(
            Duration::from_secs(20),
            "the decision on the copies Slack lets jitbot edit",
            || {
                h.slack.calls_to("chat.update").into_iter().find(|c| {
                    c.body["channel"] == channel && c.body.to_string().contains("approved by bob, carol")
                })
            },
        )
        .await;
        assert!(
            !decided.body.to_string().contains("action_id"),
            "{channel}: {decided:#?}"
        );
    }
}

crate::both_stores!(a_failed_channel_post_after_the_dms_is_retried_without_orphaning_the_dm_copies);
/// With `approval_cards = "dm"` and an approver no DM reaches, the card
/// goes to the channel after the DMs. When that channel post fails once
/// (a Slack hiccup), the DMs already sent are recorded and the retry posts
/// only the channel copy: bob and carol get the card once, and the decision
/// reaches every copy. (Before the fix the DMs' refs were dropped with the
/// error, the retry posted them again, and the first copies kept live
/// Approve buttons.)
async fn a_failed_channel_post_after_the_dms_is_retried_without_orphaning_the_dm_copies(backend: Backend) {
    let h = harness_with(dm_bot(backend, jitbot_core::policy::CardDelivery::Dm)).await;
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let next_ts = Arc::new(AtomicU32::new(100));
    {
        let failed_once = failed_once.clone();
        let next_ts = next_ts.clone();
        h.slack.answer_with("chat.postMessage", move |c| {
            if c.body["channel"] == CDB && !failed_once.swap(true, Ordering::SeqCst) {
                return json!({"ok": false, "error": "internal_error"});
            }
            let n = next_ts.fetch_add(1, Ordering::SeqCst);
            let ts = format!("1700000000.{n:06}");
            json!({"ok": true, "channel": c.body["channel"], "ts": ts,
                   "message": {"type": "message", "ts": ts, "text": c.body["text"], "bot_id": "B1"}})
        });
    }
    let n = h
        .command("alice", "request db-admins 2h fixing replication")
        .await;
    let id = TestBot::request_id(&h.answer(n).await);
    // Wait for the channel card to get through (after the outbox's retry).
    crate::support::net::eventually(
        Duration::from_secs(30),
        "the channel card, after one failure",
        || {
            card_posts(&h, &id)
                .iter()
                .filter(|c| c.body["channel"] == CDB)
                .nth(1)
                .cloned()
        },
    )
    .await;
    let dms_to_bob = card_posts(&h, &id)
        .iter()
        .filter(|c| c.body["channel"] == "DUBOB")
        .count();
    // Every DM copy ever sent: the decision must reach each of them.
    let (_, n) = h
        .click("bob", &format!("jit:approve:{id}"), "1700000300.000001")
        .await;
    h.answer(n).await;
    let (_, n) = h
        .click("carol", &format!("jit:approve:{id}"), "1700000300.000002")
        .await;
    assert!(h.answer(n).await.contains("Approved"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let updates = h.slack.calls_to("chat.update");
    let dm_posts = h.slack.calls_to("chat.postMessage");
    let mut stale = Vec::new();
    for (i, post) in dm_posts.iter().enumerate() {
        let channel = post.body["channel"].as_str().unwrap_or_default();
        if !channel.starts_with('D') || !post.body.to_string().contains(&format!("jit:approve:{id}")) {
            continue;
        }
        // The answer_with above numbers successful posts from 100 in order;
        // the one failed post took no number.
        let first_cdb = dm_posts
            .iter()
            .position(|p| p.body["channel"] == CDB)
            .unwrap_or(usize::MAX);
        let before_ok = i - usize::from(first_cdb < i);
        let ts = format!("1700000000.{:06}", 100 + before_ok);
        let decided = updates
            .iter()
            .any(|u| u.body["ts"] == ts.as_str() && u.body.to_string().contains("approved by"));
        if !decided {
            stale.push(format!("{channel} {ts}"));
        }
    }
    assert!(
        stale.is_empty(),
        "DM copies never told of the decision: {stale:?}"
    );
    assert_eq!(dms_to_bob, 1, "bob got the card {dms_to_bob} times");
}

crate::both_stores!(a_rate_limited_dm_open_is_retried_later_not_taken_as_unreachable);
/// A 429 from Slack while opening an approver's DM is a "not yet", not a
/// "this person cannot be reached": the copy is retried after the
/// `Retry-After` (by the outbox, not slept on in the delivery worker). (Before
/// the fix one 429 there (Tier 3: a burst of cards to many approvers hits
/// it) moved bob for good from his DM to the channel card's "Could not reach
/// by DM" list.) Meanwhile the channel card lists the approvers whose DM is
/// still pending, and once every DM is out it no longer does.
async fn a_rate_limited_dm_open_is_retried_later_not_taken_as_unreachable(backend: Backend) {
    let h = harness_with(dm_bot(backend, jitbot_core::policy::CardDelivery::Dm)).await;
    h.slack.add_user("UFRANK", "frank@example.org");
    h.slack.rate_limit("conversations.open", 1, 1);
    let n = h
        .command("alice", "request db-admins 2h fixing replication")
        .await;
    let id = TestBot::request_id(&h.answer(n).await);
    crate::support::net::eventually(Duration::from_secs(10), "every approver's DM copy", || {
        let posts = card_posts(&h, &id);
        ["DUBOB", "DUCAROL", "DUFRANK"]
            .iter()
            .all(|d| posts.iter().any(|c| c.body["channel"] == *d))
            .then_some(())
    })
    .await;
    // The channel card, posted while the DMs waited, is brought up to date.
    crate::support::net::eventually(WAIT, "the channel card without pending DMs", || {
        h.newest_in_channel(&id)
            .filter(|c| !c.contains("DM not sent yet"))
    })
    .await;
    let dm_posts = card_posts(&h, &id)
        .iter()
        .filter(|c| c.body["channel"] != CDB)
        .count();
    assert_eq!(dm_posts, 3, "each approver's DM once");
    for c in h.slack.calls() {
        if matches!(c.method.as_str(), "chat.postMessage" | "chat.update") {
            assert!(
                !c.body.to_string().contains("Could not reach by DM"),
                "a rate limit is not unreachable: {c:#?}"
            );
        }
    }
}

/// Slack's HTTP mode as a [`crate::contract::Platform`].
pub(crate) async fn contract_platform(backend: Backend) -> impl crate::contract::Platform {
    harness_with(backend.builder().settings(|s| s.max_pending_per_user = 1).build()).await
}

impl Harness {
    /// The newest post or update in db-admins' channel mentioning `text`.
    fn newest_in_channel(&self, text: &str) -> Option<String> {
        self.slack
            .calls()
            .into_iter()
            .filter(|c| matches!(c.method.as_str(), "chat.postMessage" | "chat.update"))
            .filter(|c| c.body["channel"] == CDB && !c.rate_limited)
            .map(|c| c.body.to_string())
            .rfind(|b| b.contains(text))
    }
}

#[async_trait::async_trait]
impl crate::contract::Platform for Harness {
    fn mode(&self) -> &'static str {
        "Slack HTTP"
    }

    async fn type_command(&self, user: &str, text: &str) -> String {
        let n = self.command(user, text).await;
        self.answer(n).await
    }

    async fn press(&self, user: &str, action: &str, click: u32) -> String {
        let (status, n) = self.click(user, action, &format!("1700000900.{click:06}")).await;
        assert_eq!(status, StatusCode::OK);
        self.answer(n).await
    }

    async fn press_again(&self, user: &str, action: &str, click: u32) -> crate::contract::Replay {
        let (status, n) = self.click(user, action, &format!("1700000900.{click:06}")).await;
        assert_eq!(status, StatusCode::OK, "a retry is acknowledged");
        let method = format!("response/{n}");
        match self
            .slack
            .wait_for(Duration::from_millis(700), |c| c.method == method)
            .await
        {
            Some(c) => crate::contract::Replay::Answered(c.body["text"].to_string()),
            None => crate::contract::Replay::Dropped,
        }
    }

    async fn deny_with_reason(&self, user: &str, request: &str, reason: &str) -> String {
        let (status, n) = self
            .click(
                user,
                &format!("jit:deny:{request}"),
                &format!("1700000950.{:06}", self.n()),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        let trigger = format!("trigger.{n}");
        let open = self
            .slack
            .wait_for(WAIT, |c| {
                c.method == "views.open" && c.body["trigger_id"] == trigger
            })
            .await
            .expect("the deny modal opened");
        let payload = json!({
            "type": "view_submission",
            "team": {"id": "T1"},
            "user": {"id": slack_id(user), "username": user, "team_id": "T1"},
            "api_app_id": "A1",
            "trigger_id": format!("{trigger}.submit"),
            "view": {
                "id": format!("V{n}"), "team_id": "T1", "type": "modal", "hash": "1.abc",
                "callback_id": "jit:deny", "private_metadata": open.body["view"]["private_metadata"],
                "title": {"type": "plain_text", "text": "Deny request"}, "blocks": [],
                "state": {"values": {"reason": {"reason": {"type": "plain_text_input", "value": reason}}}}
            }
        });
        let before = self.slack.calls_to("chat.postEphemeral").len();
        let status = self
            .post("/slack/interactions", form(&[("payload", &payload.to_string())]))
            .await;
        assert_eq!(status, StatusCode::OK);
        // The answer to a modal goes to the channel, seen only by the submitter.
        let uid = slack_id(user);
        crate::support::net::eventually(WAIT, "the answer to the deny form", || {
            self.slack
                .calls_to("chat.postEphemeral")
                .into_iter()
                .skip(before)
                .find(|c| c.body["user"] == uid.as_str())
                .map(|c| c.body["text"].as_str().unwrap_or_default().to_string())
        })
        .await
    }

    async fn card(&self, request: &str, ready: &(dyn for<'x> Fn(&'x str) -> bool + Sync)) -> String {
        let what = format!("the card of {request}");
        crate::support::net::eventually(WAIT, &what, || {
            self.newest_in_channel(request).filter(|c| ready(c))
        })
        .await
    }

    async fn direct_message(&self, user: &str, needle: &str) -> String {
        let dm = format!("D{}", slack_id(user));
        crate::support::net::eventually(WAIT, &format!("a DM to {user}"), || {
            self.slack
                .calls_to("chat.postMessage")
                .into_iter()
                .filter(|c| c.body["channel"] == dm.as_str())
                .map(|c| c.body.to_string())
                .rfind(|b| b.contains(needle))
        })
        .await
    }

    async fn wait_member(&self, user: &str, member: bool) {
        self.until("membership", || self.bot.is_member(DB, user) == member)
            .await;
    }

    async fn forged_command(&self) -> Option<u16> {
        let body = self.command_body("alice", "request db-admins 30m forged", self.n());
        let status = self
            .post_raw("/slack/commands", body, self.now(), "not-the-signing-secret")
            .await;
        Some(status.as_u16())
    }

    async fn rate_limit_next_card(&self) -> bool {
        self.slack.rate_limit_in("chat.postMessage", CDB, 1, 1);
        true
    }

    async fn card_posts(&self, request: &str) -> crate::contract::Posts {
        let posts: Vec<Call> = self
            .slack
            .calls_to("chat.postMessage")
            .into_iter()
            .filter(|c| c.body["channel"] == CDB)
            .filter(|c| crate::contract::mentions(&c.body.to_string(), request))
            .collect();
        crate::contract::Posts::from_flags(posts.iter().map(|c| c.rate_limited))
    }
}

// Approval-card copies across retries, rate limits and restarts (issue 14).

/// The OK answer the fake gives `conversations.open`.
fn dm_open_answer(c: &Call) -> Value {
    let user = c.body["users"]
        .as_str()
        .map(str::to_string)
        .or_else(|| c.body["users"][0].as_str().map(str::to_string))
        .unwrap_or_default();
    json!({"ok": true, "channel": {"id": format!("D{user}")}})
}

crate::both_stores!(a_retry_never_takes_a_dm_copy_for_the_channel_card);
/// Each copy is recorded with what it is, so a retry never takes an
/// approver's DM copy for the channel card (as it did when the channel copy
/// was inferred from "in no DM of this attempt"): frank, whom no DM reaches,
/// is listed on a real channel card, and carol's DM is never rewritten as one.
async fn a_retry_never_takes_a_dm_copy_for_the_channel_card(backend: Backend) {
    let h = harness_with(dm_bot(backend, jitbot_core::policy::CardDelivery::Dm)).await;
    // bob's DM cannot be opened for now (429 three times), so the first
    // attempts leave bob and carol pending; frank has no Slack user. carol's
    // DM goes out once the limit is over, and is recorded as hers.
    h.slack.rate_limit("conversations.open", 3, 1);
    let n = h
        .command("alice", "request db-admins 2h fixing replication")
        .await;
    let id = TestBot::request_id(&h.answer(n).await);
    crate::support::net::eventually(WAIT, "carol's DM copy", || {
        card_posts(&h, &id)
            .into_iter()
            .find(|c| c.body["channel"] == "DUCAROL")
    })
    .await;
    // Before the retry, carol's account is deactivated: Slack now refuses
    // to open her DM (bob's opens fine).
    h.slack.answer_with("conversations.open", |c| {
        if c.body.to_string().contains("UCAROL") {
            json!({"ok": false, "error": "user_disabled"})
        } else {
            dm_open_answer(c)
        }
    });
    crate::support::net::eventually(Duration::from_secs(15), "bob's DM copy on the retry", || {
        card_posts(&h, &id)
            .into_iter()
            .find(|c| c.body["channel"] == "DUBOB")
    })
    .await;
    // frank (no Slack user) and now carol are reached by no DM: the channel
    // card must go out and list them.
    let channel_card = h
        .slack
        .wait_for(Duration::from_secs(5), |c| {
            c.method == "chat.postMessage"
                && c.body["channel"] == CDB
                && c.body.to_string().contains(&format!("jit:approve:{id}"))
        })
        .await;
    let carol_dm_rewritten_as_channel_card = h
        .slack
        .calls_to("chat.update")
        .iter()
        .any(|c| c.body["channel"] == "DUCAROL" && c.body.to_string().contains("Could not reach by DM"));
    assert!(
        channel_card.is_some(),
        "no channel card: frank is never shown the card (carol's DM copy was rewritten as the channel card: {carol_dm_rewritten_as_channel_card})"
    );
}

crate::both_stores!(
    a_crash_during_the_dm_fanout_posts_no_completed_copy_again,
    flavor = "multi_thread",
    worker_threads = 2
);
/// Each copy is recorded as soon as it is posted: a crash in the middle of
/// the DM fan-out (bob's DM out, carol's in flight) posts again at most the
/// copy in flight, never bob's.
async fn a_crash_during_the_dm_fanout_posts_no_completed_copy_again(backend: Backend) {
    let bot = dm_bot(backend, jitbot_core::policy::CardDelivery::Dm);
    let policy = bot.engine.policy().clone();
    let slack = FakeSlack::start().await;
    for u in ["alice", "bob", "carol", "frank"] {
        slack.add_user(&slack_id(u), &format!("{u}@example.org"));
    }
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let next_ts = Arc::new(AtomicU32::new(100));
    {
        let (hang, next_ts) = (hang.clone(), next_ts.clone());
        slack.answer_with("chat.postMessage", move |c| {
            // carol's DM hangs (jitbot is killed while waiting for it).
            if c.body["channel"] == "DUCAROL" && hang.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_secs(2));
            }
            let n = next_ts.fetch_add(1, Ordering::SeqCst);
            let ts = format!("1700000000.{n:06}");
            json!({"ok": true, "channel": c.body["channel"], "ts": ts,
                   "message": {"type": "message", "ts": ts, "text": c.body["text"], "bot_id": "B1"}})
        });
    }
    let adapter = SlackAdapter::with_token(&config(slack.api_url()), Secret::new("xoxb-test")).unwrap();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 2h fixing replication").await);
    // jitbot "crashes" while carol's post is in flight.
    tokio::select! {
        _ = jitbot::chat::outbox::drain(&bot.engine, &adapter) => panic!("the post to carol should hang"),
        c = slack.wait_for(Duration::from_secs(10), |c| c.method == "chat.postMessage" && c.body["channel"] == "DUCAROL") => {
            c.expect("carol's DM is being posted");
        }
    }
    let bob_dms = |s: &FakeSlack| {
        s.calls_to("chat.postMessage")
            .iter()
            .filter(|c| {
                c.body["channel"] == "DUBOB" && c.body.to_string().contains(&format!("jit:approve:{id}"))
            })
            .count()
    };
    assert_eq!(bob_dms(&slack), 1, "bob's DM went out before the crash");
    let dir: Arc<dyn jitbot::ports::Directory> = bot.dir.clone();
    let bot = bot.restart(dir, policy);
    hang.store(false, Ordering::SeqCst);
    jitbot::chat::outbox::drain(&bot.engine, &adapter).await;
    jitbot::chat::outbox::drain(&bot.engine, &adapter).await;
    assert_eq!(
        bob_dms(&slack),
        1,
        "bob's DM copy, completed before the crash, was posted again after the restart; the first one is never updated"
    );
}

crate::both_stores!(a_retry_opens_no_dm_of_an_approver_already_reached);
/// A retry skips, without any call (no `conversations.open`), the approvers
/// whose copy is recorded, so the approvers already reached do not spend the
/// rate-limit budget of every retry; and after a 429 on opening a DM, the
/// other opens of that attempt wait too.
async fn a_retry_opens_no_dm_of_an_approver_already_reached(backend: Backend) {
    let bot = dm_bot(backend, jitbot_core::policy::CardDelivery::Dm);
    let h = harness_with(bot).await;
    h.slack.add_user("UFRANK", "frank@example.org");
    // bob's DM cannot be opened for now (three 429s), carol's and frank's go out.
    h.slack.rate_limit("conversations.open", 3, 1);
    let n = h
        .command("alice", "request db-admins 2h fixing replication")
        .await;
    let id = TestBot::request_id(&h.answer(n).await);
    crate::support::net::eventually(Duration::from_secs(15), "every approver's DM copy", || {
        let posts = card_posts(&h, &id);
        ["DUBOB", "DUCAROL", "DUFRANK"]
            .iter()
            .all(|d| posts.iter().any(|c| c.body["channel"] == *d))
            .then_some(())
    })
    .await;
    let opens_of = |user: &str| {
        h.slack
            .calls_to("conversations.open")
            .iter()
            .filter(|c| c.body.to_string().contains(user))
            .count()
    };
    assert_eq!(
        (opens_of("UCAROL"), opens_of("UFRANK")),
        (1, 1),
        "the retry spent conversations.open calls on carol and frank, whose copies were already recorded"
    );
}

crate::both_stores!(an_endless_dm_rate_limit_still_shows_the_card_in_the_channel);
/// While `conversations.open` stays rate limited, a `dm` card is still posted
/// in the channel, listing the approvers whose DM is pending (frank among
/// them), before the post fails for the deferred DMs.
async fn an_endless_dm_rate_limit_still_shows_the_card_in_the_channel(backend: Backend) {
    let h = harness_with(dm_bot(backend, jitbot_core::policy::CardDelivery::Dm)).await;
    h.slack.rate_limit("conversations.open", 100_000, 1);
    let n = h
        .command("alice", "request db-admins 2h fixing replication")
        .await;
    let id = TestBot::request_id(&h.answer(n).await);
    let anywhere = h
        .slack
        .wait_for(Duration::from_secs(12), |c| {
            c.method == "chat.postMessage" && c.body.to_string().contains(&format!("jit:approve:{id}"))
        })
        .await;
    let opens = h.slack.calls_to("conversations.open").len();
    assert!(
        anywhere.is_some_and(|c| c.body["channel"] == CDB && c.body.to_string().contains("frank")),
        "after {opens} rate-limited conversations.open calls, the card is still posted nowhere; frank is listed nowhere"
    );
}

crate::both_stores!(a_dm_open_rate_limit_never_holds_back_security_alerts);
/// A 429 on opening a card's DM is not slept on inside the delivery worker,
/// nor does it pause the platform: the card is retried after the pause, and
/// a security alert queued meanwhile goes out at once.
async fn a_dm_open_rate_limit_never_holds_back_security_alerts(backend: Backend) {
    let h = harness_with(dm_bot(backend, jitbot_core::policy::CardDelivery::Dm)).await;
    h.slack.add_user("UFRANK", "frank@example.org");
    h.slack.rate_limit("conversations.open", 100_000, 2);
    let n = h
        .command("alice", "request db-admins 2h fixing replication")
        .await;
    TestBot::request_id(&h.answer(n).await);
    h.slack
        .wait_for(WAIT, |c| c.method == "conversations.open")
        .await
        .expect("the card's DMs are being opened");
    let alert = jitbot::store::OutboxItem::Send {
        notice: jitbot::chat::view::Notice {
            to: jitbot::chat::view::Audience::Alert,
            text: "cannot remove bob from db-admins".into(),
            buttons: vec![],
            tone: Default::default(),
        },
    };
    h.bot
        .engine
        .store()
        .update(h.bot.engine.now(), |tx| {
            tx.outbox(alert.clone());
            Ok::<(), jitbot::store::StoreError>(())
        })
        .await
        .unwrap();
    h.bot.engine.outbox_changed().notify_one();
    let queued = tokio::time::Instant::now();
    let sent = h
        .slack
        .wait_for(Duration::from_secs(5), |c| {
            c.method == "chat.postMessage" && c.body.to_string().contains("cannot remove bob")
        })
        .await;
    assert!(
        sent.is_some(),
        "the alert was not posted within {:?} while card DMs met conversations.open 429s",
        queued.elapsed()
    );
}
