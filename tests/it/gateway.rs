//! The Discord gateway, Discord's default mode, end to end: the real
//! `jitbot run` binary (its store on sled or PostgreSQL) against a real
//! slapd, a gateway v10 fake written from Discord's documentation
//! (`support::fake_gateway`) and the REST fake.

use crate::support::bot::Backend;
use crate::support::fake_discord::{Call, FakeDiscord, APP_ID};
use crate::support::fake_gateway::{FakeGateway, GUILD};
use crate::support::net::eventually;
use crate::support::process::Jitbot;
use crate::support::slapd::{self, Slapd, APPROVERS, DB_ADMINS};
use serde_json::Value;
use std::time::{Duration, Instant};

const BOT_TOKEN: &str = "gateway-test-bot-token";
/// The channel of db-admins, where cards and notices go.
const CDB: &str = "510";
/// Where people type `/jit`.
const CTYPED: &str = "600";
const WAIT: Duration = Duration::from_secs(20);
/// Short, so that a withheld ACK shows within a second or two.
const HEARTBEAT: Duration = Duration::from_millis(1000);

/// Discord user ids of the test people.
fn did(user: &str) -> String {
    let n = ["alice", "bob", "carol", "dave", "eve"]
        .iter()
        .position(|u| *u == user)
        .map_or(99, |i| i + 1);
    format!("10000000000000000{n:02}")
}

fn dn(user: &str) -> String {
    format!("uid={user},{}", slapd::PEOPLE)
}

fn config(server: &Slapd, discord: &FakeDiscord) -> String {
    let ldap = server.ldap_config();
    let users: Vec<String> = ["alice", "bob", "carol", "eve"]
        .iter()
        .map(|u| format!("\"{}\" = \"{u}\"", did(u)))
        .collect();
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

[discord]
mode = "gateway"
bot_token = {{ env = "GW_BOT_TOKEN" }}
api_url = "{api}"
application_id = "{APP_ID}"
guild_id = "{GUILD}"
default_channel = "500"
channels = {{ db-admins = "{CDB}" }}
users = {{ {users} }}

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
        api = discord.base,
        users = users.join(", "),
    )
}

pub(crate) struct Setup {
    server: Slapd,
    gw: FakeGateway,
    bot: Jitbot,
}

async fn setup(backend: Backend) -> Setup {
    setup_with(backend, "").await
}

/// [`setup`] with `extra` appended to the config.
async fn setup_with(backend: Backend, extra: &str) -> Setup {
    let server = Slapd::start();
    let discord = FakeDiscord::start().await;
    let gw = FakeGateway::start(discord.clone(), HEARTBEAT).await;
    let store = backend.run_store();
    let config = store.config(&(config(&server, &discord) + extra));
    let bot = Jitbot::start(&config, &store.with_env(&[("GW_BOT_TOKEN", BOT_TOKEN)])).await;
    Setup { server, gw, bot }
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
    fn discord(&self) -> &FakeDiscord {
        &self.gw.discord
    }

    /// Approval cards posted in db-admins' channel, as (request id, message).
    fn cards(&self) -> Vec<(String, Call)> {
        self.discord()
            .calls_to("POST", &format!("/channels/{CDB}/messages"))
            .into_iter()
            .filter_map(|c| {
                custom_id(&c.body, "jit:approve:").map(|a| (a["jit:approve:".len()..].to_string(), c))
            })
            .collect()
    }

    async fn card(&self, n: usize) -> String {
        eventually(WAIT, &format!("approval card #{n}"), || {
            self.cards().get(n - 1).map(|(id, _)| id.clone())
        })
        .await
    }

    /// Sends an interaction over the gateway; returns everything jitbot
    /// answered it with (the callback, and an edit of a deferred answer),
    /// once the callback is there.
    async fn interact(&self, interaction: &Value) -> String {
        self.gw.dispatch_interaction(interaction);
        self.answer(interaction).await
    }

    async fn answer(&self, interaction: &Value) -> String {
        let id = interaction["id"].as_str().unwrap_or_default();
        let token = interaction["token"].as_str().unwrap_or_default();
        let callback = format!("/interactions/{id}/{token}/callback");
        let call = self
            .discord()
            .wait_for(WAIT, |c| c.method == "POST" && c.path == callback)
            .await
            .unwrap_or_else(|| self.no_answer(id));
        let deferred = call.body["type"] == 5 || call.body["type"] == 6;
        let mut text = call.body.to_string();
        if deferred {
            let edit = format!("/webhooks/{APP_ID}/{token}/messages/@original");
            let edited = self
                .discord()
                .wait_for(WAIT, |c| c.method == "PATCH" && c.path == edit)
                .await
                .expect("the deferred answer is edited in");
            text.push_str(&edited.body.to_string());
        }
        text
    }

    /// Fails a test whose interaction `id` got no answer, with what the
    /// fake saw of the gateway and jitbot's log.
    fn no_answer(&self, id: &str) -> ! {
        panic!(
            "waited {WAIT:?} for an answer to {id}\n{}\njitbot's log:\n{}",
            self.gw.describe(),
            self.bot.log_text()
        )
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

    async fn request_state(&self, id: &str) -> String {
        let requests = self.bot.admin("requests").await;
        let found = requests.iter().find(|r| r["id"] == id);
        found
            .map(|r| r["state"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    }

    fn request(&self, user: &str, duration: &str, reason: &str) -> Value {
        self.gw.command(
            &did(user),
            CTYPED,
            "request",
            &[("group", "db-admins"), ("duration", duration), ("reason", reason)],
        )
    }

    fn click(&self, user: &str, custom_id: &str) -> Value {
        self.gw.button(&did(user), CDB, "1300000000000000001", custom_id)
    }
}

/// The first `custom_id` in a message body starting with `prefix`.
fn custom_id(body: &Value, prefix: &str) -> Option<String> {
    let text = body.to_string();
    let start = text.find(prefix)?;
    let end = text[start..].find('"')? + start;
    Some(text[start..end].to_string())
}

crate::both_stores!(
    request_approve_expire_through_the_gateway,
    flavor = "multi_thread",
    worker_threads = 2
);
/// `/jit request` → card → a refused self-approval → a double click by an
/// approver (one grant) → member in slapd → expiry → removed → notice.
async fn request_approve_expire_through_the_gateway(backend: Backend) {
    let s = setup(backend).await;
    let identify = s.gw.wait_op(2, 1, WAIT).await;
    assert_eq!(
        identify.d["intents"], 0,
        "interactions need no intent: {}",
        identify.d
    );
    assert!(
        identify.d["token"]
            .as_str()
            .is_some_and(|t| t.ends_with(BOT_TOKEN)),
        "identified with the bot token"
    );
    assert!(identify.d["properties"]["os"].is_string(), "{}", identify.d);
    let asked = s.discord().calls_to("GET", "/gateway/bot");
    assert_eq!(asked.len(), 1, "the gateway URL comes from /gateway/bot");
    assert_eq!(
        asked[0].authorization.as_deref(),
        Some(format!("Bot {BOT_TOKEN}").as_str())
    );
    assert!(s.gw.connects()[0].query.contains("v=10"), "{:?}", s.gw.connects());
    // Heartbeats flow and are acknowledged.
    s.gw.wait_op(1, 2, WAIT).await;
    s.gw.session_connection().await;

    let answer = s.interact(&s.request("alice", "3s", "fixing replication")).await;
    assert!(answer.contains("\"flags\":64"), "answers are ephemeral: {answer}");
    let id = s.card(1).await;
    assert!(answer.contains(&id), "{answer}");
    assert_eq!(s.request_state(&id).await, "pending");

    let refused = s.interact(&s.click("alice", &format!("jit:approve:{id}"))).await;
    assert!(refused.contains("your own request"), "{refused}");
    assert_eq!(s.request_state(&id).await, "pending");
    assert!(!s.member("alice").await);

    // carol (security ⊂ approvers) clicks Approve twice.
    let first = s.click("carol", &format!("jit:approve:{id}"));
    let second = s.click("carol", &format!("jit:approve:{id}"));
    s.gw.dispatch_interaction(&first);
    s.gw.dispatch_interaction(&second);
    s.answer(&first).await;
    s.answer(&second).await;
    s.wait_member("alice", true).await;
    assert_eq!(s.request_state(&id).await, "approved");
    let leases = s.bot.admin("leases").await;
    assert_eq!(leases.len(), 1, "one grant for two clicks: {leases:#?}");
    s.discord()
        .wait_for(WAIT, |c| {
            c.method == "PATCH" && c.path.starts_with(&format!("/channels/{CDB}/messages/"))
        })
        .await
        .expect("the card is edited in place");

    s.wait_member("alice", false).await;
    assert!(s
        .server
        .values(DB_ADMINS, "member")
        .await
        .contains(&slapd::SERVICE_DN.to_string()));
    let notice = s
        .discord()
        .wait_for(WAIT, |c| {
            c.method == "POST"
                && c.path == format!("/channels/{CDB}/messages")
                && c.body.to_string().contains("ended (expired)")
        })
        .await;
    assert!(notice.is_some(), "no expiry notice: {:#?}", s.discord().calls());
    assert_eq!(s.bot.admin("leases").await[0]["state"], "ended");
    assert_eq!(s.cards().len(), 1);
    assert_eq!(s.gw.ops(2).len(), 1, "one session all along");
    let log = s.bot.log_text();
    assert!(log.contains("connected to the Discord gateway"), "{log}");
    assert!(
        !log.contains(BOT_TOKEN),
        "the bot token leaked into the debug log"
    );
}

crate::both_stores!(
    zombie_reconnect_and_invalid_session_are_recovered,
    flavor = "multi_thread",
    worker_threads = 2
);
/// A withheld heartbeat ACK makes jitbot reconnect; op 7 RECONNECT is
/// followed by a RESUME that receives what was dispatched meanwhile; an
/// op 9 INVALID_SESSION answer to a RESUME makes jitbot identify anew; and
/// nothing is processed twice along the way.
async fn zombie_reconnect_and_invalid_session_are_recovered(backend: Backend) {
    let s = setup(backend).await;
    s.gw.wait_op(2, 1, WAIT).await;
    let first = s.gw.session_connection().await;

    // A zombied connection: heartbeats go unanswered.
    s.gw.withhold_acks(first);
    let zombie_at = Instant::now();
    let again = eventually(WAIT, "a new connection after the missing ACK", || {
        s.gw.frames()
            .into_iter()
            .find(|f| f.connection != first && (f.op == 2 || f.op == 6))
    })
    .await;
    println!(
        "reconnected {:?} after the ACKs stopped (op {})",
        zombie_at.elapsed(),
        again.op
    );
    let second = s.gw.session_connection().await;
    assert_ne!(second, first);
    assert!(!s.gw.live().contains(&first), "the zombie connection was closed");

    // op 7: jitbot resumes, and gets what was dispatched in between.
    let identified = s.gw.ops(2).len();
    s.gw.reconnect(second).await;
    let request = s.request("alice", "1h", "dispatched while reconnecting");
    s.gw.dispatch_interaction(&request);
    let resume = s.gw.wait_op(6, 1, WAIT).await;
    assert!(
        resume.d["session_id"].is_string() && resume.d["seq"].is_u64(),
        "{}",
        resume.d
    );
    assert!(resume.d["token"].as_str().is_some_and(|t| t.ends_with(BOT_TOKEN)));
    let answer = s.answer(&request).await;
    let id = s.card(1).await;
    assert!(answer.contains(&id), "{answer}");
    assert_eq!(s.gw.ops(2).len(), identified, "resumed, not identified again");

    // op 9 in answer to a RESUME: jitbot identifies a new session.
    let third = s.gw.session_connection().await;
    s.gw.invalidate_next_resume();
    s.gw.reconnect(third).await;
    s.gw.wait_op(6, 2, WAIT).await;
    s.gw.wait_op(2, identified + 1, WAIT).await;
    s.gw.session_connection().await;

    let approve = s.click("carol", &format!("jit:approve:{id}"));
    s.interact(&approve).await;
    s.wait_member("alice", true).await;
    assert_eq!(s.bot.admin("requests").await.len(), 1, "one request");
    assert_eq!(s.bot.admin("leases").await.len(), 1, "one grant");
    assert_eq!(s.cards().len(), 1, "one card");
    let callbacks = s.discord().calls_to("POST", "/interactions/*/*/callback");
    assert_eq!(
        callbacks.len(),
        2,
        "each interaction answered once: {callbacks:#?}"
    );
}

/// Discord's gateway, through the real binary, as a
/// [`crate::contract::Platform`].
pub(crate) async fn contract_platform(backend: Backend) -> Setup {
    let s = setup_with(backend, &contract_config()).await;
    s.gw.wait_op(2, 1, WAIT).await;
    s.gw.session_connection().await;
    s
}

impl Setup {
    /// Dispatches `interaction` and waits for one more callback to it than
    /// it had; the text of that answer (or of the edit of a deferred one).
    async fn dispatch_and_read(&self, interaction: &Value) -> Value {
        let id = interaction["id"].as_str().unwrap_or_default();
        let token = interaction["token"].as_str().unwrap_or_default();
        let callback = format!("/interactions/{id}/{token}/callback");
        let before = self.discord().calls_to("POST", &callback).len();
        self.gw.dispatch_interaction(interaction);
        let answered = crate::support::net::within(WAIT, || {
            self.discord().calls_to("POST", &callback).into_iter().nth(before)
        })
        .await;
        let call = answered.unwrap_or_else(|| self.no_answer(id));
        if call.body["type"] == 5 {
            let edit = format!("/webhooks/{APP_ID}/{token}/messages/@original");
            let edited = self
                .discord()
                .wait_for(WAIT, |c| c.method == "PATCH" && c.path == edit)
                .await
                .expect("the deferred answer is edited in");
            return edited.body;
        }
        call.body
    }

    /// An answer's text.
    async fn read(&self, interaction: &Value) -> String {
        let body = self.dispatch_and_read(interaction).await;
        let content = body["data"]["content"].as_str().or(body["content"].as_str());
        content.unwrap_or_default().to_string()
    }

    /// The newest post or edit in `channel` mentioning `text`.
    fn newest_in(&self, channel: &str, text: &str) -> Option<String> {
        self.discord()
            .calls()
            .into_iter()
            .filter(|c| c.path.starts_with(&format!("/channels/{channel}/messages")))
            .filter(|c| (c.method == "POST" || c.method == "PATCH") && !c.rate_limited)
            .map(|c| c.body.to_string())
            .rfind(|b| b.contains(text))
    }
}

#[async_trait::async_trait]
impl crate::contract::Platform for Setup {
    fn mode(&self) -> &'static str {
        "Discord gateway"
    }

    fn approver(&self) -> &'static str {
        "carol"
    }

    async fn type_command(&self, user: &str, text: &str) -> String {
        let words: Vec<&str> = text.splitn(4, ' ').collect();
        let interaction = match words.as_slice() {
            ["request", group, duration, reason] => self.gw.command(
                &did(user),
                CTYPED,
                "request",
                &[("group", group), ("duration", duration), ("reason", reason)],
            ),
            ["cancel", request] => self
                .gw
                .command(&did(user), CTYPED, "cancel", &[("request", request)]),
            _ => panic!("the contract types only requests and cancels here: {text}"),
        };
        self.read(&interaction).await
    }

    async fn press(&self, user: &str, action: &str, click: u32) -> String {
        let mut interaction = self.click(user, action);
        interaction["id"] = serde_json::json!(format!("82000000000000{click:04}"));
        interaction["token"] = serde_json::json!(format!("contract-token-{click}"));
        self.read(&interaction).await
    }

    /// Discord answers a replayed interaction with "already handled", or,
    /// when the replay arrives while jitbot is still sending its first
    /// answer (this test replays the moment the fake has that answer, before
    /// jitbot has its HTTP response back), not at all: jitbot logs that it
    /// ignored the replay in flight (`gateway::a_replayed_interaction_in_flight_…`).
    async fn press_again(&self, user: &str, action: &str, click: u32) -> crate::contract::Replay {
        use crate::contract::Replay;
        let mut interaction = self.click(user, action);
        let id = format!("82000000000000{click:04}");
        interaction["id"] = serde_json::json!(id);
        interaction["token"] = serde_json::json!(format!("contract-token-{click}"));
        let callback = format!("/interactions/{id}/contract-token-{click}/callback");
        let before = self.discord().calls_to("POST", &callback).len();
        self.gw.dispatch_interaction(&interaction);
        let in_flight =
            format!("interaction {id} arrived again while its first delivery is still being answered");
        let replay = crate::support::net::within(WAIT, || {
            if let Some(call) = self.discord().calls_to("POST", &callback).into_iter().nth(before) {
                let text = call.body["data"]["content"].as_str().unwrap_or_default();
                return Some(Replay::Answered(text.to_string()));
            }
            self.bot
                .log_text()
                .contains(&in_flight)
                .then_some(Replay::Dropped)
        })
        .await;
        replay.unwrap_or_else(|| self.no_answer(&id))
    }

    async fn deny_with_reason(&self, user: &str, request: &str, reason: &str) -> String {
        let modal = self
            .dispatch_and_read(&self.click(user, &format!("jit:deny:{request}")))
            .await;
        assert_eq!(modal["type"], 9, "Deny opens a modal: {modal}");
        let mut submit = self.click(user, "unused");
        submit["type"] = serde_json::json!(5);
        submit["data"] = serde_json::json!({
            "custom_id": modal["data"]["custom_id"],
            "components": [{"type": 1, "components": [
                {"type": 4, "custom_id": "reason", "value": reason}
            ]}]
        });
        if let Some(o) = submit.as_object_mut() {
            o.remove("message");
        }
        self.read(&submit).await
    }

    async fn card(&self, request: &str, ready: &(dyn for<'x> Fn(&'x str) -> bool + Sync)) -> String {
        eventually(WAIT, &format!("the card of {request}"), || {
            self.newest_in(CDB, request).filter(|b| ready(b))
        })
        .await
    }

    async fn direct_message(&self, user: &str, needle: &str) -> String {
        let dm = crate::support::fake_discord::dm_channel(&did(user));
        eventually(WAIT, &format!("a DM to {user}"), || self.newest_in(&dm, needle)).await
    }

    async fn wait_member(&self, user: &str, member: bool) {
        Setup::wait_member(self, user, member).await
    }

    async fn forged_command(&self) -> Option<u16> {
        // Interactions arrive on the bot's own authenticated gateway
        // connection: nothing in them is signed.
        None
    }

    async fn rate_limit_next_card(&self) -> bool {
        self.discord().rate_limit(&format!("/channels/{CDB}/messages"), 1);
        true
    }

    async fn card_posts(&self, request: &str) -> crate::contract::Posts {
        let posts: Vec<Call> = self
            .discord()
            .calls_to("POST", &format!("/channels/{CDB}/messages"))
            .into_iter()
            .filter(|c| crate::contract::mentions(&c.body.to_string(), request))
            .collect();
        crate::contract::Posts::from_flags(posts.iter().map(|c| c.rate_limited))
    }
}

crate::both_stores!(
    a_replayed_interaction_in_flight_is_not_answered_nothing_was_done,
    flavor = "multi_thread",
    worker_threads = 2
);
/// A RESUME replays the events the client missed, so an
/// `INTERACTION_CREATE` jitbot is still answering can arrive a second time.
/// Discord takes only the first callback of an interaction, so the person
/// sees whatever jitbot answered first: a replay of an interaction still
/// being answered must not be answered "already handled; nothing was done"
/// ahead of the real answer. jitbot ignores such a replay (a later answer
/// would be refused by Discord anyway, and counts as an invalid request).
async fn a_replayed_interaction_in_flight_is_not_answered_nothing_was_done(backend: Backend) {
    let s = setup(backend).await;
    s.gw.wait_op(2, 1, WAIT).await;
    s.gw.session_connection().await;
    let request = s.request("alice", "30m", "fixing replication");
    // The original dispatch and its replay after a RESUME.
    s.gw.dispatch_interaction(&request);
    s.gw.dispatch_interaction(&request);
    let id = request["id"].as_str().unwrap_or_default().to_string();
    let token = request["token"].as_str().unwrap_or_default().to_string();
    let callback = format!("/interactions/{id}/{token}/callback");
    // The request is opened: its card reaches the channel.
    s.card(1).await;
    // Both deliveries were handled: the replay ignored while the first was
    // being answered, or told "already handled" after it.
    let answers = eventually(WAIT, "the replay handled", || {
        let calls = s.discord().calls_to("POST", &callback);
        let ignored = s
            .bot
            .log_text()
            .contains("ignored a replayed Discord interaction");
        (!calls.is_empty() && (ignored || calls.len() >= 2)).then_some(calls)
    })
    .await;
    let shown = answers[0].body.to_string();
    assert!(
        !shown.contains("already handled"),
        "alice's request was opened, but the answer Discord accepted (the first of {}) is not \
         its answer: {shown}\nall callbacks: {:#?}",
        answers.len(),
        answers.iter().map(|c| c.body.to_string()).collect::<Vec<_>>()
    );
}

crate::both_stores!(
    a_requester_written_masked_link_shows_as_typed_on_the_card,
    flavor = "multi_thread",
    worker_threads = 2
);
/// Requesters write the reason, and the card shows it to every approver
/// under the bot's name. Discord renders markdown in embed field values,
/// masked links included, so the reason's markdown is escaped: a
/// requester's `[Approve in the SSO portal](https://…)` shows as typed, not
/// as a link dressed as part of jitbot's card (as Slack's `blocks::escape`
/// already neutralises `<url|text>`).
async fn a_requester_written_masked_link_shows_as_typed_on_the_card(backend: Backend) {
    let s = setup(backend).await;
    s.gw.wait_op(2, 1, WAIT).await;
    s.gw.session_connection().await;
    let phish = "[Approve in the SSO portal](https://sso.evil.example/jit)";
    s.gw.dispatch_interaction(&s.request("alice", "30m", phish));
    s.card(1).await;
    let (_, card) = s.cards().remove(0);
    let reason = card.body["embeds"][0]["fields"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == "Reason"))
        .map(|f| f["value"].as_str().unwrap_or_default().to_string())
        .unwrap_or_else(|| panic!("no Reason field: {}", card.body));
    assert_eq!(
        reason, r"\[Approve in the SSO portal\]\(https://sso.evil.example/jit\)",
        "the requester's masked link must reach the approvers' card escaped"
    );
}
