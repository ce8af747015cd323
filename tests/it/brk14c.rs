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
use crate::support::slapd::{self, Slapd, APPROVERS, DB_ADMINS};
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
