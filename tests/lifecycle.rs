//! Model lifecycle and experiments, end to end against `tandem::http::serve` on a random
//! port: register, activate and roll back with recommendation requests running throughout,
//! rejected checkpoints, admin auth, keep-last-N, and experiment assignment and attribution.
//! Each app trains a tiny model on generated data (well under a second).

mod common;

use common::{eventually, tiny_checkpoints, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem::config::{AdminKey, IndexBackend, SessionBackend, Settings};
use tandem::http::admin_client::{AdminClient, ClientError};
use tandem::model::TrainConfig;
use tandem::registry::ModelStatus;

const KEY: &str = "s3cret-admin-key";

/// A server on the tiny model `tt-a` (`common::TestApp`), with an admin client.
struct App {
    app: TestApp,
    client: AdminClient,
    /// A second checkpoint: the start-up one (`tt-a`) with another version id.
    ckpt_b: PathBuf,
    /// The generated catalog and interactions the models were trained on.
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for App {
    type Target = TestApp;
    fn deref(&self) -> &TestApp {
        &self.app
    }
}

async fn spawn_app(admin_key: Option<&str>, keep_last: usize) -> App {
    let dir = tempfile::tempdir().unwrap();
    let (data, ckpts) = tiny_checkpoints(dir.path(), &["tt-a", "tt-b"]);
    let [ckpt_a, ckpt_b] = <[PathBuf; 2]>::try_from(ckpts).unwrap();
    let mut settings = Settings {
        data_dir: dir.path().join("srv"),
        model_path: ckpt_a,
        admin_key: AdminKey(admin_key.map(String::from)),
        ..Settings::default()
    };
    settings.index.backend = IndexBackend::Exact;
    settings.session.backend = SessionBackend::Memory;
    settings.server.catalog_dir = data.clone();
    settings.registry.keep_last = keep_last;
    let app = TestApp::spawn(settings).await;
    App {
        client: AdminClient::new(&app.base, admin_key.map(String::from)),
        app,
        ckpt_b,
        data,
        _dir: dir,
    }
}

impl App {
    async fn recommend(&self, user: &str) -> Result<Value, String> {
        let r = self
            .http
            .get(format!(
                "{}/v1/recommendations?user_id={user}&k=5",
                self.base
            ))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let body: Value = r.json().await.map_err(|e| e.to_string())?;
        if status != StatusCode::OK || body["items"].as_array().is_none_or(|a| a.is_empty()) {
            return Err(format!("{status}: {body}"));
        }
        Ok(body)
    }

    /// The `model_version` a recommendation response carries.
    async fn serving_version(&self) -> String {
        self.recommend("u-probe").await.unwrap()["model_version"]
            .as_str()
            .unwrap()
            .to_string()
    }
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
                let body = app.recommend("u-loop").await.expect("no request fails");
                let v = body["model_version"].as_str().unwrap().to_string();
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
    assert_eq!(app.serving_version().await, "tt-b");
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
    assert_eq!(app.serving_version().await, "tt-a");
    let list = app.client.list().await.unwrap();
    let a_now = list.models.iter().find(|m| m.version == "tt-a").unwrap();
    assert_eq!(a_now.collection, a.collection, "back on the old collection");
    let b_now = list.models.iter().find(|m| m.version == "tt-b").unwrap();
    assert_eq!(
        b_now.status,
        ModelStatus::Ready,
        "re-activating tt-b is instant"
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
    assert_eq!(app.serving_version().await, "tt-a");

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

    // A guess sharing all but the last byte with the key takes as long as a one-byte guess
    // (both are hashed before a constant-time comparison, see `http::admin`). The two are
    // timed in alternation, so that load from other tests slows both alike.
    let near = format!("{}x", &KEY[..KEY.len() - 1]);
    let (mut short, mut long) = (Vec::new(), Vec::new());
    for i in 0..400 {
        for (guess, times) in [("x", &mut short), (near.as_str(), &mut long)] {
            let s = Instant::now();
            let r = http
                .get(&url)
                .header("X-API-Key", guess)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 401, "request {i}");
            times.push(s.elapsed());
        }
    }
    let median = |t: &mut Vec<Duration>| {
        t.sort();
        t[t.len() / 2]
    };
    let (short, long) = (median(&mut short), median(&mut long));
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
    // Said once: the admin page shows this message as it is.
    assert_eq!(
        body["message"]
            .as_str()
            .unwrap()
            .matches("disabled")
            .count(),
        1,
        "{body}"
    );
}

/// Checkpoint b's weights under another version id, beside it.
fn checkpoint_b_as(app: &App, version: &str) -> PathBuf {
    let d = app.ckpt_b.parent().unwrap().join(version);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(
        app.ckpt_b.join("model.safetensors"),
        d.join("model.safetensors"),
    )
    .unwrap();
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(app.ckpt_b.join("manifest.json")).unwrap())
            .unwrap();
    m["model_version"] = version.into();
    std::fs::write(d.join("manifest.json"), m.to_string()).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_last_n_collects_old_versions_but_never_the_active_or_rollback_target() {
    let app = spawn_app(Some(KEY), 2).await;
    for v in ["tt-c", "tt-d", "tt-e"] {
        let d = checkpoint_b_as(&app, v);
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
    let kept: Vec<_> = app
        .client
        .list()
        .await
        .unwrap()
        .models
        .into_iter()
        .filter(|m| m.collection.is_some())
        .map(|m| m.version)
        .collect();
    assert_eq!(
        kept,
        ["tt-a", "tt-e"],
        "only the active and rollback collections are kept"
    );
    assert_eq!(app.client.rollback().await.unwrap().active.version, "tt-a");
}

/// A/B testing two checkpoints on live traffic: a prepared second model serves its variant
/// from its own collection while control keeps the active model, catalog writes reach both,
/// and activating the challenger afterwards serves exactly what its arm served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_experiment_serves_a_second_model_beside_the_active_one() {
    let app = spawn_app(Some(KEY), 5).await;
    let http = reqwest::Client::new();
    // A genuinely different model: same data, another seed.
    let cfg = TrainConfig {
        dim: 16,
        input_dim: 16,
        hidden: 32,
        epochs: 1,
        batch_size: 512,
        progress: false,
        seed: 99,
        ..TrainConfig::default()
    };
    let (mut model, _) = tandem::model::train_on_data(&cfg, &app.data, false).unwrap();
    model.manifest_mut().model_version = "tt-c".into();
    let ckpt_c = app.data.parent().unwrap().join("ckpt-c");
    model.save(&ckpt_c).unwrap();
    app.client.register(ckpt_c.to_str().unwrap()).await.unwrap();
    let put = |body: serde_json::Value| {
        http.put(format!("{}/admin/experiments", app.base))
            .header("X-API-Key", KEY)
            .json(&body)
            .send()
    };
    let experiment = |enabled: bool| {
        json!({"experiments": [{
            "name": "two-towers", "salt": "s9", "enabled": enabled,
            "variants": [
                {"name": "control", "share": 0.5},
                {"name": "challenger", "share": 0.5, "model_version": "tt-c"}
            ]
        }]})
    };

    // Not servable before it has a collection; the error says how to make one.
    let r = put(experiment(true)).await.unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["field"], "experiments[0].variants[1].model_version");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("/admin/models/tt-c/prepare"),
        "{body}"
    );

    let started = app.client.prepare("tt-c").await.unwrap();
    assert_eq!(started.status, ModelStatus::Indexing);
    let ready = app
        .client
        .wait_ready("tt-c", Duration::from_secs(30), |_| {})
        .await
        .unwrap();
    assert!(ready.collection.is_some());
    assert_eq!(
        app.serving_version().await,
        "tt-a",
        "preparing switches nothing"
    );
    assert_eq!(put(experiment(true)).await.unwrap().status(), 200);

    // Each user clicks a few items, so that recommendations are personal.
    let popular: Value = http
        .get(format!("{}/v1/trending?k=12", app.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let popular: Vec<String> = popular["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["item_id"].as_str().unwrap().to_string())
        .collect();
    let users: Vec<String> = (0..24).map(|u| format!("ab-{u}")).collect();
    let mut events = Vec::new();
    for (u, user) in users.iter().enumerate() {
        for j in [u, u + 5, u + 7] {
            events.push(
                json!({"user_id": user, "item_id": popular[j % popular.len()], "type": "click"}),
            );
        }
    }
    let r = http
        .post(format!("{}/v1/events", app.base))
        .json(&events)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);

    let items = |body: &Value| -> Vec<String> {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["item_id"].as_str().unwrap().to_string())
            .collect()
    };
    let mut arm_lists = std::collections::HashMap::new();
    let mut control_users = 0;
    for user in &users {
        let body = app.recommend(user).await.unwrap();
        assert!(
            ["personal", "cached"].contains(&body["source"].as_str().unwrap()),
            "{body}"
        );
        match body["variant"].as_str().unwrap() {
            "challenger" => {
                assert_eq!(body["model_version"], "tt-c", "{body}");
                arm_lists.insert(user.clone(), items(&body));
            }
            _ => {
                assert_eq!(body["model_version"], "tt-a", "{body}");
                control_users += 1;
            }
        }
    }
    assert!(
        control_users > 0 && !arm_lists.is_empty(),
        "both variants get traffic"
    );

    // Catalog writes reach the challenger's collection too.
    let (arm_user, arm_items) = arm_lists.iter().next().unwrap();
    let hidden = arm_items[0].clone();
    let r = http
        .patch(format!("{}/v1/items/{hidden}", app.base))
        .header("X-API-Key", KEY)
        .json(&json!({"available": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let after = app.recommend(arm_user).await.unwrap();
    assert_eq!(after["model_version"], "tt-c");
    assert!(!items(&after).contains(&hidden), "{after}");
    let r = http
        .post(format!("{}/v1/items", app.base))
        .header("X-API-Key", KEY)
        .json(&json!({"items": [{"item_id": "brand-new", "title": "Brand new", "categories": ["Novelty"]}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    let novelty: Value = http
        .get(format!(
            "{}/v1/recommendations?user_id={arm_user}&category=Novelty",
            app.base
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(novelty["model_version"], "tt-c");
    assert_eq!(items(&novelty), ["brand-new"], "{novelty}");
    // Put the catalog back as it was when the arm's lists were taken.
    let r = http
        .delete(format!("{}/v1/items/brand-new", app.base))
        .header("X-API-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let gone: Value = http
        .get(format!(
            "{}/v1/recommendations?user_id={arm_user}&category=Novelty",
            app.base
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(gone["items"], json!([]), "{gone}");
    http.patch(format!("{}/v1/items/{hidden}", app.base))
        .header("X-API-Key", KEY)
        .json(&json!({"available": true}))
        .send()
        .await
        .unwrap();

    // With the experiment off, everyone gets the active model, and the two models disagree.
    assert_eq!(put(experiment(false)).await.unwrap().status(), 200);
    let mut differ = 0;
    for (user, arm_items) in &arm_lists {
        let body = app.recommend(user).await.unwrap();
        assert_eq!(body["model_version"], "tt-a");
        if &items(&body) != arm_items {
            differ += 1;
        }
    }
    assert!(differ > 0, "the challenger's lists are its own");

    // Activating the challenger is instant (its collection is ready) and serves what its arm did.
    let switched = app.client.activate("tt-c").await.unwrap();
    assert_eq!(
        switched.outcome,
        tandem::lifecycle::ActivateOutcome::Switched
    );
    // tt-c answers at once; the catalog moves to tt-c's vectors in the background (300
    // items: milliseconds, but a busy box may take longer), and the lists match the arm's
    // once it has. Waited for with a deadline, then checked user by user.
    for user in arm_lists.keys() {
        assert_eq!(app.recommend(user).await.unwrap()["model_version"], "tt-c");
    }
    let same_as_arm = || async {
        for (user, arm_items) in &arm_lists {
            if &items(&app.recommend(user).await.unwrap()) != arm_items {
                return false;
            }
        }
        true
    };
    eventually(
        "tt-c serves what its arm did",
        Duration::from_secs(30),
        same_as_arm,
    )
    .await;
    for (user, arm_items) in &arm_lists {
        let body = app.recommend(user).await.unwrap();
        assert_eq!(body["model_version"], "tt-c");
        assert_eq!(&items(&body), arm_items, "{user}");
    }
}

/// The model an experiment pins keeps its collection and keeps serving its variant while the
/// active model moves on twice (which would otherwise retire it), and a prepared version
/// keeps its collection through an activation of another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_experiments_model_keeps_serving_while_the_active_one_moves_on() {
    let app = spawn_app(Some(KEY), 5).await;
    let d = checkpoint_b_as(&app, "tt-c");
    app.client
        .register(app.ckpt_b.to_str().unwrap())
        .await
        .unwrap();
    app.client.register(d.to_str().unwrap()).await.unwrap();
    app.client.prepare("tt-c").await.unwrap();
    app.client
        .wait_ready("tt-c", Duration::from_secs(30), |_| {})
        .await
        .unwrap();
    let err = app.client.prepare("tt-c").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 409, message, .. } if message.contains("already has a collection")),
        "{err}"
    );

    // The start-up model is the challenger: it serves its variant as the active model now.
    let r = app
        .http
        .put(format!("{}/admin/experiments", app.base))
        .header("X-API-Key", KEY)
        .json(&json!({"experiments": [{
            "name": "keep-a", "salt": "k1",
            "variants": [
                {"name": "control", "share": 0.5},
                {"name": "old-model", "share": 0.5, "model_version": "tt-a"}
            ]
        }]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    app.client.activate("tt-b").await.unwrap();
    app.client
        .wait_active("tt-b", Duration::from_secs(30), |_| {})
        .await
        .unwrap();
    let list = app.client.list().await.unwrap();
    let c = list.models.iter().find(|m| m.version == "tt-c").unwrap();
    assert_eq!(c.status, ModelStatus::Ready, "the prepared version is kept");
    assert!(c.collection.is_some());
    // tt-c was prepared, so this switch is instant; tt-a falls out of the rollback slot.
    let switched = app.client.activate("tt-c").await.unwrap();
    assert_eq!(
        switched.outcome,
        tandem::lifecycle::ActivateOutcome::Switched
    );
    let list = app.client.list().await.unwrap();
    let a = list.models.iter().find(|m| m.version == "tt-a").unwrap();
    assert!(
        a.collection.is_some(),
        "the pinned version keeps its collection: {a:?}"
    );

    let mut served = std::collections::HashMap::<String, String>::new();
    for u in 0..30 {
        let body = app.recommend(&format!("keep-{u}")).await.unwrap();
        served.insert(
            body["variant"].as_str().unwrap().to_string(),
            body["model_version"].as_str().unwrap().to_string(),
        );
    }
    assert_eq!(
        served.get("old-model").map(String::as_str),
        Some("tt-a"),
        "{served:?}"
    );
    assert_eq!(
        served.get("control").map(String::as_str),
        Some("tt-c"),
        "{served:?}"
    );
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

    // 40 users get recommendations; every user in `fresh` clicks, nobody in control does.
    let mut fresh_users = 0u64;
    let mut per_variant = std::collections::HashMap::<String, u64>::new();
    let mut events = Vec::new();
    for u in 0..40 {
        let user = format!("user-{u}");
        let body = app.recommend(&user).await.unwrap();
        let variant = body["variant"].as_str().unwrap().to_string();
        assert_eq!(
            app.recommend(&user).await.unwrap()["variant"],
            variant.as_str(),
            "the same user stays in the same variant"
        );
        *per_variant.entry(variant.clone()).or_default() += 2;
        if variant == "fresh" {
            fresh_users += 1;
            events.push(json!({
                "user_id": user, "item_id": body["items"][0]["item_id"],
                "type": "click", "variant": "fresh"
            }));
        }
    }
    assert!(
        per_variant.len() == 2,
        "both arms get traffic: {per_variant:?}"
    );
    // Onboarding's first page is served like any other: an impression of the user's variant.
    let seen = app.recommend("user-0").await.unwrap();
    *per_variant
        .entry(seen["variant"].as_str().unwrap().to_string())
        .or_default() += 1;
    let liked = seen["items"][0]["item_id"].clone();
    let r = http
        .post(format!("{}/v1/users/newcomer/onboarding", app.base))
        .json(&json!({"liked_items": [liked]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let onboarded: Value = r.json().await.unwrap();
    let onboarded_variant = onboarded["recommendations"]["variant"].as_str().unwrap();
    *per_variant
        .entry(onboarded_variant.to_string())
        .or_default() += 1;
    // A purchase that cites only its request id is attributed through it.
    let body = app.recommend("buyer").await.unwrap();
    let buyer_variant = body["variant"].as_str().unwrap().to_string();
    *per_variant.entry(buyer_variant.clone()).or_default() += 1;
    events.push(json!({
        "user_id": "buyer", "item_id": body["items"][0]["item_id"], "type": "purchase",
        "context": {"request_id": body["request_id"]}
    }));
    let r = http
        .post(format!("{}/v1/events", app.base))
        .json(&events)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Attribution runs after the 202: wait until every outcome is counted (a deadline, not
    // a fixed sleep, which flakes on busy cores).
    let outcomes = fresh_users + 1;
    let report = || async {
        http.get(format!("{}/admin/experiments/home", app.base))
            .header("X-API-Key", KEY)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    let counted = |report: &Value| -> u64 {
        report["variants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["clicks"].as_u64().unwrap_or(0) + v["purchases"].as_u64().unwrap_or(0))
            .sum()
    };
    eventually(
        "every outcome is counted",
        Duration::from_secs(20),
        || async { counted(&report().await) >= outcomes },
    )
    .await;
    let report = report().await;
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
    assert_eq!(fresh["clicks"], fresh_users);
    assert_eq!(fresh["impressions"], per_variant["fresh"]);
    assert_eq!(control["impressions"], per_variant["control"]);
    assert_eq!(control["clicks"], 0);
    assert_eq!(
        variant(&buyer_variant)["purchases"],
        1,
        "attributed via request_id"
    );
    assert_eq!(control["ctr"]["value"], 0.0);
    // Each user was served twice and clicked once.
    let ctr = fresh["ctr"]["value"].as_f64().unwrap();
    assert!((ctr - fresh_users as f64 / per_variant["fresh"] as f64).abs() < 1e-9);
    assert!(ctr > 0.4, "{fresh}");
    assert!(fresh["ctr"]["ci_low"].as_f64().unwrap() > control["ctr"]["ci_high"].as_f64().unwrap());
    let p99 = fresh["p99_ms"].as_f64().unwrap();
    assert!(p99 > 0.0 && p99 < 10_000.0, "{fresh}");

    let missing = http
        .get(format!("{}/admin/experiments/nope", app.base))
        .header("X-API-Key", KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}
