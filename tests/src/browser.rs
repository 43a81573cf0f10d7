//! A real browser for the tests of the pages: Debian's Chromium, headless, driven through
//! ChromeDriver with the W3C WebDriver protocol (plain JSON over HTTP, so a few calls here
//! rather than a client crate). `scripts/test.sh` installs both (`ensure_chromium`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::{Proc, free_port, which};

/// The key of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium session. [`Browser::close`] ends it; dropping it kills ChromeDriver
/// (and with it the browser).
pub struct Browser {
    http: reqwest::Client,
    session: String,
    driver_url: String,
    _driver: Proc,
    _profile: PathBuf,
}

impl Browser {
    /// Starts ChromeDriver and a headless Chromium with an empty profile, logging to
    /// `<log_dir>/chromedriver.log`. Fails, saying what to install, when either is missing.
    pub async fn start(log_dir: &Path) -> anyhow::Result<Browser> {
        let (Some(driver), Some(chromium)) = (which("chromedriver"), which("chromium")) else {
            bail!(
                "the browser tests need Debian's chromium and chromium-driver: scripts/test.sh installs them \
                 (apt-get install chromium chromium-driver)"
            );
        };
        let port = free_port();
        let driver = Proc::spawn(
            "chromedriver",
            &driver,
            &[format!("--port={port}")],
            log_dir,
        );
        let driver_url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http.get(format!("{driver_url}/status")).send().await;
            if let Ok(r) = ready
                && let Ok(status) = r.json::<Value>().await
                && status["value"]["ready"] == true
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not get ready on {driver_url} within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = log_dir.join("chromium-profile");
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile)?;
        // Without the background-networking flags Chromium keeps trying hosts this machine
        // cannot reach.
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
            &format!("--user-data-dir={}", profile.display()),
        ];
        let answer: Value = http
            .post(format!("{driver_url}/session"))
            .json(&json!({"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": chromium, "args": args}
            }}}))
            .send()
            .await
            .context("creating a browser session")?
            .json()
            .await?;
        let session = answer["value"]["sessionId"]
            .as_str()
            .with_context(|| format!("no session from chromedriver: {answer}"))?
            .to_owned();
        Ok(Browser {
            http,
            session,
            driver_url,
            _driver: driver,
            _profile: profile,
        })
    }

    async fn command(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}/session/{}{path}", self.driver_url, self.session);
        let mut request = self.http.request(method.clone(), &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let answer: Value = request
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?
            .json()
            .await?;
        if let Some(error) = answer["value"]["error"].as_str() {
            bail!("{method} {path}: {error}: {}", answer["value"]["message"]);
        }
        Ok(answer["value"].clone())
    }

    /// Loads `url` and waits until the page has loaded.
    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.command(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await
            .map(|_| ())
    }

    pub async fn current_url(&self) -> anyhow::Result<String> {
        let url = self.command(reqwest::Method::GET, "/url", None).await?;
        Ok(url.as_str().unwrap_or_default().to_owned())
    }

    /// Waits (up to `timeout`) until the page at an address containing `part` has loaded (a
    /// click on a link or a submit button returns before the navigation it starts is done);
    /// returns the address.
    pub async fn wait_for_page(&self, part: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let url = self.current_url().await?;
            let state = self.script("return document.readyState").await?;
            if url.contains(part) && state == "complete" {
                return Ok(url);
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "no page at an address containing {part:?} loaded within {timeout:?}: at {url}, {state}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The elements that match a CSS selector, in document order.
    pub async fn find_all(&self, css: &str) -> anyhow::Result<Vec<Element>> {
        let found = self
            .command(
                reqwest::Method::POST,
                "/elements",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await?;
        Ok(found
            .as_array()
            .map(|all| {
                all.iter()
                    .filter_map(|e| e[ELEMENT].as_str().map(|id| Element(id.to_owned())))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The one element that matches `css`; fails when none does.
    pub async fn find(&self, css: &str) -> anyhow::Result<Element> {
        self.find_all(css)
            .await?
            .into_iter()
            .next()
            .with_context(|| format!("no element matches {css:?}"))
    }

    /// The element's rendered text.
    pub async fn text(&self, element: &Element) -> anyhow::Result<String> {
        let text = self
            .command(
                reqwest::Method::GET,
                &format!("/element/{}/text", element.0),
                None,
            )
            .await?;
        Ok(text.as_str().unwrap_or_default().to_owned())
    }

    pub async fn attribute(&self, element: &Element, name: &str) -> anyhow::Result<Option<String>> {
        let value = self
            .command(
                reqwest::Method::GET,
                &format!("/element/{}/attribute/{name}", element.0),
                None,
            )
            .await?;
        Ok(value.as_str().map(str::to_owned))
    }

    pub async fn click(&self, element: &Element) -> anyhow::Result<()> {
        self.command(
            reqwest::Method::POST,
            &format!("/element/{}/click", element.0),
            Some(json!({})),
        )
        .await
        .map(|_| ())
    }

    /// Runs `script` (a function body; `return` gives its value) in the page.
    pub async fn script(&self, script: &str) -> anyhow::Result<Value> {
        self.command(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    /// Saves a PNG of the viewport to `path`.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        use base64::Engine as _;
        let png = self
            .command(reqwest::Method::GET, "/screenshot", None)
            .await?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .context("decoding the screenshot")?;
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
    }

    /// Ends the session (the browser quits).
    pub async fn close(self) -> anyhow::Result<()> {
        self.http
            .delete(format!("{}/session/{}", self.driver_url, self.session))
            .send()
            .await?;
        Ok(())
    }
}

/// An element of the current page.
#[derive(Debug, Clone)]
pub struct Element(String);
