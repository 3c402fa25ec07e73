//! The Gorse-compatible API (`/api/...`) over a real server (embedded index, memory session
//! store), as a Gorse client sees it; and the users-and-feedback store's contract on both
//! backends (memory, with a restart; Redis at REDIS_URL).

mod common;

use common::{redis_url, tiny_checkpoints, unique, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use tandem::config::{AdminKey, SessionBackend, Settings};
use tandem::domain::{EventType, ItemId, UserId};
use tandem::session::{self, Event, FeedbackRecord, SessionStore, UserRecord, UserStore};

const KEY: &str = "gorse-test-key";

struct Gorse {
    app: TestApp,
    /// A client with no default headers: `TestApp`'s own sends the admin key on every call,
    /// and these tests choose the key each call sends.
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn spawn(key: Option<&str>) -> Gorse {
    let dir = tempfile::tempdir().unwrap();
    let (data, ckpts) = tiny_checkpoints(dir.path(), &["gorse-a"]);
    let mut settings = Settings {
        data_dir: dir.path().join("srv"),
        model_path: ckpts[0].clone(),
        admin_key: AdminKey(key.map(String::from)),
        ..Settings::default()
    };
    settings.session.backend = SessionBackend::Memory;
    settings.server.catalog_dir = data;
    Gorse {
        app: TestApp::spawn(settings).await,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Gorse {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        self.call_with(method, path, body, &[("x-api-key", KEY)])
            .await
    }

    async fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut r = self
            .http
            .request(method.parse().unwrap(), self.app.url(path));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method, path, body).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}: {v}");
        v
    }

    /// Every item id, through Gorse's pages of `n`.
    async fn all_item_ids(&self, n: usize) -> Vec<String> {
        let mut ids = Vec::new();
        let mut cursor = String::new();
        loop {
            let page = self
                .ok("GET", &format!("/api/items?n={n}&cursor={cursor}"), None)
                .await;
            for item in page["Items"].as_array().unwrap() {
                ids.push(item["ItemId"].as_str().unwrap().to_string());
            }
            cursor = page["Cursor"].as_str().unwrap().to_string();
            if cursor.is_empty() {
                return ids;
            }
        }
    }

    async fn categories_of(&self, id: &str) -> Vec<String> {
        let item = self.ok("GET", &format!("/api/item/{id}"), None).await;
        serde_json::from_value(item["Categories"].clone()).unwrap()
    }

    /// The source of a tandem recommendation for `user`: `trending` when nothing is known of
    /// the user, `personal` (or `cached`) when the user's activity is used.
    async fn source(&self, user: &str) -> String {
        let (status, v) = self
            .app
            .get(&format!("/v1/recommendations?user_id={user}&k=5"))
            .await;
        assert_eq!(status, StatusCode::OK, "{v}");
        v["source"].as_str().unwrap().to_string()
    }
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| match s {
            Value::String(id) => id.clone(),
            other => other["Id"].as_str().unwrap().to_string(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gorse_items_map_onto_the_catalog_and_pages_visit_each_once() {
    let g = spawn(Some(KEY)).await;
    let item = json!({
        "ItemId": "g-1", "IsHidden": false, "Categories": ["Gorse-Only"],
        "Labels": ["red", "round"], "Comment": "A gorse item", "Timestamp": "2022-02-24",
    });
    let v = g.ok("POST", "/api/item", Some(item)).await;
    assert_eq!(v, json!({"RowAffected": 1}));
    let got = g.ok("GET", "/api/item/g-1", None).await;
    assert_eq!(got["Comment"], "A gorse item");
    assert_eq!(got["Labels"], json!(["red", "round"]));
    assert_eq!(got["Categories"], json!(["Gorse-Only"]));
    assert_eq!(got["Timestamp"], "2022-02-24T00:00:00Z");
    assert_eq!(got["IsHidden"], false);
    // The same item through tandem's own API: Comment is the title, Labels the tags.
    let (_, v1) = g.app.get("/v1/items/g-1").await;
    assert_eq!(v1["title"], "A gorse item");
    assert_eq!(v1["tags"], json!(["red", "round"]));
    assert_eq!(v1["created_at"], 1_645_660_800);

    // IsHidden is availability; a content change keeps it.
    g.ok("PATCH", "/api/item/g-1", Some(json!({"IsHidden": true})))
        .await;
    let (_, v1) = g.app.get("/v1/items/g-1").await;
    assert_eq!(v1["available"], false);
    g.ok(
        "PATCH",
        "/api/item/g-1",
        Some(json!({"Comment": "Renamed"})),
    )
    .await;
    let got = g.ok("GET", "/api/item/g-1", None).await;
    assert_eq!(
        (got["Comment"].as_str(), got["IsHidden"].as_bool()),
        (Some("Renamed"), Some(true))
    );

    // A batch, then paging: every item exactly once, in pages of 7.
    let batch: Vec<Value> = (2..=4)
        .map(|i| json!({"ItemId": format!("g-{i}"), "Categories": ["Gorse-Only"], "Timestamp": ""}))
        .collect();
    assert_eq!(
        g.ok("POST", "/api/items", Some(json!(batch))).await["RowAffected"],
        3
    );
    let paged = g.all_item_ids(7).await;
    let unique_ids: HashSet<&String> = paged.iter().collect();
    let (_, ready) = g.app.get("/readyz").await;
    assert_eq!(unique_ids.len(), paged.len(), "an item came twice");
    assert_eq!(paged.len() as u64, ready["catalog_items"].as_u64().unwrap());
    assert!(unique_ids.contains(&"g-3".to_string()));
    // gorsejs sends the cursor as `Cursor`.
    let first = g.ok("GET", "/api/items?n=2", None).await;
    let cursor = first["Cursor"].as_str().unwrap();
    let second = g
        .ok("GET", &format!("/api/items?n=2&Cursor={cursor}"), None)
        .await;
    assert_eq!(
        second["Items"][0]["ItemId"].as_str(),
        Some(paged[2].as_str())
    );

    // Deleted: 404 from then on.
    assert_eq!(
        g.ok("DELETE", "/api/item/g-2", None).await["RowAffected"],
        1
    );
    assert_eq!(
        g.call("GET", "/api/item/g-2", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        g.call("DELETE", "/api/item/g-2", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        g.call("GET", "/api/item/nope", None).await.0,
        StatusCode::NOT_FOUND
    );

    // Bad input: Gorse's 400, naming the field in Gorse's terms.
    let (status, err) = g
        .call(
            "POST",
            "/api/item",
            Some(json!({"ItemId": "g-9", "Timestamp": "soon"})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["field"], "item.Timestamp");
    let (status, err) = g
        .call(
            "POST",
            "/api/items",
            Some(json!([{"ItemId": "ok"}, {"ItemId": "x", "Labels": ["\u{7}"]}])),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["field"], "items[1].Labels[0]");
    let (status, err) = g.call("GET", "/api/items?n=0", None).await;
    assert_eq!(
        (status, err["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("n"))
    );
    g.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gorse_recommendations_keep_to_the_category_and_never_show_hidden_or_seen_items() {
    let g = spawn(Some(KEY)).await;
    let (_, cats) = g.app.get("/v1/categories").await;
    let category = cats["categories"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|c| c["items"].as_u64())
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();
    let all = g.all_item_ids(100).await;
    let liked: Vec<&String> = all.iter().take(3).collect();
    let feedback: Vec<Value> = liked
        .iter()
        .map(|i| json!({"FeedbackType": "star", "UserId": "alice", "ItemId": i, "Timestamp": "2026-12-01T10:00:00Z", "Value": 5}))
        .collect();
    let v = g.ok("POST", "/api/feedback", Some(json!(feedback))).await;
    assert_eq!(v["RowAffected"], 3);
    // The user was inserted with the feedback, as Gorse does.
    assert_eq!(
        g.ok("GET", "/api/user/alice", None).await["UserId"],
        "alice"
    );
    assert_ne!(
        g.source("alice").await,
        "trending",
        "alice's feedback is used"
    );

    // By category, with scores (X-API-Version: 2): only that category.
    let path = format!("/api/recommend/alice/{category}?n=10");
    let (status, recs) = g
        .call_with(
            "GET",
            &path,
            None,
            &[("x-api-key", KEY), ("X-API-Version", "2")],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{recs}");
    assert!(!recs.as_array().unwrap().is_empty());
    assert!(recs[0]["Score"].is_number());
    for id in ids(&recs) {
        assert!(
            g.categories_of(&id).await.contains(&category),
            "{id} is not in {category}"
        );
        assert!(
            !liked.contains(&&id),
            "{id} was given feedback and came back"
        );
    }

    // Hide the first recommendation: it never comes back, from any list.
    let plain = g.ok("GET", "/api/recommend/alice/?n=10", None).await;
    let hidden = ids(&plain)[0].clone();
    assert!(
        plain[0].is_string(),
        "without X-API-Version: 2 the answer is ids"
    );
    g.ok(
        "PATCH",
        &format!("/api/item/{hidden}"),
        Some(json!({"IsHidden": true})),
    )
    .await;
    for path in [
        "/api/recommend/alice?n=50".to_string(),
        format!("/api/recommend/alice/{category}?n=50"),
        "/api/popular?n=100".into(),
        "/api/latest?n=200".into(),
        format!("/api/item/{}/neighbors?n=50", liked[0]),
    ] {
        let v = g.ok("GET", &path, None).await;
        assert!(!ids(&v).contains(&hidden), "{path} showed the hidden item");
    }
    // Popular, latest and neighbors by category.
    for path in [
        format!("/api/popular/{category}?n=20"),
        format!("/api/latest/{category}?n=20"),
        format!("/api/item/{}/neighbors/{category}?n=20", liked[0]),
    ] {
        let v = g.ok("GET", &path, None).await;
        assert!(!ids(&v).is_empty(), "{path} is empty");
        for id in ids(&v) {
            assert!(
                g.categories_of(&id).await.contains(&category),
                "{path}: {id}"
            );
        }
    }
    // Offsets page the ranked lists.
    let ten = ids(&g.ok("GET", "/api/latest?n=10", None).await);
    let tail = ids(&g.ok("GET", "/api/latest?n=5&offset=5", None).await);
    assert_eq!(&ten[5..], &tail[..]);

    // write-back-type: what was returned is recorded as that feedback, and not returned again.
    let first = ids(&g
        .ok("GET", "/api/recommend/alice?n=5&write-back-type=read", None)
        .await);
    let read = g.ok("GET", "/api/user/alice/feedback/read", None).await;
    let read_ids: HashSet<String> = read
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["ItemId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(read_ids, first.iter().cloned().collect());
    let next = ids(&g.ok("GET", "/api/recommend/alice?n=20", None).await);
    assert!(
        first.iter().all(|i| !next.contains(i)),
        "written-back items came back"
    );

    // Session recommendations: from the given feedback, never one of its items.
    let session = g
        .ok(
            "POST",
            "/api/session/recommend?n=5",
            Some(json!([{"FeedbackType": "star", "UserId": "", "ItemId": liked[1], "Timestamp": ""}])),
        )
        .await;
    assert_eq!(ids(&session).len(), 5);
    assert!(!ids(&session).contains(liked[1]));
    assert_eq!(
        g.call("GET", "/api/item/nope/neighbors", None).await.0,
        StatusCode::NOT_FOUND
    );
    g.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_feedback_or_a_user_removes_it_from_recommendations() {
    let g = spawn(Some(KEY)).await;
    let item = g.all_item_ids(1).await[0].clone();
    let one =
        |ty: &str| json!({"FeedbackType": ty, "UserId": "bob", "ItemId": item, "Timestamp": ""});
    g.ok("POST", "/api/feedback", Some(one("like"))).await;
    assert_ne!(g.source("bob").await, "trending", "bob's feedback is used");
    let listed = g.ok("GET", "/api/feedback?n=10", None).await;
    assert_eq!(listed["Feedback"][0]["FeedbackType"], "like");
    assert_eq!(listed["Feedback"][0]["UserId"], "bob");
    // Deleting it: recommendations no longer know anything about bob.
    assert_eq!(
        g.ok("DELETE", &format!("/api/feedback/bob/{item}"), None)
            .await["RowAffected"],
        1
    );
    assert_eq!(g.source("bob").await, "trending");
    assert_eq!(g.ok("GET", "/api/user/bob/feedback", None).await, json!([]));

    // Of two types on one item, deleting one (gorsejs' path) leaves the other in use.
    g.ok(
        "POST",
        "/api/feedback",
        Some(json!([one("like"), one("an-unknown-type")])),
    )
    .await;
    g.ok("DELETE", &format!("/api/feedback/like/bob/{item}"), None)
        .await;
    assert_ne!(g.source("bob").await, "trending", "bob's feedback is used");
    let left = g.ok("GET", "/api/user/bob/feedback", None).await;
    assert_eq!(left[0]["FeedbackType"], "an-unknown-type");

    // Deleting the user: gone, with its feedback and its activity.
    assert_eq!(
        g.ok("DELETE", "/api/user/bob", None).await["RowAffected"],
        1
    );
    assert_eq!(
        g.call("GET", "/api/user/bob", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        g.call("DELETE", "/api/user/bob", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(g.source("bob").await, "trending");
    assert_eq!(
        g.ok("GET", "/api/feedback", None).await["Feedback"],
        json!([])
    );
    g.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_page_once_and_patch() {
    let g = spawn(Some(KEY)).await;
    let users: Vec<Value> = (0..25)
        .map(|i| json!({"UserId": format!("user-{i:02}"), "Labels": ["l"], "Comment": "c"}))
        .collect();
    assert_eq!(
        g.ok("POST", "/api/users", Some(json!(users))).await["RowAffected"],
        25
    );
    g.ok("POST", "/api/user", Some(json!({"UserId": "solo"})))
        .await;
    g.ok(
        "PATCH",
        "/api/user/solo",
        Some(json!({"Comment": "edited"})),
    )
    .await;
    let solo = g.ok("GET", "/api/user/solo", None).await;
    assert_eq!(
        (solo["Comment"].as_str(), solo["Labels"].clone()),
        (Some("edited"), json!([]))
    );
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page = g
            .ok("GET", &format!("/api/users?n=4&cursor={cursor}"), None)
            .await;
        seen.extend(
            page["Users"]
                .as_array()
                .unwrap()
                .iter()
                .map(|u| u["UserId"].as_str().unwrap().to_string()),
        );
        cursor = page["Cursor"].as_str().unwrap().to_string();
        if cursor.is_empty() {
            break;
        }
    }
    assert_eq!(seen.len(), 26);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 26);
    assert_eq!(
        g.call("PATCH", "/api/user/ghost", Some(json!({}))).await.0,
        StatusCode::NOT_FOUND
    );
    g.app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_guards_every_gorse_route() {
    let g = spawn(Some(KEY)).await;
    for (method, path) in [
        ("GET", "/api/items"),
        ("GET", "/api/recommend/x/"),
        ("POST", "/api/user"),
    ] {
        let body = (method == "POST").then(|| json!({"UserId": "x"}));
        let (status, _) = g.call_with(method, path, body.clone(), &[]).await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{method} {path} without a key"
        );
        let (status, err) = g
            .call_with(method, path, body, &[("x-api-key", "wrong")])
            .await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{method} {path} with a wrong key"
        );
        assert_eq!(err["code"], "unauthorized");
    }
    g.app.stop().await;
    // Without a key configured the Gorse API is off, reads and writes alike.
    let off = spawn(None).await;
    for (method, path) in [
        ("GET", "/api/items"),
        ("GET", "/api/feedback"),
        ("DELETE", "/api/user/x"),
    ] {
        let (status, err) = off
            .call_with(method, path, None, &[("x-api-key", "anything")])
            .await;
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "{method} {path} without a configured key"
        );
        assert_eq!(err["code"], "catalog_writes_disabled");
    }
    off.app.stop().await;
}

// ---- the store's contract, on both backends ----------------------------------------------

fn uid(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn iid(s: &str) -> ItemId {
    ItemId::parse(s).unwrap()
}

fn record(ty: &str, user: &str, item: &str) -> FeedbackRecord {
    FeedbackRecord {
        feedback_type: ty.into(),
        user_id: uid(user),
        item_id: iid(item),
        timestamp_ms: 1_700_000_000_000,
        value: 1.0,
        comment: String::new(),
    }
}

fn event(user: &str, item: &str) -> Event {
    Event {
        event_id: uuid::Uuid::new_v4(),
        user_id: Some(uid(user)),
        session_id: None,
        item_id: iid(item),
        event_type: EventType::Click,
        value: None,
        timestamp_ms: tandem::session::event::now_ms(),
        variant: None,
        context: None,
        categories: Vec::new(),
    }
}

async fn history(s: &dyn SessionStore, user: &str) -> Vec<String> {
    let (recent, history) = s.user_activity(&uid(user), 50, 50).await.unwrap();
    let mut items: Vec<String> = recent
        .into_iter()
        .chain(history)
        .map(|r| r.item_id.to_string())
        .collect();
    items.sort();
    items.dedup();
    items
}

type Stores = (Arc<dyn SessionStore>, Arc<dyn UserStore>);

/// The contract; `reopen` is a restart (the memory store replays its log).
async fn contract(
    settings: &Settings,
    open: impl Fn() -> futures::future::BoxFuture<'static, Stores>,
) {
    let _ = settings;
    let (sessions, users) = open().await;
    // Users: upsert, read, page in id order, each once.
    let all: Vec<UserRecord> = ["c", "a", "b", "d", "e"]
        .iter()
        .map(|u| UserRecord {
            user_id: uid(u),
            labels: vec![format!("label-{u}")],
            comment: String::new(),
        })
        .collect();
    users.put_users(&all).await.unwrap();
    assert_eq!(
        users.user(&uid("c")).await.unwrap().unwrap().labels,
        ["label-c"]
    );
    assert!(users.user(&uid("zz")).await.unwrap().is_none());
    let first = users.users_after(None, 2).await.unwrap();
    let rest = users
        .users_after(Some(&first[1].user_id), 10)
        .await
        .unwrap();
    let order: Vec<String> = first
        .iter()
        .chain(&rest)
        .map(|u| u.user_id.to_string())
        .collect();
    assert_eq!(order, ["a", "b", "c", "d", "e"]);

    // Feedback: keyed by (user, item, type), paged in that order.
    sessions
        .append(&[event("a", "i1"), event("a", "i2"), event("b", "i1")])
        .await
        .unwrap();
    users
        .put_feedback(&[
            record("star", "a", "i2"),
            record("like", "a", "i1"),
            record("star", "a", "i1"),
            record("star", "b", "i1"),
        ])
        .await
        .unwrap();
    users
        .put_feedback(&[record("star", "a", "i1")])
        .await
        .unwrap(); // replaces, not adds
    let page = users.feedback_after(None, 2).await.unwrap();
    let rest = users
        .feedback_after(Some(&page[1].key()), 10)
        .await
        .unwrap();
    let keys: Vec<(String, String, String)> = page
        .iter()
        .chain(&rest)
        .map(|r| {
            (
                r.user_id.to_string(),
                r.item_id.to_string(),
                r.feedback_type.clone(),
            )
        })
        .collect();
    let expect = |u: &str, i: &str, t: &str| (u.to_string(), i.to_string(), t.to_string());
    assert_eq!(
        keys,
        [
            expect("a", "i1", "like"),
            expect("a", "i1", "star"),
            expect("a", "i2", "star"),
            expect("b", "i1", "star")
        ]
    );
    assert_eq!(users.user_feedback(&uid("a")).await.unwrap().len(), 3);
    assert_eq!(history(sessions.as_ref(), "a").await, ["i1", "i2"]);

    // Deleting one type of two keeps the item in the history; the last one takes it out.
    let gone = users
        .delete_feedback(&uid("a"), &iid("i1"), Some("like"))
        .await
        .unwrap();
    assert_eq!(gone.len(), 1);
    assert_eq!(history(sessions.as_ref(), "a").await, ["i1", "i2"]);
    users
        .delete_feedback(&uid("a"), &iid("i1"), None)
        .await
        .unwrap();
    assert_eq!(history(sessions.as_ref(), "a").await, ["i2"]);

    // Deleting a user: its record, feedback and activity; others untouched.
    assert!(users.delete_user(&uid("b")).await.unwrap());
    assert!(!users.delete_user(&uid("b")).await.unwrap());
    assert!(users.user(&uid("b")).await.unwrap().is_none());
    assert!(history(sessions.as_ref(), "b").await.is_empty());
    assert!(users.user_feedback(&uid("b")).await.unwrap().is_empty());

    // A restart keeps all of it.
    drop((sessions, users));
    let (sessions, users) = open().await;
    assert!(users.user(&uid("b")).await.unwrap().is_none());
    assert_eq!(users.users_after(None, 10).await.unwrap().len(), 4);
    let left: Vec<String> = users
        .feedback_after(None, 10)
        .await
        .unwrap()
        .iter()
        .map(FeedbackRecord::key)
        .collect();
    assert_eq!(left, [record("star", "a", "i2").key()]);
    assert_eq!(history(sessions.as_ref(), "a").await, ["i2"]);
    assert!(history(sessions.as_ref(), "b").await.is_empty());
}

#[tokio::test]
async fn user_store_contract_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    settings.session.backend = SessionBackend::Memory;
    let s = settings.clone();
    contract(&settings, move || {
        let s = s.clone();
        Box::pin(async move { session::open_with_users(&s).await.unwrap() })
    })
    .await;
}

#[tokio::test]
async fn user_store_contract_redis() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    settings.session.backend = SessionBackend::Redis;
    settings.session.redis_url = redis_url();
    settings.session.key_prefix = unique("gorse-contract-");
    let s = settings.clone();
    contract(&settings, move || {
        let s = s.clone();
        Box::pin(async move { session::open_with_users(&s).await.unwrap() })
    })
    .await;
    let store = session::RedisStore::connect(&settings.session)
        .await
        .unwrap();
    store.delete_all_keys().await.unwrap();
}
