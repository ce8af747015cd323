//! The real `jitbot run` binary as a child process: a config written to a
//! temporary directory, a free loopback port, the admin API to look inside,
//! stderr kept in a log file, and SIGKILL on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The admin API token every test config uses.
pub const ADMIN_TOKEN: &str = "process-admin-token";

pub struct Jitbot {
    child: Child,
    /// `http://127.0.0.1:<port>`, the public listener.
    pub base: String,
    /// The admin listener (`server.admin_listen`, added here).
    pub admin_base: String,
    pub log: PathBuf,
    http: reqwest::Client,
    _dir: TempDir,
}

impl Jitbot {
    /// Starts `jitbot run` with `config`, a TOML text in which `{listen}`,
    /// `{store}` and `{admin}` are filled in here ([server] and [store] are
    /// the caller's to write; `server.admin_listen` is added on a free
    /// port), and the given environment. Waits for `/healthz`.
    pub async fn start(config: &str, env: &[(&str, &str)]) -> Jitbot {
        let dir = tempfile::Builder::new()
            .prefix("jitbot-run-")
            .tempdir()
            .expect("temp dir");
        // Both held at once, so they differ.
        let (public, admin) = (
            std::net::TcpListener::bind("127.0.0.1:0").expect("free port"),
            std::net::TcpListener::bind("127.0.0.1:0").expect("free port"),
        );
        let port = public.local_addr().expect("free port").port();
        let admin_port = admin.local_addr().expect("free port").port();
        drop((public, admin));
        let text = config
            .replacen(
                "[server]\n",
                &format!("[server]\nadmin_listen = \"127.0.0.1:{admin_port}\"\n"),
                1,
            )
            .replace("{listen}", &format!("127.0.0.1:{port}"))
            .replace("{store}", &dir.path().join("db").display().to_string())
            .replace("{admin}", "{ env = \"JITBOT_TEST_ADMIN\" }");
        let path = dir.path().join("jitbot.toml");
        std::fs::write(&path, text).expect("write config");
        let log = dir.path().join("jitbot.log");
        let stderr = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_jitbot"));
        cmd.args(["run", "--config"])
            .arg(&path)
            .env("JITBOT_TEST_ADMIN", ADMIN_TOKEN)
            .env(
                "JITBOT_LOG",
                "debug,serenity=info,slack_morphism=debug,rustls=info,hyper=info,h2=info",
            )
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn jitbot");
        let bot = Jitbot {
            child,
            base: format!("http://127.0.0.1:{port}"),
            admin_base: format!("http://127.0.0.1:{admin_port}"),
            log,
            http: reqwest::Client::new(),
            _dir: dir,
        };
        bot.wait_healthy().await;
        bot
    }

    async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(format!("{}/healthz", self.base)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "jitbot did not come up; its log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What jitbot logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id, to signal it (a graceful stop is `kill -TERM`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// `GET /admin/<what>?all=true` as JSON.
    pub async fn admin(&self, what: &str) -> Vec<serde_json::Value> {
        let res = self
            .http
            .get(format!("{}/admin/{what}?all=true", self.admin_base))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("admin API");
        assert!(res.status().is_success(), "admin {what}: {}", res.status());
        res.json().await.expect("admin JSON")
    }
}

impl Drop for Jitbot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
