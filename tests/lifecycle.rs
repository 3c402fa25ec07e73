//! Model lifecycle and experiments, end to end over HTTP on a random port: register,
//! activate, roll back, rejected checkpoints, admin auth, keep-last-N, and experiment
//! attribution. Each test trains a tiny model on generated data (well under a second).

use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::catalog::Catalog;
use tandem::data::synthetic::{generate, GenerateConfig};
use tandem::domain::{EventType, Filter, ItemId, UserId};
use tandem::experiment::Experiments;
use tandem::http::admin::{self, AdminState};
use tandem::http::admin_client::{AdminClient, ClientError};
use tandem::index::{IndexPoint, Payload, VectorIndex};
use tandem::lifecycle::Lifecycle;
use tandem::model::{TrainConfig, TwoTower, UserEvent};
use tandem::registry::{ModelStatus, Registry};
use tandem::session::{Event, MemoryStore, SessionStore};

const KEY: &str = "s3cret-admin-key";

struct App {
    _dir: tempfile::TempDir,
    base: String,
    model: Arc<ArcSwap<TwoTower>>,
    index: Arc<dyn VectorIndex>,
    catalog: Arc<Catalog>,
    experiments: Arc<Experiments>,
    /// A second checkpoint on disk: the start-up one (`tt-a`) with another version id.
    ckpt_b: PathBuf,
    client: AdminClient,
}

fn tiny_checkpoints(dir: &Path) -> (PathBuf, PathBuf) {
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
    let a = dir.join("ckpt-a");
    let b = dir.join("ckpt-b");
    model.manifest_mut().model_version = "tt-a".into();
    model.save(&a).unwrap();
    model.manifest_mut().model_version = "tt-b".into();
    model.save(&b).unwrap();
    (a, b)
}

async fn spawn_app(admin_key: Option<&str>, keep_last: usize) -> App {
    let dir = tempfile::tempdir().unwrap();
    let (ckpt_a, ckpt_b) = tiny_checkpoints(dir.path());
    let model = TwoTower::load(&ckpt_a).unwrap();
    let items = tandem::data::read_items(&dir.path().join("data/items.csv")).unwrap();
    let index: Arc<dyn VectorIndex> = Arc::new(tandem::index::exact::ExactIndex::new());
    let vectors = model.embed_items(&items).unwrap();
    let points = items.iter().zip(vectors).map(|(i, v)| IndexPoint {
        vector: v,
        payload: Payload {
            item_id: i.item_id.clone(),
            categories: i.genres.clone(),
            available: i.available,
            price: i.price,
            created_at: i.created_at,
            title: i.title.clone(),
            popularity: 1.0,
        },
    });
    let bar = indicatif::ProgressBar::hidden();
    tandem::index::build_version(index.as_ref(), "tt-a-initial", model.dim(), points, &bar)
        .await
        .unwrap();
    let (catalog, _) = Catalog::load(items, index.as_ref(), |_, _| {})
        .await
        .unwrap();
    let catalog = Arc::new(catalog);
    let model = Arc::new(ArcSwap::from_pointee(model));
    let registry = Arc::new(Registry::open(&dir.path().join("srv"), keep_last).unwrap());
    let lifecycle = Arc::new(
        Lifecycle::start(
            registry,
            model.clone(),
            index.clone(),
            catalog.clone(),
            &ckpt_a,
        )
        .await
        .unwrap(),
    );
    let mut session = tandem::config::Settings::default().session;
    session.log_path = dir.path().join("events.log");
    let store: Arc<dyn SessionStore> =
        Arc::new(MemoryStore::open(&session, &session.log_path.clone()).unwrap());
    let experiments = Arc::new(Experiments::new(Vec::new(), store));
    let state = AdminState::new(lifecycle, experiments.clone(), admin_key);
    let app = axum::Router::new().nest("/admin", admin::router(state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    App {
        _dir: dir,
        client: AdminClient::new(&base, admin_key.map(String::from)),
        base,
        model,
        index,
        catalog,
        experiments,

        ckpt_b,
    }
}

/// What a recommendation request does with the model and the index: embed the user with the
/// model it loaded, then search. Returns the model version that answered.
async fn recommend_once(app: &App) -> Result<String, String> {
    let model = app.model.load_full();
    let entries = app.catalog.entries();
    let item = &entries[0].item;
    let history = [UserEvent {
        item,
        event_type: EventType::Click,
    }];
    let v = model.embed_user(&history).map_err(|e| e.to_string())?;
    let hits = app
        .index
        .search(&v, &Filter::default(), 10)
        .await
        .map_err(|e| e.to_string())?;
    if hits.is_empty() {
        return Err("no hits".into());
    }
    Ok(model.version().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_activate_rollback_with_requests_running_throughout() {
    let app = spawn_app(Some(KEY), 5).await;
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let app = Arc::new(app);
    let looper = {
        let (app, stop, served) = (app.clone(), stop.clone(), served.clone());
        tokio::spawn(async move {
            let mut versions = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let v = recommend_once(&app).await.expect("no request fails");
                if versions.last() != Some(&v) {
                    versions.push(v);
                }
                served.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
            versions
        })
    };

    let list = app.client.list().await.unwrap();
    assert_eq!(
        list.active.as_deref(),
        Some("tt-a"),
        "the start-up model is adopted"
    );

    let rec = app
        .client
        .register(app.ckpt_b.to_str().unwrap())
        .await
        .unwrap();
    assert_eq!(rec.version, "tt-b");
    assert_eq!(rec.status, ModelStatus::Registered);
    assert_eq!(rec.dim, 16);

    let started = app.client.activate("tt-b").await.unwrap();
    assert_eq!(started.model.status, ModelStatus::Indexing);
    let active = app
        .client
        .wait_active("tt-b", Duration::from_secs(30), |_| {})
        .await
        .unwrap();
    assert_eq!(active.status, ModelStatus::Active);
    assert_eq!(recommend_once(&app).await.unwrap(), "tt-b");
    let list = app.client.list().await.unwrap();
    let a = list.models.iter().find(|m| m.version == "tt-a").unwrap();
    assert_eq!(
        a.status,
        ModelStatus::Ready,
        "the old version keeps its collection for rollback"
    );
    assert!(a.collection.is_some());

    let t = Instant::now();
    let back = app.client.rollback().await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "rollback is instant");
    assert_eq!(back.active.version, "tt-a");
    assert_eq!(recommend_once(&app).await.unwrap(), "tt-a");
    let (_, live) = app.index.versions().await.unwrap();
    assert_eq!(
        live, a.collection,
        "the alias is back on the old collection"
    );

    // Nothing left to roll back to beyond the start-up model.
    let err = app.client.rollback().await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 409, .. }),
        "{err}"
    );

    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.store(true, Ordering::Relaxed);
    let versions = looper.await.unwrap();
    assert!(served.load(Ordering::Relaxed) > 10);
    assert_eq!(versions.first().map(String::as_str), Some("tt-a"));
    assert!(versions.iter().any(|v| v == "tt-b"), "{versions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_checkpoints_get_422_with_the_reason_and_change_nothing() {
    let app = spawn_app(Some(KEY), 5).await;
    let root = app.ckpt_b.parent().unwrap().to_path_buf();
    let copy = |name: &str| {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["model.safetensors", "manifest.json"] {
            std::fs::copy(app.ckpt_b.join(f), d.join(f)).unwrap();
        }
        d
    };
    let edit_manifest = |d: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let p = d.join("manifest.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    };

    let corrupt = copy("corrupt");
    let bytes = std::fs::read(corrupt.join("model.safetensors")).unwrap();
    std::fs::write(corrupt.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();

    let wrong_dims = copy("wrong-dims");
    edit_manifest(&wrong_dims, &|v| v["dim"] = 32.into());

    let bad_manifest = copy("bad-manifest");
    edit_manifest(&bad_manifest, &|v| {
        v.as_object_mut().unwrap().remove("features");
    });

    let future_format = copy("future-format");
    edit_manifest(&future_format, &|v| v["format_version"] = 99.into());

    let cases = [
        (&corrupt, "corrupt or truncated"),
        (&wrong_dims, "dims mismatch"),
        (&bad_manifest, "features"),
        (&future_format, "unknown checkpoint format version 99"),
    ];
    for (dir, reason) in cases {
        let err = app
            .client
            .register(dir.to_str().unwrap())
            .await
            .unwrap_err();
        match &err {
            ClientError::Api {
                status: 422,
                message,
                ..
            } => assert!(message.contains(reason), "{dir:?}: {message}"),
            other => panic!("{dir:?}: expected 422, got {other}"),
        }
    }
    let err = app.client.register("/no/such/dir").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 422, message, .. } if message.contains("not a directory")),
        "{err}"
    );

    let list = app.client.list().await.unwrap();
    assert_eq!(list.active.as_deref(), Some("tt-a"));
    assert_eq!(list.models.len(), 1, "nothing was registered");
    assert_eq!(recommend_once(&app).await.unwrap(), "tt-a");

    // Registering the same version twice is a conflict, not a second copy.
    app.client
        .register(app.ckpt_b.to_str().unwrap())
        .await
        .unwrap();
    let err = app
        .client
        .register(app.ckpt_b.to_str().unwrap())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 409, .. }),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_auth_401_for_missing_or_wrong_key_and_403_when_disabled() {
    let app = spawn_app(Some(KEY), 5).await;
    let http = reqwest::Client::new();
    let url = format!("{}/admin/models", app.base);

    let missing = http.get(&url).send().await.unwrap();
    assert_eq!(missing.status(), 401);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("X-API-Key"));

    let wrong = http
        .get(&url)
        .header("X-API-Key", "guess")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = http
        .get(&url)
        .header("X-API-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);

    // A guess sharing a long prefix with the key takes as long as a short wrong guess: both
    // are hashed before a constant-time comparison.
    let near = format!("{}x", &KEY[..KEY.len() - 1]);
    let median = |guess: String| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let mut t = Vec::new();
            for _ in 0..150 {
                let s = Instant::now();
                let r = http
                    .get(&url)
                    .header("X-API-Key", &guess)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 401);
                t.push(s.elapsed());
            }
            t.sort();
            t[t.len() / 2]
        }
    };
    let short = median("x".into()).await;
    let long = median(near).await;
    let ratio = long.as_secs_f64() / short.as_secs_f64();
    assert!((0.5..2.0).contains(&ratio), "median {long:?} vs {short:?}");

    let disabled = spawn_app(None, 5).await;
    let r = http
        .get(format!("{}/admin/models", disabled.base))
        .header("X-API-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("TANDEM_ADMIN_KEY"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_last_n_collects_old_versions_but_never_the_active_or_rollback_target() {
    let app = spawn_app(Some(KEY), 2).await;
    let root = app.ckpt_b.parent().unwrap().to_path_buf();
    for v in ["tt-c", "tt-d", "tt-e"] {
        let d = root.join(v);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(
            app.ckpt_b.join("model.safetensors"),
            d.join("model.safetensors"),
        )
        .unwrap();
        let mut m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(app.ckpt_b.join("manifest.json")).unwrap(),
        )
        .unwrap();
        m["model_version"] = v.into();
        std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
        app.client.register(d.to_str().unwrap()).await.unwrap();
    }
    let versions: Vec<String> = app
        .client
        .list()
        .await
        .unwrap()
        .models
        .into_iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(
        versions,
        ["tt-a", "tt-e"],
        "keeps the active one and the newest"
    );

    app.client.activate("tt-e").await.unwrap();
    app.client
        .wait_active("tt-e", Duration::from_secs(30), |_| {})
        .await
        .unwrap();
    let (collections, _) = app.index.versions().await.unwrap();
    assert_eq!(
        collections.len(),
        2,
        "active and rollback target: {collections:?}"
    );
    assert_eq!(app.client.rollback().await.unwrap().active.version, "tt-a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clicks_with_a_variant_show_up_in_that_variants_ctr() {
    let app = spawn_app(Some(KEY), 5).await;
    let http = reqwest::Client::new();
    let put = |body: serde_json::Value| {
        http.put(format!("{}/admin/experiments", app.base))
            .header("X-API-Key", KEY)
            .json(&body)
            .send()
    };
    let bad = put(serde_json::json!({"experiments": [{
        "name": "home", "salt": "s1",
        "variants": [{"name": "control", "share": 0.5}, {"name": "fresh", "share": 0.6}]
    }]}))
    .await
    .unwrap();
    assert_eq!(bad.status(), 422);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert_eq!(body["field"], "experiments[0].variants");
    assert!(
        body["message"].as_str().unwrap().contains("sum to 1.1"),
        "{body}"
    );

    let ok = put(serde_json::json!({"experiments": [{
        "name": "home", "salt": "s1",
        "variants": [
            {"name": "control", "share": 0.5},
            {"name": "fresh", "share": 0.5, "rerank": {"freshness": 0.5}}
        ]
    }]}))
    .await
    .unwrap();
    assert_eq!(ok.status(), 200);

    // 40 users see a list; every user in `fresh` clicks, nobody in control does.
    let mut fresh_users = 0;
    let mut events = Vec::new();
    for u in 0..40 {
        let user = UserId::parse(&format!("user-{u}")).unwrap();
        let a = app.experiments.assign(Some(&user), None).unwrap();
        let request_id = uuid::Uuid::new_v4().to_string();
        app.experiments
            .record_served(&a, &request_id, Duration::from_millis(3));
        if a.variant == "fresh" {
            fresh_users += 1;
            let mut e = event(&user, EventType::Click);
            e.variant = Some("fresh".into());
            events.push(e);
        }
    }
    // A purchase that cites only its request id is attributed through it.
    let user = UserId::parse("buyer").unwrap();
    let a = app.experiments.assign(Some(&user), None).unwrap();
    app.experiments
        .record_served(&a, "req-buyer", Duration::from_millis(3));
    tokio::time::sleep(Duration::from_millis(50)).await; // the request id is stored async
    let mut purchase = event(&user, EventType::Purchase);
    purchase.context = Some(serde_json::json!({"request_id": "req-buyer"}));
    events.push(purchase);
    app.experiments.attribute(&events).await;

    let report: serde_json::Value = http
        .get(format!("{}/admin/experiments/home", app.base))
        .header("X-API-Key", KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let variant = |name: &str| {
        report["variants"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap()
            .clone()
    };
    let fresh = variant("fresh");
    let control = variant("control");
    let buyer_in_fresh = (a.variant == "fresh") as u64;
    assert_eq!(fresh["clicks"], fresh_users);
    assert_eq!(fresh["impressions"], fresh_users + buyer_in_fresh);
    assert_eq!(control["clicks"], 0);
    assert_eq!(
        variant(&a.variant)["purchases"],
        1,
        "attributed via request_id"
    );
    assert_eq!(control["ctr"]["value"], 0.0);
    assert!(fresh["ctr"]["value"].as_f64().unwrap() > 0.9);
    assert!(fresh["ctr"]["ci_low"].as_f64().unwrap() > control["ctr"]["ci_high"].as_f64().unwrap());
    assert!(
        (fresh["p99_ms"].as_f64().unwrap() - 3.0).abs() < 0.4,
        "{fresh}"
    );

    let missing = http
        .get(format!("{}/admin/experiments/nope", app.base))
        .header("X-API-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

fn event(user: &UserId, t: EventType) -> Event {
    Event {
        event_id: uuid::Uuid::new_v4(),
        user_id: Some(user.clone()),
        session_id: None,
        item_id: ItemId::parse("i1").unwrap(),
        event_type: t,
        value: None,
        timestamp_ms: 1_700_000_000_000,
        variant: None,
        context: None,
        categories: Vec::new(),
    }
}
