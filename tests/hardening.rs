//! Hardening (issue 36): what a timeout, a crash, a damaged file or a slow client must not be
//! able to do. Each test fails without the fix it names.

mod common;

use async_trait::async_trait;
use common::{eventually, tiny_checkpoints, TestApp};
use futures::FutureExt;
use reqwest::StatusCode;
use serde_json::json;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tandem::config::{IndexBackend, SessionBackend, Settings};
use tandem::domain::{Filter, Item, ItemId};
use tandem::http::AppState;
use tandem::index::edge::{EdgeIndex, EdgeOptions};
use tandem::index::{Hit, IndexError, IndexPoint, Payload, PayloadPatch, ScrollPage, VectorIndex};
use tandem::items::load::{journal_path, load_local, REPLAY_BATCH};
use tandem::items::CatalogJournal;
use tandem::model::TwoTower;
use tandem::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server's settings on the embedded engine and the memory store, over `data`.
fn settings(dir: &Path, data: &Path, model: &Path) -> Settings {
    let mut s = Settings {
        data_dir: dir.join("srv"),
        model_path: model.to_path_buf(),
        ..Settings::default()
    };
    s.index.backend = IndexBackend::Embedded;
    s.session.backend = SessionBackend::Memory;
    s.server.catalog_dir = data.to_path_buf();
    s
}

/// An item delete whose request goes away at its first await (a request timeout, a client
/// that hung up) still finishes as one unit: the engine, the catalog and what is served
/// agree that the item is gone. Before item writes ran on a task of their own, the dropped
/// request dropped the write with it: the engine, the catalog and the answers kept the item
/// although the delete had started (or, dropped later, the engine lost it while the catalog
/// kept serving it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_delete_whose_request_is_dropped_still_finishes_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ckpts) = tiny_checkpoints(dir.path(), &["v1"]);
    let state = AppState::build(settings(dir.path(), &data, &ckpts[0]))
        .await
        .unwrap_or_else(|e| panic!("start-up: {e}"));
    let victim = state.catalog.any().unwrap();
    let id = victim.item.item_id.clone();
    // The item's nearest neighbour: the deleted item would top its similar items.
    let hits = state
        .index
        .search(&victim.vector.to_vec(), &Filter::default(), 5)
        .await
        .unwrap();
    let anchor = hits
        .iter()
        .find(|h| h.item_id != id)
        .unwrap()
        .item_id
        .clone();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tandem::http::run(listener, state.clone(), async {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let similar = format!("{base}/v1/items/{anchor}/similar?k=200&available_only=false");
    let served = |body: serde_json::Value| {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["item_id"] == id.as_str())
    };
    let before: serde_json::Value = http
        .get(&similar)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(served(before), "the item is served before the delete");

    // One poll starts the delete; then its caller is gone.
    drop(state.items.delete(&id).now_or_never());

    eventually(
        "the dropped delete reaches the engine and the catalog",
        Duration::from_secs(10),
        || {
            let (state, id) = (state.clone(), id.clone());
            async move {
                let in_engine = !state
                    .index
                    .fetch(std::slice::from_ref(&id))
                    .await
                    .unwrap()
                    .is_empty();
                let in_catalog = state.catalog.get(&id).is_some();
                !in_engine && !in_catalog
            }
        },
    )
    .await;
    let after: serde_json::Value = http
        .get(&similar)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!served(after), "a deleted item is never served");
    let one = http
        .get(format!("{base}/v1/items/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), StatusCode::NOT_FOUND);
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// A real embedded index that records the size of every live-collection upsert.
struct Recording {
    inner: EdgeIndex,
    largest: AtomicUsize,
    points: AtomicUsize,
    calls: AtomicUsize,
}

impl Recording {
    fn note(&self, n: usize) {
        self.largest.fetch_max(n, Ordering::SeqCst);
        self.points.fetch_add(n, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl VectorIndex for Recording {
    async fn upsert(&self, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        self.note(points.len());
        self.inner.upsert(points).await
    }
    async fn upsert_buffered(&self, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        self.note(points.len());
        self.inner.upsert_buffered(points).await
    }
    async fn flush(&self) -> Result<(), IndexError> {
        self.inner.flush().await
    }
    async fn delete(&self, ids: &[ItemId]) -> Result<(), IndexError> {
        self.inner.delete(ids).await
    }
    async fn set_payload(&self, id: &ItemId, patch: &PayloadPatch) -> Result<(), IndexError> {
        self.inner.set_payload(id, patch).await
    }
    async fn search(&self, v: &[f32], f: &Filter, k: usize) -> Result<Vec<Hit>, IndexError> {
        self.inner.search(v, f, k).await
    }
    async fn fetch(
        &self,
        ids: &[ItemId],
    ) -> Result<Vec<(Payload, tandem::index::Vector)>, IndexError> {
        self.inner.fetch(ids).await
    }
    async fn count(&self) -> Result<usize, IndexError> {
        self.inner.count().await
    }
    async fn create_version(&self, version: &str, dim: usize) -> Result<(), IndexError> {
        self.inner.create_version(version, dim).await
    }
    async fn upsert_into(&self, version: &str, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        self.inner.upsert_into(version, points).await
    }
    async fn search_in(
        &self,
        version: &str,
        v: &[f32],
        f: &Filter,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        self.inner.search_in(version, v, f, k).await
    }
    async fn fetch_from(
        &self,
        version: &str,
        ids: &[ItemId],
    ) -> Result<Vec<(Payload, tandem::index::Vector)>, IndexError> {
        self.inner.fetch_from(version, ids).await
    }
    async fn delete_from(&self, version: &str, ids: &[ItemId]) -> Result<(), IndexError> {
        self.inner.delete_from(version, ids).await
    }
    async fn set_payload_in(
        &self,
        version: &str,
        id: &ItemId,
        patch: &PayloadPatch,
    ) -> Result<(), IndexError> {
        self.inner.set_payload_in(version, id, patch).await
    }
    async fn finalize_version(&self, version: &str) -> Result<(), IndexError> {
        self.inner.finalize_version(version).await
    }
    async fn switch_to(&self, version: &str) -> Result<(), IndexError> {
        self.inner.switch_to(version).await
    }
    async fn drop_version(&self, version: &str) -> Result<(), IndexError> {
        self.inner.drop_version(version).await
    }
    async fn versions(&self) -> Result<(Vec<String>, Option<String>), IndexError> {
        self.inner.versions().await
    }
    async fn scroll(
        &self,
        version: Option<&str>,
        offset: Option<String>,
        limit: usize,
    ) -> Result<ScrollPage, IndexError> {
        self.inner.scroll(version, offset, limit).await
    }
}

/// A crash replay larger than one batch is written back in batches of at most
/// `REPLAY_BATCH` points, each one write under the write budget, and every line reaches the
/// index. Before, the whole replay was one upsert: under the 2 s budget a large one timed out
/// and stopped the start-up at every restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_replay_larger_than_one_batch_is_written_in_bounded_batches() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ckpts) = tiny_checkpoints(dir.path(), &["v1"]);
    let model = TwoTower::load(&ckpts[0]).unwrap();
    let journal = CatalogJournal::new(journal_path(&dir.path().join("srv")));
    let index = Recording {
        inner: EdgeIndex::open(&dir.path().join("index"), EdgeOptions::default()).unwrap(),
        largest: AtomicUsize::new(0),
        points: AtomicUsize::new(0),
        calls: AtomicUsize::new(0),
    };
    let first = load_local(&index, &model, &data, &journal).await.unwrap();
    let catalog_items = first.len();
    assert!(catalog_items > 0);
    // Upserts acknowledged (journaled) whose index write never happened: a crash.
    let pending = REPLAY_BATCH * 2 + 500;
    let added: Vec<(Item, f32)> = (0..pending)
        .map(|i| {
            let mut item = Item::new(
                ItemId::parse(format!("added-{i}")).unwrap(),
                format!("Added {i}"),
            );
            item.categories = ["Books".into()].into();
            (item, 0.0)
        })
        .collect();
    journal.append(&added).unwrap();
    index.largest.store(0, Ordering::SeqCst);
    index.points.store(0, Ordering::SeqCst);
    index.calls.store(0, Ordering::SeqCst);

    let catalog = load_local(&index, &model, &data, &journal).await.unwrap();
    let largest = index.largest.load(Ordering::SeqCst);
    assert!(
        largest <= REPLAY_BATCH,
        "the replay wrote {largest} points in one call (batch {REPLAY_BATCH})"
    );
    assert_eq!(index.points.load(Ordering::SeqCst), pending);
    assert!(index.calls.load(Ordering::SeqCst) >= 3);
    assert_eq!(index.count().await.unwrap(), catalog_items + pending);
    assert_eq!(catalog.len(), catalog_items + pending);
    assert!(catalog.get(&ItemId::parse("added-0").unwrap()).is_some());
    // Replayed and flushed: nothing is left to replay.
    assert!(journal.unflushed().unwrap().0.is_empty());
}

/// A damaged `registry.json` does not stop the start-up: the registry comes back from the
/// copy kept before the last write, says it recovered, and keeps the damaged file aside.
/// Before, `Registry::open` failed and so did every start.
#[test]
fn a_damaged_registry_falls_back_to_its_previous_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ckpts) = tiny_checkpoints(dir.path(), &["v1", "v2"]);
    let store = dir.path().join("models");
    {
        let registry = Registry::open(&store, 3).unwrap();
        registry.register(&ckpts[0]).unwrap();
        registry.register(&ckpts[1]).unwrap();
        assert!(registry.recovered().is_none());
    }
    std::fs::write(store.join("registry.json"), b"{\"models\": [ {\"vers").unwrap();

    let registry = Registry::open(&store, 3).expect("a damaged registry must not stop start-up");
    assert!(registry.recovered().is_some());
    let versions: Vec<String> = registry.list().into_iter().map(|m| m.version).collect();
    assert_eq!(versions, ["v1"], "the copy before the last write");
    assert_eq!(
        std::fs::read(store.join("registry.json.damaged")).unwrap(),
        b"{\"models\": [ {\"vers"
    );
    drop(registry);
    // The fallback was written back: the next start is clean.
    let again = Registry::open(&store, 3).unwrap();
    assert!(again.recovered().is_none());
    assert_eq!(again.list().len(), 1);
}

/// A registry whose active version has lost its checkpoint folder stops the start-up with
/// a message naming the folder. Before, the server silently served `model_path` instead and
/// marked it active over the live collection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_active_model_folder_stops_start_up_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ckpts) = tiny_checkpoints(dir.path(), &["v1", "v2"]);
    let s = settings(dir.path(), &data, &ckpts[0]);
    let store = s.registry.model_store(&s.data_dir);
    let folder = {
        let registry = Registry::open(&store, 3).unwrap();
        registry.register(&ckpts[1]).unwrap();
        registry.mark_active("v2", None).unwrap();
        registry.model_dir("v2")
    };
    std::fs::remove_dir_all(&folder).unwrap();
    match AppState::build(s).await {
        Ok(state) => panic!(
            "started with model {} although the active v2 has no folder",
            state.model.load().version()
        ),
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.contains(&folder.display().to_string()) && message.contains("v2"),
                "{message}"
            );
        }
    }
}

/// A few hundred clients that send their headers and then trickle their bodies cannot make
/// a normal client wait or get 429: bodies are read before a request takes a concurrency
/// slot, and a body slower than `server.body_timeout_ms` gets 408. Before, each trickling
/// client held a slot until the 2 s request timeout, and everyone else got 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickling_bodies_cannot_make_other_clients_get_429() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ckpts) = tiny_checkpoints(dir.path(), &["v1"]);
    let mut s = settings(dir.path(), &data, &ckpts[0]);
    s.server.max_concurrency = 16;
    s.server.body_timeout_ms = 300;
    let app = TestApp::spawn(s).await;
    let addr = app.base.trim_start_matches("http://").to_string();

    let (_, trending) = app.get("/v1/trending?k=1").await;
    let item = trending["items"][0]["item_id"]
        .as_str()
        .unwrap()
        .to_string();

    const SLOW: usize = 300;
    let started = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let addr = addr.clone();
        slow.push(tokio::spawn(async move {
            let mut c = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let head = "POST /v1/events HTTP/1.1\r\nhost: tandem\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n[";
            c.write_all(head.as_bytes()).await.unwrap();
            // One byte every 50 ms for at most 3 s, until the server answers.
            let mut answer = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && answer.is_empty() {
                let mut buf = [0u8; 512];
                match tokio::time::timeout(Duration::from_millis(50), c.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
                    Err(_) => {
                        if c.write_all(b" ").await.is_err() {
                            break;
                        }
                    }
                }
            }
            String::from_utf8_lossy(&answer).to_string()
        }));
    }
    // Normal clients while the slow ones trickle: every answer is a success, in time.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut statuses = Vec::new();
    while started.elapsed() < Duration::from_millis(1_500) {
        let t = Instant::now();
        let r = app
            .http
            .post(app.url("/v1/events"))
            .json(&json!({"user_id": "u1", "item_id": item, "type": "view"}))
            .send()
            .await
            .unwrap();
        statuses.push((r.status(), t.elapsed()));
        let (status, _) = app.get("/v1/recommendations?user_id=u1&k=5").await;
        statuses.push((status, t.elapsed()));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let bad: Vec<_> = statuses
        .iter()
        .filter(|(st, took)| !st.is_success() || *took > Duration::from_secs(1))
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} normal requests failed or were slow beside {SLOW} trickling clients: {:?}",
        bad.len(),
        statuses.len(),
        &bad[..bad.len().min(5)]
    );
    let mut timed_out = 0;
    for h in slow {
        if h.await.unwrap().starts_with("HTTP/1.1 408") {
            timed_out += 1;
        }
    }
    assert!(
        timed_out > SLOW / 2,
        "{timed_out} of {SLOW} trickling clients were told 408"
    );
    app.stop().await;
}

/// A price range whose minimum is above its maximum is an empty range: an answer with no
/// items, not a 422. The schema states each bound but cannot state their order, so a client
/// generated from it could send one (schemathesis did); before, the server refused it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inverted_price_range_matches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ckpts) = tiny_checkpoints(dir.path(), &["v1"]);
    let app = TestApp::spawn(settings(dir.path(), &data, &ckpts[0])).await;
    let (status, body) = app
        .get("/v1/recommendations?price_min=10&price_max=2&available_only=false")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["items"].as_array().unwrap().len(), 0, "{body}");
    app.stop().await;
}
