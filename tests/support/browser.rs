//! A real headless Chromium driven through chromedriver (WebDriver), for the
//! console's end-to-end tests. Debian's `chromium` and `chromium-driver`
//! packages must be installed: a missing browser fails the test, it is never
//! skipped.

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A browser session; chromedriver (and with it Chromium) is killed on drop.
pub struct Browser {
    pub client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and opens a headless Chromium
    /// with a fresh profile.
    pub async fn start() -> Browser {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: the console's end-to-end test needs a real Chromium; \
                 install it with `apt-get install -y chromium chromium-driver`"
            );
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}"));
        let profile = tempfile::tempdir().expect("temporary Chromium profile");
        let url = format!("http://127.0.0.1:{port}");
        let mut driver = DriverGuard(Some(driver));
        wait_for("chromedriver to answer", Duration::from_secs(30), || async {
            reqwest::get(format!("{url}/status"))
                .await
                .ok()
                .filter(|r| r.status().is_success())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--window-size=1280,1000",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "binary": CHROMIUM, "args": args }),
        );
        let client = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&url)
            .await
            .unwrap_or_else(|e| panic!("chromedriver could not start Chromium: {e}"));
        Browser {
            client,
            driver: driver.0.take().expect("driver"),
            _profile: profile,
        }
    }

    /// Saves a PNG of the page under `target/artifacts/`; returns its path.
    pub async fn screenshot(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(name);
        std::fs::write(&path, self.client.screenshot().await?)?;
        Ok(path)
    }

    /// The text of every element `css` matches.
    pub async fn texts(&self, css: &str) -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        for e in self.client.find_all(Locator::Css(css)).await? {
            // An element replaced by a re-render between find and read is skipped.
            if let Ok(t) = e.text().await {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Waits until an element matching `css` has text containing `needle`.
    pub async fn wait_for_text(&self, css: &str, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        wait_for(&format!("`{needle}` in {css}"), timeout, || async {
            self.texts(css)
                .await
                .ok()?
                .into_iter()
                .find(|t| t.contains(needle))
        })
        .await
    }

    /// Waits for an element matching `css` and clicks it (retrying when the
    /// page re-renders it between the find and the click).
    pub async fn click(&self, css: &str, timeout: Duration) -> anyhow::Result<()> {
        wait_for(&format!("{css} to be clickable"), timeout, || async {
            let e = self.client.find(Locator::Css(css)).await.ok()?;
            e.click().await.ok()
        })
        .await
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Kills chromedriver if the start fails half-way.
struct DriverGuard(Option<Child>);

impl Drop for DriverGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// Polls `probe` every 100ms until it yields a value, or fails after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
