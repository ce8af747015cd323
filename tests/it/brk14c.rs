//! Adversarial review of issue 14 (default chat modes, approver DMs, one
//! chat boundary): tests that show where `main` breaks its guarantees.
//! Each test is named `brk14c_<what_breaks>` and fails on the code it was
//! written against; the comment above each says why.

use crate::support::bot::{TestBot, DB};
use crate::support::fake_discord::{FakeDiscord, APP_ID};
use crate::support::fake_gateway::{FakeGateway, GUILD};
use crate::support::fake_slack::{Call, FakeSlack};
use crate::support::net::eventually;
use crate::support::process::Jitbot;
use crate::support::slapd::{Slapd, APPROVERS, DB_ADMINS};
use jitbot::chat::slack::SlackAdapter;
use jitbot::ports::Notifier;
use jitbot::scheduler::SchedulerSettings;
use jitbot::secret::Secret;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------
// Discord gateway, through `jitbot run` with a real slapd.
// ---------------------------------------------------------------------

const GW_TOKEN: &str = "brk14c-gateway-bot-token";
/// db-admins' channel on Discord.
const GW_CDB: &str = "510";
/// Where people type `/jit`.
const GW_CTYPED: &str = "600";

fn did(user: &str) -> String {
    let n = ["alice", "bob", "carol", "dave", "eve"]
        .iter()
        .position(|u| *u == user)
        .map_or(99, |i| i + 1);
    format!("10000000000000000{n:02}")
}

fn gateway_config(server: &Slapd, discord: &FakeDiscord) -> String {
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
bot_token = {{ env = "BRK14C_GW_TOKEN" }}
api_url = "{api}"
application_id = "{APP_ID}"
guild_id = "{GUILD}"
default_channel = "500"
channels = {{ db-admins = "{GW_CDB}" }}
users = {{ {users} }}

[[group]]
name = "db-admins"
dn = "{DB_ADMINS}"
zsp = true
requesters = {{ users = ["alice", "bob", "dave", "eve"] }}
approvers = {{ groups = ["{APPROVERS}"] }}
default_duration = "30m"
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

/// A RESUME replays the events of the session the client missed, so an
/// `INTERACTION_CREATE` jitbot is still working on can arrive a second time
/// (op 7 RECONNECT or a zombied connection between the dispatch and the
/// answer). Discord takes only the FIRST callback of an interaction and
/// refuses every later one (40060 "Interaction has already been
/// acknowledged"), so the person sees whatever jitbot answered first.
///
/// On `main` the replay is refused by the durable dedupe before the
/// original has finished its work, and its "already handled; nothing was
/// done again" callback goes out first: alice's request IS opened (a card
/// is posted) but the only answer Discord shows her says nothing was done,
/// and she never sees her request id. The dedupe should not answer a
/// replay of an interaction still in flight (or should answer with a
/// deferred type 5 that the original then edits), not claim nothing was done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brk14c_gateway_replayed_interaction_answers_first_that_nothing_was_done() {
    let server = Slapd::start();
    let discord = FakeDiscord::start().await;
    let gw = FakeGateway::start(discord.clone(), Duration::from_secs(1)).await;
    let bot = Jitbot::start(
        &gateway_config(&server, &discord),
        &[("BRK14C_GW_TOKEN", GW_TOKEN)],
    )
    .await;
    gw.wait_op(2, 1, WAIT).await;
    gw.session_connection().await;

    let request = gw.command(
        &did("alice"),
        GW_CTYPED,
        "request",
        &[
            ("group", "db-admins"),
            ("duration", "30m"),
            ("reason", "fixing replication"),
        ],
    );
    // The original dispatch and its replay after a RESUME.
    gw.dispatch_interaction(&request);
    gw.dispatch_interaction(&request);

    let id = request["id"].as_str().unwrap_or_default().to_string();
    let token = request["token"].as_str().unwrap_or_default().to_string();
    let callback = format!("/interactions/{id}/{token}/callback");
    // The request is opened: its card reaches the channel.
    let card = discord
        .wait_for(WAIT, |c| {
            c.method == "POST"
                && c.path == format!("/channels/{GW_CDB}/messages")
                && c.body.to_string().contains("jit:approve:")
        })
        .await;
    assert!(
        card.is_some(),
        "no approval card; jitbot's log:\n{}",
        bot.log_text()
    );
    let answers = eventually(WAIT, "both callbacks", || {
        let calls = discord.calls_to("POST", &callback);
        (calls.len() >= 2).then_some(calls)
    })
    .await;
    // What Discord shows alice: the first callback only.
    let shown = answers[0].body.to_string();
    assert!(
        !shown.contains("already handled"),
        "alice's request was opened, but the answer Discord accepted (the first of {}) \
         tells her nothing was done: {shown}\nall callbacks: {:#?}",
        answers.len(),
        answers.iter().map(|c| c.body.to_string()).collect::<Vec<_>>()
    );
}

/// A requester writes the reason, and the card shows it to every approver
/// (now also in their DMs, under the bot's name). Discord renders markdown
/// in embed field values, masked links included: `[text](url)` shows as a
/// clickable "text". On Slack the same reason is neutralised (`blocks::escape`
/// turns `<url|text>` into plain characters), so a Discord approver sees
/// what a Slack approver does not: a link the requester chose, dressed as
/// part of jitbot's card ("[Approve in the SSO portal](https://…)").
///
/// On `main` `discord::message::card_embed` puts the reason into a field
/// with `render::clip` only, no markdown escaping. Requester-written
/// values (reason, and anything else not jitbot's own) should have
/// Discord's markdown escaped (`\[`, `\]`, `\(`, `*`, `_`, `~`, `` ` ``,
/// `|`, `>`), as Slack's are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brk14c_discord_card_renders_a_requester_masked_link() {
    let server = Slapd::start();
    let discord = FakeDiscord::start().await;
    let gw = FakeGateway::start(discord.clone(), Duration::from_secs(1)).await;
    let bot = Jitbot::start(
        &gateway_config(&server, &discord),
        &[("BRK14C_GW_TOKEN", GW_TOKEN)],
    )
    .await;
    gw.wait_op(2, 1, WAIT).await;
    gw.session_connection().await;
    let phish = "[Approve in the SSO portal](https://sso.evil.example/jit)";
    let request = gw.command(
        &did("alice"),
        GW_CTYPED,
        "request",
        &[("group", "db-admins"), ("duration", "30m"), ("reason", phish)],
    );
    gw.dispatch_interaction(&request);
    let card = discord
        .wait_for(WAIT, |c| {
            c.method == "POST"
                && c.path == format!("/channels/{GW_CDB}/messages")
                && c.body.to_string().contains("jit:approve:")
        })
        .await
        .unwrap_or_else(|| panic!("no approval card; jitbot's log:\n{}", bot.log_text()));
    let reason = card.body["embeds"][0]["fields"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == "Reason"))
        .map(|f| f["value"].as_str().unwrap_or_default().to_string())
        .unwrap_or_else(|| panic!("no Reason field: {}", card.body));
    assert!(
        !reason.contains("](https://"),
        "the requester's masked link reaches the approvers' card as markdown Discord renders \
         as a clickable link: Reason = {reason:?}"
    );
}

// ---------------------------------------------------------------------
// Approver DMs on Slack: the engine, the outbox and the Slack adapter
// against the Web API fake (as `tests/it/slack.rs` runs them).
// ---------------------------------------------------------------------

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
fn dm_bot(delivery: jitbot_core::policy::CardDelivery) -> TestBot {
    dm_bot_with(delivery, &[])
}

/// [`dm_bot`] with `more` approvers by name.
fn dm_bot_with(delivery: jitbot_core::policy::CardDelivery, more: &[&str]) -> TestBot {
    let bot = TestBot::builder()
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

/// `users.lookupByEmail` answers with whoever has that address anywhere
/// Slack can see: in an Enterprise Grid org, or for an address that also
/// belongs to an account in another workspace, the user it returns can
/// have a `team_id` that is not `slack.team_id`. jitbot refuses every
/// click from such a user (binding: "external_user"), so a card DMed to
/// them has buttons that can never work, and the channel card does not
/// list them as unreachable: the approver silently never gets a usable
/// card.
///
/// On `main` `SlackAdapter::user_by_mail` takes `res.user.id` without
/// looking at `team_id` (nor `deleted`/`is_bot`), and the card goes to
/// bob's DM. The lookup should refuse a user outside the configured
/// workspace (and a deactivated or bot user) as unreachable, with a log
/// line saying why.
#[tokio::test]
async fn brk14c_slack_dm_card_goes_to_a_user_of_another_workspace() {
    let h = slack_dms(dm_bot(jitbot_core::policy::CardDelivery::Dm), |slack| {
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

/// Slack reports its own hiccups inside HTTP 200 answers: `internal_error`,
/// `fatal_error`, `service_unavailable` and `request_timeout` are in the
/// documented error list of `chat.update` (Slack "chat.update": "the server
/// could not complete your operation(s) without encountering an error,
/// likely due to a transient issue on our end"). They are worth a retry.
///
/// On `main` `slack::chat_error` maps every `ApiError` to
/// `ChatError::Refused` (a permanent "no"), and `outbox::update_every_copy`
/// skips a refused copy for good and finishes the update: 1.5 s of
/// `internal_error` answers on carol's DM while the decision goes out (the
/// decision's update and the one after the grant both fall in it) leaves
/// her copy saying "pending" with live Approve/Deny buttons forever,
/// although the request was approved. Transient Slack error codes should map to
/// `ChatError::Unavailable` so the update is retried.
#[tokio::test]
async fn brk14c_slack_transient_error_on_the_decision_leaves_a_copy_with_live_buttons() {
    let failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let shown = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = {
        let failed = failed.clone();
        let shown = shown.clone();
        let hiccup = std::sync::Mutex::new(None::<std::time::Instant>);
        slack_dms(dm_bot(jitbot_core::policy::CardDelivery::Both), move |slack| {
            slack.answer_with("chat.update", move |c| {
                let decision = c.body.to_string().contains("approved by bob, carol");
                // A Slack hiccup of 1.5 s on carol's DM, from the
                // first decision update on.
                if c.body["channel"] == "DUCAROL" && decision {
                    let mut since = hiccup.lock().unwrap();
                    let start = *since.get_or_insert_with(std::time::Instant::now);
                    if start.elapsed() < Duration::from_millis(1500) {
                        failed.store(true, std::sync::atomic::Ordering::SeqCst);
                        return json!({"ok": false, "error": "internal_error"});
                    }
                    shown.store(true, std::sync::atomic::Ordering::SeqCst);
                }
                json!({"ok": true, "channel": c.body["channel"], "ts": c.body["ts"],
                       "text": c.body["text"], "message": {"text": c.body["text"]}})
            });
        })
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
        failed.load(std::sync::atomic::Ordering::SeqCst).then_some(())
    })
    .await;
    // The outbox retries after retry_base (1 s in tests); give it a few.
    let decided = crate::support::net::within(Duration::from_secs(10), || {
        shown.load(std::sync::atomic::Ordering::SeqCst).then_some(())
    })
    .await;
    assert!(
        decided.is_some(),
        "carol's DM copy was never updated with the decision after 1.5 s of transient internal_error answers; \
         it still shows live buttons. chat.update calls: {:#?}",
        h.slack
            .calls_to("chat.update")
            .iter()
            .map(|c| (c.body["channel"].clone(), c.body.to_string().contains("approved by bob, carol")))
            .collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------
// Slack Socket Mode, through `jitbot run` with a real slapd.
// ---------------------------------------------------------------------

const SM_APP_TOKEN: &str = "xapp-1-A0JITBOT-brk14c";
const SM_BOT_TOKEN: &str = "xoxb-brk14c";
const SM_CHANNEL: &str = "CJIT";

fn socket_config(server: &Slapd, slack: &FakeSlack) -> String {
    let ldap = server.ldap_config();
    format!(
        r#"
[server]
listen = "{{listen}}"
admin_token = {{admin}}
shutdown_grace = "5s"

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
bot_token = {{ env = "BRK14C_SM_BOT_TOKEN" }}
app_token = {{ env = "BRK14C_SM_APP_TOKEN" }}
team_id = "T1"
api_url = "{api}"
default_channel = "{SM_CHANNEL}"

[[group]]
name = "db-admins"
dn = "{DB_ADMINS}"
zsp = true
requesters = {{ users = ["alice", "bob", "dave", "eve"] }}
approvers = {{ groups = ["{APPROVERS}"] }}
default_duration = "30m"
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

/// The pid of the `jitbot run` whose log is `bot.log` (its config sits
/// beside the log), found in /proc.
fn pid_of(bot: &Jitbot) -> u32 {
    let config = bot.log.with_file_name("jitbot.toml");
    let config = config.to_string_lossy().to_string();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let Ok(entry) = entry else { continue };
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&config) {
            return pid;
        }
    }
    panic!("no process runs {config}");
}

/// Whether process `pid` is gone (exited; a zombie counts as gone).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Socket Mode acknowledges an envelope as soon as the work is spawned (as
/// slack-morphism requires), so once acked Slack never delivers it again:
/// from then on jitbot alone is responsible for the command. A graceful
/// stop (SIGTERM, as every deploy or `systemctl restart` sends) must let
/// work already acknowledged finish within `server.shutdown_grace`.
///
/// On `main` the handler's work runs in a detached `tokio::spawn`
/// (`slack/handle.rs`: `command`, `interaction_from`) that nothing tracks:
/// `jitbot run` stops its servers, workers and the Socket Mode listener,
/// returns, and the runtime drops the task halfway. alice was told
/// "Working on it…" in the ack, her trigger id is recorded as seen, and
/// then nothing: no answer, no request, no card, and no log line saying a
/// command was dropped. (The same holds for a click, e.g. an approver's
/// Approve, and for HTTP mode.) Here the users.info lookup takes 3 s, well
/// inside the 5 s grace. The in-flight handler tasks should be tracked and
/// drained (bounded by the grace) before the process exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brk14c_socket_mode_acked_command_is_dropped_by_a_graceful_stop() {
    let server = Slapd::start();
    let slack = FakeSlack::start().await;
    for user in ["alice", "bob", "carol", "eve"] {
        slack.add_user(&slack_id(user), &format!("{user}@example.org"));
    }
    // A slow users.info (Slack under load): the command's work is still
    // running when jitbot is told to stop.
    slack.answer_with("users.info", |c| {
        std::thread::sleep(Duration::from_millis(3000));
        let user = c.body["user"].as_str().unwrap_or_default().to_string();
        let name = user.trim_start_matches('U').to_ascii_lowercase();
        json!({"ok": true, "user": {"id": user, "team_id": "T1", "name": name,
               "profile": {"email": format!("{name}@example.org")}}})
    });
    let sm = crate::support::fake_socket_mode::FakeSocketMode::start(slack.clone(), SM_APP_TOKEN).await;
    let bot = Jitbot::start(
        &socket_config(&server, &slack),
        &[
            ("BRK14C_SM_BOT_TOKEN", SM_BOT_TOKEN),
            ("BRK14C_SM_APP_TOKEN", SM_APP_TOKEN),
        ],
    )
    .await;
    sm.wait_live(1).await;
    let env = sm
        .slash(
            &slack_id("alice"),
            SM_CHANNEL,
            "request db-admins 30m fixing replication",
        )
        .await;
    let ack = sm.ack(&env).await;
    assert!(ack.payload.is_some(), "the command was taken: {ack:?}");

    let pid = pid_of(&bot);
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());

    // Whatever the command leads to: an answer on its response_url, or the
    // approval card in the channel.
    let done = crate::support::net::within(Duration::from_secs(8), || {
        slack
            .calls()
            .into_iter()
            .find(|c| {
                c.method.starts_with("response/")
                    || (c.method == "chat.postMessage" && c.body.to_string().contains("jit:approve:"))
            })
            .map(|c| c.method)
    })
    .await;
    let gone = exited(pid);
    eprintln!("graceful stop: done = {done:?}, exited = {gone}");
    assert!(
        done.is_some(),
        "alice's acknowledged /jit request was dropped by a graceful stop (jitbot exited: {gone}); \
         Slack calls: {:#?}\njitbot's log (tail):\n{}",
        slack.calls().iter().map(|c| c.method.clone()).collect::<Vec<_>>(),
        bot.log_text()
            .lines()
            .rev()
            .take(25)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// ARCHITECTURE.md: "a rate limit or outage is never 'unreachable': the
/// approver is listed as pending on the channel card and the post fails
/// for later". Slack reports its outages inside HTTP 200 answers
/// (`service_unavailable`, `internal_error`, `fatal_error`,
/// `request_timeout` are in the documented errors of `conversations.open`
/// and `users.lookupByEmail`).
///
/// On `main` `slack::chat_error` maps every `ApiError` to `Refused`, and
/// `open_dm` turns a refused `conversations.open` into
/// `DmError::Unreachable`: one `service_unavailable` while the card goes
/// out lists bob on the channel card as "Could not reach by DM" and he
/// never gets his copy, although Slack was back a moment later.
#[tokio::test]
async fn brk14c_slack_outage_answer_marks_an_approver_unreachable_for_good() {
    let h = slack_dms(dm_bot(jitbot_core::policy::CardDelivery::Both), |slack| {
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
    })
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

/// A slash command from another workspace (an org-wide install on
/// Enterprise Grid delivers every workspace's commands over the one
/// socket) is refused by the workspace binding, and nothing more happens.
///
/// On `main` Socket Mode's `on_command` logs the refusal and still
/// acknowledges with "Working on it…": the person is promised work that
/// will never come, with no answer afterwards. (HTTP mode answers 403 with
/// the binding's explanation.) The ack should carry the refusal's
/// `user_message()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brk14c_socket_mode_foreign_command_is_told_working_on_it() {
    let server = Slapd::start();
    let slack = FakeSlack::start().await;
    for user in ["alice", "bob", "carol", "eve"] {
        slack.add_user(&slack_id(user), &format!("{user}@example.org"));
    }
    let sm = crate::support::fake_socket_mode::FakeSocketMode::start(slack.clone(), SM_APP_TOKEN).await;
    let _bot = Jitbot::start(
        &socket_config(&server, &slack),
        &[
            ("BRK14C_SM_BOT_TOKEN", SM_BOT_TOKEN),
            ("BRK14C_SM_APP_TOKEN", SM_APP_TOKEN),
        ],
    )
    .await;
    sm.wait_live(1).await;
    let mut payload = crate::support::fake_socket_mode::slash_payload(
        &slack,
        &slack_id("alice"),
        SM_CHANNEL,
        "request db-admins 30m fixing replication",
        77,
    );
    payload["team_id"] = json!("T2");
    let env = sm.deliver("slash_commands", payload, true).await;
    let ack = sm.ack(&env).await;
    let text = ack
        .payload
        .as_ref()
        .and_then(|p| p["text"].as_str())
        .unwrap_or_default()
        .to_string();
    // Nothing is done for it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(slack.calls_to("response/77").is_empty(), "{:#?}", slack.calls());
    assert!(
        !text.contains("Working on it"),
        "a command refused as coming from another workspace is acknowledged with {text:?}, \
         and then nothing ever answers it"
    );
}

/// With `approval_cards = "dm"`/`"both"` every decision is one `chat.update`
/// per copy, all at once, and Slack's per-method budget (Tier 3 for
/// chat.update: about 50 a minute per workspace) is shared by all of them.
/// A large approver group has more copies than one window's budget.
///
/// On `main` `outbox::update_every_copy` tries every copy on each attempt,
/// in the same order, and a 429 on any copy makes the whole update retry
/// after the pause: each retry spends the budget on the copies already
/// updated, and the copies at the end of the list are rate limited every
/// time. They never get the decision (live Approve buttons, "pending"),
/// and the update retries forever. Here: 5 copies and a budget of 3 per
/// 2 s window; the fix (skip copies already showing this state, or stop
/// at the first 429 and resume from that copy) updates all 5 within a few
/// windows.
#[tokio::test]
async fn brk14c_slack_rate_limit_keeps_the_last_copies_from_the_decision_forever() {
    let bot = dm_bot_with(jitbot_core::policy::CardDelivery::Both, &["dave", "erin"]);
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

/// `users.lookupByEmail` results are cached for the life of the process.
/// When a person's Slack account is replaced (deactivated and provisioned
/// again by SCIM, or moved between workspaces of an org), the mail now
/// belongs to a new Slack user and the old id is disabled.
///
/// On `main` `SlackAdapter::user_by_mail` keeps answering the old id from
/// its cache, `conversations.open` refuses it (`user_disabled`), and bob is
/// listed as unreachable on every later card until jitbot restarts,
/// although Slack would find his new account on asking again. A refusal of
/// a cached id should drop that cache entry and look the mail up again (or
/// the cache should expire).
#[tokio::test]
async fn brk14c_slack_cached_lookup_keeps_a_replaced_account_unreachable() {
    let replaced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = {
        let replaced_lookup = replaced.clone();
        let replaced_open = replaced.clone();
        slack_dms(dm_bot(jitbot_core::policy::CardDelivery::Both), move |slack| {
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
        })
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
