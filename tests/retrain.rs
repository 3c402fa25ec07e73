//! The offline retrain loop end to end, against a running server (`tests/common`): events are
//! posted through `POST /v1/events`, retrains are started with `POST /admin/retrain` and
//! followed through `GET /admin/retrain`, a better candidate is activated, a deliberately
//! worse one (trained on shuffled item ids) is held back, and recommendations never fail
//! meanwhile. Training is tiny (16-d towers on a few thousand rows: seconds).

mod common;

use common::{eventually, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tandem::config::{AdminKey, IndexBackend, SessionBackend, Settings};
use tandem::data::synthetic::{generate, GenerateConfig};
use tandem::domain::Interaction;
use tandem::model::TrainConfig;

const KEY: &str = "retrain-admin-key";
const DAY: i64 = 86_400;

fn tiny() -> TrainConfig {
    TrainConfig {
        dim: 16,
        input_dim: 16,
        hidden: 32,
        epochs: 2,
        batch_size: 256,
        progress: false,
        ..TrainConfig::default()
    }
}

/// Generated data, and the starting model: a stale, poor one. It was trained on the oldest
/// 30% of the rows with the item ids shuffled, and its manifest names the (real) oldest rows
/// as its training data, which the retrain gathers along with the posted events.
fn fixture(dir: &Path) -> (PathBuf, PathBuf, Vec<Interaction>) {
    let data = dir.join("data");
    generate(
        &GenerateConfig {
            items: 300,
            users: 100,
            interactions: 6_000,
            seed: 11,
        },
        &data,
    )
    .unwrap();
    let mut d = tandem::data::Dataset::load(&data).unwrap();
    live_times(&mut d.interactions);
    let mut times: Vec<i64> = d.interactions.iter().map(|r| r.timestamp).collect();
    times.sort_unstable();
    let cut = times[times.len() * 3 / 10];
    let old: Vec<Interaction> = d
        .interactions
        .iter()
        .filter(|r| r.timestamp < cut)
        .cloned()
        .collect();
    let old_dir = dir.join("old");
    std::fs::create_dir_all(&old_dir).unwrap();
    tandem::data::format::write_items(&old_dir.join("items.csv"), &d.items, true).unwrap();
    tandem::data::format::write_interactions(&old_dir.join("interactions.csv"), &old, true)
        .unwrap();
    // The same rows with every item id moved to another item's.
    let ids: Vec<_> = d.items.iter().map(|i| i.item_id.clone()).collect();
    let shuffled: Vec<Interaction> = old
        .iter()
        .map(|r| {
            let k = ids.iter().position(|i| *i == r.item_id).unwrap();
            Interaction {
                item_id: ids[(k * 7 + 13) % ids.len()].clone(),
                ..r.clone()
            }
        })
        .collect();
    let shuffled_dir = dir.join("shuffled");
    std::fs::create_dir_all(&shuffled_dir).unwrap();
    tandem::data::format::write_items(&shuffled_dir.join("items.csv"), &d.items, true).unwrap();
    tandem::data::format::write_interactions(
        &shuffled_dir.join("interactions.csv"),
        &shuffled,
        true,
    )
    .unwrap();
    let (mut model, _) = tandem::model::train_on_data(&tiny(), &shuffled_dir, false).unwrap();
    model.manifest_mut().model_version = "tt-stale".into();
    model.manifest_mut().data.source = old_dir.display().to_string();
    let ckpt = dir.join("ckpt-stale");
    model.save(&ckpt).unwrap();
    (data, ckpt, d.interactions)
}

/// The generator gives each user a timeline of their own across a year and more, so its
/// last days hold one or two users: too few to score. Live traffic has every user active
/// through the same weeks, so each user's rows are spread, in their order, over the same 100
/// days (plus a per-user offset under an hour).
fn live_times(rows: &mut [Interaction]) {
    let mut by_user: std::collections::HashMap<String, Vec<usize>> = Default::default();
    for (i, r) in rows.iter().enumerate() {
        by_user.entry(r.user_id.to_string()).or_default().push(i);
    }
    let start = 1_735_689_600; // 2025-01-01
    for (u, mut idx) in by_user {
        idx.sort_by_key(|&i| rows[i].timestamp);
        let n = idx.len() as i64;
        let offset = u.bytes().map(i64::from).sum::<i64>() % 3_600;
        for (k, i) in idx.into_iter().enumerate() {
            rows[i].timestamp = start + k as i64 * 100 * DAY / n + offset;
        }
    }
}

fn settings(dir: &Path, data: &Path, ckpt: &Path) -> Settings {
    let mut s = Settings {
        data_dir: dir.join("srv"),
        model_path: ckpt.to_path_buf(),
        admin_key: AdminKey(Some(KEY.into())),
        ..Settings::default()
    };
    s.index.backend = IndexBackend::Exact;
    s.session.backend = SessionBackend::Memory;
    s.server.catalog_dir = data.to_path_buf();
    s.retrain.window = "400d".into();
    s.retrain.holdout = "10d".into();
    s.retrain.margin = 0.05;
    s.retrain.epochs = 4;
    s.retrain.min_rows = 100;
    s
}

async fn admin(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = app
        .http
        .request(method, app.url(path))
        .header("x-api-key", KEY);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn post_events(app: &TestApp, rows: &[Interaction]) {
    for chunk in rows.chunks(500) {
        let events: Vec<Value> = chunk
            .iter()
            .map(|r| {
                json!({
                    "user_id": r.user_id.as_str(),
                    "item_id": r.item_id.as_str(),
                    "type": r.event_type.as_str(),
                    "value": r.rating,
                    "timestamp": r.timestamp,
                })
            })
            .collect();
        let r = app
            .http
            .post(app.url("/v1/events"))
            .json(&events)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED, "{:?}", r.text().await);
    }
}

/// Starts a retrain and follows it to its report; returns the report and every stage seen
/// while it ran.
async fn retrain(app: &TestApp, body: Value) -> (Value, Vec<String>) {
    let (status, started) = admin(app, reqwest::Method::POST, "/admin/retrain", Some(body)).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{started}");
    let id = started["id"].as_str().unwrap().to_string();
    let mut seen: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let (status, st) = admin(app, reqwest::Method::GET, "/admin/retrain", None).await;
        assert_eq!(status, StatusCode::OK, "{st}");
        if let Some(r) = st["runs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == id)
        {
            return (r.clone(), seen);
        }
        if let Some(stage) = st["running"]["stage"].as_str() {
            if seen.last().map(String::as_str) != Some(stage) {
                seen.push(stage.to_string());
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "retrain {id} did not finish"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

fn key(r: &Interaction) -> (String, String, i64) {
    (r.user_id.to_string(), r.item_id.to_string(), r.timestamp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_better_candidate_is_promoted_and_a_worse_one_held_back_while_serving_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ckpt, rows) = fixture(dir.path());
    let app = TestApp::spawn(settings(dir.path(), &data, &ckpt)).await;
    post_events(&app, &rows).await;

    // Recommendations for every kind of user, all through both runs.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let versions = Arc::new(parking_lot::Mutex::new(HashSet::<String>::new()));
    let traffic = {
        let (stop, served, failures, versions) = (
            stop.clone(),
            served.clone(),
            failures.clone(),
            versions.clone(),
        );
        let (http, base) = (app.http.clone(), app.base.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let url = format!("{base}/v1/recommendations?user_id={}&k=10", n % 120);
                match http.get(&url).send().await {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let v: Value = r.json().await.unwrap();
                        if v["items"].as_array().is_none_or(|a| a.is_empty()) {
                            failures.lock().push(format!("empty: {v}"));
                        }
                        versions
                            .lock()
                            .insert(v["model_version"].as_str().unwrap_or("").into());
                    }
                    Ok(r) => {
                        let line = format!("{}: {:?}", r.status(), r.text().await);
                        failures.lock().push(line);
                    }
                    Err(e) => failures.lock().push(e.to_string()),
                }
                served.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };

    // 1. The stale model is replaced by one trained on the events.
    let (first, seen) = retrain(&app, json!({})).await;
    assert_eq!(first["decision"], "promoted", "{first:#}");
    let id = first["id"].as_str().unwrap().to_string();
    assert_eq!(first["candidate"], id);
    assert_eq!(first["active"], "tt-stale");
    assert!(
        seen.contains(&"train".to_string()),
        "the run showed its stages: {seen:?}"
    );
    let stages: Vec<&str> = first["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["gather", "split", "train", "gate", "promote"]);
    let (c, a) = (
        first["candidate_metrics"]["recall@20"].as_f64().unwrap(),
        first["active_metrics"]["recall@20"].as_f64().unwrap(),
    );
    assert!(c > a * 1.05, "promoted past the margin: {c} vs {a}");
    for m in ["ndcg@10", "recall@20"] {
        assert!(
            first["candidate_metrics"][m].is_number(),
            "{m} in {first:#}"
        );
        assert!(first["active_metrics"][m].is_number(), "{m} in {first:#}");
    }
    let counts = &first["counts"];
    assert_eq!(
        counts["events"],
        rows.len(),
        "every posted event was gathered"
    );
    assert!(counts["model_rows"].as_u64().unwrap() > 0, "{counts}");
    assert_eq!(
        counts["rows"],
        rows.len(),
        "the model's rows are among the events: counted once"
    );
    let (status, models) = admin(&app, reqwest::Method::GET, "/admin/models", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(models["active"], id.as_str(), "{models:#}");
    eventually("the candidate serves", Duration::from_secs(10), || async {
        app.get("/v1/recommendations?user_id=3&k=5").await.1["model_version"] == id.as_str()
    })
    .await;

    // The held-out slice never reached training: the rows the candidate was trained on (its
    // manifest's data source) and the held-out rows are disjoint, split at `holdout_from`.
    let run_dir = PathBuf::from(first["dir"].as_str().unwrap());
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("model/manifest.json")).unwrap(),
    )
    .unwrap();
    let train_dir = run_dir.join("train");
    assert_eq!(manifest["data"]["source"], train_dir.display().to_string());
    let trained = tandem::data::read_interactions(&train_dir.join("interactions.csv")).unwrap();
    let held = tandem::data::read_interactions(&run_dir.join("holdout.csv")).unwrap();
    assert_eq!(manifest["data"]["interactions"], trained.len());
    assert_eq!(counts["train_rows"], trained.len());
    assert_eq!(counts["holdout_rows"], held.len());
    assert!(!held.is_empty());
    let from = first["holdout_from"].as_i64().unwrap();
    let newest = rows.iter().map(|r| r.timestamp).max().unwrap();
    assert_eq!(from, newest - 10 * DAY + 1);
    let trained_keys: HashSet<_> = trained.iter().map(key).collect();
    let held_keys: HashSet<_> = held.iter().map(key).collect();
    assert!(
        trained_keys.is_disjoint(&held_keys),
        "a held-out row was trained on"
    );
    assert!(trained.iter().all(|r| r.timestamp < from));
    let expected_held: HashSet<_> = rows
        .iter()
        .filter(|r| r.timestamp >= from)
        .map(key)
        .collect();
    assert_eq!(
        held_keys, expected_held,
        "the slice is exactly the newest 10 days of events"
    );
    let all: HashSet<_> = rows.iter().map(key).collect();
    assert_eq!(
        trained_keys.union(&held_keys).count(),
        all.len(),
        "nothing else was lost"
    );

    // 2. A control run on shuffled items: worse than the model it just promoted, held back.
    let (second, _) = retrain(&app, json!({"shuffle_items": true})).await;
    assert_eq!(second["decision"], "held_back", "{second:#}");
    assert_eq!(second["shuffled_items"], true);
    assert_eq!(second["active"], id.as_str());
    assert!(
        second["reason"].as_str().unwrap().contains("does not beat"),
        "{second:#}"
    );
    let (_, models) = admin(&app, reqwest::Method::GET, "/admin/models", None).await;
    assert_eq!(
        models["active"],
        id.as_str(),
        "the held-back candidate does not serve"
    );
    let held_back = second["candidate"].as_str().unwrap();
    assert!(
        !models["models"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["version"] == held_back),
        "a held-back candidate is not registered"
    );

    // The reports: both decisions in the registry, as GET /admin/models shows it.
    let runs = models["retrain_runs"].as_array().unwrap();
    let decisions: Vec<&str> = runs
        .iter()
        .map(|r| r["decision"].as_str().unwrap())
        .collect();
    assert_eq!(decisions, ["promoted", "held_back"]);
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tandem_retrain_runs_total{decision=\"held_back\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tandem_retrain_gate{"),
        "the gate metrics are exported"
    );

    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    let failures = failures.lock().clone();
    assert!(
        failures.is_empty(),
        "serving failed during the retrains: {failures:?}"
    );
    assert!(served.load(Ordering::Relaxed) > 20);
    assert!(versions.lock().contains(&id), "the promoted model served");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_nothing_to_learn_fails_with_the_reason_and_the_model_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ckpt, _) = fixture(dir.path());
    // No events, and the model's training data is gone.
    std::fs::remove_dir_all(dir.path().join("old")).unwrap();
    let app = TestApp::spawn(settings(dir.path(), &data, &ckpt)).await;

    let (status, body) = admin(
        &app,
        reqwest::Method::POST,
        "/admin/retrain",
        Some(json!({"shuffle": true})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("shuffle"),
        "{body}"
    );

    let (report, _) = retrain(&app, json!({})).await;
    assert_eq!(report["decision"], "failed", "{report:#}");
    assert!(
        report["reason"].as_str().unwrap().contains("no events"),
        "{report:#}"
    );
    assert_eq!(report["active"], "tt-stale");
    let (_, models) = admin(&app, reqwest::Method::GET, "/admin/models", None).await;
    assert_eq!(models["active"], "tt-stale");
    assert_eq!(models["retrain_runs"][0]["decision"], "failed");
    let (status, rec) = app.get("/v1/recommendations?user_id=1&k=5").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rec["model_version"], "tt-stale");
    // The loop is not stuck: the next run starts (and fails the same way).
    let (again, _) = retrain(&app, json!({})).await;
    assert_eq!(again["decision"], "failed");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_experiment_starts_an_ab_test_with_the_candidate_as_challenger() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ckpt, rows) = fixture(dir.path());
    let mut s = settings(dir.path(), &data, &ckpt);
    s.retrain.promote = tandem::config::retrain::Promote::Experiment;
    s.retrain.experiment_share = 0.25;
    let app = TestApp::spawn(s).await;
    post_events(&app, &rows).await;
    let (report, _) = retrain(&app, json!({})).await;
    assert_eq!(report["decision"], "promoted", "{report:#}");
    let id = report["id"].as_str().unwrap();
    assert!(
        report["reason"].as_str().unwrap().contains("challenger"),
        "{report:#}"
    );
    let (_, models) = admin(&app, reqwest::Method::GET, "/admin/models", None).await;
    assert_eq!(
        models["active"], "tt-stale",
        "an experiment does not switch the active model"
    );
    let candidate = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["version"] == id)
        .expect("the candidate is registered");
    assert_eq!(candidate["status"], "ready", "{candidate}");
    let (_, exps) = admin(&app, reqwest::Method::GET, "/admin/experiments", None).await;
    let exp = &exps["experiments"][0];
    assert_eq!(exp["name"], format!("retrain-{id}"));
    assert_eq!(exp["enabled"], true);
    assert_eq!(exp["variants"][1]["model_version"], id);
    assert_eq!(exp["variants"][1]["share"], 0.25);
    // Some users get the challenger: the candidate serves beside the active model.
    let mut served = HashSet::new();
    for u in 0..80 {
        let (status, rec) = app
            .get(&format!("/v1/recommendations?user_id=u{u}&k=5"))
            .await;
        assert_eq!(status, StatusCode::OK, "{rec}");
        served.insert(rec["model_version"].as_str().unwrap().to_string());
    }
    assert!(
        served.contains(id) && served.contains("tt-stale"),
        "{served:?}"
    );
    app.stop().await;
}

/// `[retrain] every`: the server runs the loop by itself on each tick (ticks fall on
/// multiples of the period since the epoch, so this waits up to a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_retrains_by_itself_on_its_schedule() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ckpt, rows) = fixture(dir.path());
    let mut s = settings(dir.path(), &data, &ckpt);
    s.retrain.every = "1m".into();
    let app = TestApp::spawn(s).await;
    post_events(&app, &rows).await;
    let (_, st) = admin(&app, reqwest::Method::GET, "/admin/retrain", None).await;
    assert_eq!(st["every"], "1m");
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    let report = loop {
        let (_, st) = admin(&app, reqwest::Method::GET, "/admin/retrain", None).await;
        if let Some(r) = st["runs"].as_array().and_then(|r| r.first()) {
            break r.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no scheduled run within 180 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(report["trigger"], "schedule", "{report:#}");
    assert_eq!(report["decision"], "promoted", "{report:#}");
    let (_, models) = admin(&app, reqwest::Method::GET, "/admin/models", None).await;
    assert_eq!(models["active"], report["candidate"]);
    app.stop().await;
}

#[tokio::test]
async fn retrain_needs_the_admin_key() {
    let dir = tempfile::tempdir().unwrap();
    let (data, ckpts) = common::tiny_checkpoints(dir.path(), &["tt-a"]);
    let app = TestApp::spawn(settings(dir.path(), &data, &ckpts[0])).await;
    // A client of its own: `TestApp`'s sends the admin key on every call.
    let r = reqwest::Client::new()
        .post(app.url("/admin/retrain"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let (status, st) = admin(&app, reqwest::Method::GET, "/admin/retrain", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(st["every"], "off");
    assert!(st["running"].is_null());
    assert_eq!(st["runs"], json!([]));
    app.stop().await;
}
