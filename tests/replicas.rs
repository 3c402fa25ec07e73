//! Several replicas behave as one service: two (then three) servers in this process share a
//! real Qdrant server (`QDRANT_URL`) and the real Redis, as the production deployment does,
//! while requests loop on the second replica and none may fail. What one replica is told
//! every other one serves: item writes within a second, a model activation and a rollback
//! within ten, experiments within ten, and a replica that starts later loads the catalog
//! from the shared collection.

mod common;

use common::{eventually, qdrant_url, redis_url, tiny_checkpoints, unique, TestApp};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem::config::{AdminKey, IndexBackend, SessionBackend, Settings};

const KEY: &str = "replica-admin-key";
const ITEM_WITHIN: Duration = Duration::from_secs(1);
const MODEL_WITHIN: Duration = Duration::from_secs(10);

struct Shared {
    qdrant: String,
    prefix: String,
    collection: String,
}

fn replica(dir: &Path, name: &str, shared: &Shared, ckpt: &Path) -> Settings {
    let mut s = Settings {
        data_dir: dir.join(name),
        model_path: ckpt.to_path_buf(),
        admin_key: AdminKey(Some(KEY.into())),
        ..Settings::default()
    };
    s.index.backend = IndexBackend::Qdrant;
    s.index.qdrant_url = shared.qdrant.clone();
    s.index.collection = shared.collection.clone();
    s.session.backend = SessionBackend::Redis;
    s.session.redis_url = redis_url();
    s.session.key_prefix = shared.prefix.clone();
    s.server.catalog_dir = dir.join("data");
    s.registry.model_store = dir.join("model-store");
    s
}

async fn recommend(app: &TestApp, user: &str) -> Value {
    let (status, body) = app
        .get(&format!("/v1/recommendations?user_id={user}&k=10"))
        .await;
    assert_eq!(status, 200, "{body}");
    body
}

async fn admin(app: &TestApp, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
    let mut req = app
        .http
        .request(method, app.url(path))
        .header("X-API-Key", KEY);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{path}: {status} {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_catalog_models_and_experiments() {
    let Some(qdrant) = qdrant_url("replicas_share_catalog_models_and_experiments") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_data, ckpts) = tiny_checkpoints(dir.path(), &["rp-a", "rp-b"]);
    let shared = Shared {
        qdrant,
        prefix: unique("tandem-test-"),
        collection: unique("rp"),
    };
    let a = TestApp::spawn(replica(dir.path(), "a", &shared, &ckpts[0])).await;
    let b = Arc::new(TestApp::spawn(replica(dir.path(), "b", &shared, &ckpts[0])).await);
    let (_, ready) = b.get("/readyz").await;
    assert!(ready["catalog_items"].as_u64().unwrap() >= 300, "{ready}");

    // Requests loop on replica B throughout; none may fail.
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let looping = {
        let (b, stop, served, failed) = (b.clone(), stop.clone(), served.clone(), failed.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let url = b.url(&format!("/v1/recommendations?user_id=loop-{}&k=10", n % 50));
                match b.http.get(url).send().await {
                    Ok(r) if r.status() == 200 => served.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("request on replica B failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // --- Catalog: a write on A is on B within a second. ---
    let r = a
        .http
        .post(a.url("/v1/items"))
        .header("X-API-Key", KEY)
        .json(
            &json!({"items": [{"item_id": "rp-new", "title": "Juno Vintage Guide",
            "categories": ["Books"], "price": 12.5}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let took = eventually("an item posted on A readable on B", ITEM_WITHIN, || async {
        b.get("/v1/items/rp-new").await.0 == 200
    })
    .await;
    eprintln!("item upsert reached B in {took:?}");
    let similar_on_b = b.get("/v1/items/rp-new/similar?k=5").await;
    assert_eq!(
        similar_on_b.0, 200,
        "B searches for the new item: {}",
        similar_on_b.1
    );

    let r = a
        .http
        .patch(a.url("/v1/items/rp-new"))
        .header("X-API-Key", KEY)
        .json(&json!({"available": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    eventually(
        "an item made unavailable on A is unavailable on B",
        ITEM_WITHIN,
        || async { b.get("/v1/items/rp-new").await.1["available"] == json!(false) },
    )
    .await;
    // A category page on B never shows it now.
    let (_, page) = b.get("/v1/recommendations?category=Books&k=50").await;
    assert!(
        !page["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["item_id"] == "rp-new"),
        "{page}"
    );

    let r = a
        .http
        .delete(a.url("/v1/items/rp-new"))
        .header("X-API-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    eventually("an item deleted on A is gone on B", ITEM_WITHIN, || async {
        b.get("/v1/items/rp-new").await.0 == 404
    })
    .await;

    // --- Models: activate on A, B serves it within 10 s; then roll back. ---
    assert_eq!(recommend(&b, "u1").await["model_version"], "rp-a");
    let store_copy = ckpts[1].to_str().unwrap().to_string();
    admin(
        &a,
        reqwest::Method::POST,
        "/admin/models",
        Some(json!({"path": store_copy})),
    )
    .await;
    admin(
        &a,
        reqwest::Method::POST,
        "/admin/models/rp-b/activate",
        None,
    )
    .await;
    eventually("A serves rp-b", Duration::from_secs(60), || async {
        recommend(&a, "u1").await["model_version"] == "rp-b"
    })
    .await;
    let took = eventually(
        "B serves the model activated on A",
        MODEL_WITHIN,
        || async { recommend(&b, "u1").await["model_version"] == "rp-b" },
    )
    .await;
    eprintln!("activation reached B in {took:?}");
    // The registry is one: B lists what A registered and activated.
    let models = admin(&b, reqwest::Method::GET, "/admin/models", None).await;
    let active: Vec<&Value> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["status"] == "active")
        .collect();
    assert_eq!(active.len(), 1, "{models}");
    assert_eq!(active[0]["version"], "rp-b");

    // The activation still catches the new collection up after the swap, and a switch
    // answers 409 busy meanwhile: roll back once it has finished.
    eventually(
        "A accepts the rollback",
        Duration::from_secs(60),
        || async {
            let r = a
                .http
                .post(a.url("/admin/models/rollback"))
                .header("X-API-Key", KEY)
                .send()
                .await
                .unwrap();
            match r.status().as_u16() {
                200 => true,
                409 => false,
                other => panic!("rollback: {other} {}", r.text().await.unwrap_or_default()),
            }
        },
    )
    .await;
    let took = eventually(
        "B serves the model rolled back to on A",
        MODEL_WITHIN,
        || async { recommend(&b, "u1").await["model_version"] == "rp-a" },
    )
    .await;
    eprintln!("rollback reached B in {took:?}");

    // --- Experiments: put on A, assigned alike on B within 10 s. ---
    admin(
        &a,
        reqwest::Method::PUT,
        "/admin/experiments",
        Some(json!({"experiments": [{
            "name": "rail-weights", "salt": "rp", "enabled": true,
            "variants": [{"name": "control", "share": 0.5}, {"name": "alt", "share": 0.5}]
        }]})),
    )
    .await;
    eventually(
        "B assigns the experiment set on A",
        MODEL_WITHIN,
        || async {
            recommend(&b, "u1").await["variant"] != "control"
                || recommend(&b, "u2").await["variant"] != "control"
                || recommend(&b, "u3").await["variant"] != "control"
        },
    )
    .await;
    let mut variants = std::collections::BTreeSet::new();
    for u in 0..20 {
        let user = format!("user-{u}");
        let on_a = recommend(&a, &user).await["variant"].clone();
        let on_b = recommend(&b, &user).await["variant"].clone();
        assert_eq!(on_a, on_b, "{user} gets one variant on every replica");
        variants.insert(on_a.to_string());
    }
    assert_eq!(
        variants.len(),
        2,
        "both variants are assigned: {variants:?}"
    );

    // --- A replica that starts now loads the catalog from the shared collection. ---
    let r = a
        .http
        .post(a.url("/v1/items"))
        .header("X-API-Key", KEY)
        .json(
            &json!({"items": [{"item_id": "rp-late", "title": "Only in Qdrant",
            "categories": ["Books"], "tags": ["rare"], "year": 2001}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let c = TestApp::spawn(replica(dir.path(), "c", &shared, &ckpts[0])).await;
    let (status, late) = c.get("/v1/items/rp-late").await;
    assert_eq!(
        status, 200,
        "C loaded an item that no catalog file holds: {late}"
    );
    assert_eq!(late["title"], "Only in Qdrant");
    assert_eq!(
        recommend(&c, "user-3").await["variant"],
        recommend(&a, "user-3").await["variant"]
    );

    stop.store(true, Ordering::Relaxed);
    looping.await.unwrap();
    let served = served.load(Ordering::Relaxed);
    // Enough requests to have crossed every change above; the count itself depends on how
    // busy the machine is (48 in one run on a loaded 2-core box).
    assert!(served > 10, "the loop ran ({served} requests)");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests on B failed during the changes"
    );
    c.stop().await;
    drop(a);
}
