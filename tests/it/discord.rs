//! Discord end to end: interaction payloads signed with an Ed25519 key made
//! here, posted to `/discord/interactions`; the engine with an in-memory
//! directory (or a real slapd) and a sled or PostgreSQL store; a fake
//! Discord REST API recording the messages, edits, DMs and deferred answers
//! jitbot sends.

use crate::support::bot::{Backend, TestBot, DB};
use crate::support::fake_discord::{dm_channel, FakeDiscord, APP_ID};
use crate::support::forward::{Forward, Hooks};
use crate::support::slapd::{group_configs, Slapd, DB_ADMINS};
use ed25519_dalek::{Signer, SigningKey};
use jitbot::chat::discord::{routes, DiscordAdapter};
use jitbot::clock::Clock;
use jitbot::config::{DiscordConfig, DiscordMode};
use jitbot::directory::ldap::LdapDirectory;
use jitbot::directory::memory::MemoryDirectory;
use jitbot::ports::{ChatError, Directory, DirectoryError, GroupMember, Notifier};
use jitbot::secret::{Secret, SecretSource};
use jitbot_core::request::RequestState;
use jitbot_core::{GroupDn, RequestId, Span, UserId};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

const KEY: [u8; 32] = [7; 32];
const OTHER_KEY: [u8; 32] = [9; 32];
/// The channel configured for db-admins, and the default one.
const CDB: &str = "510";
const CDEFAULT: &str = "500";
/// Where slash commands are typed.
const CTYPED: &str = "600";
const GUILD: &str = "700000000000000001";

/// Discord user ids of the test people.
fn did(user: &str) -> String {
    let n = ["alice", "bob", "carol", "dave", "erin"]
        .iter()
        .position(|u| *u == user)
        .map(|i| i + 1)
        .unwrap_or(99);
    format!("10000000000000000{n:02}")
}

fn config(public_key: &str) -> DiscordConfig {
    DiscordConfig {
        mode: DiscordMode::Http,
        bot_token: SecretSource::env("JITBOT_TEST_UNUSED_DISCORD_TOKEN"),
        api_url: jitbot::config::DISCORD_API.into(),
        public_key: Some(public_key.to_string()),
        application_id: APP_ID.into(),
        guild_id: None,
        default_channel: CDEFAULT.into(),
        alert_channel: Some("501".into()),
        channels: [("db-admins".to_string(), CDB.to_string())].into(),
        user_attribute: None,
        users: ["alice", "bob", "carol", "dave", "erin"]
            .iter()
            .map(|u| (did(u), u.to_string()))
            .collect(),
    }
}

fn public_hex(key: &[u8; 32]) -> String {
    hex::encode(SigningKey::from_bytes(key).verifying_key().to_bytes())
}

struct Harness {
    bot: TestBot,
    discord: FakeDiscord,
    adapter: Arc<DiscordAdapter>,
    base: String,
    http: reqwest::Client,
    next: AtomicU32,
}

async fn harness(backend: Backend) -> Harness {
    start(backend.bot(), Duration::from_secs(2), |_| {}).await
}

async fn start(bot: TestBot, answer_budget: Duration, tweak: impl FnOnce(&mut DiscordConfig)) -> Harness {
    let discord = FakeDiscord::start().await;
    let key = public_hex(&KEY);
    let mut config = config(&key);
    config.api_url = discord.base.clone();
    tweak(&mut config);
    let adapter = DiscordAdapter::with_token(&config, Secret::new("test-bot-token"))
        .expect("adapter")
        .with_answer_budget(answer_budget);
    let adapter = Arc::new(adapter);
    let app = routes(
        bot.engine.clone(),
        adapter.clone(),
        &key,
        Arc::new(bot.clock.clone()),
    )
    .expect("routes");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Harness {
        bot,
        discord,
        adapter,
        base,
        http: reqwest::Client::new(),
        next: AtomicU32::new(0),
    }
}

fn option(name: &str, value: &str, focused: bool) -> Value {
    json!({ "name": name, "type": 3, "value": value, "focused": focused })
}

impl Harness {
    fn envelope(&self, kind: u8, user: &str, data: Value) -> Value {
        let n = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        json!({
            "type": kind,
            "id": format!("80000000000000{n:04}"),
            "application_id": APP_ID,
            "token": format!("tok-{n}"),
            "version": 1,
            "locale": "en-US",
            "guild_id": GUILD,
            "channel_id": CTYPED,
            "member": { "user": { "id": did(user), "username": user }, "roles": [] },
            "data": data,
        })
    }

    fn command(&self, user: &str, sub: &str, options: &[(&str, &str)]) -> Value {
        let options: Vec<Value> = options.iter().map(|(k, v)| option(k, v, false)).collect();
        let data = json!({ "id": "1", "name": "jit", "type": 1, "options": [{ "name": sub, "type": 1, "options": options }] });
        self.envelope(2, user, data)
    }

    fn autocomplete(&self, user: &str, typed: &str) -> Value {
        let data = json!({ "id": "1", "name": "jit", "type": 1,
            "options": [{ "name": "request", "type": 1, "options": [option("group", typed, true)] }] });
        self.envelope(4, user, data)
    }

    fn button(&self, user: &str, custom_id: &str) -> Value {
        let mut v = self.envelope(3, user, json!({ "custom_id": custom_id, "component_type": 2 }));
        v["message"] = json!({ "id": "1300000000000000001", "channel_id": CDB });
        v
    }

    fn modal(&self, user: &str, custom_id: &str, reason: &str) -> Value {
        let data = json!({ "custom_id": custom_id, "components": [
            { "type": 1, "components": [{ "type": 4, "custom_id": "reason", "value": reason }] }] });
        self.envelope(5, user, data)
    }

    /// Posts `body` signed with `key` at timestamp `ts`.
    async fn post_signed(&self, body: &[u8], ts: i64, key: &[u8; 32]) -> (StatusCode, Value) {
        let ts = ts.to_string();
        let signed = [ts.as_bytes(), body].concat();
        let sig = hex::encode(SigningKey::from_bytes(key).sign(&signed).to_bytes());
        let r = self
            .http
            .post(format!("{}/discord/interactions", self.base))
            .header("content-type", "application/json")
            .header("x-signature-ed25519", sig)
            .header("x-signature-timestamp", ts)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    fn now(&self) -> i64 {
        self.bot.clock.now().timestamp()
    }

    /// Posts a correctly signed interaction; it must be accepted.
    async fn send(&self, payload: &Value) -> Value {
        let (status, body) = self
            .post_signed(payload.to_string().as_bytes(), self.now(), &KEY)
            .await;
        assert_eq!(status, StatusCode::OK, "{payload}: {body}");
        body
    }

    /// An accepted interaction's ephemeral answer text.
    async fn answer(&self, payload: &Value) -> String {
        let r = self.send(payload).await;
        assert_eq!(r["type"], 4, "{r}");
        assert_eq!(r["data"]["flags"], 64, "answers are ephemeral: {r}");
        r["data"]["content"].as_str().unwrap_or_default().to_string()
    }

    async fn drain(&self) {
        jitbot::chat::outbox::drain(&self.bot.engine, self.adapter.as_ref()).await;
    }

    fn state(&self, id: &str) -> RequestState {
        let rec = self
            .bot
            .engine
            .store()
            .request(&RequestId::new(id))
            .unwrap()
            .expect("request");
        rec.request.state
    }

    /// `/jit request db-admins 2h <reason>` by alice; returns the request id.
    async fn alice_requests(&self) -> String {
        let text = self
            .answer(&self.command(
                "alice",
                "request",
                &[
                    ("group", "db-admins"),
                    ("duration", "2h"),
                    ("reason", "3 replicas down"),
                ],
            ))
            .await;
        TestBot::request_id(&text)
    }
}

fn custom_ids(message: &Value) -> Vec<String> {
    message["components"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|row| row["components"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["custom_id"].as_str().map(str::to_string))
        .collect()
}

fn field<'a>(message: &'a Value, name: &str) -> &'a str {
    message["embeds"][0]["fields"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == name))
        .and_then(|f| f["value"].as_str())
        .unwrap_or_else(|| panic!("no field {name} in {message}"))
}

crate::both_stores!(ping_is_answered_with_pong);
async fn ping_is_answered_with_pong(backend: Backend) {
    let h = harness(backend).await;
    let r = h
        .send(&json!({ "type": 1, "id": "1", "application_id": APP_ID, "token": "t", "version": 1 }))
        .await;
    assert_eq!(r, json!({ "type": 1 }));
}

crate::both_stores!(request_posts_a_card_and_an_approval_grants_and_clears_the_buttons);
async fn request_posts_a_card_and_an_approval_grants_and_clears_the_buttons(backend: Backend) {
    let h = harness(backend).await;
    let id = h.alice_requests().await;
    h.drain().await;
    let posted = h.discord.calls_to("POST", &format!("/channels/{CDB}/messages"));
    assert_eq!(posted.len(), 1, "{:?}", h.discord.calls());
    let card = &posted[0].body;
    assert_eq!(
        custom_ids(card),
        [format!("jit:approve:{id}"), format!("jit:deny:{id}")]
    );
    assert_eq!(field(card, "Requester"), "alice");
    assert_eq!(field(card, "Group"), "db-admins");
    assert_eq!(field(card, "Duration"), "2h");
    assert_eq!(field(card, "Reason"), "3 replicas down");
    assert_eq!(field(card, "Approvals"), "0 of 1");
    assert_eq!(
        card["allowed_mentions"]["parse"],
        json!([]),
        "a reason must not ping anyone"
    );

    let text = h.answer(&h.button("bob", &format!("jit:approve:{id}"))).await;
    assert!(text.contains("pprove"), "{text}");
    h.bot.run_due().await;
    assert!(h.bot.is_member(DB, "alice"), "approved request must grant");
    assert_eq!(h.state(&id), RequestState::Approved);

    h.drain().await;
    let edits = h
        .discord
        .calls_to("PATCH", &format!("/channels/{CDB}/messages/*"));
    let last = edits
        .last()
        .unwrap_or_else(|| panic!("the card is edited: {:#?}", h.discord.calls()));
    assert_eq!(
        custom_ids(&last.body),
        Vec::<String>::new(),
        "buttons removed: {}",
        last.body
    );
    assert!(
        field(&last.body, "Status").contains("approved by bob"),
        "{}",
        last.body
    );
    // alice hears the outcome by DM: a DM channel is opened, then written to.
    let dm = h.discord.calls_to("POST", "/users/@me/channels");
    assert!(
        dm.iter().any(|c| c.body["recipient_id"] == did("alice")),
        "{dm:?}"
    );
    let to_alice = h.discord.calls_to(
        "POST",
        &format!("/channels/{}/messages", dm_channel(&did("alice"))),
    );
    assert!(!to_alice.is_empty(), "{:?}", h.discord.calls());
}

crate::both_stores!(a_replayed_extend_click_does_nothing_the_second_time);
/// A signed Extend click captured and sent again inside the signature window
/// is refused by its interaction id: the lease is extended once.
async fn a_replayed_extend_click_does_nothing_the_second_time(backend: Backend) {
    let h = harness(backend).await;
    let id = h.alice_requests().await;
    h.answer(&h.button("bob", &format!("jit:approve:{id}"))).await;
    h.bot.run_due().await;
    let lease = h.bot.lease();
    let click = h.button("alice", &format!("jit:extend:{}", lease.id));
    let body = click.to_string();
    let ts = h.now();
    let (status, first) = h.post_signed(body.as_bytes(), ts, &KEY).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let extended = h.bot.lease().expires_at;
    assert!(extended > lease.expires_at, "the first click extends: {first}");

    h.bot.advance(chrono::Duration::seconds(120));
    let (status, again) = h.post_signed(body.as_bytes(), ts, &KEY).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    let text = again["data"]["content"].as_str().unwrap_or_default();
    assert!(text.contains("already handled"), "{again}");
    assert_eq!(h.bot.lease().expires_at, extended, "the replay extends nothing");
    let extends = h
        .bot
        .audit_actions()
        .iter()
        .filter(|a| a.contains("extend"))
        .count();
    assert_eq!(extends, 1, "{:?}", h.bot.audit_actions());
}

crate::both_stores!(deny_opens_a_modal_and_its_reason_denies);
async fn deny_opens_a_modal_and_its_reason_denies(backend: Backend) {
    let h = harness(backend).await;
    let id = h.alice_requests().await;
    h.drain().await;
    let modal = h.send(&h.button("bob", &format!("jit:deny:{id}"))).await;
    assert_eq!(modal["type"], 9, "{modal}");
    assert_eq!(modal["data"]["custom_id"], format!("jit:deny-modal:{id}"));
    assert_eq!(
        h.state(&id),
        RequestState::Pending,
        "the click alone denies nothing"
    );

    let text = h
        .answer(&h.modal("bob", &format!("jit:deny-modal:{id}"), "not during the freeze"))
        .await;
    assert!(text.to_lowercase().contains("denied"), "{text}");
    assert_eq!(h.state(&id), RequestState::Denied);
    assert!(!h.bot.is_member(DB, "alice"));
    h.drain().await;
    let edits = h
        .discord
        .calls_to("PATCH", &format!("/channels/{CDB}/messages/*"));
    let last = edits
        .last()
        .unwrap_or_else(|| panic!("the card is edited: {:#?}", h.discord.calls()));
    assert!(custom_ids(&last.body).is_empty());
    assert!(
        field(&last.body, "Status").contains("not during the freeze"),
        "{}",
        last.body
    );
}

crate::both_stores!(autocomplete_offers_only_the_groups_the_user_may_request);
async fn autocomplete_offers_only_the_groups_the_user_may_request(backend: Backend) {
    let h = harness(backend).await;
    let choices = |r: Value| -> Vec<String> {
        assert_eq!(r["type"], 8, "{r}");
        r["data"]["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["value"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        choices(h.send(&h.autocomplete("alice", "")).await),
        ["db-admins", "web-admins"]
    );
    assert_eq!(
        choices(h.send(&h.autocomplete("alice", "web")).await),
        ["web-admins"]
    );
    assert_eq!(choices(h.send(&h.autocomplete("erin", "")).await), ["db-admins"]);
    assert!(
        choices(h.send(&h.autocomplete("bob", "")).await).is_empty(),
        "bob may request nothing"
    );
    assert!(
        choices(h.send(&h.autocomplete("mallory", "")).await).is_empty(),
        "unknown people get nothing"
    );
}

crate::both_stores!(refused_requests_change_nothing);
async fn refused_requests_change_nothing(backend: Backend) {
    let h = harness(backend).await;
    let id = h.alice_requests().await;
    h.drain().await;
    let calls = h.discord.calls().len();
    let audit = h.bot.audit_actions();
    let approve = h.button("bob", &format!("jit:approve:{id}")).to_string();
    let now = h.now();

    // A signature over other bytes.
    let ts = now.to_string();
    let sig = hex::encode(
        SigningKey::from_bytes(&KEY)
            .sign(format!("{ts}{{}}").as_bytes())
            .to_bytes(),
    );
    let r = h
        .http
        .post(format!("{}/discord/interactions", h.base))
        .header("x-signature-ed25519", sig)
        .header("x-signature-timestamp", ts)
        .body(approve.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "bad signature");
    let r = h
        .http
        .post(format!("{}/discord/interactions", h.base))
        .body(approve.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "no signature");
    assert_eq!(
        h.post_signed(approve.as_bytes(), now, &OTHER_KEY).await.0,
        StatusCode::UNAUTHORIZED,
        "wrong key"
    );
    assert_eq!(
        h.post_signed(approve.as_bytes(), now - 301, &KEY).await.0,
        StatusCode::UNAUTHORIZED,
        "stale"
    );
    assert_eq!(
        h.post_signed(approve.as_bytes(), now + 301, &KEY).await.0,
        StatusCode::UNAUTHORIZED,
        "future"
    );
    assert_eq!(
        h.post_signed(b"{\"type\":3,", now, &KEY).await.0,
        StatusCode::BAD_REQUEST,
        "malformed JSON"
    );
    let unknown = h.button("bob", &format!("jit:launch:{id}")).to_string();
    assert_eq!(
        h.post_signed(unknown.as_bytes(), now, &KEY).await.0,
        StatusCode::BAD_REQUEST,
        "unknown button"
    );
    let forged_modal = h.modal("bob", "jit:approve-modal:r-1", "x").to_string();
    assert_eq!(
        h.post_signed(forged_modal.as_bytes(), now, &KEY).await.0,
        StatusCode::BAD_REQUEST,
        "unknown modal"
    );

    // A timestamp just inside the window is still accepted.
    assert_eq!(
        h.post_signed(br#"{"type":1}"#, now - 299, &KEY).await.0,
        StatusCode::OK
    );

    h.bot.run_due().await;
    h.drain().await;
    assert_eq!(h.state(&id), RequestState::Pending);
    assert!(!h.bot.is_member(DB, "alice"));
    assert_eq!(h.bot.audit_actions(), audit, "nothing was audited");
    assert_eq!(h.discord.calls().len(), calls, "nothing was sent to Discord");
}

crate::both_stores!(self_approval_is_refused_and_changes_nothing);
async fn self_approval_is_refused_and_changes_nothing(backend: Backend) {
    let h = harness(backend).await;
    let id = h.alice_requests().await;
    let text = h.answer(&h.button("alice", &format!("jit:approve:{id}"))).await;
    assert!(!text.is_empty());
    assert_eq!(h.state(&id), RequestState::Pending, "{text}");
    h.bot.run_due().await;
    assert!(!h.bot.is_member(DB, "alice"));
    // A stranger to jitbot is told so, and nothing happens either.
    let text = h.answer(&h.button("mallory", &format!("jit:approve:{id}"))).await;
    assert!(text.contains("does not know"), "{text}");
    assert_eq!(h.state(&id), RequestState::Pending);
}

/// The in-memory directory behind a slow `find_user`, like a busy LDAP server.
struct SlowLookups(Arc<MemoryDirectory>, Duration);

#[async_trait::async_trait]
impl Hooks for SlowLookups {
    fn inner(&self) -> &dyn Directory {
        &*self.0
    }
    async fn find_user(&self, attribute: &str, value: &str) -> Result<Option<UserId>, DirectoryError> {
        tokio::time::sleep(self.1).await;
        self.0.find_user(attribute, value).await
    }
}

crate::both_stores!(slow_work_is_deferred_and_the_answer_edits_the_original_response);
async fn slow_work_is_deferred_and_the_answer_edits_the_original_response(backend: Backend) {
    // alice is found through a directory attribute holding her Discord id,
    // and that lookup takes longer than the answer budget.
    let bot = backend
        .builder()
        .wrap(|dir| {
            let discord_id = did("alice");
            dir.add_user(
                "alice",
                [("mail", "alice@example.org"), ("discordId", discord_id.as_str())],
            );
            Arc::new(Forward(SlowLookups(dir, Duration::from_millis(400))))
        })
        .build();
    let h = start(bot, Duration::from_millis(50), |c| {
        c.users.clear();
        c.user_attribute = Some("discordId".into());
    })
    .await;
    let r = h.send(&h.command("alice", "groups", &[])).await;
    assert_eq!(
        (r["type"].as_u64(), r["data"]["flags"].as_u64()),
        (Some(5), Some(64)),
        "deferred, ephemeral: {r}"
    );
    let token = "tok-1";
    let path = format!("/webhooks/{APP_ID}/{token}/messages/@original");
    let edit = h
        .discord
        .wait_for(Duration::from_secs(5), |c| c.method == "PATCH" && c.path == path)
        .await
        .expect("the deferred answer arrives as an edit");
    let content = edit.body["content"].as_str().unwrap();
    assert!(
        content.contains("db-admins") && content.contains("web-admins"),
        "{content}"
    );
}

crate::both_stores!(help_and_bad_options_are_answered_at_once);
async fn help_and_bad_options_are_answered_at_once(backend: Backend) {
    let h = harness(backend).await;
    assert!(h
        .answer(&h.command("alice", "help", &[]))
        .await
        .contains("/jit request"));
    let text = h
        .answer(&h.command(
            "alice",
            "request",
            &[("group", "db-admins"), ("duration", "soon")],
        ))
        .await;
    assert!(!text.is_empty());
    assert!(h.bot.engine.store().requests().unwrap().is_empty(), "{text}");
    let unknown = h.command("alice", "list", &[]);
    let mut other = unknown.clone();
    other["data"]["name"] = json!("other");
    let (status, _) = h.post_signed(other.to_string().as_bytes(), h.now(), &KEY).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "a command that is not /jit");
}

crate::both_stores!(registering_the_command_is_a_repeatable_bulk_overwrite);
async fn registering_the_command_is_a_repeatable_bulk_overwrite(backend: Backend) {
    let h = harness(backend).await;
    h.adapter.register_commands().await.expect("register");
    h.adapter.register_commands().await.expect("register again");
    let puts = h
        .discord
        .calls_to("PUT", &format!("/applications/{APP_ID}/commands"));
    assert_eq!(puts.len(), 2);
    assert_eq!(puts[0].body, puts[1].body, "the same definition each time");
    let jit = &puts[0].body[0];
    assert_eq!(jit["name"], "jit");
    let request = jit["options"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "request")
        .unwrap();
    let group = request["options"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "group")
        .unwrap();
    assert_eq!(group["autocomplete"], true);
    let subs: Vec<&str> = jit["options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    for s in [
        "request", "list", "release", "extend", "groups", "pending", "help",
    ] {
        assert!(subs.contains(&s), "{s} missing from {subs:?}");
    }

    let mut in_guild = config(&public_hex(&KEY));
    in_guild.api_url = h.discord.base.clone();
    in_guild.guild_id = Some(GUILD.into());
    let adapter = DiscordAdapter::with_token(&in_guild, Secret::new("t")).unwrap();
    adapter.register_commands().await.expect("register in guild");
    assert_eq!(
        h.discord
            .calls_to("PUT", &format!("/applications/{APP_ID}/guilds/{GUILD}/commands"))
            .len(),
        1
    );
}

crate::both_stores!(rate_limits_reach_the_outbox_as_such);
async fn rate_limits_reach_the_outbox_as_such(backend: Backend) {
    let h = harness(backend).await;
    h.alice_requests().await;
    h.discord.rate_limit(&format!("/channels/{CDB}/messages"), 1);
    let delay = jitbot::chat::outbox::drain(&h.bot.engine, h.adapter.as_ref()).await;
    assert!(delay >= Duration::from_secs(1), "the outbox pauses: {delay:?}");
    h.drain().await;
    assert_eq!(
        h.discord
            .calls_to("POST", &format!("/channels/{CDB}/messages"))
            .len(),
        1,
        "no second try before the pause is over"
    );
    h.bot.advance(chrono::Duration::from_std(delay).unwrap());
    h.drain().await;
    let posted = h.discord.calls_to("POST", &format!("/channels/{CDB}/messages"));
    assert_eq!(
        posted.len(),
        2,
        "refused once, then posted once the pause is over"
    );
    let card = h.bot.engine.card(&h.bot.engine.store().requests().unwrap()[0]);
    h.discord.rate_limit(&format!("/channels/{CDB}/messages"), 1);
    let refused = h.adapter.post_approval(&card).await;
    assert!(matches!(refused, Err(ChatError::RateLimited(_))), "{refused:?}");
}

crate::both_stores!(bad_config_is_refused_before_anything_runs);
async fn bad_config_is_refused_before_anything_runs(backend: Backend) {
    let bot = backend.bot();
    let discord = FakeDiscord::start().await;
    let mut c = config("zz");
    c.api_url = discord.base.clone();
    assert!(DiscordAdapter::with_token(&c, Secret::new("t")).is_ok());
    let adapter = Arc::new(DiscordAdapter::with_token(&c, Secret::new("t")).unwrap());
    assert!(
        routes(bot.engine.clone(), adapter, "zz", Arc::new(bot.clock.clone())).is_err(),
        "bad public key"
    );
    c.default_channel = "general".into();
    assert!(
        DiscordAdapter::with_token(&c, Secret::new("t")).is_err(),
        "channel names are not ids"
    );
}

crate::both_stores!(flow_against_slapd, flavor = "multi_thread", worker_threads = 2);
/// The whole flow against a real OpenLDAP: request, approval by button,
/// membership in slapd, expiry removes it, the card ends without buttons.
async fn flow_against_slapd(backend: Backend) {
    let slapd = Slapd::start();
    let ldap = LdapDirectory::new(&slapd.ldap_config(), &group_configs()).expect("ldap directory");
    let bot = backend.builder().wrap(|_| Arc::new(ldap)).build();
    let h = start(bot, Duration::from_secs(2), |_| {}).await;
    let id = h.alice_requests().await;
    h.drain().await;
    assert_eq!(
        h.discord
            .calls_to("POST", &format!("/channels/{CDB}/messages"))
            .len(),
        1
    );
    h.answer(&h.button("bob", &format!("jit:approve:{id}"))).await;
    h.bot.run_due().await;
    let alice = "uid=alice,ou=people,dc=example,dc=org".to_string();
    assert!(
        slapd.values(DB_ADMINS, "member").await.contains(&alice),
        "granted in slapd"
    );
    h.bot
        .advance(Span::from_hours(2).to_chrono() + chrono::Duration::seconds(1));
    h.bot.run_due().await;
    assert!(
        !slapd.values(DB_ADMINS, "member").await.contains(&alice),
        "revoked in slapd at expiry"
    );
    h.drain().await;
    let edits = h
        .discord
        .calls_to("PATCH", &format!("/channels/{CDB}/messages/*"));
    assert!(custom_ids(&edits.last().expect("card edited").body).is_empty());
}

const SEC: &str = "cn=security,ou=groups,dc=example,dc=org";
const ONCALL: &str = "cn=oncall,ou=groups,dc=example,dc=org";

/// The posts of request `id`'s card (those with its Approve button).
fn card_posts(h: &Harness, id: &str) -> Vec<crate::support::fake_discord::Call> {
    let approve = format!("jit:approve:{id}");
    h.discord
        .calls_to("POST", "/channels/*/messages")
        .into_iter()
        .filter(|c| custom_ids(&c.body).contains(&approve))
        .collect()
}

/// A button click in a DM, shaped as Discord sends it there: no guild, no
/// `member`, the clicker as `user`, the DM as channel.
fn dm_click(h: &Harness, user: &str, custom_id: &str, dm: &str) -> Value {
    let mut v = h.button(user, custom_id);
    let o = v.as_object_mut().unwrap();
    o.remove("guild_id");
    o.remove("member");
    o.insert("user".into(), json!({ "id": did(user), "username": user }));
    o.insert("channel_id".into(), json!(dm));
    o.insert(
        "message".into(),
        json!({ "id": "1300000000000000002", "channel_id": dm }),
    );
    v
}

/// The last edit of each message: path → body.
fn last_edits(h: &Harness) -> std::collections::BTreeMap<String, Value> {
    h.discord
        .calls_to("PATCH", "/channels/*/messages/*")
        .into_iter()
        .map(|c| (c.path, c.body))
        .collect()
}

crate::both_stores!(approval_cards_by_dm_reach_every_approver_and_every_copy_is_updated);
async fn approval_cards_by_dm_reach_every_approver_and_every_copy_is_updated(backend: Backend) {
    // db-admins: `approval_cards = "dm"`, two approvals, approvers bob and
    // frank by name and `security` (alice, the requester, and carol through
    // the nested `oncall`). carol is found by `user_attribute`, bob through
    // `discord.users`; frank by neither.
    let bot = backend
        .builder()
        .policy(|p| {
            let db = &mut p.groups[0];
            db.approval_cards = jitbot_core::policy::CardDelivery::Dm;
            db.approvals_required = 2;
            db.approvers.users.insert(UserId::new("frank"));
            db.approvers.groups.insert(GroupDn::new(SEC));
        })
        .build();
    bot.dir.add_user("frank", [("mail", "frank@example.org")]);
    let carol = did("carol");
    bot.dir.add_user(
        "carol",
        [("mail", "carol@example.org"), ("discordId", carol.as_str())],
    );
    bot.dir.add_group(ONCALL, ["carol"]);
    bot.dir.add_group(SEC, ["alice", ONCALL]);
    let h = start(bot, Duration::from_secs(2), |c| {
        c.users.remove(&did("carol"));
        c.user_attribute = Some("discordId".into());
    })
    .await;

    let id = h.alice_requests().await;
    h.drain().await;
    let opened: BTreeSet<String> = h
        .discord
        .calls_to("POST", "/users/@me/channels")
        .iter()
        .map(|c| c.body["recipient_id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(opened, [did("bob"), did("carol")].into(), "never the requester");
    let posts = card_posts(&h, &id);
    let channels: BTreeSet<String> = posts
        .iter()
        .map(|c| c.path.split('/').nth(2).unwrap_or_default().to_string())
        .collect();
    let (dm_bob, dm_carol) = (dm_channel(&did("bob")), dm_channel(&did("carol")));
    assert_eq!(
        channels,
        [dm_bob.clone(), dm_carol.clone(), CDB.to_string()].into(),
        "{posts:#?}"
    );
    assert_eq!(posts.len(), 3, "each copy once");
    let channel_card = posts
        .iter()
        .find(|c| c.path == format!("/channels/{CDB}/messages"))
        .unwrap();
    assert_eq!(field(&channel_card.body, "Could not reach by DM"), "frank");

    // bob approves from his DM: 1 of 2 on every copy, buttons still there.
    let text = h
        .answer(&dm_click(&h, "bob", &format!("jit:approve:{id}"), &dm_bob))
        .await;
    assert!(text.contains("1 of 2"), "{text}");
    h.drain().await;
    let edits = last_edits(&h);
    for channel in [&dm_bob, &dm_carol, &CDB.to_string()] {
        let (_, body) = edits
            .iter()
            .find(|(path, _)| path.starts_with(&format!("/channels/{channel}/messages/")))
            .unwrap_or_else(|| panic!("copy in {channel} not updated: {edits:#?}"));
        assert_eq!(field(body, "Approvals"), "1 of 2", "{channel}");
        assert_eq!(custom_ids(body).len(), 2, "{channel}: still open");
    }
    let on_channel = edits
        .iter()
        .find(|(p, _)| p.starts_with(&format!("/channels/{CDB}/")))
        .unwrap()
        .1;
    assert_eq!(field(on_channel, "Could not reach by DM"), "frank");

    // carol (found by her directory attribute) decides: every copy says so,
    // without buttons.
    let text = h.answer(&h.button("carol", &format!("jit:approve:{id}"))).await;
    assert!(text.contains("pprove"), "{text}");
    h.bot.run_due().await;
    assert!(h.bot.is_member(DB, "alice"));
    h.drain().await;
    let edits = last_edits(&h);
    for channel in [&dm_bob, &dm_carol, &CDB.to_string()] {
        let (_, body) = edits
            .iter()
            .find(|(path, _)| path.starts_with(&format!("/channels/{channel}/messages/")))
            .unwrap();
        assert!(custom_ids(body).is_empty(), "{channel}: buttons removed: {body}");
        assert!(
            field(body, "Status").contains("approved by bob, carol"),
            "{channel}: {body}"
        );
    }
}

crate::both_stores!(holder_notices_arrive_by_dm_on_slack_and_discord);
/// Grant, expiry warning and expiry reach the holder by DM on both
/// platforms, though the request came from neither (no chat identity
/// stored): Slack finds alice by her directory mail, Discord through
/// `discord.users`.
async fn holder_notices_arrive_by_dm_on_slack_and_discord(backend: Backend) {
    use crate::support::fake_slack::FakeSlack;
    use jitbot::chat::fanout::Fanout;
    use jitbot::chat::slack::SlackAdapter;
    let bot = backend
        .builder()
        .policy(|p| p.groups[0].expiry_warning = Some(Span::from_mins(10)))
        .build();
    let h = start(bot, Duration::from_secs(2), |_| {}).await;
    let slack = FakeSlack::start().await;
    slack.add_user("UALICE", "alice@example.org");
    let slack_config = jitbot::config::SlackConfig {
        mode: jitbot::config::SlackMode::Http,
        bot_token: SecretSource::env("JITBOT_TEST_UNUSED_SLACK_TOKEN"),
        signing_secret: None,
        app_token: None,
        api_url: slack.api_url(),
        user_attribute: "mail".into(),
        default_channel: "CJIT".into(),
        alert_channel: None,
        channels: Default::default(),
        team_id: "T1".into(),
        app_id: None,
        enterprise_id: None,
    };
    let slack_adapter = SlackAdapter::with_token(&slack_config, Secret::new("xoxb-test")).unwrap();
    let both = Fanout::new(vec![
        ("slack".into(), Arc::new(slack_adapter) as Arc<dyn Notifier>),
        ("discord".into(), h.adapter.clone() as Arc<dyn Notifier>),
    ]);
    let discord_dm = format!("/channels/{}/messages", dm_channel(&did("alice")));
    let slack_dms = |needle: &str| {
        slack
            .calls_to("chat.postMessage")
            .into_iter()
            .filter(|c| c.body["channel"] == "DUALICE" && c.body.to_string().contains(needle))
            .count()
    };
    let discord_dms = |needle: &str| {
        h.discord
            .calls_to("POST", &discord_dm)
            .into_iter()
            .filter(|c| c.body.to_string().contains(needle))
            .count()
    };

    let text = h.bot.ok("alice", "request db-admins 1h fixing replication").await;
    let id = TestBot::request_id(&text);
    h.bot.ok("bob", &format!("approve {id}")).await;
    h.bot.run_due().await;
    jitbot::chat::outbox::drain(&h.bot.engine, &both).await;
    assert_eq!(slack_dms("You have `db-admins` until"), 1, "{:#?}", slack.calls());
    assert_eq!(
        discord_dms("You have `db-admins` until"),
        1,
        "{:#?}",
        h.discord.calls()
    );
    assert!(slack
        .calls_to("users.lookupByEmail")
        .iter()
        .any(|c| c.body["email"] == "alice@example.org"));

    h.bot.advance(chrono::Duration::minutes(51));
    h.bot.run_due().await;
    jitbot::chat::outbox::drain(&h.bot.engine, &both).await;
    assert_eq!(
        slack_dms("ends in"),
        1,
        "expiry warning on Slack: {:#?}",
        slack.calls()
    );
    assert_eq!(discord_dms("ends in"), 1, "expiry warning on Discord");

    h.bot.advance(chrono::Duration::minutes(10));
    h.bot.run_due().await;
    assert!(!h.bot.is_member(DB, "alice"));
    jitbot::chat::outbox::drain(&h.bot.engine, &both).await;
    assert_eq!(slack_dms("ended"), 1, "expiry on Slack: {:#?}", slack.calls());
    assert_eq!(discord_dms("ended"), 1, "expiry on Discord");
}

crate::both_stores!(an_approver_refusing_dms_is_listed_on_the_channel_card);
/// With `approval_cards = "both"`, the channel copy goes out first; bob does
/// not accept DMs (Discord's 403, code 50007), so the channel copy is
/// rewritten to list him, while carol's DM still goes out and the post
/// succeeds.
async fn an_approver_refusing_dms_is_listed_on_the_channel_card(backend: Backend) {
    let bot = backend
        .builder()
        .policy(|p| p.groups[0].approval_cards = jitbot_core::policy::CardDelivery::Both)
        .build();
    let h = start(bot, Duration::from_secs(2), |_| {}).await;
    h.discord.refuse_dms(&did("bob"));
    let id = h.alice_requests().await;
    h.drain().await;
    let posts = card_posts(&h, &id);
    let paths: Vec<&str> = posts.iter().map(|c| c.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            format!("/channels/{CDB}/messages"),
            format!("/channels/{}/messages", dm_channel(&did("bob"))),
            format!("/channels/{}/messages", dm_channel(&did("carol")))
        ],
        "channel first, then the DMs (bob's refused)"
    );
    let edits = h
        .discord
        .calls_to("PATCH", &format!("/channels/{CDB}/messages/*"));
    let last = edits.last().expect("channel card rewritten");
    assert_eq!(field(&last.body, "Could not reach by DM"), "bob");
    assert_eq!(custom_ids(&last.body).len(), 2, "still open");
    let rec = h
        .bot
        .engine
        .store()
        .request(&RequestId::new(&id))
        .unwrap()
        .unwrap();
    assert_eq!(rec.messages.len(), 2, "both copies recorded: {:?}", rec.messages);
}

crate::both_stores!(a_rate_limited_dm_open_is_retried_later_not_taken_as_unreachable);
/// A 429 on `POST /users/@me/channels` is a "not yet", never "cannot be
/// reached": the copies are retried after the pause (not slept on in the
/// delivery worker), and bob and carol get their DMs; the channel card,
/// posted while they waited (`approval_cards = "dm"`), lists them as pending
/// and then no longer does, and never as unreachable.
async fn a_rate_limited_dm_open_is_retried_later_not_taken_as_unreachable(backend: Backend) {
    let bot = backend
        .builder()
        .policy(|p| p.groups[0].approval_cards = jitbot_core::policy::CardDelivery::Dm)
        .build();
    let h = start(bot, Duration::from_secs(2), |_| {}).await;
    h.discord.rate_limit("/users/@me/channels", 1);
    let id = h.alice_requests().await;
    let delay = jitbot::chat::outbox::drain(&h.bot.engine, h.adapter.as_ref()).await;
    h.bot.advance(chrono::Duration::from_std(delay).unwrap());
    h.drain().await;
    let channels: Vec<String> = card_posts(&h, &id)
        .iter()
        .map(|c| c.path.split('/').nth(2).unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        channels,
        [
            CDB.to_string(),
            dm_channel(&did("bob")),
            dm_channel(&did("carol"))
        ],
        "the channel card while the DMs waited, then every approver by DM, each once"
    );
    let edits = h
        .discord
        .calls_to("PATCH", &format!("/channels/{CDB}/messages/*"));
    let last = edits.last().expect("the channel card is brought up to date");
    assert!(!last.body.to_string().contains("DM not sent yet"), "{last:#?}");
    for c in h.discord.calls() {
        assert!(
            !c.body.to_string().contains("Could not reach by DM"),
            "a rate limit is not unreachable: {c:#?}"
        );
    }
}

crate::both_stores!(a_lasting_dm_rate_limit_is_retried_for_the_missing_copy_only);
/// A rate limit that lasts fails the post for later, with the copies made
/// recorded: the channel card (listing bob and carol as pending meanwhile),
/// then, once the limit is over, only the missing DMs, each once; no copy
/// ever lists anyone as unreachable, and the other deliveries are not paused.
async fn a_lasting_dm_rate_limit_is_retried_for_the_missing_copy_only(backend: Backend) {
    let bot = backend
        .builder()
        .policy(|p| p.groups[0].approval_cards = jitbot_core::policy::CardDelivery::Both)
        .build();
    let h = start(bot, Duration::from_secs(2), |_| {}).await;
    // bob's DM is opened first: three tries are answered 429.
    h.discord.rate_limit("/users/@me/channels", 3);
    let id = h.alice_requests().await;
    let mut delay = jitbot::chat::outbox::drain(&h.bot.engine, h.adapter.as_ref()).await;
    assert!(
        delay >= Duration::from_secs(1),
        "the card waits for the pause: {delay:?}"
    );
    let rec = h
        .bot
        .engine
        .store()
        .request(&RequestId::new(&id))
        .unwrap()
        .unwrap();
    assert_eq!(
        rec.messages.len(),
        1,
        "the channel card recorded: {:?}",
        rec.messages
    );
    for _ in 0..2 {
        h.bot.advance(chrono::Duration::from_std(delay).unwrap());
        delay = jitbot::chat::outbox::drain(&h.bot.engine, h.adapter.as_ref()).await;
    }
    h.bot.advance(chrono::Duration::from_std(delay).unwrap());
    h.drain().await;
    let mut paths: Vec<String> = card_posts(&h, &id).iter().map(|c| c.path.clone()).collect();
    paths.sort();
    let mut want = vec![
        format!("/channels/{CDB}/messages"),
        format!("/channels/{}/messages", dm_channel(&did("bob"))),
        format!("/channels/{}/messages", dm_channel(&did("carol"))),
    ];
    want.sort();
    assert_eq!(paths, want, "each copy once");
    for edit in h.discord.calls_to("PATCH", "/channels/*/messages/*") {
        assert!(
            !edit.body.to_string().contains("Could not reach by DM"),
            "{edit:#?}"
        );
    }
    // The decision reaches all three copies.
    h.answer(&h.button("bob", &format!("jit:approve:{id}"))).await;
    h.drain().await;
    let edits = last_edits(&h);
    assert_eq!(edits.len(), 3, "{edits:#?}");
    assert!(edits.values().all(|b| custom_ids(b).is_empty()), "{edits:#?}");
}

/// Discord's HTTP interactions mode as a [`crate::contract::Platform`].
pub(crate) async fn contract_platform(backend: Backend) -> impl crate::contract::Platform {
    let bot = backend.builder().settings(|s| s.max_pending_per_user = 1).build();
    start(bot, Duration::from_secs(2), |_| {}).await
}

impl Harness {
    /// Runs due timers and the outbox until `f` finds what it looks for.
    /// The test clock moves on to a delivery put off by a short pause (a
    /// rate limit), as time would.
    async fn poll<T>(&self, what: &str, f: impl Fn() -> Option<T>) -> T {
        let deadline = tokio::time::Instant::now() + crate::contract::WAIT;
        loop {
            self.bot.run_due().await;
            let wait = jitbot::chat::outbox::drain(&self.bot.engine, self.adapter.as_ref()).await;
            if let Some(found) = f() {
                return found;
            }
            if wait <= Duration::from_secs(2) {
                self.bot
                    .advance(chrono::Duration::from_std(wait).unwrap_or_default());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for {what}; calls: {:#?}",
                self.discord.calls()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A click with a fixed interaction id, so that a replay repeats it.
    fn press_payload(&self, user: &str, action: &str, click: u32) -> Value {
        let mut v = self.button(user, action);
        v["id"] = json!(format!("81000000000000{click:04}"));
        v
    }
}

#[async_trait::async_trait]
impl crate::contract::Platform for Harness {
    fn mode(&self) -> &'static str {
        "Discord HTTP"
    }

    async fn type_command(&self, user: &str, text: &str) -> String {
        // `/jit request <group> <duration> <reason>` as Discord's options.
        let words: Vec<&str> = text.splitn(4, ' ').collect();
        let payload = match words.as_slice() {
            ["request", group, duration, reason] => self.command(
                user,
                "request",
                &[("group", group), ("duration", duration), ("reason", reason)],
            ),
            ["cancel", request] => self.command(user, "cancel", &[("request", request)]),
            _ => panic!("the contract types only requests and cancels here: {text}"),
        };
        self.answer(&payload).await
    }

    async fn press(&self, user: &str, action: &str, click: u32) -> String {
        self.answer(&self.press_payload(user, action, click)).await
    }

    async fn press_again(&self, user: &str, action: &str, click: u32) -> crate::contract::Replay {
        crate::contract::Replay::Answered(self.answer(&self.press_payload(user, action, click)).await)
    }

    async fn deny_with_reason(&self, user: &str, request: &str, reason: &str) -> String {
        let modal = self
            .send(&self.button(user, &format!("jit:deny:{request}")))
            .await;
        assert_eq!(modal["type"], 9, "Deny opens a modal: {modal}");
        let custom_id = modal["data"]["custom_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.answer(&self.modal(user, &custom_id, reason)).await
    }

    async fn card(&self, request: &str, ready: &(dyn for<'x> Fn(&'x str) -> bool + Sync)) -> String {
        self.poll(&format!("the card of {request}"), || {
            self.discord
                .calls()
                .into_iter()
                .filter(|c| c.path.starts_with(&format!("/channels/{CDB}/messages")))
                .filter(|c| (c.method == "POST" || c.method == "PATCH") && !c.rate_limited)
                .map(|c| c.body.to_string())
                .rfind(|b| b.contains(request))
                .filter(|b| ready(b))
        })
        .await
    }

    async fn direct_message(&self, user: &str, needle: &str) -> String {
        let path = format!("/channels/{}/messages", dm_channel(&did(user)));
        self.poll(&format!("a DM to {user}"), || {
            self.discord
                .calls_to("POST", &path)
                .into_iter()
                .map(|c| c.body.to_string())
                .rfind(|b| b.contains(needle))
        })
        .await
    }

    async fn wait_member(&self, user: &str, member: bool) {
        self.poll("membership", || {
            (self.bot.is_member(DB, user) == member).then_some(())
        })
        .await
    }

    async fn forged_command(&self) -> Option<u16> {
        let payload = self.command("alice", "list", &[]);
        let (status, _) = self
            .post_signed(payload.to_string().as_bytes(), self.now(), &OTHER_KEY)
            .await;
        Some(status.as_u16())
    }

    async fn rate_limit_next_card(&self) -> bool {
        self.discord.rate_limit(&format!("/channels/{CDB}/messages"), 1);
        true
    }

    async fn card_posts(&self, request: &str) -> crate::contract::Posts {
        let posts: Vec<crate::support::fake_discord::Call> = self
            .discord
            .calls_to("POST", &format!("/channels/{CDB}/messages"))
            .into_iter()
            .filter(|c| crate::contract::mentions(&c.body.to_string(), request))
            .collect();
        crate::contract::Posts::from_flags(posts.iter().map(|c| c.rate_limited))
    }
}

// Approval-card copies across retries, rate limits and restarts (issue 14).

crate::both_stores!(a_retry_never_takes_a_dm_copy_for_the_channel_card);
/// (Discord) An approver reached on the first attempt and unreachable on the
/// retry (carol's `discordId` removed in between) keeps her recorded DM copy,
/// which is never taken for the channel card: one channel card lists frank.
async fn a_retry_never_takes_a_dm_copy_for_the_channel_card(backend: Backend) {
    let bot = backend
        .builder()
        .policy(|p| {
            let db = &mut p.groups[0];
            db.approval_cards = jitbot_core::policy::CardDelivery::Dm;
            db.approvals_required = 2;
            db.approvers.users.insert(UserId::new("frank"));
            db.approvers.groups.insert(GroupDn::new(SEC));
        })
        .build();
    bot.dir.add_user("frank", [("mail", "frank@example.org")]);
    let carol = did("carol");
    bot.dir.add_user(
        "carol",
        [("mail", "carol@example.org"), ("discordId", carol.as_str())],
    );
    bot.dir.add_group(ONCALL, ["carol"]);
    bot.dir.add_group(SEC, ["alice", ONCALL]);
    let h = start(bot, Duration::from_secs(2), |c| {
        c.users.remove(&did("carol"));
        c.user_attribute = Some("discordId".into());
    })
    .await;
    // bob's DM copy is rate limited (its DM channel's own limit); carol's goes out.
    h.discord
        .rate_limit(&format!("/channels/{}/messages", dm_channel(&did("bob"))), 1);
    let id = h.alice_requests().await;
    let delay = jitbot::chat::outbox::drain(&h.bot.engine, h.adapter.as_ref()).await;
    let dm_carol = dm_channel(&carol);
    assert_eq!(
        card_posts(&h, &id)
            .iter()
            .filter(|c| c.path == format!("/channels/{dm_carol}/messages"))
            .count(),
        1,
        "carol's DM went out on the first attempt"
    );
    // carol's Discord account is unlinked in the directory before the retry.
    h.bot.dir.add_user("carol", [("mail", "carol@example.org")]);
    h.bot.advance(chrono::Duration::from_std(delay).unwrap());
    h.drain().await;
    let channel_posts = card_posts(&h, &id)
        .into_iter()
        .filter(|c| c.path == format!("/channels/{CDB}/messages"))
        .count();
    let carol_dm_listed_as_channel_card = h
        .discord
        .calls_to("PATCH", &format!("/channels/{dm_carol}/messages/*"))
        .iter()
        .any(|c| c.body.to_string().contains("Could not reach by DM"));
    assert_eq!(
        channel_posts, 1,
        "no channel card listing frank and carol; carol's DM copy was rewritten as the channel card: {carol_dm_listed_as_channel_card}"
    );
}

crate::both_stores!(a_card_decided_before_any_copy_is_not_posted_in_a_dm_group);
/// A request decided (here cancelled) while its `dm` card is still being
/// retried, with no copy posted yet, is not posted at all: not in the
/// channel the group keeps cards out of.
async fn a_card_decided_before_any_copy_is_not_posted_in_a_dm_group(backend: Backend) {
    let bot = backend
        .builder()
        .policy(|p| p.groups[0].approval_cards = jitbot_core::policy::CardDelivery::Dm)
        .build();
    let h = start(bot, Duration::from_secs(2), |_| {}).await;
    // Nothing can be posted for now: DM opens and the channel are rate
    // limited (the channel card would list bob and carol as pending).
    h.discord.rate_limit("/users/@me/channels", 6);
    h.discord.rate_limit(&format!("/channels/{CDB}/messages"), 6);
    let id = h.alice_requests().await;
    let delay = jitbot::chat::outbox::drain(&h.bot.engine, h.adapter.as_ref()).await;
    let in_channel = || {
        h.discord
            .calls_to("POST", &format!("/channels/{CDB}/messages"))
            .into_iter()
            .filter(|c| c.body.to_string().contains(&id))
            .count()
    };
    let refused = in_channel();
    assert!(refused >= 1, "the channel card was tried (and answered 429)");
    let rec = h
        .bot
        .engine
        .store()
        .request(&RequestId::new(&id))
        .unwrap()
        .unwrap();
    assert!(rec.messages.is_empty(), "nothing posted yet: {:?}", rec.messages);
    h.bot.ok("alice", &format!("cancel {id}")).await;
    h.bot.advance(chrono::Duration::from_std(delay).unwrap());
    h.drain().await;
    h.drain().await;
    assert_eq!(
        in_channel(),
        refused,
        "the closed request's card was posted in the channel of a dm-only group"
    );
}

/// The in-memory directory, except that listing `SEC` fails once (a busy
/// LDAP server timing out), as it may while a card is being posted.
struct SecListingFailsOnce(Arc<MemoryDirectory>, std::sync::atomic::AtomicBool);

#[async_trait::async_trait]
impl Hooks for SecListingFailsOnce {
    fn inner(&self) -> &dyn Directory {
        &*self.0
    }
    async fn members(&self, group: &GroupDn) -> Result<Vec<GroupMember>, DirectoryError> {
        if group.as_str() == SEC && !self.1.swap(true, Ordering::SeqCst) {
            return Err(DirectoryError::Unavailable("timed out".into()));
        }
        Directory::members(&*self.0, group).await
    }
}

crate::both_stores!(a_failed_approver_group_listing_is_retried_for_its_members);
/// An approver group the directory cannot list while a `dm` card is posted
/// (an LDAP timeout) fails the post for later, naming the group on the
/// channel card meanwhile; the retry reaches its members (carol).
async fn a_failed_approver_group_listing_is_retried_for_its_members(backend: Backend) {
    let bot = backend
        .builder()
        .policy(|p| {
            let db = &mut p.groups[0];
            db.approval_cards = jitbot_core::policy::CardDelivery::Dm;
            db.approvers.users.remove(&UserId::new("carol"));
            db.approvers.groups.insert(GroupDn::new(SEC));
        })
        .wrap(|dir| {
            dir.add_group(ONCALL, ["carol"]);
            dir.add_group(SEC, [ONCALL]);
            Arc::new(Forward(SecListingFailsOnce(dir, Default::default())))
        })
        .build();
    let h = start(bot, Duration::from_secs(2), |_| {}).await;
    let id = h.alice_requests().await;
    for _ in 0..3 {
        h.drain().await;
        h.bot.advance(chrono::Duration::minutes(5));
    }
    let posts = card_posts(&h, &id);
    let carol_dm = posts
        .iter()
        .any(|c| c.path == format!("/channels/{}/messages", dm_channel(&did("carol"))));
    let carol_listed = posts.iter().any(|c| {
        c.body.to_string().contains("Could not reach by DM") && c.body.to_string().contains("carol")
    });
    let paths: Vec<&str> = posts.iter().map(|c| c.path.as_str()).collect();
    assert!(
        carol_dm || carol_listed,
        "carol, an approver through `security`, got no copy and is listed nowhere: {paths:?}"
    );
}

crate::both_stores!(two_approvers_with_one_discord_account_get_one_copy);
/// Two approvers who are one chat person (both directory entries name the
/// same Discord id) get one copy in that DM, recorded for both.
async fn two_approvers_with_one_discord_account_get_one_copy(backend: Backend) {
    let bot = backend
        .builder()
        .policy(|p| p.groups[0].approval_cards = jitbot_core::policy::CardDelivery::Dm)
        .build();
    let bob = did("bob");
    bot.dir.add_user(
        "carol",
        [("mail", "carol@example.org"), ("discordId", bob.as_str())],
    );
    let h = start(bot, Duration::from_secs(2), |c| {
        c.users.remove(&did("carol"));
        c.user_attribute = Some("discordId".into());
    })
    .await;
    let id = h.alice_requests().await;
    h.drain().await;
    let in_bobs_dm = card_posts(&h, &id)
        .iter()
        .filter(|c| c.path == format!("/channels/{}/messages", dm_channel(&bob)))
        .count();
    assert_eq!(
        in_bobs_dm, 1,
        "one person, one DM channel, {in_bobs_dm} copies of the card"
    );
}
