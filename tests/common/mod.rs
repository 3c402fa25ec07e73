//! The harness every integration test shares (each file that needs any of it has
//! `mod common;`): a tiny trained checkpoint on generated data, a server on a random port
//! (`TestApp::spawn`, with typed requests), the `tandem` binary with a clean environment,
//! `free_port`, `wait_ready`, `eventually`, a `redis-server` of a test's own, and the real
//! backends' addresses.
#![allow(dead_code)]

use proptest::prelude::*;
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tandem::config::Settings;

/// The `tandem` binary cargo built for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_tandem");

/// A path inside the repository.
pub fn repo_path(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// Runs the binary with a clean `TANDEM_*` environment (and no `RUST_LOG`), so that the
/// developer's settings do not leak into the test.
pub fn tandem_cli(args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars() {
        if k.starts_with("TANDEM_") || k == "RUST_LOG" {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).output().expect("the tandem binary runs")
}

/// Logs of the servers a test starts in-process go to the test's output when `TEST_LOG` is
/// set (`TEST_LOG=1 cargo test ...`), and nowhere otherwise.
pub fn init_logs() {
    if std::env::var_os("TEST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info,tandem=debug")
            .try_init();
    }
}

/// A port nothing listens on now (the OS's pick; another process could take it before the
/// caller binds it, which on a test machine does not happen in practice).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `base`'s `/readyz` until it answers 200 (`Ok`). `exited` is asked between polls
/// and says whether the server stopped, which ends the wait at once (`Err`); a server not
/// ready within `within` fails the test.
pub async fn wait_ready(
    http: &reqwest::Client,
    base: &str,
    within: Duration,
    mut exited: impl FnMut() -> bool,
) -> Result<(), ()> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await {
            if r.status() == StatusCode::OK {
                return Ok(());
            }
        }
        if exited() {
            return Err(());
        }
        assert!(
            Instant::now() < deadline,
            "{base} not ready within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
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

/// A server on a random port, started exactly as `tandem serve` starts one
/// (`tandem::http::serve(listener, settings, shutdown)`), stopped when dropped.
pub struct TestApp {
    pub base: String,
    /// Sends the admin key as `X-API-Key` when the app was spawned with one.
    pub http: reqwest::Client,
    /// The directory the server's data lives in, when the app owns it (see `in_dir`).
    dir: Option<tempfile::TempDir>,
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
    /// Serves `settings` on 127.0.0.1 and waits until `/readyz` answers 200. The client
    /// sends `settings.admin_key` as `X-API-Key` when there is one (catalog writes need it).
    pub async fn spawn(settings: Settings) -> TestApp {
        init_logs();
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = settings.admin_key.0.as_deref() {
            headers.insert("x-api-key", key.parse().unwrap());
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .default_headers(headers)
            .build()
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tandem::http::serve(listener, settings, async {
            let _ = rx.await;
        }));
        let within = Duration::from_secs(120);
        if wait_ready(&http, &base, within, || server.is_finished())
            .await
            .is_err()
        {
            panic!("server exited at start-up: {:?}", server.await);
        }
        TestApp {
            base,
            http,
            dir: None,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// The app owns `dir` (its data directory's parent), which `stop` hands back for a
    /// restart over the same data.
    pub fn in_dir(mut self, dir: tempfile::TempDir) -> TestApp {
        self.dir = Some(dir);
        self
    }

    /// Stops the server gracefully, checks that it stopped without an error, and hands back
    /// the directory it owned, if any.
    pub async fn stop(mut self) -> Option<tempfile::TempDir> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(s) = self.server.take() {
            s.await
                .expect("the server task does not panic")
                .expect("the server stops cleanly");
        }
        self.dir.take()
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

    /// GET that must answer 200, as `T`.
    pub async fn get_as<T: DeserializeOwned>(&self, path: &str) -> T {
        let (status, body) = self.get(path).await;
        assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
        serde_json::from_value(body.clone()).unwrap_or_else(|e| panic!("GET {path}: {e} in {body}"))
    }

    /// A JSON body by `method`, answered as JSON, with the status.
    pub async fn send_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> (StatusCode, Value) {
        let r = self
            .http
            .request(method, self.url(path))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        self.send_json(reqwest::Method::POST, path, body).await
    }

    /// `GET /v1/recommendations?{query}`, which must answer 200.
    pub async fn recommend(&self, query: &str) -> tandem::http::types::RecommendationsResponse {
        self.get_as(&format!("/v1/recommendations?{query}")).await
    }
}

/// A `redis-server` of a test's own on `port` (no persistence unless `args` turn it on),
/// keeping its files in `dir`; killed when dropped.
pub struct RedisServer {
    child: Child,
    pub port: u16,
    args: Vec<String>,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts it and waits until it answers `PING` (a Redis still loading its AOF answers
    /// `-LOADING`, which is not ready).
    pub fn start(port: u16, dir: &Path, args: &[&str]) -> RedisServer {
        let nodes_file = format!("nodes-{port}.conf");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir)
            .args(["--cluster-config-file", &nodes_file])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH (scripts/check-prereqs.sh names the package)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis_answers(port) {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisServer {
            child,
            port,
            args: args.iter().map(|a| a.to_string()).collect(),
            dir: dir.to_path_buf(),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `kill -STOP` or `-CONT`: a stopped server keeps its connections open and answers
    /// nothing, which is the case a client-side timeout exists for.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// SIGKILL, and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port, directory and arguments.
    pub fn restart(&mut self) {
        self.kill();
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        *self = RedisServer::start(self.port, &self.dir.clone(), &args);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis answers `PING` with `+PONG` on `port`.
pub fn redis_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 64];
    s.write_all(b"PING\r\n").is_ok()
        && s.read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}

/// Field values that have broken parsers before: empty, whitespace, quotes, separators,
/// non-ASCII, numbers at and past the edges of their types, NaN and infinities (a proptest
/// strategy, for the importers and the HTTP request parsing alike).
pub fn nasty_field() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(" ".to_string()),
        Just("\"".to_string()),
        Just("\"\"".to_string()),
        Just("a,b".to_string()),
        Just("a|b||".to_string()),
        Just("|".to_string()),
        Just("NaN".to_string()),
        Just("inf".to_string()),
        Just("-inf".to_string()),
        Just("-1".to_string()),
        Just("1e309".to_string()),
        Just("-1e309".to_string()),
        Just("99999999999999999999999".to_string()),
        Just("9223372036854775808".to_string()),
        Just("-9223372036854775809".to_string()),
        Just("4294967296".to_string()),
        Just("0x10".to_string()),
        Just("true".to_string()),
        Just("yes".to_string()),
        Just("\u{feff}item".to_string()),
        Just("é漢字🙂".to_string()),
        Just("\u{0}".to_string()),
        Just("x".repeat(5000)),
        "[ -~]{0,12}",
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
    ]
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
