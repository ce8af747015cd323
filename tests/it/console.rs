//! The demo and its web console, end to end: over plain HTTP, and in a real
//! headless Chromium; the store on sled (the demo's own) or PostgreSQL.

use crate::support::bot::Backend;
use crate::support::browser::{wait_for, Browser};
use jitbot::app::Running;
use jitbot::chat::web::{dashboard_routes, DashboardAccess};
use jitbot::clock::{Clock, ManualClock, SystemClock};
use jitbot::demo::{start_demo_with, DemoData, DemoOptions};
use jitbot::engine::EngineSettings;
use jitbot::secret::Secret;
use jitbot_core::{GroupDn, UserId};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const DB_DN: &str = "cn=db-admins,ou=groups,dc=demo,dc=example";
const WAIT: Duration = Duration::from_secs(15);

/// A client of the console's JSON API.
struct Api {
    http: reqwest::Client,
    base: String,
}

impl Api {
    fn new(running: &Running) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: format!("http://{}", running.addr),
        }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    async fn command(&self, user: &str, text: &str) -> Value {
        self.post("/api/command", json!({"user": user, "text": text}))
            .await
            .1
    }

    async fn action(&self, user: &str, action: &str, reason: Option<&str>) -> Value {
        self.post(
            "/api/action",
            json!({"user": user, "action": action, "reason": reason}),
        )
        .await
        .1
    }

    async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    /// Waits for the approval card of `requester`'s request for `group`.
    async fn card(&self, requester: &str, group: &str, open: bool) -> Value {
        wait_for("the approval card", WAIT, || async {
            let m = self.get("/api/messages?after=0&user=bob").await;
            m["messages"]
                .as_array()?
                .iter()
                .rev()
                .find(|m| {
                    let c = &m["card"];
                    c["requester"] == requester && c["group"] == group && c["open"] == open
                })
                .cloned()
        })
        .await
        .unwrap()
    }
}

/// What a running demo keeps on disk: its data directory and, on
/// PostgreSQL, the replica's mirror.
struct Kept {
    _data: DemoData,
    _mirror: tempfile::TempDir,
}

/// Starts the demo on a free loopback port with its store on `backend`.
async fn demo(backend: Backend, clock: Arc<dyn Clock>, settings: EngineSettings) -> (Running, Kept) {
    let mirror = tempfile::tempdir().expect("temp dir");
    let store = match backend {
        Backend::Sled => None,
        Backend::Postgres => Some(backend.open(&mirror.path().join("db"))),
    };
    let (running, data) = start_demo_with(DemoOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        data: None,
        clock,
        settings,
        store,
    })
    .await
    .unwrap();
    (
        running,
        Kept {
            _data: data,
            _mirror: mirror,
        },
    )
}

fn ok(reply: &Value) -> bool {
    reply["ok"]
        .as_bool()
        .unwrap_or_else(|| panic!("not a reply: {reply}"))
}

crate::both_stores!(
    console_api_request_approve_and_deny,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn console_api_request_approve_and_deny(backend: Backend) {
    let (running, _data) = demo(backend, Arc::new(SystemClock), EngineSettings::default()).await;
    let api = Api::new(&running);

    let reply = api.command("alice", "/jit request db-admins 1m testing").await;
    assert!(ok(&reply), "{reply}");
    let card = api.card("alice", "db-admins", true).await;
    let request = card["card"]["request"].as_str().unwrap().to_string();
    let buttons: Vec<&str> = card["buttons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        buttons,
        [format!("jit:approve:{request}"), format!("jit:deny:{request}")]
    );

    // The requester cannot approve their own request, and strangers are turned away.
    let own = api.action("alice", &format!("jit:approve:{request}"), None).await;
    assert!(!ok(&own), "self-approval must be refused: {own}");
    let (status, _) = api
        .post("/api/command", json!({"user": "mallory", "text": "list"}))
        .await;
    assert_eq!(status, 400);

    let approved = api.action("bob", &format!("jit:approve:{request}"), None).await;
    assert!(ok(&approved), "{approved}");
    let closed = api.card("alice", "db-admins", false).await;
    assert!(
        closed["card"]["status"]
            .as_str()
            .unwrap()
            .contains("approved by bob"),
        "{closed}"
    );
    assert!(
        closed["buttons"].as_array().unwrap().is_empty(),
        "no buttons once decided"
    );
    assert_eq!(closed["id"], card["id"], "the card is updated in place");

    let lease = wait_for("the lease on the dashboard", WAIT, || async {
        let d = api.get("/api/dashboard").await;
        d["leases"]
            .as_array()?
            .iter()
            .find(|l| l["user"] == "alice" && l["state"] == "active")
            .cloned()
    })
    .await
    .unwrap();
    assert_eq!(lease["group"], "db-admins");
    let left = lease["remaining_secs"].as_i64().unwrap();
    assert!((1..=60).contains(&left), "a one-minute lease has {left}s left");
    assert!(running
        .engine
        .directory()
        .is_member(&GroupDn::new(DB_DN), &UserId::new("alice"))
        .await
        .unwrap());
    let dash = api.get("/api/dashboard").await;
    assert_eq!(dash["mode"], "demo");
    let zsp = dash["zsp"]
        .as_array()
        .unwrap()
        .iter()
        .find(|z| z["group"] == "db-admins")
        .unwrap();
    assert_eq!(zsp["members"], json!(["alice"]));
    assert_eq!(zsp["unleased"], json!([]));
    assert!(
        dash["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "request.opened"),
        "{dash}"
    );

    // The requester hears about it in a direct message that only they see.
    let dm = wait_for("alice's DM", WAIT, || async {
        let m = api.get("/api/messages?after=0&user=alice").await;
        m["messages"]
            .as_array()?
            .iter()
            .find(|m| m["place"] == "direct")
            .cloned()
    })
    .await
    .unwrap();
    assert_eq!(dm["to"], "alice");
    let bobs = api.get("/api/messages?after=0&user=bob").await;
    assert!(!bobs["messages"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["place"] == "direct" && m["to"] == "alice"));

    // Deny needs a reason, and then closes the card.
    assert!(ok(&api
        .command("dave", "/jit request db-admins 30m reindexing")
        .await));
    let dave = api.card("dave", "db-admins", true).await;
    let deny = format!("jit:deny:{}", dave["card"]["request"].as_str().unwrap());
    assert!(!ok(&api.action("carol", &deny, None).await));
    assert!(ok(&api
        .action("carol", &deny, Some("not during the freeze"))
        .await));
    let denied = api.card("dave", "db-admins", false).await;
    assert!(
        denied["card"]["status"]
            .as_str()
            .unwrap()
            .contains("not during the freeze"),
        "{denied}"
    );

    running.stop(Duration::from_secs(5)).await;
}

crate::both_stores!(
    dashboard_needs_the_admin_token_outside_the_demo,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn dashboard_needs_the_admin_token_outside_the_demo(backend: Backend) {
    let (running, _data) = demo(backend, Arc::new(SystemClock), EngineSettings::default()).await;
    let app = dashboard_routes(
        running.engine.clone(),
        DashboardAccess::Token(Secret::new("s3cret")),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/api/dashboard");
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        http.get(&url).bearer_auth("wrong").send().await.unwrap().status(),
        401
    );
    let r = http.get(&url).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["mode"], "admin");
    // The page itself holds no data; it asks for the token.
    let page = http.get(format!("http://{addr}/dashboard")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    server.abort();
    running.stop(Duration::from_secs(5)).await;
}

crate::both_stores!(
    console_in_chromium_request_approve_expire,
    flavor = "multi_thread",
    worker_threads = 2
);
async fn console_in_chromium_request_approve_expire(backend: Backend) {
    let clock = ManualClock::new(chrono::Utc::now());
    let (running, _data) = demo(backend, Arc::new(clock.clone()), EngineSettings::default()).await;
    let browser = Browser::start().await;
    let outcome = browser_flow(&browser, &running, &clock).await;
    let shot = browser.screenshot("console-e2e.png").await;
    browser.close().await;
    running.stop(Duration::from_secs(5)).await;
    if let Err(e) = outcome {
        panic!("{e:#} (screenshot: {shot:?})");
    }
    let shot = shot.expect("screenshot saved");
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 1000,
        "{shot:?} is empty"
    );
}

async fn browser_flow(b: &Browser, running: &Running, clock: &ManualClock) -> anyhow::Result<()> {
    use fantoccini::Locator;
    let base = format!("http://{}", running.addr);
    b.client.goto(&format!("{base}/")).await?;
    let user_select = |b: &'_ Browser| {
        let c = b.client.clone();
        async move { c.find(Locator::Id("user-select")).await }
    };
    wait_for("the user picker", WAIT, || async {
        b.client.find(Locator::Css("#user-select option")).await.ok()
    })
    .await?;
    user_select(b).await?.select_by_value("alice").await?;
    b.wait_for_text("#user-role", "alice may request db-admins", WAIT)
        .await?;

    let input = b.client.find(Locator::Id("command-input")).await?;
    input.send_keys("/jit request db-admins 1m e2e test").await?;
    b.client.find(Locator::Id("command-send")).await?.click().await?;
    b.wait_for_text("[data-testid=reply]", "r-", WAIT).await?;
    b.wait_for_text("[data-testid=approval-card]", "e2e test", WAIT)
        .await?;

    user_select(b).await?.select_by_value("bob").await?;
    b.wait_for_text("#user-role", "approves db-admins", WAIT).await?;
    b.click("button[data-action^='jit:approve:']", WAIT).await?;
    b.wait_for_text("[data-testid=card-status]", "approved by bob", WAIT)
        .await?;
    wait_for("alice in db-admins", WAIT, || async {
        let member = running
            .engine
            .directory()
            .is_member(&GroupDn::new(DB_DN), &UserId::new("alice"))
            .await;
        member.ok().filter(|m| *m)
    })
    .await?;

    b.client.goto(&format!("{base}/dashboard")).await?;
    let row = "[data-testid=lease-row][data-user=alice][data-group=db-admins]";
    b.wait_for_text(row, "active", WAIT).await?;
    b.wait_for_text(&format!("{row} [data-testid=countdown]"), "m ", WAIT)
        .await?;
    b.wait_for_text(
        "[data-testid=zsp-row][data-group=db-admins]",
        "every member holds a lease",
        WAIT,
    )
    .await?;
    b.wait_for_text("[data-testid=audit-row]", "lease.granted", WAIT)
        .await?;
    b.screenshot("dashboard-e2e.png").await?;

    // Back in the console as alice, let the lease run out.
    b.client.goto(&format!("{base}/")).await?;
    wait_for("the user picker", WAIT, || async {
        b.client.find(Locator::Css("#user-select option")).await.ok()
    })
    .await?;
    user_select(b).await?.select_by_value("alice").await?;
    b.wait_for_text("[data-testid=dms]", "You have db-admins until", WAIT)
        .await?;
    clock.advance(chrono::Duration::minutes(2));
    running.engine.timers_changed().notify_one();
    b.wait_for_text(
        "#feed [data-testid=message-text]",
        "alice's access to db-admins ended (expired)",
        WAIT,
    )
    .await?;
    b.wait_for_text("[data-testid=dms]", "ended (expired)", WAIT)
        .await?;
    let still = running
        .engine
        .directory()
        .is_member(&GroupDn::new(DB_DN), &UserId::new("alice"))
        .await?;
    anyhow::ensure!(!still, "alice is still in db-admins after expiry");
    Ok(())
}

/// The web console of `jitbot demo` as a [`crate::contract::Platform`]: the
/// same inbound route as the chat platforms, over the page's JSON API.
pub(crate) struct ConsolePlatform {
    running: Running,
    api: Api,
    _data: Kept,
}

pub(crate) async fn contract_platform(backend: Backend) -> ConsolePlatform {
    let (running, data) = demo(
        backend,
        Arc::new(SystemClock),
        EngineSettings {
            max_pending_per_user: 1,
            ..Default::default()
        },
    )
    .await;
    let api = Api::new(&running);
    ConsolePlatform {
        running,
        api,
        _data: data,
    }
}

impl ConsolePlatform {
    /// The newest message `user` sees that satisfies `f`, as JSON text.
    async fn newest(&self, user: &str, what: &str, f: &(dyn for<'x> Fn(&'x Value) -> bool + Sync)) -> String {
        wait_for(what, crate::contract::WAIT, || async {
            let m = self.api.get(&format!("/api/messages?after=0&user={user}")).await;
            m["messages"]
                .as_array()?
                .iter()
                .rev()
                .find(|m| f(m))
                .map(|m| m.to_string())
        })
        .await
        .unwrap()
    }
}

#[async_trait::async_trait]
impl crate::contract::Platform for ConsolePlatform {
    fn mode(&self) -> &'static str {
        "web console"
    }

    async fn type_command(&self, user: &str, text: &str) -> String {
        let reply = self.api.command(user, &format!("/jit {text}")).await;
        reply["text"].as_str().unwrap_or_default().to_string()
    }

    async fn press(&self, user: &str, action: &str, _click: u32) -> String {
        let reply = self.api.action(user, action, None).await;
        reply["text"].as_str().unwrap_or_default().to_string()
    }

    async fn press_again(&self, _user: &str, _action: &str, _click: u32) -> crate::contract::Replay {
        crate::contract::Replay::NotApplicable(
            "the console's clicks carry no delivery id: each is a new click by a demo user",
        )
    }

    async fn deny_with_reason(&self, user: &str, request: &str, reason: &str) -> String {
        let deny = format!("jit:deny:{request}");
        // The page asks for the reason; a Deny without one is refused.
        let bare = self.api.action(user, &deny, None).await;
        assert!(!ok(&bare), "a deny without a reason: {bare}");
        let reply = self.api.action(user, &deny, Some(reason)).await;
        reply["text"].as_str().unwrap_or_default().to_string()
    }

    async fn card(&self, request: &str, ready: &(dyn for<'x> Fn(&'x str) -> bool + Sync)) -> String {
        self.newest("bob", &format!("the card of {request}"), &|m| {
            m["card"]["request"] == request && ready(&m.to_string())
        })
        .await
    }

    async fn direct_message(&self, user: &str, needle: &str) -> String {
        self.newest(user, &format!("a DM to {user}"), &|m| {
            m["place"] == "direct" && m["to"] == user && m.to_string().contains(needle)
        })
        .await
    }

    async fn wait_member(&self, user: &str, member: bool) {
        let dir = self.running.engine.directory();
        wait_for("membership", crate::contract::WAIT, || async {
            let now = dir
                .is_member(&GroupDn::new(DB_DN), &UserId::new(user))
                .await
                .ok()?;
            (now == member).then_some(())
        })
        .await
        .unwrap()
    }

    async fn forged_command(&self) -> Option<u16> {
        // The demo console acts as any demo user by design: nothing is signed.
        None
    }

    async fn rate_limit_next_card(&self) -> bool {
        // The console is jitbot's own page: no platform limits its posts.
        false
    }

    async fn card_posts(&self, request: &str) -> crate::contract::Posts {
        // A card's updates rewrite its message in place: one message per post.
        let m = self.api.get("/api/messages?after=0&user=bob").await;
        let accepted = m["messages"]
            .as_array()
            .map(|all| {
                all.iter()
                    .filter(|m| m["place"] == "channel" && m["card"]["request"] == request)
                    .count()
            })
            .unwrap_or_default();
        crate::contract::Posts {
            accepted,
            rate_limited: 0,
        }
    }
}
