//! The harness integration tests share: a tiny trained checkpoint on generated data, a server
//! on a random port (`TestApp::spawn`), and the real backends' addresses.
#![allow(dead_code)]

use reqwest::StatusCode;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tandem::config::Settings;
use tandem::data::synthetic::{generate, GenerateConfig};
use tandem::model::TrainConfig;

/// Generated data (`<dir>/data`: catalog and interactions) and a tiny model trained on it,
/// saved under each of `versions` (the same weights, another version id): well under a
/// second.
pub fn tiny_checkpoints(dir: &Path, versions: &[&str]) -> (PathBuf, Vec<PathBuf>) {
    let data = dir.join("data");
    generate(
        &GenerateConfig {
            items: 300,
            users: 60,
            interactions: 3_000,
            seed: 7,
        },
        &data,
    )
    .unwrap();
    let cfg = TrainConfig {
        dim: 16,
        input_dim: 16,
        hidden: 32,
        epochs: 1,
        batch_size: 512,
        progress: false,
        ..TrainConfig::default()
    };
    let (mut model, _) = tandem::model::train_on_data(&cfg, &data, false).unwrap();
    let dirs = versions
        .iter()
        .map(|v| {
            let out = dir.join(format!("ckpt-{v}"));
            model.manifest_mut().model_version = (*v).into();
            model.save(&out).unwrap();
            out
        })
        .collect();
    (data, dirs)
}

/// The Redis every test uses (a unique key prefix each).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The Qdrant server's gRPC URL, from `QDRANT_URL` (`.ci/run` and `make test` start one).
/// Without it the test is skipped with a note, except under `CI=true`, where it fails: CI
/// must never pass without the production backend.
pub fn qdrant_url(test: &str) -> Option<String> {
    match std::env::var("QDRANT_URL") {
        Ok(u) if !u.is_empty() => Some(u),
        _ if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: QDRANT_URL is not set under CI=true; .ci/run starts a Qdrant server and sets it")
        }
        _ => {
            eprintln!("{test}: skipped, QDRANT_URL is not set (make test starts a Qdrant server when ../shared/bin/qdrant exists)");
            None
        }
    }
}

/// A unique name for one test's keys and collections.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// A server on a random port, stopped when dropped.
pub struct TestApp {
    pub base: String,
    pub http: reqwest::Client,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), tandem::http::ServeError>>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl TestApp {
    /// Serves `settings` on 127.0.0.1 and waits until `/readyz` answers 200.
    pub async fn spawn(settings: Settings) -> TestApp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tandem::http::serve(listener, settings, async {
            let _ = rx.await;
        }));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if server.is_finished() {
                panic!("server exited at start-up: {:?}", server.await);
            }
            if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
                if r.status() == StatusCode::OK {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "server not ready within 120 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        TestApp {
            base,
            http,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// Stops the server and waits until it has.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(s) = self.server.take() {
            let _ = s.await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET as JSON, with the status.
    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let r = self.http.get(self.url(path)).send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

/// Polls `check` every 50 ms until it holds or `within` has passed; returns how long it
/// took, or panics naming `what`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
