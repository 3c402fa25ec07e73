//! The HTTP API on a random port, started exactly as `tandem serve` starts it
//! (`tandem::http::serve(listener, settings, shutdown)`), over a small generated catalog with
//! planted tastes, a model trained on it in a few seconds (once per test binary), the exact
//! index and the memory session store.
//!
//! Logs are silent unless `TEST_LOG` is set.

use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestRunner};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tandem::config::{AdminKey, IndexBackend, SessionBackend, Settings};
use tandem::domain::{EventType, Filter, Interaction, Item, ItemId, UserId};
use tandem::http::types::{ItemView, OnboardingResponse, RecommendationsResponse};
use tandem::http::ErrorBody;

mod common;
use common::{repo_path, TestApp};

// ---- the test catalog --------------------------------------------------------------------

const CATEGORIES: [&str; 6] = ["Action", "Comedy", "Drama", "Horror", "Romance", "SciFi"];
const PER_CATEGORY: usize = 40;

/// A small catalog with planted structure: every item has one main category (sometimes a
/// second), title words from its category's vocabulary, a price, and 1 in 10 unavailable.
fn catalog() -> Vec<Item> {
    let words: HashMap<&str, [&str; 4]> = HashMap::from([
        ("Action", ["explosion", "chase", "mission", "agent"]),
        ("Comedy", ["laugh", "wedding", "roommates", "prank"]),
        ("Drama", ["family", "letters", "winter", "trial"]),
        ("Horror", ["haunted", "night", "cellar", "curse"]),
        ("Romance", ["love", "paris", "summer", "kiss"]),
        ("SciFi", ["galaxy", "robot", "signal", "orbit"]),
    ]);
    let mut items = Vec::new();
    for (c, cat) in CATEGORIES.iter().enumerate() {
        for n in 0..PER_CATEGORY {
            let id = format!("{}-{n}", cat.to_lowercase());
            let w = words[cat];
            let mut item = Item::new(
                ItemId::parse(id).unwrap(),
                format!("{} {} {n}", w[n % 4], w[(n / 4) % 4]),
            );
            let mut categories = vec![(*cat).into()];
            if n % 7 == 3 {
                categories.push(CATEGORIES[(c + 1) % CATEGORIES.len()].into());
            }
            item.categories = categories.into();
            item.tags = [w[(n + 1) % 4].into()].into();
            item.price = Some(((n * 37 + c * 11) % 120) as f32 + 0.99);
            item.available = n % 10 != 9;
            item.year = Some(1980 + (n as i32 % 40));
            item.created_at = Some(1_600_000_000 + (n as i64) * 86_400);
            items.push(item);
        }
    }
    items
}

/// Interactions with planted tastes: each user sticks to two categories.
fn interactions(items: &[Item]) -> Vec<Interaction> {
    let mut rows = Vec::new();
    let mut x: u64 = 7;
    let mut next = |n: usize| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) as usize) % n
    };
    for u in 0..90 {
        let tastes = [
            u % CATEGORIES.len(),
            (u / CATEGORIES.len() + u + 1) % CATEGORIES.len(),
        ];
        for t in 0..30 {
            let c = tastes[next(2)];
            let n = next(PER_CATEGORY);
            rows.push(Interaction {
                user_id: UserId::parse(format!("train-{u}")).unwrap(),
                item_id: items[c * PER_CATEGORY + n].item_id.clone(),
                rating: 4.0,
                timestamp: 1_700_000_000 + t as i64 * 60,
                event_type: EventType::Click,
            });
        }
    }
    rows
}

fn write_catalog(dir: &Path) -> Vec<Item> {
    std::fs::create_dir_all(dir).unwrap();
    let items = catalog();
    tandem::data::format::write_items(&dir.join("items.csv"), &items, true).unwrap();
    tandem::data::format::write_interactions(
        &dir.join("interactions.csv"),
        &interactions(&items),
        true,
    )
    .unwrap();
    items
}

/// One small model per test binary, trained on the test catalog in a few seconds.
fn model_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        write_catalog(&data);
        let cfg = tandem::model::TrainConfig {
            epochs: 4,
            hidden: 64,
            batch_size: 256,
            progress: false,
            ..Default::default()
        };
        let (model, _) = tandem::model::train_on_data(&cfg, &data, false).unwrap();
        model.save(&dir.path().join("model")).unwrap();
        dir
    })
    .path()
}

// ---- spawn_app ---------------------------------------------------------------------------

/// A server over the test catalog (`common::TestApp`), and the catalog it serves.
struct Api {
    app: TestApp,
    items: HashMap<String, Item>,
}

impl std::ops::Deref for Api {
    type Target = TestApp;
    fn deref(&self) -> &TestApp {
        &self.app
    }
}

/// The admin key the test servers run with; catalog writes need it, and the test client
/// sends it with every request.
const CATALOG_KEY: &str = "test-catalog-key";

async fn spawn_app() -> Api {
    spawn_app_with(|_| {}).await
}

async fn spawn_app_with(tweak: impl FnOnce(&mut Settings)) -> Api {
    spawn_app_in(tempfile::tempdir().unwrap(), tweak).await
}

/// Starts a server over `dir` (a new one, or one a previous server used: a restart).
async fn spawn_app_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Settings)) -> Api {
    let catalog_dir = dir.path().join("catalog");
    let items = write_catalog(&catalog_dir);
    let mut settings = Settings {
        data_dir: dir.path().join("data"),
        model_path: model_dir().join("model"),
        ..Settings::default()
    };
    settings.index.backend = IndexBackend::Exact;
    settings.session.backend = SessionBackend::Memory;
    settings.server.catalog_dir = catalog_dir;
    settings.admin_key = AdminKey(Some(CATALOG_KEY.into()));
    tweak(&mut settings);
    Api {
        app: TestApp::spawn(settings).await.in_dir(dir),
        items: items
            .into_iter()
            .map(|i| (i.item_id.to_string(), i))
            .collect(),
    }
}

impl Api {
    /// Stops the server gracefully and hands back its directory.
    async fn stop(self) -> tempfile::TempDir {
        self.app.stop().await.expect("an Api owns its directory")
    }

    async fn similar(&self, item: &str, query: &str) -> (StatusCode, Value) {
        self.get(&format!("/v1/items/{item}/similar?{query}")).await
    }

    async fn events(&self, events: Value) -> (StatusCode, Value) {
        self.post("/v1/events", &events).await
    }

    /// `user` clicked each item, oldest first.
    async fn clicks(&self, user: &str, items: &[&str]) {
        let events: Vec<Value> = items
            .iter()
            .map(|i| json!({"user_id": user, "item_id": i, "type": "click"}))
            .collect();
        let (status, body) = self.events(Value::Array(events)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }

    async fn expect_error(&self, r: (StatusCode, Value), status: StatusCode, field: &str) {
        assert_eq!(r.0, status, "{}", r.1);
        let e: ErrorBody = serde_json::from_value(r.1.clone()).unwrap();
        assert_eq!(e.field.as_deref(), Some(field), "{}", r.1);
        assert!(!e.message.is_empty());
    }

    fn share_in(&self, recs: &RecommendationsResponse, cats: &[&str]) -> f64 {
        let n = recs
            .items
            .iter()
            .filter(|i| i.categories.iter().any(|c| cats.contains(&c.as_str())))
            .count();
        n as f64 / recs.items.len().max(1) as f64
    }
}

fn ids(r: &RecommendationsResponse) -> Vec<String> {
    r.items.iter().map(|i| i.item_id.clone()).collect()
}

// ---- tests -------------------------------------------------------------------------------

#[tokio::test]
async fn a_click_session_shifts_recommendations_toward_the_clicked_category() {
    let app = spawn_app().await;
    app.clicks(
        "u-horror",
        &["horror-0", "horror-1", "horror-2", "horror-4"],
    )
    .await;
    app.clicks(
        "u-romance",
        &["romance-0", "romance-1", "romance-2", "romance-4"],
    )
    .await;
    let horror = app.recommend("user_id=u-horror&k=10").await;
    let romance = app.recommend("user_id=u-romance&k=10").await;
    assert_eq!(horror.variant, "control");
    assert!(horror.degraded.is_empty(), "{:?}", horror.degraded);
    assert!(!horror.model_version.is_empty());
    assert_eq!(horror.items.len(), 10);
    assert!(
        app.share_in(&horror, &["Horror"]) >= 0.6,
        "{:?}",
        ids(&horror)
    );
    assert!(
        app.share_in(&romance, &["Romance"]) >= 0.6,
        "{:?}",
        ids(&romance)
    );
    assert_ne!(ids(&horror), ids(&romance));

    // A session (no user) works the same way, and explain returns the components.
    let (status, body) = app
        .events(json!({"session_id": "s-1", "item_id": "scifi-3", "type": "view"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let s = app.recommend("session_id=s-1&k=5&explain=true").await;
    assert_eq!(s.items.len(), 5);
    assert!(s.items.iter().all(|i| i.explanation.is_some()));
    assert!(app.share_in(&s, &["SciFi"]) >= 0.6, "{:?}", ids(&s));
}

#[tokio::test]
async fn strangers_get_trending_under_the_same_filters() {
    let app = spawn_app().await;
    // Other users make comedy-5 the most trending comedy, and drama-1 trending overall.
    for u in 0..6 {
        app.clicks(&format!("fan-{u}"), &["comedy-5", "drama-1"])
            .await;
    }
    app.clicks("fan-x", &["drama-1"]).await;
    let all = app.recommend("k=5").await;
    assert_eq!(all.items[0].item_id, "drama-1", "{:?}", ids(&all));
    assert!(all.degraded.is_empty());
    let comedy = app.recommend("k=10&category=Comedy").await;
    assert_eq!(comedy.items[0].item_id, "comedy-5");
    assert_eq!(comedy.items.len(), 10, "topped up with popular comedies");
    assert!(comedy
        .items
        .iter()
        .all(|i| i.categories.iter().any(|c| c == "Comedy")));
    let (status, body) = app.get("/v1/trending?k=3").await;
    assert_eq!(status, StatusCode::OK);
    let t: RecommendationsResponse = serde_json::from_value(body).unwrap();
    assert_eq!(ids(&t)[..2], ["drama-1", "comedy-5"]);
}

#[tokio::test]
async fn a_purchased_item_never_comes_back() {
    let app = spawn_app().await;
    app.clicks("buyer", &["action-0", "action-1", "action-2"])
        .await;
    let before = app
        .recommend("user_id=buyer&k=30&available_only=false")
        .await;
    let target = before.items[0].item_id.clone();
    let (status, body) = app
        .events(json!({"user_id": "buyer", "item_id": target, "type": "purchase"}))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    for q in ["k=30", "k=200&available_only=false", "k=5&category=Action"] {
        let after = app.recommend(&format!("user_id=buyer&{q}")).await;
        assert!(!ids(&after).contains(&target), "{q}: {:?}", ids(&after));
    }
}

#[tokio::test]
async fn patch_available_false_removes_the_item_from_the_very_next_response() {
    let app = spawn_app().await;
    app.clicks("shopper", &["drama-0", "drama-2", "drama-3"])
        .await;
    let first = app.recommend("user_id=shopper&k=10").await;
    let top = first.items[0].item_id.clone();
    // The second call is served from the candidate cache: the item must go anyway.
    let cached = app.recommend("user_id=shopper&k=10").await;
    assert_eq!(ids(&cached), ids(&first));
    let (status, body) = app
        .send_json(
            reqwest::Method::PATCH,
            &format!("/v1/items/{top}"),
            &json!({"available": false}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let view: ItemView = serde_json::from_value(body).unwrap();
    assert!(!view.available);
    let next = app.recommend("user_id=shopper&k=10").await;
    assert!(!ids(&next).contains(&top), "{:?}", ids(&next));
    assert_eq!(next.items.len(), 10);
    // Asked for explicitly, unavailable items may come back.
    let any = app
        .recommend("user_id=shopper&k=50&available_only=false")
        .await;
    assert!(ids(&any).contains(&top));
}

#[tokio::test]
async fn a_new_item_shows_up_in_similar_within_a_second() {
    let app = spawn_app().await;
    let anchor = &app.items["scifi-6"];
    let body = json!({"items": [{
        "item_id": "scifi-new",
        "title": anchor.title,
        "categories": anchor.categories,
        "tags": anchor.tags,
        "price": 12.5,
        "year": anchor.year,
    }]});
    let posted = Instant::now();
    let (status, resp) = app.post("/v1/items", &body).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    assert_eq!(resp["upserted"], 1);
    loop {
        let (status, body) = app.similar("scifi-6", "k=20").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let r: RecommendationsResponse = serde_json::from_value(body).unwrap();
        if ids(&r).contains(&"scifi-new".to_string()) {
            assert!(
                !ids(&r).contains(&"scifi-6".to_string()),
                "an item is not similar to itself"
            );
            break;
        }
        assert!(
            posted.elapsed() < Duration::from_secs(1),
            "not visible after 1 s: {:?}",
            ids(&r)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = app.get("/v1/items/scifi-new").await;
    assert_eq!(status, StatusCode::OK);
    let view: ItemView = serde_json::from_value(body).unwrap();
    assert_eq!(view.price, Some(12.5));
    assert_eq!(view.categories[..], anchor.categories[..]);
}

#[tokio::test]
async fn items_added_through_the_api_survive_a_restart_with_the_embedded_index() {
    let embedded = |s: &mut Settings| s.index.backend = IndexBackend::Embedded;
    let app = spawn_app_with(embedded).await;
    let body = json!({"items": [{"item_id": "kept-1", "title": "orbit signal", "categories": ["SciFi"], "price": 9.0}]});
    let (status, resp) = app.post("/v1/items", &body).await;
    assert_eq!(status, StatusCode::OK, "{resp}");
    let (status, _) = app
        .send_json(
            reqwest::Method::PATCH,
            "/v1/items/drama-2",
            &json!({"available": false}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let dir = app.stop().await;

    let app = spawn_app_in(dir, embedded).await;
    let (status, body) = app.get("/v1/items/kept-1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["categories"], json!(["SciFi"]));
    let (_, body) = app.get("/v1/items/drama-2").await;
    assert_eq!(body["available"], false, "{body}");
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["catalog_items"], CATEGORIES.len() * PER_CATEGORY + 1);
}

/// A restart pairs the catalog file with the index batch by batch as the file is read. Over a
/// file of several batches (the last one partial), the items written through the API come
/// back in place of the file's items and after them, the last write of an id wins, nothing
/// is lost or doubled, and a bad row past the first batches still stops the start-up with
/// an error that names its line and field.
#[tokio::test]
async fn a_restart_over_a_catalog_file_of_many_batches_keeps_every_item_and_api_write() {
    use tandem::catalog::LOAD_BATCH;
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big");
    std::fs::create_dir_all(&big).unwrap();
    let n = LOAD_BATCH * 2 + LOAD_BATCH / 2;
    let items: Vec<Item> = catalog()
        .into_iter()
        .cycle()
        .take(n)
        .enumerate()
        .map(|(i, mut item)| {
            item.item_id = ItemId::parse(format!("big-{i}")).unwrap();
            item.title = format!("{} {i}", item.title);
            item
        })
        .collect();
    tandem::data::format::write_items(&big.join("items.csv"), &items, true).unwrap();
    let tweak = |s: &mut Settings| {
        s.index.backend = IndexBackend::Embedded;
        s.server.catalog_dir = big.clone();
    };
    let app = spawn_app_in(dir, tweak).await;
    let in_batch_two = format!("big-{}", LOAD_BATCH + 10);
    let in_last_batch = format!("big-{}", n - 3);
    for body in [
        json!({"items": [{"item_id": in_batch_two, "title": "replaced orbit", "categories": ["SciFi"]}]}),
        json!({"items": [{"item_id": "added-1", "title": "first write", "categories": ["Drama"]}]}),
        json!({"items": [{"item_id": "added-1", "title": "second write", "categories": ["Drama"]}]}),
    ] {
        let (status, resp) = app.post("/v1/items", &body).await;
        assert_eq!(status, StatusCode::OK, "{resp}");
    }
    let (status, _) = app
        .send_json(
            reqwest::Method::PATCH,
            &format!("/v1/items/{in_last_batch}"),
            &json!({"available": false}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let dir = app.stop().await;

    let app = spawn_app_in(dir, tweak).await;
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["catalog_items"], n + 1);
    let (_, body) = app.get(&format!("/v1/items/{in_batch_two}")).await;
    assert_eq!(body["title"], "replaced orbit", "{body}");
    assert_eq!(body["categories"], json!(["SciFi"]));
    let (_, body) = app.get("/v1/items/added-1").await;
    assert_eq!(body["title"], "second write", "{body}");
    let (_, body) = app.get(&format!("/v1/items/{in_last_batch}")).await;
    assert_eq!(body["available"], false, "{body}");
    for i in [0, LOAD_BATCH - 1, LOAD_BATCH, n - 1] {
        let (status, body) = app.get(&format!("/v1/items/big-{i}")).await;
        assert_eq!(status, StatusCode::OK, "big-{i}: {body}");
        assert_eq!(body["title"], items[i].title);
    }
    let dir = app.stop().await;

    // A bad price on the file's last row: the restart stops and says where.
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(big.join("items.csv"))
        .unwrap();
    std::io::Write::write_all(&mut file, b"big-bad,Bad Price,Drama,,-3,true,,,\n").unwrap();
    let mut settings = Settings {
        data_dir: dir.path().join("data"),
        model_path: model_dir().join("model"),
        ..Settings::default()
    };
    settings.session.backend = SessionBackend::Memory;
    tweak(&mut settings);
    let err = match tandem::http::AppState::build(settings).await {
        Ok(_) => panic!("a catalog file with a bad row started"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains(&format!("items.csv:{}: field `price`", n + 2)),
        "{err}"
    );
}

#[tokio::test]
async fn onboarding_returns_the_chosen_categories_and_not_just_trending() {
    let app = spawn_app().await;
    for u in 0..5 {
        app.clicks(&format!("t-{u}"), &["action-1", "action-2", "drama-5"])
            .await;
    }
    let (status, body) = app
        .post(
            "/v1/users/newbie/onboarding",
            &json!({"categories": ["Romance", "Comedy"], "k": 10}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let on: OnboardingResponse = serde_json::from_value(body).unwrap();
    assert!(!on.seeded_items.is_empty());
    let recs = &on.recommendations;
    assert_eq!(recs.items.len(), 10);
    assert!(
        app.share_in(recs, &["Romance", "Comedy"]) >= 0.7,
        "{:?}",
        ids(recs)
    );
    let (_, trending) = app.get("/v1/trending?k=10").await;
    let trending: RecommendationsResponse = serde_json::from_value(trending).unwrap();
    assert_ne!(ids(recs), ids(&trending));
    // The history was seeded: the next plain request is personal too.
    let next = app.recommend("user_id=newbie&k=10").await;
    assert!(
        app.share_in(&next, &["Romance", "Comedy"]) >= 0.7,
        "{:?}",
        ids(&next)
    );

    // Liked items work alone; an unknown liked item is a 404 that names it.
    let (status, body) = app
        .post(
            "/v1/users/other/onboarding",
            &json!({"liked_items": ["horror-3", "horror-8"]}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let r = app
        .post(
            "/v1/users/other/onboarding",
            &json!({"liked_items": ["horror-3", "nope"]}),
        )
        .await;
    app.expect_error(r, StatusCode::NOT_FOUND, "liked_items[1]")
        .await;
    let r = app.post("/v1/users/other/onboarding", &json!({})).await;
    app.expect_error(r, StatusCode::UNPROCESSABLE_ENTITY, "categories")
        .await;
}

#[tokio::test]
async fn catalog_endpoints_read_update_and_delete() {
    let app = spawn_app().await;
    let (status, body) = app.get("/v1/items/comedy-3").await;
    assert_eq!(status, StatusCode::OK);
    let view: ItemView = serde_json::from_value(body).unwrap();
    assert_eq!(view.title, app.items["comedy-3"].title);
    let (status, body) = app
        .send_json(
            reqwest::Method::PATCH,
            "/v1/items/comedy-3",
            &json!({"price": 3.5}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, body) = app.get("/v1/items/comedy-3").await;
    assert_eq!(body["price"], 3.5);
    // The new price is what filters see.
    let cheap = app.recommend("k=200&price_max=4&category=Comedy").await;
    assert!(
        ids(&cheap).contains(&"comedy-3".to_string()),
        "{:?}",
        ids(&cheap)
    );

    let r = app
        .http
        .delete(app.url("/v1/items/comedy-3"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let (status, _) = app.get("/v1/items/comedy-3").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let r = app
        .http
        .delete(app.url("/v1/items/comedy-3"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let all = app.recommend("k=200&available_only=false").await;
    assert!(!ids(&all).contains(&"comedy-3".to_string()));
    let (status, body) = app.similar("comedy-3", "k=5").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("comedy-3"),
        "{body}"
    );
}

#[tokio::test]
async fn events_are_accepted_one_or_many_and_deduplicated() {
    let app = spawn_app().await;
    let id = "5f0c6f1e-8a53-4c7e-9f53-2b8f5b8f8d11";
    let one = json!({"event_id": id, "user_id": "u", "item_id": "drama-1", "type": "view"});
    let (status, body) = app.events(one.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body, json!({"accepted": 1, "duplicates": 0}));
    let (status, body) = app
        .events(json!([one, {"user_id": "u", "item_id": "drama-2", "type": "click"}]))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(body, json!({"accepted": 1, "duplicates": 1}));
    let r = app
        .events(json!([{"user_id": "u", "item_id": "drama-2", "type": "click"}, {"user_id": "u", "item_id": "drama-2", "type": "stare"}]))
        .await;
    app.expect_error(r, StatusCode::UNPROCESSABLE_ENTITY, "events[1].type")
        .await;
    let r = app
        .events(json!({"item_id": "drama-2", "type": "click"}))
        .await;
    assert_eq!(r.0, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.1);
}

/// An event-log file whose fsync fails, as on a dying disk: the page cache of a SIGKILL test
/// would hide a missing fsync; this shows that an acknowledgement waits for it.
struct FsyncFails(std::fs::File);

impl tandem::session::log::LogSink for FsyncFails {
    fn append_bytes(&mut self, buf: &[u8]) -> std::io::Result<()> {
        std::io::Write::write_all(&mut self.0, buf)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        Err(std::io::Error::other("injected: fsync failed (EIO)"))
    }
}

#[tokio::test]
async fn an_event_log_whose_fsync_fails_answers_503_with_retry_after() {
    let app = spawn_app_with(|s| {
        let path = s.session.log_file(&s.data_dir);
        tandem::session::log::inject_sink(&path, |f| Box::new(FsyncFails(f)));
    })
    .await;
    for _ in 0..2 {
        let r = app
            .http
            .post(app.url("/v1/events"))
            .json(&json!({"user_id": "u", "item_id": "drama-1", "type": "click"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "unavailable", "{body}");
    }
}

#[tokio::test]
async fn catalog_writes_need_the_key_and_reads_and_events_do_not() {
    let app = spawn_app().await;
    let anonymous = reqwest::Client::new();
    let item =
        json!({"items": [{"item_id": "forged", "title": "Forged", "categories": ["Drama"]}]});
    let writes = |key: Option<&'static str>| {
        let a = anonymous.clone();
        let item = item.clone();
        let base = app.base.clone();
        async move {
            let with_key = |r: reqwest::RequestBuilder| match key {
                Some(k) => r.header("X-API-Key", k),
                None => r,
            };
            let mut statuses = Vec::new();
            for r in [
                a.post(format!("{base}/v1/items")).json(&item),
                a.patch(format!("{base}/v1/items/drama-1"))
                    .json(&json!({"available": false})),
                a.delete(format!("{base}/v1/items/drama-1")),
            ] {
                let r = with_key(r).send().await.unwrap();
                let status = r.status();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                statuses.push((status, body["code"].clone()));
            }
            statuses
        }
    };
    for key in [None, Some("wrong-key")] {
        for (status, code) in writes(key).await {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{key:?}");
            assert_eq!(code, "unauthorized");
        }
    }
    // Nothing changed; reads and events need no key.
    let r = anonymous
        .get(app.url("/v1/items/drama-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = anonymous
        .get(app.url("/v1/items/forged"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = anonymous
        .post(app.url("/v1/events"))
        .json(&json!({"user_id": "u", "item_id": "drama-1", "type": "click"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // At most 32 values of a repeatable category filter.
    let many: String = (0..33).map(|i| format!("category=c{i}&")).collect();
    let r = app.get(&format!("/v1/recommendations?{many}k=3")).await;
    app.expect_error(r.clone(), StatusCode::UNPROCESSABLE_ENTITY, "category")
        .await;
    assert!(r.1["message"].as_str().unwrap().contains("32"), "{}", r.1);
    // A huge x-request-id is replaced, a fit one echoed.
    let huge = "a".repeat(20_000);
    let r = anonymous
        .get(app.url("/healthz"))
        .header("x-request-id", &huge)
        .send()
        .await
        .unwrap();
    let echoed = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert!(echoed.len() <= 128 && echoed != huge, "{}", echoed.len());
    let r = anonymous
        .get(app.url("/healthz"))
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "req-42");
    // A JSON body sent as anything but application/json (a cross-site form post) gets 415.
    for ct in ["text/plain", "application/x-www-form-urlencoded"] {
        let r = anonymous
            .post(app.url("/v1/events"))
            .header("content-type", ct)
            .body(r#"{"user_id": "u", "item_id": "drama-1", "type": "click"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}");
        let e: ErrorBody = r.json().await.unwrap();
        assert_eq!(e.code, "unsupported_media_type");
        assert_eq!(e.field.as_deref(), Some("content-type"));
    }
    let r = anonymous
        .post(app.url("/v1/events"))
        .header("content-type", "application/json; charset=utf-8")
        .body(r#"{"user_id": "u", "item_id": "drama-1", "type": "click"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // A misspelt field is refused, not dropped.
    let r = app
        .events(json!({"user_id": "u", "item_id": "drama-1", "type": "click", "timestmap": 1}))
        .await;
    assert_eq!(r.0, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.1);
    assert!(
        r.1["message"].as_str().unwrap().contains("timestmap"),
        "{}",
        r.1
    );
    let r = anonymous
        .get(app.url("/v1/recommendations?user_id=u&k=3"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The key opens them.
    let statuses: Vec<StatusCode> = writes(Some(CATALOG_KEY))
        .await
        .into_iter()
        .map(|s| s.0)
        .collect();
    assert_eq!(
        statuses,
        [StatusCode::OK, StatusCode::OK, StatusCode::NO_CONTENT]
    );

    // With no key configured at all, catalog writes are off: 403, whatever is sent.
    let app = spawn_app_with(|s| s.admin_key = AdminKey(None)).await;
    let r = app.post("/v1/items", &item).await;
    assert_eq!(r.0, StatusCode::FORBIDDEN, "{}", r.1);
    assert_eq!(r.1["code"], "catalog_writes_disabled");
    let r = app
        .send_json(
            reqwest::Method::PATCH,
            "/v1/items/drama-1",
            &json!({"available": false}),
        )
        .await;
    assert_eq!(r.0, StatusCode::FORBIDDEN, "{}", r.1);
    assert_eq!(app.get("/v1/items/drama-1").await.0, StatusCode::OK);
}

#[tokio::test]
async fn bad_input_gets_a_json_error_naming_the_field() {
    let app = spawn_app_with(|s| s.server.max_body_bytes = 64 * 1024).await;
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    for (query, field) in [
        ("k=0", "k"),
        ("k=10000", "k"),
        ("k=abc", "k"),
        ("price_min=-1", "price_min"),
        ("price_max=-0.5", "price_max"),
        ("colour=red", "colour"),
        ("k=5&k=6", "k"),
        ("user_id=", "user_id"),
        ("available_only=perhaps", "available_only"),
    ] {
        let r = app.get(&format!("/v1/recommendations?{query}")).await;
        app.expect_error(r, unprocessable, field).await;
    }
    let r = app.similar("drama-1", "k=0").await;
    app.expect_error(r, unprocessable, "k").await;
    let r = app.similar("drama-1", "user_id=x").await;
    app.expect_error(r, unprocessable, "user_id").await;
    let r = app.get("/v1/trending?k=201").await;
    app.expect_error(r, unprocessable, "k").await;

    // Bodies: malformed JSON, a wrong type deep inside, an unknown field, too large.
    let raw = |path: &str, body: &'static str| {
        let req = app
            .http
            .post(app.url(path))
            .header("content-type", "application/json")
            .body(body);
        async move {
            let r = req.send().await.unwrap();
            let s = r.status();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let r = raw("/v1/recommendations", "{\"k\": 5,").await;
    app.expect_error(r, unprocessable, "body").await;
    let r = raw("/v1/recommendations", "").await;
    app.expect_error(r, unprocessable, "body").await;
    let r = app.post("/v1/recommendations", &json!({"k": "many"})).await;
    app.expect_error(r, unprocessable, "k").await;
    let r = app.post("/v1/recommendations", &json!({"kk": 1})).await;
    app.expect_error(r, unprocessable, "kk").await;
    let r = app
        .post("/v1/items", &json!({"items": [{"item_id": "a", "title": "t"}, {"item_id": "b", "title": "t", "price": -3}]}))
        .await;
    app.expect_error(r, unprocessable, "items[1].price").await;
    let r = app
        .post("/v1/items", &json!({"items": [{"title": "t"}]}))
        .await;
    app.expect_error(r, unprocessable, "items[0].item_id").await;
    let r = app
        .send_json(
            reqwest::Method::PATCH,
            "/v1/items/drama-1",
            &json!({"price": -1}),
        )
        .await;
    app.expect_error(r, unprocessable, "price").await;
    let big = json!({"items": (0..2000).map(|i| json!({"item_id": format!("x{i}"), "title": "a long enough title to add up"})).collect::<Vec<_>>()});
    let r = app.post("/v1/items", &big).await;
    app.expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "body")
        .await;

    // Unknown item and route: 404 with a message.
    let (status, body) = app.similar("no-such-item", "k=5").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(
        body["message"].as_str().unwrap().contains("no-such-item"),
        "{body}"
    );
    let (status, body) = app.get("/v2/nothing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["code"], "no_route");
    let r = app
        .http
        .put(app.url("/v1/recommendations"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn health_readiness_metrics_and_openapi() {
    let app = spawn_app().await;
    let (status, body) = app.get("/healthz").await;
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    let (status, body) = app.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "ready");
    assert_eq!(body["catalog_items"], CATEGORIES.len() * PER_CATEGORY);
    assert_eq!(body["index_items"], CATEGORIES.len() * PER_CATEGORY);
    let r = app
        .http
        .get(app.url("/healthz"))
        .header("x-request-id", "my-id-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["x-request-id"], "my-id-1");
    let r = app
        .http
        .get(app.url("/v1/recommendations?k=1"))
        .header("x-request-id", "my-id-2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["request_id"], "my-id-2");
    app.recommend("user_id=nobody&k=3").await;
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("tandem_stage_seconds"), "{metrics}");
    // The runtime's stall watch reports from the server's first 10 ms on.
    let mut lag_reported = false;
    for _ in 0..100 {
        let metrics = app.http.get(app.url("/metrics")).send().await.unwrap();
        if metrics
            .text()
            .await
            .unwrap()
            .contains("tandem_runtime_lag_seconds_bucket")
        {
            lag_reported = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(lag_reported, "no tandem_runtime_lag_seconds in /metrics");
    let (status, served) = app.get("/openapi.json").await;
    assert_eq!(status, StatusCode::OK);
    assert!(served["paths"]["/v1/recommendations"]["get"].is_object());
}

/// `schemas/openapi.json` is the generated document; regenerate it with
/// `TANDEM_UPDATE_SCHEMAS=1 cargo test --test api openapi`.
#[test]
fn committed_openapi_matches_the_generated_one() {
    let generated = tandem::http::openapi::openapi_json();
    let path = repo_path("schemas/openapi.json");
    if std::env::var_os("TANDEM_UPDATE_SCHEMAS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "schemas/openapi.json is out of date; run `TANDEM_UPDATE_SCHEMAS=1 cargo test --test api openapi` and commit it"
    );
}

// ---- property tests ----------------------------------------------------------------------

#[derive(Debug, Clone)]
struct FilterCase {
    who: u8,
    k: usize,
    include: Vec<usize>,
    exclude_cats: Vec<usize>,
    available_only: Option<bool>,
    price_min: Option<u16>,
    price_max: Option<u16>,
    exclude_items: Vec<(usize, usize)>,
    similar_to: Option<(usize, usize)>,
}

fn filter_case() -> impl Strategy<Value = FilterCase> {
    (
        0u8..4,
        1usize..60,
        proptest::collection::vec(0..CATEGORIES.len(), 0..3),
        proptest::collection::vec(0..CATEGORIES.len(), 0..2),
        proptest::option::of(any::<bool>()),
        proptest::option::of(0u16..100),
        proptest::option::of(0u16..130),
        proptest::collection::vec((0..CATEGORIES.len(), 0..PER_CATEGORY), 0..8),
        proptest::option::of((0..CATEGORIES.len(), 0..PER_CATEGORY)),
    )
        .prop_map(
            |(
                who,
                k,
                include,
                exclude_cats,
                available_only,
                price_min,
                price_max,
                exclude_items,
                similar_to,
            )| {
                FilterCase {
                    who,
                    k,
                    include,
                    exclude_cats,
                    available_only,
                    price_min,
                    price_max,
                    exclude_items,
                    similar_to,
                }
            },
        )
}

fn item_name(c: usize, n: usize) -> String {
    format!("{}-{n}", CATEGORIES[c].to_lowercase())
}

impl FilterCase {
    fn query(&self) -> String {
        let mut q = vec![format!("k={}", self.k)];
        if self.similar_to.is_none() {
            match self.who {
                0 => q.push("user_id=p-user".into()),
                1 => q.push("session_id=p-session".into()),
                2 => q.push("user_id=p-stranger".into()),
                _ => {}
            }
        }
        q.extend(
            self.include
                .iter()
                .map(|c| format!("category={}", CATEGORIES[*c])),
        );
        q.extend(
            self.exclude_cats
                .iter()
                .map(|c| format!("exclude_category={}", CATEGORIES[*c])),
        );
        if let Some(a) = self.available_only {
            q.push(format!("available_only={a}"));
        }
        if let Some(p) = self.price_min {
            q.push(format!("price_min={p}"));
        }
        if let Some(p) = self.price_max {
            q.push(format!("price_max={}", p.max(self.price_min.unwrap_or(0))));
        }
        q.extend(
            self.exclude_items
                .iter()
                .map(|(c, n)| format!("exclude={}", item_name(*c, *n))),
        );
        q.join("&")
    }

    fn filter(&self) -> Filter {
        Filter {
            include_categories: self
                .include
                .iter()
                .map(|c| CATEGORIES[*c].to_string())
                .collect(),
            exclude_categories: self
                .exclude_cats
                .iter()
                .map(|c| CATEGORIES[*c].to_string())
                .collect(),
            available_only: self.available_only.unwrap_or(true),
            price_min: self.price_min.map(f32::from),
            price_max: self
                .price_max
                .map(|p| f32::from(p.max(self.price_min.unwrap_or(0)))),
            created_after: None,
            attributes: Default::default(),
            exclude_items: self
                .exclude_items
                .iter()
                .map(|(c, n)| ItemId::parse(item_name(*c, *n)).unwrap())
                .collect(),
        }
    }
}

#[test]
fn no_returned_item_ever_violates_the_filter_or_the_exclude_list() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(async {
        let app = spawn_app().await;
        app.clicks("p-user", &["action-3", "comedy-4", "drama-9", "horror-1"])
            .await;
        let (s, b) = app
            .events(json!([
                {"session_id": "p-session", "item_id": "romance-2", "type": "view"},
                {"user_id": "p-user", "item_id": "scifi-5", "type": "purchase"},
                {"user_id": "other", "item_id": "horror-7", "type": "click"},
            ]))
            .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{b}");
        app
    });
    let purchased = "scifi-5";
    let mut runner = TestRunner::new(PropConfig {
        cases: 64,
        ..PropConfig::default()
    });
    runner
        .run(&filter_case(), |case| {
            let (status, body) = rt.block_on(async {
                match case.similar_to {
                    Some((c, n)) => app.similar(&item_name(c, n), &case.query()).await,
                    None => {
                        app.get(&format!("/v1/recommendations?{}", case.query()))
                            .await
                    }
                }
            });
            prop_assert_eq!(status, StatusCode::OK, "{} {}", case.query(), body);
            let r: RecommendationsResponse = serde_json::from_value(body).unwrap();
            prop_assert!(r.items.len() <= case.k);
            let filter = case.filter();
            let mut seen = HashSet::new();
            for it in &r.items {
                let item = &app.items[&it.item_id];
                prop_assert!(filter.matches(item), "{} returned {:?}", case.query(), item);
                prop_assert!(seen.insert(it.item_id.clone()), "duplicate {}", it.item_id);
                if case.who == 0 && case.similar_to.is_none() {
                    prop_assert!(it.item_id != purchased, "a purchased item came back");
                }
                if let Some((c, n)) = case.similar_to {
                    prop_assert!(it.item_id != item_name(c, n));
                }
            }
            Ok(())
        })
        .unwrap();
    drop(app);
}

#[test]
fn no_input_produces_a_500() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app = rt.block_on(spawn_app());
    let keys = [
        "user_id",
        "session_id",
        "k",
        "category",
        "exclude_category",
        "available_only",
        "price_min",
        "price_max",
        "exclude",
        "explain",
        "bogus",
        "",
    ];
    let values = [
        "",
        "0",
        "-1",
        "1e400",
        "NaN",
        "inf",
        "true",
        "%00",
        "%FF%FE",
        "a%20b",
        "\u{1F600}",
        "999999999999999999999",
        "drama-1",
        "Drama",
    ];
    let paths = [
        "/v1/recommendations",
        "/v1/items/drama-1/similar",
        "/v1/items/%00/similar",
        "/v1/trending",
    ];
    let strategy = (
        0..paths.len(),
        proptest::collection::vec((0..keys.len(), 0..values.len()), 0..5),
    );
    let mut runner = TestRunner::new(PropConfig {
        cases: 96,
        ..PropConfig::default()
    });
    runner
        .run(&strategy, |(p, pairs)| {
            let q: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{}={}", keys[*k], values[*v]))
                .collect();
            let url = format!("{}?{}", paths[p], q.join("&"));
            let (status, body) = rt.block_on(app.get(&url));
            prop_assert!(status.as_u16() < 500, "{url}: {status} {body}");
            if !status.is_success() {
                prop_assert!(body["code"].is_string(), "{url}: not a JSON error: {body}");
            }
            Ok(())
        })
        .unwrap();
    for body in [
        "[]",
        "null",
        "1",
        "\"x\"",
        "{\"items\": null}",
        "{\"items\": [null]}",
        "[{}]",
        "{}",
    ] {
        for path in [
            "/v1/items",
            "/v1/events",
            "/v1/recommendations",
            "/v1/users/u/onboarding",
        ] {
            let r = rt.block_on(async {
                let r = app
                    .http
                    .post(app.url(path))
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                (r.status(), r.json::<Value>().await.unwrap_or(Value::Null))
            });
            assert!(r.0.as_u16() < 500, "{path} {body}: {} {}", r.0, r.1);
            if !r.0.is_success() {
                assert!(r.1["code"].is_string(), "{path} {body}: {}", r.1);
            }
        }
    }
    drop(app);
}

// ---- index outage ------------------------------------------------------------------------

/// A real index behind a switch: while `down`, every call fails as a Qdrant server that is
/// restarting would (the production `GuardedIndex` sits in front, as in `tandem serve`).
struct Outage {
    inner: std::sync::Arc<dyn tandem::index::VectorIndex>,
    down: std::sync::atomic::AtomicBool,
}

impl Outage {
    fn check(&self) -> Result<(), tandem::index::IndexError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(tandem::index::IndexError::Unavailable(
                "connection refused".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl tandem::index::VectorIndex for Outage {
    async fn upsert(
        &self,
        p: Vec<tandem::index::IndexPoint>,
    ) -> Result<(), tandem::index::IndexError> {
        self.check()?;
        self.inner.upsert(p).await
    }
    async fn delete(&self, ids: &[ItemId]) -> Result<(), tandem::index::IndexError> {
        self.check()?;
        self.inner.delete(ids).await
    }
    async fn set_payload(
        &self,
        id: &ItemId,
        patch: &tandem::index::PayloadPatch,
    ) -> Result<(), tandem::index::IndexError> {
        self.check()?;
        self.inner.set_payload(id, patch).await
    }
    async fn search(
        &self,
        v: &[f32],
        f: &Filter,
        k: usize,
    ) -> Result<Vec<tandem::index::Hit>, tandem::index::IndexError> {
        self.check()?;
        self.inner.search(v, f, k).await
    }
    async fn fetch(
        &self,
        ids: &[ItemId],
    ) -> Result<Vec<(tandem::index::Payload, tandem::index::Vector)>, tandem::index::IndexError>
    {
        self.check()?;
        self.inner.fetch(ids).await
    }
    async fn count(&self) -> Result<usize, tandem::index::IndexError> {
        self.check()?;
        self.inner.count().await
    }
    async fn create_version(&self, v: &str, dim: usize) -> Result<(), tandem::index::IndexError> {
        self.check()?;
        self.inner.create_version(v, dim).await
    }
    async fn upsert_into(
        &self,
        v: &str,
        p: Vec<tandem::index::IndexPoint>,
    ) -> Result<(), tandem::index::IndexError> {
        self.check()?;
        self.inner.upsert_into(v, p).await
    }
    async fn search_in(
        &self,
        version: &str,
        v: &[f32],
        f: &Filter,
        k: usize,
    ) -> Result<Vec<tandem::index::Hit>, tandem::index::IndexError> {
        self.check()?;
        self.inner.search_in(version, v, f, k).await
    }
    async fn fetch_from(
        &self,
        version: &str,
        ids: &[ItemId],
    ) -> Result<Vec<(tandem::index::Payload, tandem::index::Vector)>, tandem::index::IndexError>
    {
        self.check()?;
        self.inner.fetch_from(version, ids).await
    }
    async fn delete_from(
        &self,
        version: &str,
        ids: &[ItemId],
    ) -> Result<(), tandem::index::IndexError> {
        self.check()?;
        self.inner.delete_from(version, ids).await
    }
    async fn set_payload_in(
        &self,
        version: &str,
        id: &ItemId,
        patch: &tandem::index::PayloadPatch,
    ) -> Result<(), tandem::index::IndexError> {
        self.check()?;
        self.inner.set_payload_in(version, id, patch).await
    }
    async fn finalize_version(&self, v: &str) -> Result<(), tandem::index::IndexError> {
        self.check()?;
        self.inner.finalize_version(v).await
    }
    async fn switch_to(&self, v: &str) -> Result<(), tandem::index::IndexError> {
        self.check()?;
        self.inner.switch_to(v).await
    }
    async fn drop_version(&self, v: &str) -> Result<(), tandem::index::IndexError> {
        self.check()?;
        self.inner.drop_version(v).await
    }
    async fn versions(&self) -> Result<(Vec<String>, Option<String>), tandem::index::IndexError> {
        self.check()?;
        self.inner.versions().await
    }
    async fn scroll(
        &self,
        version: Option<&str>,
        offset: Option<String>,
        limit: usize,
    ) -> Result<tandem::index::ScrollPage, tandem::index::IndexError> {
        self.check()?;
        self.inner.scroll(version, offset, limit).await
    }
}

/// The vector index stops answering (a Qdrant restart): a user with history still gets a
/// full page, from the fallback list and under the request's filter, flagged
/// `degraded:["index"]`, never an error; once the index answers again the page is personal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_outage_serves_the_fallback_list_and_recovers() {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use tandem::pipeline::{Degraded, Parts, RecommendRequest, Recommender, Source};

    let dir = tempfile::tempdir().unwrap();
    let catalog_dir = dir.path().join("catalog");
    let items = write_catalog(&catalog_dir);
    let model = tandem::model::TwoTower::load(&model_dir().join("model")).unwrap();
    let outage = Arc::new(Outage {
        inner: Arc::new(tandem::index::exact::ExactIndex::new()),
        down: false.into(),
    });
    tandem::items::load::index_catalog(outage.as_ref(), &model, &items, &catalog_dir)
        .await
        .unwrap();
    let index: Arc<dyn tandem::index::VectorIndex> = Arc::new(tandem::degrade::GuardedIndex::new(
        outage.clone(),
        tandem::degrade::Budgets {
            read: Duration::from_millis(200),
            write: Duration::from_millis(500),
            cooldown: Duration::from_millis(200),
        },
    ));
    let (catalog, _) = tandem::catalog::Catalog::load(items.clone(), index.as_ref(), |_, _| {})
        .await
        .unwrap();
    let settings = Settings::default();
    let sessions = Arc::new(
        tandem::session::memory::MemoryStore::open(
            &settings.session,
            &dir.path().join("events.log"),
        )
        .unwrap(),
    );
    let clicks: Vec<tandem::session::Event> = (0..5)
        .map(|n| tandem::session::Event {
            event_id: uuid::Uuid::new_v4(),
            user_id: Some(UserId::parse("shopper").unwrap()),
            session_id: None,
            item_id: ItemId::parse(format!("comedy-{n}")).unwrap(),
            event_type: EventType::Click,
            value: None,
            timestamp_ms: 1_700_000_000_000 + n,
            variant: None,
            context: None,
            categories: vec!["Comedy".into()],
        })
        .collect();
    tandem::session::SessionStore::append(sessions.as_ref(), &clicks)
        .await
        .unwrap();
    let experiments = Arc::new(tandem::experiment::Experiments::new(
        Vec::new(),
        sessions.clone(),
        settings.rerank.clone(),
    ));
    let recommender = Recommender::new(Parts {
        model: Arc::new(arc_swap::ArcSwap::from_pointee(model)),
        index: index.clone(),
        sessions,
        catalog: Arc::new(catalog),
        settings: settings.server.clone(),
        boosts: settings.boosts.clone(),
        experiments,
        arms: Arc::new(tandem::arms::Arms::new(index)),
    });
    let request = |n: usize, category: &str| RecommendRequest {
        request_id: format!("r{n}"),
        user: Some(UserId::parse("shopper").unwrap()),
        session: None,
        k: 10,
        filter: Filter {
            include_categories: vec![category.into()],
            available_only: true,
            ..Default::default()
        },
        boosts: Vec::new(),
    };

    let up = recommender.recommend(&request(0, "Drama")).await;
    assert_eq!(up.source, Source::Personal, "{:?}", up.degraded);
    assert!(up.degraded.is_empty(), "{:?}", up.degraded);

    outage.down.store(true, Ordering::SeqCst);
    for (n, category) in ["Horror", "Romance", "SciFi"].into_iter().enumerate() {
        let down = recommender.recommend(&request(n + 1, category)).await;
        assert!(
            down.degraded.contains(&Degraded::Index),
            "{category}: {:?}",
            down.degraded
        );
        assert_eq!(
            down.items.len(),
            10,
            "{category}: a full page while the index is down"
        );
        for r in &down.items {
            assert!(
                r.entry.item.categories.iter().any(|g| g == category) && r.entry.item.available,
                "{category}: {} breaks the filter",
                r.entry.id()
            );
        }
    }

    outage.down.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let back = recommender.recommend(&request(9, "Action")).await;
        if back.degraded.is_empty() {
            assert_eq!(back.source, Source::Personal);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still degraded: {:?}",
            back.degraded
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_unknown_or_mis_cased_category_is_a_422_naming_the_closest_names() {
    let app = spawn_app().await;
    for (path, field, near) in [
        ("/v1/recommendations?category=comedy", "category", "Comedy"),
        (
            "/v1/recommendations?user_id=u&exclude_category=Horor",
            "exclude_category",
            "Horror",
        ),
        ("/v1/trending?category=scifi", "category", "SciFi"),
        (
            "/v1/items/drama-1/similar?category=Drama&category=romance",
            "category",
            "Romance",
        ),
    ] {
        let r = app.get(path).await;
        let message = r.1["message"].as_str().unwrap_or_default().to_string();
        app.expect_error(r, StatusCode::UNPROCESSABLE_ENTITY, field)
            .await;
        assert!(
            message.contains(&format!("did you mean {near}")),
            "{path}: {message}"
        );
    }
    // Nothing close: a few known names instead.
    let r = app.get("/v1/recommendations?category=Toys").await;
    let message = r.1["message"].as_str().unwrap_or_default().to_string();
    app.expect_error(r, StatusCode::UNPROCESSABLE_ENTITY, "category")
        .await;
    assert!(
        message.contains("known categories include Action"),
        "{message}"
    );
    // The JSON form and onboarding say the same.
    let r = app
        .post("/v1/recommendations", &json!({"category": ["drama"]}))
        .await;
    app.expect_error(r, StatusCode::UNPROCESSABLE_ENTITY, "category")
        .await;
    let r = app
        .post(
            "/v1/users/typo/onboarding",
            &json!({"categories": ["Romance", "romance"]}),
        )
        .await;
    app.expect_error(r, StatusCode::UNPROCESSABLE_ENTITY, "categories[1]")
        .await;
    // Known names are fine.
    let ok = app
        .recommend("k=5&category=Comedy&exclude_category=Drama")
        .await;
    assert_eq!(ok.items.len(), 5);

    // GET /v1/categories: every name, with its number of items.
    let (status, body) = app.get("/v1/categories").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let listed: Vec<(String, u64)> = body["categories"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["items"].as_u64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, u64)> = CATEGORIES
        .iter()
        .map(|c| {
            let n = app
                .items
                .values()
                .filter(|i| i.categories.iter().any(|g| g == c));
            (c.to_string(), n.count() as u64)
        })
        .collect();
    assert_eq!(listed, want);
}

#[tokio::test]
async fn onboarding_leaves_the_liked_items_out_of_its_answer() {
    let app = spawn_app().await;
    let liked = ["horror-3", "horror-8", "scifi-2"];
    let (status, body) = app
        .post(
            "/v1/users/fan/onboarding",
            &json!({"liked_items": liked, "k": 20}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let on: OnboardingResponse = serde_json::from_value(body).unwrap();
    let recs = &on.recommendations;
    assert_eq!(recs.items.len(), 20);
    for l in liked {
        assert!(
            !ids(recs).contains(&l.to_string()),
            "{l} came back: {:?}",
            ids(recs)
        );
    }
    // Still about them.
    assert!(
        app.share_in(recs, &["Horror", "SciFi"]) >= 0.5,
        "{:?}",
        ids(recs)
    );
}
