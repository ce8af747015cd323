//! Operations, through the real binary: health, readiness, metrics, the admin
//! API and CLI, backup and restore, SIGTERM during activity, and no secret in
//! the logs; the store on sled or PostgreSQL (a backup of either restores
//! into a sled store).

use crate::support::bot::{Backend, TestBot};
use chrono::Duration;
use jitbot::config::Config;
use jitbot::store::{AuditCheck, Store};
use jitbot_core::LeaseState;
use std::process::{Command, Stdio};
use std::time::Instant;

pub(crate) const TOKEN: &str = "adm1n-t0ken-that-must-never-be-logged";

/// Kills the child if the test fails before it is stopped on purpose.
pub(crate) struct KillOnDrop(pub(crate) Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Two free ports, different from each other: the public and the admin
/// listener's.
pub(crate) fn free_ports() -> (u16, u16) {
    let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    (a.local_addr().unwrap().port(), b.local_addr().unwrap().port())
}

/// A memory-directory config; `[server]` is the first table, so a test can
/// add server keys by inserting lines after its header.
pub(crate) fn config_text(port: u16, admin_port: u16, store: &std::path::Path) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:{port}"
admin_listen = "127.0.0.1:{admin_port}"
admin_token = {{ env = "JITBOT_TEST_ADMIN_TOKEN" }}
dashboard = true
shutdown_grace = "5s"

[store]
path = "{}"
cache_mb = 16

[scheduler]
max_wait = "1s"
retry_base = "1s"

[directory]
kind = "memory"

[memory]
groups = {{ "cn=db-admins,ou=groups,dc=example,dc=org" = [], "cn=web-admins,ou=groups,dc=example,dc=org" = ["dave"] }}

[[memory.user]]
id = "alice"
[[memory.user]]
id = "dave"
[[memory.user]]
id = "bob"

[[group]]
name = "db-admins"
dn = "cn=db-admins,ou=groups,dc=example,dc=org"
zsp = true
requesters = {{ users = ["alice", "dave"] }}
approvers = {{ users = ["bob"] }}
default_duration = "1h"
max_duration = "4h"

[[group]]
name = "web-admins"
dn = "cn=web-admins,ou=groups,dc=example,dc=org"
requesters = {{ users = ["alice"] }}
approvers = {{ users = ["bob"] }}
default_duration = "1h"
max_duration = "4h"
"#,
        store.display()
    )
}

pub(crate) fn jitbot() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jitbot"));
    cmd.env("JITBOT_TEST_ADMIN_TOKEN", TOKEN)
        .env("JITBOT_ADMIN_TOKEN", TOKEN)
        .env("JITBOT_LOG", "debug");
    cmd
}

pub(crate) fn wait_until(what: &str, secs: u64, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + std::time::Duration::from_secs(secs);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

crate::both_stores!(
    the_binary_serves_operates_and_stops_cleanly,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn the_binary_serves_operates_and_stops_cleanly(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let store_path = tmp.path().join("db");
    let (port, admin_port) = free_ports();
    let run = backend.run_store();
    let text = run.config(&config_text(port, admin_port, &store_path));
    let config_path = tmp.path().join("jitbot.toml");
    std::fs::write(&config_path, &text).unwrap();
    let config = Config::parse(&text, "test").unwrap();

    // Leases made before the start: two that end a few seconds after it, one
    // that lasts.
    {
        let bot = TestBot::builder().policy(|p| *p = config.policy()).build();
        drop(bot);
        let store = run.open(&store_path);
        let dir = crate::support::bot::seeded();
        let clock = jitbot::clock::ManualClock::new(
            chrono::Utc::now() - Duration::minutes(59) - Duration::seconds(57),
        );
        let engine = jitbot::engine::Engine::new(
            config.policy(),
            store,
            dir,
            std::sync::Arc::new(clock.clone()),
            Default::default(),
        );
        let say = |user: &'static str, text: String| {
            let engine = engine.clone();
            async move {
                engine
                    .execute(
                        &jitbot::engine::Caller::new(user, None),
                        jitbot_core::Command::parse(&text).unwrap(),
                    )
                    .await
            }
        };
        for user in ["alice", "dave"] {
            let r = say(user, "request db-admins 1h soon over".into()).await;
            say("bob", format!("approve {}", TestBot::request_id(&r.text))).await;
        }
        clock.set(chrono::Utc::now());
        let r = say("alice", "request web-admins 2h lasting".into()).await;
        say("bob", format!("approve {}", TestBot::request_id(&r.text))).await;
        assert_eq!(engine.store().leases().unwrap().len(), 3);
    }

    let log_path = tmp.path().join("stderr.log");
    let child = jitbot()
        .args(["run", "--config"])
        .arg(&config_path)
        .envs(run.env().iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(Some(child));
    let public = format!("http://127.0.0.1:{port}");
    let base = format!("http://127.0.0.1:{admin_port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(format!("{public}/healthz")).send().await {
            if r.status().is_success() {
                break;
            }
        }
        assert!(Instant::now() < deadline, "jitbot did not come up");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The admin listener's `/readyz` also names the role on PostgreSQL:
    // the only replica leads once it has taken the term.
    let admin_ready = match backend {
        Backend::Sled => "ready\n",
        Backend::Postgres => "ready (leader)\n",
    };
    for (url, ready) in [(&public, "ready\n"), (&base, admin_ready)] {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let r = http.get(format!("{url}/readyz")).send().await.unwrap();
            assert_eq!(r.status(), 200, "{url}");
            let text = r.text().await.unwrap();
            if text == ready {
                break;
            }
            assert!(Instant::now() < deadline, "{url}/readyz: {text:?}, not {ready:?}");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    // The admin surface is on the admin listener only.
    for path in [
        "/admin/leases",
        "/metrics",
        "/api/dashboard",
        "/dashboard",
        "/admin/backup",
    ] {
        let on_public = http
            .get(format!("{public}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(on_public.status(), 404, "{path} on the public listener");
        let on_admin = http
            .get(format!("{base}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(on_admin.status(), 200, "{path} on the admin listener");
    }
    // The admin CLI's default URL is the default admin listener.
    let help = jitbot().args(["leases", "list", "--help"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("http://127.0.0.1:8081"),
        "{}",
        String::from_utf8_lossy(&help.stdout)
    );

    // The admin API refuses a wrong token and serves the right one.
    let wrong = http
        .get(format!("{base}/admin/leases"))
        .bearer_auth("nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    // The overdue leases are revoked by the running scheduler.
    let leases_json = || {
        let out = jitbot()
            .args(["leases", "list", "--json", "--all", "--url", &base])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
    };
    wait_until("the two short leases to end", 30, || {
        leases_json().iter().filter(|l| l["state"] == "ended").count() == 2
    });

    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && !l.starts_with('#'))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{metrics}"))
    };
    assert_eq!(value("jitbot_revocations_total"), 2.0);
    assert_eq!(value("jitbot_active_leases"), 1.0);
    assert!(value("jitbot_revocation_lag_seconds_count") >= 2.0);

    let verify = jitbot()
        .args(["audit", "verify", "--url", &base])
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(String::from_utf8_lossy(&verify.stdout).contains("intact"));
    let csv = jitbot()
        .args(["audit", "export", "--format", "csv", "--url", &base])
        .output()
        .unwrap();
    let csv = String::from_utf8_lossy(&csv.stdout);
    assert!(
        csv.starts_with("seq,at,actor,action") && csv.contains("lease.ended"),
        "{csv}"
    );

    let backup = tmp.path().join("backup.jsonl");
    let out = jitbot()
        .args(["backup", "--url", &base, "--to"])
        .arg(&backup)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A second jitbot on the same store is refused with a clear message.
    let second = jitbot()
        .args(["restore", "--from"])
        .arg(&backup)
        .arg("--data")
        .arg(&store_path)
        .output()
        .unwrap();
    assert!(!second.status.success());

    // SIGTERM: a clean, bounded exit.
    let stopped_at = Instant::now();
    let mut child = child.0.take().unwrap();
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(stopped_at.elapsed() < std::time::Duration::from_secs(10));

    // The store reopens cleanly with every lease and an intact audit chain.
    let store = run.open(&store_path);
    let leases = store.leases().unwrap();
    assert_eq!(leases.len(), 3, "no lease lost");
    assert_eq!(
        leases
            .iter()
            .filter(|l| l.lease.state == LeaseState::Active)
            .count(),
        1
    );
    assert!(matches!(store.verify_audit().unwrap(), AuditCheck::Intact { .. }));
    drop(store);

    // The backup restores into a new store with the same leases, written
    // uncompressed as asked (and kept so when opened with the default).
    let restored_path = tmp.path().join("restored");
    let out = jitbot()
        .args(["restore", "--compression", "off", "--from"])
        .arg(&backup)
        .arg("--data")
        .arg(&restored_path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("(compression off)"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let restored = Store::open(&restored_path, 16).unwrap();
    assert_eq!(restored.compression(), jitbot::store::Compression::Off);
    assert_eq!(restored.leases().unwrap().len(), 3);
    assert!(matches!(
        restored.verify_audit().unwrap(),
        AuditCheck::Intact { .. }
    ));

    let logs = std::fs::read_to_string(&log_path).unwrap();
    assert!(logs.contains("jitbot listening"), "{logs}");
    assert!(!logs.contains(TOKEN), "the admin token leaked into the logs");
}

// Once, not per store: refused before any store is opened.
#[test]
fn a_bad_config_exits_64_before_binding() {
    let tmp = tempfile::tempdir().unwrap();
    let (port, admin_port) = free_ports();
    let text = config_text(port, admin_port, &tmp.path().join("db"))
        .replace("max_duration = \"4h\"", "max_duration = \"30m\"");
    let path = tmp.path().join("bad.toml");
    std::fs::write(&path, text).unwrap();
    for sub in ["run", "check-config"] {
        let out = jitbot().args([sub, "--config"]).arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{sub}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("group[db-admins].default_duration"), "{sub}: {err}");
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", admin_port)).is_ok(),
            "{sub} bound the port"
        );
        assert!(!tmp.path().join("db").exists(), "{sub} created the store");
    }
}

// On both stores: on PostgreSQL, `check-config` also opens the store.
crate::both_stores!(check_config_names_a_missing_secret);
async fn check_config_names_a_missing_secret(backend: Backend) {
    let tmp = tempfile::tempdir().unwrap();
    let (port, admin_port) = free_ports();
    let run = backend.run_store();
    let text = run.config(&config_text(port, admin_port, &tmp.path().join("db")));
    let path = tmp.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_jitbot"))
        .args(["check-config", "--config"])
        .arg(&path)
        .envs(run.env().iter().copied())
        .env_remove("JITBOT_TEST_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("JITBOT_TEST_ADMIN_TOKEN"));
    let ok = jitbot()
        .args(["check-config", "--config"])
        .arg(&path)
        .envs(run.env().iter().copied())
        .output()
        .unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
}
