//! Safeguards against replays, floods and rewritten history: Slack payloads
//! replayed after a restart and the audit chain anchored outside the store
//! (through the real binary), and the cap on pending requests per person
//! (through the engine).

use crate::support::bot::TestBot;
use crate::support::fake_slack::FakeSlack;
use jitbot::chat::slack::signature::sign;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "hardening-admin-token-0123456789";
const SIGNING: &str = "hardening-signing-secret";
const OPS: &str = "cn=ops-admins,ou=groups,dc=example,dc=org";

/// The running binary; killed if a test fails before stopping it.
struct Running(Option<Child>, String);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Running {
    /// SIGTERM, and a clean exit.
    fn stop(mut self) {
        let mut child = self.0.take().expect("running");
        let pid = child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = child.wait().unwrap();
        assert!(status.success(), "exit status after SIGTERM: {status}");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn jitbot() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jitbot"));
    cmd.env("JITBOT_HARDENING_ADMIN_TOKEN", TOKEN)
        .env("JITBOT_ADMIN_TOKEN", TOKEN)
        .env("JITBOT_HARDENING_SIGNING", SIGNING)
        .env("JITBOT_HARDENING_BOT", "xoxb-hardening")
        .env("JITBOT_LOG", "debug");
    cmd
}

/// A config with Slack in HTTP mode against `slack`, plus `extra` TOML.
fn write_config(
    dir: &Path,
    port: u16,
    admin_port: u16,
    slack: &FakeSlack,
    extra: &str,
) -> std::path::PathBuf {
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
admin_token = {{ env = "JITBOT_HARDENING_ADMIN_TOKEN" }}
shutdown_grace = "5s"

[store]
path = "{store}"
cache_mb = 16

[directory]
kind = "memory"

[memory]
groups = {{ "cn=db-admins,ou=groups,dc=example,dc=org" = [] }}

[[memory.user]]
id = "alice"
attributes = {{ mail = "alice@example.org" }}
[[memory.user]]
id = "bob"
attributes = {{ mail = "bob@example.org" }}

[slack]
mode = "http"
bot_token = {{ env = "JITBOT_HARDENING_BOT" }}
signing_secret = {{ env = "JITBOT_HARDENING_SIGNING" }}
team_id = "T1"
api_url = "{api}"
default_channel = "CJIT"
alert_channel = "CALERT"

[[group]]
name = "db-admins"
dn = "cn=db-admins,ou=groups,dc=example,dc=org"
requesters = {{ users = ["alice"] }}
approvers = {{ users = ["bob"] }}
default_duration = "1h"
max_duration = "4h"
{extra}
"#,
        store = dir.join("db").display(),
        api = slack.api_url(),
    );
    let path = dir.join("jitbot.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn start(config: &Path, port: u16, log: &Path) -> Running {
    let child = jitbot()
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    wait_up(Running(Some(child), format!("http://127.0.0.1:{port}")), log).await
}

fn command_body(slack: &FakeSlack, text: &str, n: u32) -> String {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("team_id", "T1")
        .append_pair("api_app_id", "A1")
        .append_pair("channel_id", "CJIT")
        .append_pair("user_id", "UALICE")
        .append_pair("command", "/jit")
        .append_pair("text", text)
        .append_pair("response_url", &slack.response_url(n))
        .append_pair("trigger_id", &format!("trigger.{n}"));
    form.finish()
}

async fn post_signed(base: &str, body: &str, ts: i64) -> reqwest::StatusCode {
    reqwest::Client::new()
        .post(format!("{base}/slack/commands"))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-slack-request-timestamp", ts.to_string())
        .header("x-slack-signature", sign(SIGNING, ts, body.as_bytes()))
        .body(body.to_string())
        .send()
        .await
        .unwrap()
        .status()
}

/// A signed slash command captured and replayed after jitbot restarted,
/// inside the signature window, is acknowledged but not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_payload_replayed_after_a_restart_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let slack = FakeSlack::start().await;
    slack.add_user("UALICE", "alice@example.org");
    let port = free_port();
    let config = write_config(tmp.path(), port, free_port(), &slack, "");
    let log = tmp.path().join("first.log");
    let bot = start(&config, port, &log).await;

    let body = command_body(&slack, "request db-admins 1h replicas down", 1);
    let ts = chrono::Utc::now().timestamp();
    assert_eq!(post_signed(&bot.1, &body, ts).await, 200);
    let wait = Duration::from_secs(10);
    let first = slack.wait_for(wait, |c| c.method == "response/1").await;
    let first = first.unwrap_or_else(|| panic!("no answer: {:?}", std::fs::read_to_string(&log)));
    assert!(
        first.body["text"].as_str().unwrap_or_default().contains("r-"),
        "{first:?}"
    );
    bot.stop();

    let log = tmp.path().join("second.log");
    let bot = start(&config, port, &log).await;
    assert_eq!(
        post_signed(&bot.1, &body, ts).await,
        200,
        "acknowledged, so Slack stops retrying"
    );
    // A fresh command is answered: the replay had its chance to be too.
    let fresh = command_body(&slack, "list", 2);
    assert_eq!(
        post_signed(&bot.1, &fresh, chrono::Utc::now().timestamp()).await,
        200
    );
    assert!(slack.wait_for(wait, |c| c.method == "response/2").await.is_some());
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(slack.calls_to("response/1").len(), 1, "the replay was run again");
    bot.stop();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(logs.contains("already taken"), "{logs}");
    let store = jitbot::store::Store::open(&tmp.path().join("db"), 16).unwrap();
    assert_eq!(store.requests().unwrap().len(), 1, "one request, not two");
}

/// A requester can keep only `max_pending_per_user` requests waiting; the
/// refusal names them and says how to cancel one. Break-glass and other
/// people are not held back.
#[tokio::test]
async fn pending_requests_per_person_are_capped() {
    let bot = TestBot::builder()
        .settings(|s| s.max_pending_per_user = 2)
        .policy(|p| {
            let mut ops = p.groups[1].clone();
            ops.break_glass = true;
            ops.name = jitbot_core::GroupName::new("ops-admins");
            ops.dn = jitbot_core::GroupDn::new(OPS);
            p.groups.push(ops);
        })
        .build();
    bot.dir.add_group(OPS, Vec::<&str>::new());
    let first = TestBot::request_id(&bot.ok("alice", "request web-admins 1h one").await);
    let second = TestBot::request_id(&bot.ok("alice", "request db-admins 1h two").await);
    let third = bot.say("alice", "request ops-admins 1h three").await;
    assert!(!third.ok, "{}", third.text);
    for part in ["/jit cancel", &first, &second, "2 requests"] {
        assert!(third.text.contains(part), "{part} missing: {}", third.text);
    }
    assert_eq!(
        bot.engine.store().requests().unwrap().len(),
        2,
        "nothing was queued"
    );

    // Someone else is not affected.
    bot.ok("dave", "request db-admins 1h mine").await;
    // Break-glass is granted at once, so the cap never holds it back.
    let glass = bot.say("alice", "breakglass ops-admins 1h prod down").await;
    assert!(glass.ok, "{}", glass.text);
    bot.run_due().await;
    assert!(bot.is_member(OPS, "alice"), "break-glass granted");

    // Cancelling one frees a slot.
    bot.ok("alice", &format!("cancel {first}")).await;
    bot.ok("alice", "request web-admins 1h three again").await;
}

/// `jitbot audit anchor` publishes the head to the alert channel (and the
/// scheduled anchor does at start-up); `verify --anchor` accepts the chain
/// while it is intact, and refuses it once someone with store access has
/// rewritten a record before the anchor and re-linked everything after it.
/// With `[audit] key`, records are HMAC-keyed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_anchors_catch_rewritten_history() {
    let tmp = tempfile::tempdir().unwrap();
    let slack = FakeSlack::start().await;
    slack.add_user("UALICE", "alice@example.org");
    let port = free_port();
    let admin_port = free_port();
    let audit = "\n[audit]\nkey = { env = \"JITBOT_HARDENING_AUDIT_KEY\" }\nanchor_every = \"1h\"\n";
    let config = write_config(tmp.path(), port, admin_port, &slack, audit);
    let log = tmp.path().join("anchor.log");
    let key = "k".repeat(40);
    let child = jitbot()
        .env("JITBOT_HARDENING_AUDIT_KEY", &key)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let bot = wait_up(Running(Some(child), format!("http://127.0.0.1:{port}")), &log).await;
    let wait = Duration::from_secs(10);
    let scheduled = slack
        .wait_for(wait, |c| {
            c.method == "chat.postMessage" && c.body["channel"] == "CALERT"
        })
        .await
        .expect("the scheduled anchor at start-up");
    assert!(
        scheduled.body.to_string().contains("Audit anchor `0:`"),
        "{:?}",
        scheduled.body
    );

    // Some history: a request, then the anchor.
    let body = command_body(&slack, "request db-admins 1h replicas down", 1);
    assert_eq!(
        post_signed(&bot.1, &body, chrono::Utc::now().timestamp()).await,
        200
    );
    assert!(slack.wait_for(wait, |c| c.method == "response/1").await.is_some());
    let base = format!("http://127.0.0.1:{admin_port}");
    let cli = |args: &[&str]| jitbot().args(args).args(["--url", &base]).output().unwrap();
    let out = cli(&["audit", "anchor"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let anchor = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let parsed: jitbot::store::Anchor = anchor.parse().expect("SEQ:HASH");
    assert!(parsed.seq >= 1, "{anchor}");
    let published = slack
        .wait_for(wait, |c| {
            c.body["channel"] == "CALERT" && c.body.to_string().contains(&anchor)
        })
        .await;
    assert!(
        published.is_some(),
        "the anchor reached the alert channel: {:?}",
        slack.calls()
    );
    assert!(
        std::fs::read_to_string(&log).unwrap().contains(&anchor),
        "and the log"
    );

    // More history after the anchor; the chain verifies against it.
    let body = command_body(&slack, "list", 2);
    assert_eq!(
        post_signed(&bot.1, &body, chrono::Utc::now().timestamp()).await,
        200
    );
    assert!(slack.wait_for(wait, |c| c.method == "response/2").await.is_some());
    let out = cli(&["audit", "verify", "--anchor", &anchor]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("matches anchor"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    bot.stop();

    // Offline, with write access to the store: every record is keyed, so
    // the attacker rewrites record 1 and re-links the chain with SHA-256.
    {
        let db = crate::support::open_raw_sled(tmp.path().join("db"));
        let tree = db.open_tree("audit").unwrap();
        let raw: Vec<(sled::IVec, sled::IVec)> = tree.iter().map(|i| i.unwrap()).collect();
        assert!(!raw.is_empty());
        for (_, v) in &raw {
            assert!(
                String::from_utf8_lossy(v).contains("\"v\":\"1-hmac\""),
                "keyed records"
            );
        }
        let mut prev = String::new();
        for (k, v) in &raw {
            let mut json: serde_json::Value = serde_json::from_slice(v).unwrap();
            if json["seq"] == 1 {
                json["detail"] = "nothing happened".into();
            }
            json["v"] = "1".into();
            json["prev"] = prev.clone().into();
            let bytes = serde_json::to_vec(&json).unwrap();
            use sha2::Digest;
            prev = hex::encode(sha2::Sha256::digest(&bytes));
            tree.insert(k, bytes).unwrap();
        }
        db.flush().unwrap();
    }
    let first_logs = std::fs::read_to_string(tmp.path().join("anchor.log")).unwrap();
    assert!(
        !first_logs.contains("keyed for the first time") && !first_logs.contains("NOT sealed"),
        "a new keyed store needs no seal and raises no alert"
    );
    let log = tmp.path().join("after.log");
    let child = jitbot()
        .env("JITBOT_HARDENING_AUDIT_KEY", &key)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let bot = wait_up(Running(Some(child), format!("http://127.0.0.1:{port}")), &log).await;
    let out = cli(&["audit", "verify", "--anchor", &anchor]);
    assert!(!out.status.success(), "a rewritten history must not verify");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken at record"), "{err}");
    let alert = slack
        .wait_for(wait, |c| {
            c.body["channel"] == "CALERT" && c.body.to_string().contains("does not verify under its key")
        })
        .await;
    assert!(alert.is_some(), "the rewrite is alerted: {:?}", slack.calls());
    bot.stop();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains("It was NOT sealed") && !logs.contains("keyed for the first time"),
        "the rewritten chain is not sealed, and that is logged: {logs}"
    );
}

async fn wait_up(running: Running, log: &Path) -> Running {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(format!("{}/healthz", running.1)).send().await {
            if r.status().is_success() {
                return running;
            }
        }
        let logs = std::fs::read_to_string(log).unwrap_or_default();
        assert!(Instant::now() < deadline, "jitbot did not come up:\n{logs}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 13 item 10: `/jit extend` on a group whose extensions need
/// approval opens a pending request (and posts an approval card) without
/// the per-person pending cap, so one holder can queue any number of
/// cards in front of break-glass and drift alerts.
#[tokio::test]
async fn extension_requests_obey_the_pending_cap() {
    let bot = TestBot::builder()
        .settings(|s| s.max_pending_per_user = 2)
        .policy(|p| p.groups[0].extension_requires_approval = true)
        .build();
    let id = TestBot::request_id(&bot.ok("alice", "request db-admins 1h x").await);
    bot.ok("bob", &format!("approve {id}")).await;
    bot.run_due().await;
    let mut queued = 0;
    for _ in 0..6 {
        if bot.say("alice", "extend db-admins 1m").await.ok {
            queued += 1;
        }
    }
    let pending = bot
        .engine
        .store()
        .pending_requests()
        .unwrap()
        .into_iter()
        .filter(|r| r.request.requester.as_str() == "alice")
        .count();
    assert!(
        pending <= 2,
        "alice has {pending} requests waiting ({queued} extensions accepted); the cap is 2"
    );
}

/// Issue 13 item 1: an empty bind DN would make the LDAP bind anonymous.
#[test]
fn an_empty_ldap_bind_dn_is_refused_at_load() {
    for dn in ["", "   "] {
        let text = format!(
            r#"
[store]
path = "/tmp/x"

[directory]
kind = "ldap"

[ldap]
url = "ldaps://ldap.example.org"
bind_dn = "{dn}"
password = {{ env = "PW" }}
user_base = "ou=people,dc=example,dc=org"

[[group]]
name = "db-admins"
dn = "cn=db-admins,ou=groups,dc=example,dc=org"
requesters = {{ users = ["alice"] }}
approvers = {{ users = ["bob"] }}
default_duration = "1h"
max_duration = "4h"
"#
        );
        let parsed = jitbot::config::Config::parse(&text, "t.toml");
        assert!(
            parsed.is_err(),
            "bind_dn = {dn:?} was accepted: jitbot would bind anonymously"
        );
    }
}

use jitbot::secret::Secret;
use jitbot::store::{AuditCheck, AuditDraft, Sealing, Store, StoreError};

const AUDIT_KEY: &str = "safeguards-audit-hmac-key-0123456789abcdef";

/// Appends `n` records, as the engine's commits do.
async fn write_records(store: &Store, n: usize) {
    for i in 0..n {
        store
            .update(chrono::Utc::now(), |tx| {
                tx.audit(AuditDraft {
                    actor: "alice".into(),
                    action: "request.opened".into(),
                    detail: format!("genuine record {i}"),
                    ..AuditDraft::default()
                });
                Ok::<(), StoreError>(())
            })
            .await
            .unwrap();
    }
    store.flush().await.unwrap();
}

/// Opens the store, waiting (up to 5 s) for the sled flusher of a handle
/// just dropped to let go of the lock.
fn open_store(path: &Path) -> Store {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Store::open(path, 8) {
            Err(StoreError::Locked { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            other => return other.unwrap(),
        }
    }
}

/// Opens the store as `jitbot run` does with `[audit] key` set, start-up
/// keying included.
async fn start_keyed(path: &Path) -> (Store, Sealing) {
    let store = open_store(path);
    store.set_audit_key(Secret::new(AUDIT_KEY));
    let sealing = store.seal_unkeyed_history(chrono::Utc::now()).await.unwrap();
    (store, sealing)
}

/// A new keyed store holding `n` records.
async fn keyed_store(path: &Path, n: usize) -> Store {
    let (store, sealing) = start_keyed(path).await;
    assert_eq!(sealing, Sealing::FirstKeyed { since: 1, legacy: 0 });
    write_records(&store, n).await;
    store
}

fn assert_tampered(sealing: &Sealing) {
    assert!(
        matches!(sealing, Sealing::Tampered { recorded: true, .. }),
        "start-up must refuse to seal and record the finding: {sealing:?}"
    );
}

/// Issue 13 item 11 (adversarial review, finding 1): with store write access
/// an attacker replaces the whole keyed chain by an unkeyed one of their
/// choosing (links and head recomputed with SHA-256). The next start must
/// not seal it as a legacy chain: the keyed-since marker, MACed under the
/// key, says the chain was keyed from record 1; start-up refuses to seal
/// and `verify` reports the chain broken, also after later commits.
#[tokio::test]
async fn a_keyed_history_rewritten_without_the_key_is_not_sealed_at_start_up() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    drop(keyed_store(&db, 3).await);
    {
        let raw = crate::support::open_raw_sled(&db);
        let audit = raw.open_tree("audit").unwrap();
        let meta = raw.open_tree("meta").unwrap();
        let records: Vec<(sled::IVec, sled::IVec)> = audit.iter().map(|i| i.unwrap()).collect();
        assert_eq!(records.len(), 3);
        let mut prev = String::new();
        let mut seq = 0;
        for (k, v) in &records {
            let mut json: serde_json::Value = serde_json::from_slice(v).unwrap();
            assert_eq!(json["v"], "1-hmac", "the store was keyed");
            json["v"] = "1".into();
            json["prev"] = prev.clone().into();
            json["detail"] = "nothing happened".into();
            let bytes = serde_json::to_vec(&json).unwrap();
            use sha2::Digest;
            prev = hex::encode(sha2::Sha256::digest(&bytes));
            seq = json["seq"].as_u64().unwrap();
            audit.insert(k, bytes).unwrap();
        }
        meta.insert("audit_head", format!("{seq}:{prev}").as_bytes())
            .unwrap();
        raw.flush().unwrap();
    }
    let (store, sealing) = start_keyed(&db).await;
    assert_tampered(&sealing);
    let check = store.verify_audit().unwrap();
    assert!(
        matches!(&check, AuditCheck::Broken { seq: 1, problem } if problem.contains("keyed since record 1")),
        "a history forged without the key verifies with the key: {check:?}"
    );
    // Normal work goes on; the finding stays.
    write_records(&store, 2).await;
    drop(store);
    let (store, sealing) = start_keyed(&db).await;
    assert!(matches!(sealing, Sealing::Tampered { .. }), "{sealing:?}");
    assert!(matches!(store.verify_audit().unwrap(), AuditCheck::Broken { .. }));

    // Deleting the marker as well does not make it a legacy chain while a
    // head MAC remains.
    drop(store);
    {
        let raw = crate::support::open_raw_sled(&db);
        raw.open_tree("meta")
            .unwrap()
            .remove("audit_keyed_since")
            .unwrap();
        raw.flush().unwrap();
    }
    let (store, sealing) = start_keyed(&db).await;
    assert!(matches!(sealing, Sealing::Tampered { .. }), "{sealing:?}");
    assert!(matches!(store.verify_audit().unwrap(), AuditCheck::Broken { .. }));
}

/// Finding 2: cutting off the newest keyed records (say the ones that show
/// the attacker's own grant) needs no key to relink, since the last kept
/// record's link is stored in the clear as the deleted record's `prev`. The
/// head's MAC under the key catches it, at start-up and in `verify`, and
/// the next commit does not bless the shortened chain.
#[tokio::test]
async fn cutting_off_the_newest_keyed_records_is_caught_by_the_head_mac() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    drop(keyed_store(&db, 5).await);
    {
        let raw = crate::support::open_raw_sled(&db);
        let audit = raw.open_tree("audit").unwrap();
        let meta = raw.open_tree("meta").unwrap();
        assert_eq!(audit.len(), 5);
        let fourth: serde_json::Value =
            serde_json::from_slice(&audit.get(4u64.to_be_bytes()).unwrap().unwrap()).unwrap();
        assert_eq!(fourth["v"], "1-hmac", "the store was keyed");
        let hash_of_third = fourth["prev"].as_str().unwrap().to_string();
        audit.remove(4u64.to_be_bytes()).unwrap();
        audit.remove(5u64.to_be_bytes()).unwrap();
        meta.insert("audit_head", format!("3:{hash_of_third}").as_bytes())
            .unwrap();
        raw.flush().unwrap();
    }
    let (store, sealing) = start_keyed(&db).await;
    match &sealing {
        Sealing::Tampered {
            seq: 3,
            problem,
            recorded: true,
        } => {
            assert!(problem.contains("cut off"), "{problem}")
        }
        other => panic!("records 4 and 5 were deleted without the key, and start-up says {other:?}"),
    }
    write_records(&store, 1).await;
    let check = store.verify_audit().unwrap();
    assert!(
        matches!(&check, AuditCheck::Broken { seq: 4, problem } if problem.contains("tampered")),
        "records 4 and 5 of a keyed chain were deleted without the key, and verify says {check:?}"
    );
}

/// Finding 5: an emptied keyed chain with its head deleted is not "a new
/// chain of 0 records": the keyed head (and marker) written when the store
/// was first keyed tell "empty" from "deleted".
#[tokio::test]
async fn an_emptied_keyed_chain_does_not_verify_as_intact() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    drop(keyed_store(&db, 3).await);
    {
        let raw = crate::support::open_raw_sled(&db);
        raw.open_tree("audit").unwrap().clear().unwrap();
        raw.open_tree("meta").unwrap().remove("audit_head").unwrap();
        raw.flush().unwrap();
    }
    let (store, sealing) = start_keyed(&db).await;
    assert_tampered(&sealing);
    let check = store.verify_audit().unwrap();
    assert!(
        matches!(check, AuditCheck::Broken { .. }),
        "every audit record of a keyed store was deleted, and verify says {check:?}"
    );

    // A new keyed store with no record yet is intact, and stays so.
    let fresh = tmp.path().join("fresh");
    let (store, _) = start_keyed(&fresh).await;
    assert_eq!(store.verify_audit().unwrap(), AuditCheck::Intact { records: 0 });
    drop(store);
    let (store, sealing) = start_keyed(&fresh).await;
    assert_eq!(sealing, Sealing::Intact);
    assert_eq!(store.verify_audit().unwrap(), AuditCheck::Intact { records: 0 });
}

/// The first keying of a legacy unkeyed chain seals it once (an
/// `audit.keyed` record, the marker and the head's MAC), and every later
/// start finds it intact instead of sealing again; a forged marker is
/// refused.
#[tokio::test]
async fn a_legacy_chain_is_sealed_once_and_a_forged_marker_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    {
        let store = Store::open(&db, 8).unwrap();
        write_records(&store, 2).await;
    }
    let (store, sealing) = start_keyed(&db).await;
    assert_eq!(sealing, Sealing::FirstKeyed { since: 3, legacy: 2 });
    write_records(&store, 1).await;
    assert_eq!(store.verify_audit().unwrap(), AuditCheck::Intact { records: 4 });
    drop(store);
    let (store, sealing) = start_keyed(&db).await;
    assert_eq!(sealing, Sealing::Intact);
    drop(store);
    // Moving the marker past the keyed records (to pass them off as
    // legacy) without the key does not verify.
    {
        let raw = crate::support::open_raw_sled(&db);
        let meta = raw.open_tree("meta").unwrap();
        let marker = String::from_utf8(meta.get("audit_keyed_since").unwrap().unwrap().to_vec()).unwrap();
        let (_, mac) = marker.split_once(':').unwrap();
        meta.insert("audit_keyed_since", format!("5:{mac}").as_bytes())
            .unwrap();
        raw.flush().unwrap();
    }
    let (store, sealing) = start_keyed(&db).await;
    assert_tampered(&sealing);
    match store.verify_audit().unwrap() {
        AuditCheck::Broken { problem, .. } => assert!(problem.contains("marker"), "{problem}"),
        other => panic!("{other:?}"),
    }
}

/// Reads `audit_head` and `audit_head_mac` from a closed store, as anyone
/// with read access to it (or to any backup of it) can.
fn copy_head_and_mac(db: &Path) -> (sled::IVec, sled::IVec) {
    let raw = crate::support::open_raw_sled(db);
    let meta = raw.open_tree("meta").unwrap();
    let head = meta.get("audit_head").unwrap().expect("a head");
    let mac = meta.get("audit_head_mac").unwrap().expect("a head MAC");
    (head, mac)
}

/// Issue 13 item 11 (review brk13b), what the head MAC cannot catch: cutting off the newest keyed
/// records and putting back a head and head MAC copied earlier (any backup has them) is a
/// consistent older state of the audit tree and its meta, so the store alone verifies it intact
/// (SECURITY.md says so). An anchor published outside the store after the cut-off records were
/// written catches it.
#[tokio::test]
async fn a_rollback_to_an_old_head_and_head_mac_is_caught_only_by_a_later_anchor() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    drop(keyed_store(&db, 3).await);
    // The attacker's copy, from a backup or an earlier look at the store.
    let (old_head, old_mac) = copy_head_and_mac(&db);
    // Later: records 4 and 5 show the attacker's own grant, and jitbot
    // publishes an anchor of them (`jitbot audit anchor`).
    let (store, sealing) = start_keyed(&db).await;
    assert_eq!(sealing, Sealing::Intact);
    write_records(&store, 2).await;
    assert_eq!(store.verify_audit().unwrap(), AuditCheck::Intact { records: 5 });
    let published = store.audit_head().unwrap();
    drop(store);
    // Without the key: delete them and put the old head and its MAC back.
    {
        let raw = crate::support::open_raw_sled(&db);
        let audit = raw.open_tree("audit").unwrap();
        let meta = raw.open_tree("meta").unwrap();
        audit.remove(4u64.to_be_bytes()).unwrap();
        audit.remove(5u64.to_be_bytes()).unwrap();
        meta.insert("audit_head", old_head).unwrap();
        meta.insert("audit_head_mac", old_mac).unwrap();
        raw.flush().unwrap();
    }
    let (store, sealing) = start_keyed(&db).await;
    assert_eq!(sealing, Sealing::Intact, "the store alone cannot tell");
    assert_eq!(store.verify_audit().unwrap(), AuditCheck::Intact { records: 3 });
    match store.verify_audit_against(Some(&published)).unwrap() {
        AuditCheck::Broken { seq: 5, problem } => {
            assert!(problem.contains("records were removed"), "{problem}")
        }
        other => panic!("the anchor {published} must catch the cut-off records: {other:?}"),
    }
}

/// Issue 13 item 11 (review brk13b), what the head MAC cannot catch: the head MAC of the empty
/// chain and the marker `1:` are the same for every store keyed with the same key, so a keyed
/// store emptied and given another (fresh) store's meta values is a consistent state the store
/// alone verifies intact with 0 records (SECURITY.md says so). Any anchor published before the
/// emptying catches it.
#[tokio::test]
async fn an_emptied_chain_with_another_stores_meta_is_caught_only_by_an_anchor() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    let store = keyed_store(&db, 3).await;
    let published = store.audit_head().unwrap();
    drop(store);
    // Any other store keyed with the same key (staging, a test run, a
    // fresh install), before its first record.
    let other = tmp.path().join("other");
    drop(keyed_store(&other, 0).await);
    let (other_head, other_mac, other_marker) = {
        let raw = crate::support::open_raw_sled(&other);
        let meta = raw.open_tree("meta").unwrap();
        (
            meta.get("audit_head").unwrap(),
            meta.get("audit_head_mac").unwrap().expect("head MAC"),
            meta.get("audit_keyed_since").unwrap().expect("marker"),
        )
    };
    {
        let raw = crate::support::open_raw_sled(&db);
        raw.open_tree("audit").unwrap().clear().unwrap();
        let meta = raw.open_tree("meta").unwrap();
        match other_head {
            Some(h) => meta.insert("audit_head", h).unwrap(),
            None => meta.remove("audit_head").unwrap(),
        };
        meta.insert("audit_head_mac", other_mac).unwrap();
        meta.insert("audit_keyed_since", other_marker).unwrap();
        raw.flush().unwrap();
    }
    let (store, sealing) = start_keyed(&db).await;
    assert_eq!(sealing, Sealing::Intact, "the store alone cannot tell");
    assert_eq!(store.verify_audit().unwrap(), AuditCheck::Intact { records: 0 });
    match store.verify_audit_against(Some(&published)).unwrap() {
        AuditCheck::Broken { seq: 3, problem } => {
            assert!(problem.contains("records were removed"), "{problem}")
        }
        other => panic!("the anchor {published} must catch the emptied chain: {other:?}"),
    }
}

/// Issue 13 item 11 (review brk13b): one start with a wrong `[audit] key` (a typo, a rotated
/// secret, one replica's stale env) used to append `audit.tampered` and then every commit under
/// the wrong key, so with the right key back the chain never verified again. Now, when the marker,
/// the head MAC and the last keyed link all fail under the key, start-up refuses (a key mismatch)
/// and writes nothing; with the right key back the chain is intact.
#[tokio::test]
async fn a_wrong_audit_key_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    drop(keyed_store(&db, 3).await);
    {
        let store = open_store(&db);
        store.set_audit_key(Secret::new("a-different-audit-key-0123456789abcdef"));
        // As `jitbot run` does: seal (or not), then carry on serving.
        match store.seal_unkeyed_history(chrono::Utc::now()).await {
            Err(StoreError::AuditKey(m)) => assert!(
                m.contains("differs") && m.contains("rotation is not supported"),
                "{m}"
            ),
            other => panic!("a wrong key must be refused at start-up: {other:?}"),
        }
        assert_eq!(store.audit_head().unwrap().seq, 3, "nothing was written");
    }
    // The operator puts the right key back.
    let (store, sealing) = start_keyed(&db).await;
    assert_eq!(sealing, Sealing::Intact);
    assert_eq!(store.verify_audit().unwrap(), AuditCheck::Intact { records: 3 });
}

/// Issue 13 item 11 (review brk13b): `jitbot run` without `[audit] key` (a config rollback, a
/// missing section) used to open a keyed store without a word and append unkeyed records after
/// the keyed ones, so with the key back the chain was reported tampered for ever. Now start-up
/// refuses a keyed store without the key and writes nothing.
#[tokio::test]
async fn a_keyed_store_without_its_audit_key_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    drop(keyed_store(&db, 3).await);
    {
        // As `jitbot run` does with no `[audit] key`.
        let store = open_store(&db);
        match store.seal_unkeyed_history(chrono::Utc::now()).await {
            Err(StoreError::AuditKey(m)) => {
                assert!(m.contains("keyed") && m.contains("[audit] key"), "{m}")
            }
            other => panic!("a keyed store without its key must be refused: {other:?}"),
        }
        assert_eq!(store.audit_head().unwrap().seq, 3, "nothing was written");
    }
    let (store, sealing) = start_keyed(&db).await;
    assert_eq!(sealing, Sealing::Intact);
    assert_eq!(store.verify_audit().unwrap(), AuditCheck::Intact { records: 3 });
    // A store never keyed still starts without a key.
    let plain = Store::open(&tmp.path().join("plain"), 8).unwrap();
    write_records(&plain, 1).await;
    assert_eq!(
        plain.seal_unkeyed_history(chrono::Utc::now()).await.unwrap(),
        Sealing::Unkeyed
    );
}

/// Through the real binary: `jitbot run` and `check-config` on a keyed store
/// without its key, or with another key, exit 64 with the reason, bind no
/// port and leave the chain as it was.
#[tokio::test]
async fn run_and_check_config_refuse_a_missing_or_wrong_audit_key_with_64() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    drop(keyed_store(&db, 2).await);
    let (port, admin_port) = crate::ops::free_ports();
    let base = crate::ops::config_text(port, admin_port, &db);
    let keyed = format!("{base}\n[audit]\nkey = {{ env = \"JITBOT_BRK_AUDIT_KEY\" }}\n");
    for (text, key, expect) in [
        (&base, AUDIT_KEY, "no [audit] key is configured"),
        (
            &keyed,
            "another-audit-key-0123456789abcdef0123",
            "differs from the key",
        ),
    ] {
        let config = tmp.path().join("jitbot.toml");
        std::fs::write(&config, text).unwrap();
        for sub in ["run", "check-config"] {
            let mut cmd = crate::ops::jitbot();
            cmd.env("JITBOT_BRK_AUDIT_KEY", key)
                .args([sub, "--config"])
                .arg(&config);
            if sub == "check-config" {
                cmd.arg("--offline");
            }
            let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
                .await
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(64), "{sub}: {err}");
            assert!(err.contains(expect), "{sub}: {err}");
            assert!(
                std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
                "{sub} left its port bound"
            );
        }
    }
    let (store, sealing) = start_keyed(&db).await;
    assert_eq!(sealing, Sealing::Intact);
    assert_eq!(store.verify_audit().unwrap(), AuditCheck::Intact { records: 2 });
}

/// `[audit] anchor_file`: each anchor jitbot publishes is appended to a file
/// outside the store, and start-up and `audit verify` check the chain against
/// its last line, so a rollback of the audit tree with its old head MAC
/// (which the store alone verifies intact) is found without anyone pasting
/// an anchor. A line that is not an anchor is refused, naming the file.
#[tokio::test]
async fn the_last_anchor_in_the_anchor_file_catches_a_rollback_with_its_meta() {
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("db");
    let anchors = tmp.path().join("anchors");
    drop(keyed_store(&db, 3).await);
    let (old_head, old_mac) = copy_head_and_mac(&db);
    let (store, _) = start_keyed(&db).await;
    store.set_anchor_file(anchors.clone());
    assert_eq!(store.last_published_anchor().unwrap(), None, "no file yet");
    store
        .record_published_anchor(&store.audit_head().unwrap())
        .unwrap();
    write_records(&store, 2).await;
    let published = store.audit_head().unwrap();
    store.record_published_anchor(&published).unwrap();
    drop(store);
    {
        let raw = crate::support::open_raw_sled(&db);
        let audit = raw.open_tree("audit").unwrap();
        let meta = raw.open_tree("meta").unwrap();
        audit.remove(4u64.to_be_bytes()).unwrap();
        audit.remove(5u64.to_be_bytes()).unwrap();
        meta.insert("audit_head", old_head).unwrap();
        meta.insert("audit_head_mac", old_mac).unwrap();
        raw.flush().unwrap();
    }
    let (store, _) = start_keyed(&db).await;
    store.set_anchor_file(anchors.clone());
    let last = store.last_published_anchor().unwrap();
    assert_eq!(last.as_ref(), Some(&published));
    assert!(matches!(
        store.verify_audit_against(last.as_ref()).unwrap(),
        AuditCheck::Broken { seq: 5, .. }
    ));
    std::fs::write(&anchors, "5:not-an-anchor\n").unwrap();
    let err = store.last_published_anchor().unwrap_err().to_string();
    assert!(err.contains("anchor_file"), "{err}");
}
