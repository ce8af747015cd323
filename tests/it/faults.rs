//! Fault injection through the real binary: SIGKILL at random points during
//! many grant and revoke cycles (Slack HTTP mode, real slapd), restart, and
//! check that no membership exists without a lease, no lease is lost, no
//! grant happens twice, and every expired lease is revoked; the store on
//! sled or PostgreSQL.

use crate::support::bot::Backend;
use crate::support::fake_slack::FakeSlack;
use crate::support::slapd::{self, Slapd, DB_ADMINS};
use jitbot::chat::slack::signature::sign;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SIGNING: &str = "fault-signing-secret";
const TOKEN: &str = "fault-admin-token";
const USERS: [&str; 4] = ["alice", "bob", "dave", "eve"];

struct Bot {
    child: Option<Child>,
    config: std::path::PathBuf,
    base: String,
    /// The admin listener.
    admin: String,
    log: std::path::PathBuf,
    /// The environment the config's `[store]` reads.
    store_env: &'static [(&'static str, &'static str)],
}

impl Bot {
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_jitbot"))
                .args(["run", "--config"])
                .arg(&self.config)
                .env("FAULT_SIGNING", SIGNING)
                .env("FAULT_BOT_TOKEN", "xoxb-fault")
                .env("FAULT_ADMIN", TOKEN)
                .env("JITBOT_LOG", "debug")
                .envs(self.store_env.iter().copied())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    async fn wait_up(&self, http: &reqwest::Client) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(format!("{}/healthz", self.base)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "jitbot did not come up; see {}",
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn post(&self, http: &reqwest::Client, path: &str, body: String) {
        let ts = chrono::Utc::now().timestamp();
        let _ = http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("x-slack-request-timestamp", ts.to_string())
            .header("x-slack-signature", sign(SIGNING, ts, body.as_bytes()))
            .body(body)
            .send()
            .await;
    }

    async fn leases(&self, http: &reqwest::Client) -> Vec<serde_json::Value> {
        http.get(format!("{}/admin/leases?all=true", self.admin))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn requests(&self, http: &reqwest::Client) -> Vec<serde_json::Value> {
        http.get(format!("{}/admin/requests?all=true", self.admin))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Bot {
    fn drop(&mut self) {
        self.kill();
    }
}

fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}

fn slack_id(user: &str) -> String {
    format!("U{}", user.to_uppercase())
}

fn uid_of(dn: &str) -> Option<String> {
    dn.strip_prefix("uid=")
        .and_then(|rest| rest.split(',').next())
        .map(str::to_string)
}

crate::both_stores!(
    sigkill_at_random_points_leaves_no_standing_privilege,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn sigkill_at_random_points_leaves_no_standing_privilege(backend: Backend) {
    let server = Slapd::start();
    let slack = FakeSlack::start().await;
    for u in USERS.iter().chain(&["carol"]) {
        slack.add_user(&slack_id(u), &format!("{u}@example.org"));
    }
    let tmp = tempfile::tempdir().unwrap();
    let (port, admin_port) = {
        // Both held at once, so they differ.
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
    };
    let ldap = server.ldap_config();
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
admin_token = {{ env = "FAULT_ADMIN" }}
shutdown_grace = "2s"

[store]
path = "{store}"
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
mode = "http"
bot_token = {{ env = "FAULT_BOT_TOKEN" }}
signing_secret = {{ env = "FAULT_SIGNING" }}
team_id = "T1"
api_url = "{api}"
default_channel = "CJIT"

[[group]]
name = "db-admins"
dn = "{dn}"
zsp = true
requesters = {{ users = ["alice", "bob", "dave", "eve"] }}
approvers = {{ users = ["carol"] }}
default_duration = "2s"
max_duration = "1h"
reason_required = false
"#,
        store = tmp.path().join("db").display(),
        url = ldap.url,
        bind = ldap.bind_dn,
        pw = ldap.password.file.as_ref().unwrap().display(),
        people = ldap.user_base,
        api = slack.api_url(),
        dn = DB_ADMINS,
    );
    let run = backend.run_store();
    let config_path = tmp.path().join("jitbot.toml");
    std::fs::write(&config_path, run.config(&config)).unwrap();
    let mut bot = Bot {
        child: None,
        config: config_path,
        base: format!("http://127.0.0.1:{port}"),
        admin: format!("http://127.0.0.1:{admin_port}"),
        log: tmp.path().join("jitbot.log"),
        store_env: run.env(),
    };
    let http = reqwest::Client::new();
    let seed: u64 = rand::random();
    println!("fault-injection seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    bot.spawn();
    bot.wait_up(&http).await;

    let mut n = 0u32;
    for cycle in 0..12 {
        let user = USERS[cycle % USERS.len()];
        n += 1;
        let body = form(&[
            ("team_id", "T1"),
            ("channel_id", "CJIT"),
            ("user_id", &slack_id(user)),
            ("user_name", user),
            ("command", "/jit"),
            ("text", "request db-admins 2s fault drill"),
            ("response_url", &slack.response_url(n)),
            ("trigger_id", &format!("trigger.{n}")),
        ]);
        bot.post(&http, "/slack/commands", body).await;
        // Approve whatever is pending, with a kill at a random point.
        let kill_after = Duration::from_millis(rng.gen_range(0..400));
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..150))).await;
        for req in bot.requests(&http).await {
            if req["state"] != "pending" {
                continue;
            }
            let id = req["id"].as_str().unwrap().to_string();
            n += 1;
            let payload = json!({
                "type": "block_actions",
                "team": {"id": "T1"},
                "api_app_id": "A1",
                "user": {"id": slack_id("carol"), "username": "carol", "team_id": "T1"},
                "trigger_id": format!("trigger.{n}"),
                "channel": {"id": "CJIT"},
                "container": {"type": "message", "message_ts": "1.1", "channel_id": "CJIT"},
                "response_url": slack.response_url(n),
                "actions": [{"type": "button", "action_id": format!("jit:approve:{id}"), "action_ts": format!("{n}.0")}]
            });
            bot.post(
                &http,
                "/slack/interactions",
                form(&[("payload", &payload.to_string())]),
            )
            .await;
        }
        tokio::time::sleep(kill_after).await;
        bot.kill();
        bot.spawn();
        bot.wait_up(&http).await;
    }

    // Let every lease run out; the restarted jitbot must revoke them all.
    let deadline = Instant::now() + Duration::from_secs(60);
    let leases = loop {
        let leases = bot.leases(&http).await;
        if leases.iter().all(|l| l["state"] == "ended") {
            break leases;
        }
        assert!(Instant::now() < deadline, "leases never ended: {leases:#?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let requests = bot.requests(&http).await;
    // Approved grants; a request for a group the user still held became an
    // extension of that lease instead, which must exist.
    let approved: BTreeSet<String> = requests
        .iter()
        .filter(|r| r["state"] == "approved" && r["kind"] == "grant")
        .map(|r| r["id"].as_str().unwrap().to_string())
        .collect();
    let extended: Vec<String> = requests
        .iter()
        .filter(|r| r["state"] == "approved" && r["kind"] == "extend")
        .map(|r| r["lease"].as_str().unwrap().to_string())
        .collect();
    assert!(!approved.is_empty(), "the drill approved nothing: {requests:#?}");
    // No lease lost: every approved request has its lease; no double grant:
    // never more than one lease per request.
    let mut per_request: BTreeMap<String, usize> = BTreeMap::new();
    let all_leases: Vec<serde_json::Value> = leases.clone();
    let store_leases = {
        bot.kill();
        let store = run.open(&tmp.path().join("db"));
        store.leases().unwrap()
    };
    for l in &store_leases {
        *per_request.entry(l.lease.request.to_string()).or_default() += 1;
    }
    for id in &approved {
        assert_eq!(
            per_request.get(id),
            Some(&1),
            "request {id}: leases {per_request:?}"
        );
    }
    assert_eq!(store_leases.len(), all_leases.len());
    for lease in &extended {
        assert!(
            store_leases.iter().any(|l| l.lease.id.as_str() == lease),
            "extended lease {lease} is missing"
        );
    }
    println!(
        "fault drill: {} requests, {} approved grants, {} extensions, {} leases, all ended",
        requests.len(),
        approved.len(),
        extended.len(),
        store_leases.len()
    );
    // No membership without a lease: only the placeholder is left.
    let members = server.values(DB_ADMINS, "member").await;
    let users: Vec<String> = members.iter().filter_map(|m| uid_of(m)).collect();
    assert!(users.is_empty(), "memberships left behind: {members:?}");
    assert!(members.contains(&slapd::SERVICE_DN.to_string()));

    // No secret in the logs, at debug level, across all those runs.
    let log = std::fs::read_to_string(&bot.log).unwrap();
    assert!(log.contains("jitbot listening"), "the log was captured");
    for secret in [SIGNING, TOKEN, "xoxb-fault", slapd::SERVICE_PW] {
        assert!(!log.contains(secret), "a secret leaked into the logs");
    }
}
