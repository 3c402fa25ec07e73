//! The offline loop: retrain from the logged events, score the candidate against the active
//! model on a held-out slice, and promote it only when it is better.
//!
//! One run, in stages (each timed in the run's report):
//! 1. **gather**: the event log since the run that trained the active model (all of it when
//!    the active model did not come from a run), as interactions the way `tandem
//!    export-events` writes them, plus the active model's own training data (the manifest's
//!    `data.source`); duplicates dropped, only the `[retrain] window` before the newest row.
//! 2. **split**: rows at or after `newest - holdout` are this run's test set and are never
//!    trained on. Users with history before the slice are scored on their held-out rows; users
//!    new in the slice become the protocol's new users (first 5 rows as onboarding, the rest
//!    the truth). The training rows, the held-out rows and the catalog are written under
//!    `<data_dir>/retrain/<run id>/` (`train/`, `holdout.csv`), so what the candidate saw can
//!    be checked afterwards.
//! 3. **train**: `tandem train --data` on `train/` ([`crate::model::train_on_data`], with
//!    validation), with the active model's settings from its manifest unless `[retrain]`
//!    overrides them.
//! 4. **gate**: candidate and active model ranked and scored on the held-out slice by
//!    [`eval::recommend`] and [`eval::score`], the scorer of `tandem eval`. The candidate
//!    passes when its `[retrain] metric` beats the active model's by `margin` (relative).
//! 5. **promote** (a passing candidate only): register it, then activate it, start an A/B
//!    test with it as the challenger, or leave it registered (`[retrain] promote`).
//! 6. **record**: the report (counts, both models' metrics, decision and reason, time per
//!    stage) is kept in the registry, shown by `GET /admin/models`, `GET /admin/retrain` and
//!    `tandem models list`, and exported as `tandem_retrain_*` metrics.
//!
//! Whatever fails, the active model keeps serving: nothing is switched before the gate has
//! passed and the promotion's own switch is the lifecycle's zero-downtime one. A failed run is
//! recorded with its reason. The server runs the loop every `[retrain] every` (off by
//! default); with replicas a Redis lease per tick makes one replica run it.

use crate::config::retrain::{Promote, RetrainSettings};
use crate::config::{Experiment, Unit, Variant, CONTROL_VARIANT};
use crate::domain::{Interaction, Item, ItemId, UserId};
use crate::eval::{self, On, Split};
use crate::model::{TrainConfig, TwoTower};
use crate::registry::ModelStatus;
use parking_lot::Mutex;
use rand::seq::SliceRandom;
use rand::SeedableRng;
pub use report::{DataCounts, Decision, RetrainReport, StageTime};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The protocol's onboarding length for a new user (`tandem split`): the first 5 rows are
/// known, the rest are the truth; a new user needs at least 6.
pub mod report;

/// What the loop reads and changes on the server it runs in.
#[derive(Clone)]
pub struct Serving {
    pub settings: Arc<crate::config::Settings>,
    pub model: Arc<arc_swap::ArcSwap<TwoTower>>,
    pub sessions: Arc<dyn crate::session::SessionStore>,
    pub catalog: Arc<crate::catalog::Catalog>,
    pub lifecycle: Arc<crate::lifecycle::Lifecycle>,
    pub experiments: Arc<crate::experiment::Experiments>,
    pub bus: Option<Arc<crate::cluster::Bus>>,
    pub retrain: Arc<Retrainer>,
}

const NEW_USER_ONBOARD: usize = 5;
/// How long the cross-replica "a run is in progress" lease lives without renewal.
const RUN_LEASE: Duration = Duration::from_secs(60);

/// The stages of a run, in order.
pub const STAGES: [&str; 6] = ["gather", "split", "train", "gate", "promote", "record"];

/// A run in progress, as `GET /admin/retrain` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunProgress {
    pub id: String,
    pub trigger: String,
    pub started_at: String,
    /// The stage running now (one of gather, split, train, gate, promote, record).
    pub stage: String,
    /// The stages finished so far, with their times.
    pub done: Vec<StageTime>,
    pub elapsed_s: f64,
}

/// `POST /admin/retrain`'s body (optional).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetrainRequest {
    /// A control run that checks the gate: the candidate trains on the gathered rows with
    /// the item ids permuted at random, so it must be held back.
    #[serde(default)]
    pub shuffle_items: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RetrainError {
    #[error(
        "a retrain ({0}) is in progress; try again when it has finished (see GET /admin/retrain)"
    )]
    Busy(String),
    #[error("a retrain is in progress on another replica; try again when it has finished")]
    BusyElsewhere,
    #[error("the replicas' shared store: {0}")]
    Shared(String),
}

/// The stage clock of one run, shared with its blocking parts.
struct Tracker {
    id: String,
    trigger: String,
    started_at: String,
    started: Instant,
    stage: Option<(&'static str, Instant)>,
    done: Vec<StageTime>,
}

impl Tracker {
    fn new(id: String, trigger: &str) -> Self {
        Tracker {
            id,
            trigger: trigger.to_string(),
            started_at: now_rfc3339(),
            started: Instant::now(),
            stage: None,
            done: Vec::new(),
        }
    }

    /// Ends the current stage (recording its time) and starts `stage`.
    fn enter(&mut self, stage: &'static str) {
        self.end();
        tracing::info!(run = self.id, stage, "retrain stage");
        self.stage = Some((stage, Instant::now()));
    }

    fn end(&mut self) {
        if let Some((name, at)) = self.stage.take() {
            self.done.push(StageTime {
                stage: name.to_string(),
                seconds: at.elapsed().as_secs_f64(),
            });
        }
    }

    fn progress(&self) -> RunProgress {
        RunProgress {
            id: self.id.clone(),
            trigger: self.trigger.clone(),
            started_at: self.started_at.clone(),
            stage: self.stage.map(|(s, _)| s).unwrap_or("starting").to_string(),
            done: self.done.clone(),
            elapsed_s: self.started.elapsed().as_secs_f64(),
        }
    }
}

type SharedTracker = Arc<Mutex<Tracker>>;

fn enter(t: &SharedTracker, stage: &'static str) {
    t.lock().enter(stage);
}

/// The server's handle on the loop: at most one run at a time in this process (and, with
/// replicas, across them).
#[derive(Default)]
pub struct Retrainer {
    running: Mutex<Option<SharedTracker>>,
}

impl Retrainer {
    pub fn new() -> Self {
        Self::default()
    }

    /// The run in progress, if any.
    pub fn progress(&self) -> Option<RunProgress> {
        self.running.lock().as_ref().map(|t| t.lock().progress())
    }

    /// Starts a run in the background and returns at once with its id; the handle completes
    /// with its report (already recorded). Fails if a run is in progress here or, with
    /// replicas, on another replica.
    pub async fn start(
        self: &Arc<Self>,
        state: Serving,
        trigger: &str,
        request: RetrainRequest,
    ) -> Result<(RunProgress, tokio::task::JoinHandle<RetrainReport>), RetrainError> {
        let tracker = {
            let mut running = self.running.lock();
            if let Some(t) = running.as_ref() {
                return Err(RetrainError::Busy(t.lock().id.clone()));
            }
            let t = Arc::new(Mutex::new(Tracker::new(new_run_id(), trigger)));
            *running = Some(t.clone());
            t
        };
        let lease = match &state.bus {
            Some(bus) => match bus.hold(&bus.keys().retrain, RUN_LEASE).await {
                Ok(Some(lease)) => Some(lease),
                Ok(None) => {
                    *self.running.lock() = None;
                    return Err(RetrainError::BusyElsewhere);
                }
                Err(e) => {
                    *self.running.lock() = None;
                    return Err(RetrainError::Shared(e.to_string()));
                }
            },
            None => None,
        };
        let progress = tracker.lock().progress();
        let me = self.clone();
        let handle = tokio::spawn(async move {
            let report = run(&state, &tracker, &request).await;
            drop(lease);
            *me.running.lock() = None;
            report
        });
        Ok((progress, handle))
    }
}

/// Runs the scheduled loop every `[retrain] every` until aborted. Ticks fall on multiples of
/// the period since the Unix epoch, so every replica computes the same tick, and the first
/// replica to claim a tick in Redis (a key that lives one period) is the one that runs it.
pub fn spawn_scheduler(state: Serving) -> Option<tokio::task::JoinHandle<()>> {
    let every = state.settings.retrain.every()?;
    tracing::info!(every = state.settings.retrain.every, "retrain scheduled");
    Some(tokio::spawn(async move {
        let period = every.as_millis().max(1) as u64;
        loop {
            let now = unix_millis() as u64;
            let next = (now / period + 1) * period;
            tokio::time::sleep(Duration::from_millis(next - now)).await;
            let tick = next / period;
            if let Some(bus) = &state.bus {
                let key = format!("{}:{tick}", bus.keys().retrain_tick);
                match bus.try_lease(&key, every).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::info!(tick, "another replica runs this retrain tick");
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming the retrain tick; skipped");
                        continue;
                    }
                }
            }
            match state
                .retrain
                .start(state.clone(), "schedule", RetrainRequest::default())
                .await
            {
                // Waited for, so that a run longer than the period does not stack up.
                Ok((_, handle)) => {
                    let _ = handle.await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scheduled retrain skipped");
                    let mut report = failed_report(
                        new_run_id(),
                        "schedule",
                        &state.settings.retrain,
                        format!("skipped: {e}"),
                    );
                    report.active = Some(state.model.load().version().to_string());
                    record(&state, &report);
                }
            }
        }
    }))
}

/// One whole run; never fails: a failure is a report with `decision: failed`.
async fn run(state: &Serving, t: &SharedTracker, request: &RetrainRequest) -> RetrainReport {
    let settings = state.settings.retrain.clone();
    let id = t.lock().id.clone();
    let dir = state.settings.data_dir.join("retrain").join(&id);
    let mut report = failed_report(id, &t.lock().trigger, &settings, String::new());
    report.started_at = t.lock().started_at.clone();
    report.dir = dir.display().to_string();
    report.shuffled_items = request.shuffle_items;
    match execute(state, t, request, &settings, &dir, &mut report).await {
        Ok(()) => {}
        Err(reason) => {
            tracing::error!(
                run = report.id,
                reason,
                "retrain failed; the active model keeps serving"
            );
            report.decision = Decision::Failed;
            report.reason = reason;
        }
    }
    // `record` shows in the progress while the report is written; the report's own stage
    // list ends where the work ended (`promote`, or the stage that failed).
    enter(t, "record");
    let tracker = t.lock();
    report.stages = tracker.done.clone();
    report.seconds = tracker.started.elapsed().as_secs_f64();
    report.finished_at = now_rfc3339();
    drop(tracker);
    record(state, &report);
    t.lock().end();
    tracing::info!(
        run = report.id,
        decision = ?report.decision,
        reason = report.reason,
        secs = report.seconds,
        "retrain finished"
    );
    report
}

async fn execute(
    state: &Serving,
    t: &SharedTracker,
    request: &RetrainRequest,
    settings: &RetrainSettings,
    dir: &Path,
    report: &mut RetrainReport,
) -> Result<(), String> {
    enter(t, "gather");
    let active = state.model.load_full();
    report.active = Some(active.version().to_string());
    // Events the active model may not have seen: everything after the slice its own run
    // held out (that run's training data is the manifest's source), or all of the log.
    let since_s = state
        .lifecycle
        .registry()
        .retrain_runs()
        .iter()
        .rev()
        .find(|r| r.candidate.as_deref() == Some(active.version()))
        .and_then(|r| r.holdout_from);
    let since_ms = since_s.map_or(i64::MIN, |s| s.saturating_mul(1000));
    let events = state
        .sessions
        .read_log(since_ms, i64::MAX)
        .await
        .map_err(|e| format!("reading the event log: {e}"))?;
    let event_rows: Vec<Interaction> = events
        .iter()
        .filter_map(|e| crate::session::export::to_interaction(&state.settings, e))
        .collect();
    drop(events);
    let mut items: Vec<Item> = state
        .catalog
        .entries()
        .iter()
        .map(|e| e.item.clone())
        .collect();
    items.sort_by(|a, b| crate::data::split::compare_ids(a.item_id.as_str(), b.item_id.as_str()));
    let source = PathBuf::from(&active.manifest().data.source);
    let model_rows = tokio::task::spawn_blocking(move || model_rows(&source))
        .await
        .map_err(|e| format!("reading the active model's training data: {e}"))?;
    let model_rows = match model_rows {
        Ok(rows) => rows,
        Err(why) => {
            tracing::warn!(why, "retraining on the event log only");
            Vec::new()
        }
    };
    report.counts.events = event_rows.len();
    report.counts.model_rows = model_rows.len();
    report.counts.items = items.len();

    let job = Offline {
        id: report.id.clone(),
        items,
        events: event_rows,
        model_rows,
        active: active.clone(),
        settings: settings.clone(),
        dir: dir.to_path_buf(),
        shuffle_items: request.shuffle_items,
    };
    let tracker = t.clone();
    let outcome = tokio::task::spawn_blocking(move || job.run(&tracker))
        .await
        .map_err(|e| format!("the training task failed: {e}"))?;
    let outcome = match outcome {
        Ok(o) => o,
        Err((reason, counts)) => {
            if let Some(c) = counts {
                report.counts = c;
            }
            return Err(reason);
        }
    };
    report.counts = outcome.counts.clone();
    report.newest = Some(outcome.newest);
    report.holdout_from = Some(outcome.holdout_from);
    report.candidate = Some(outcome.version.clone());
    report.candidate_metrics = outcome.candidate_metrics.clone();
    report.active_metrics = outcome.active_metrics.clone();
    let (passed, why) = decide(
        &settings.metric,
        settings.margin,
        &outcome.candidate_metrics,
        &outcome.active_metrics,
    )?;
    if !passed {
        report.decision = Decision::HeldBack;
        report.reason = why;
        return Ok(());
    }
    enter(t, "promote");
    let done = promote(state, settings, &outcome.model_dir, &outcome.version).await?;
    report.decision = Decision::Promoted;
    report.reason = format!("{why}; {done}");
    Ok(())
}

/// The blocking part of a run: split, write, train, gate.
struct Offline {
    id: String,
    items: Vec<Item>,
    events: Vec<Interaction>,
    model_rows: Vec<Interaction>,
    active: Arc<TwoTower>,
    settings: RetrainSettings,
    dir: PathBuf,
    shuffle_items: bool,
}

struct Outcome {
    version: String,
    model_dir: PathBuf,
    counts: DataCounts,
    newest: i64,
    holdout_from: i64,
    candidate_metrics: BTreeMap<String, f64>,
    active_metrics: BTreeMap<String, f64>,
}

type Failure = (String, Option<DataCounts>);

impl Offline {
    fn run(self, t: &SharedTracker) -> Result<Outcome, Failure> {
        let mut counts = DataCounts {
            events: self.events.len(),
            model_rows: self.model_rows.len(),
            items: self.items.len(),
            ..DataCounts::default()
        };
        let fail = |reason: String, counts: &DataCounts| (reason, Some(counts.clone()));
        if self.items.is_empty() {
            return Err(fail("the catalog is empty".into(), &counts));
        }
        let rows = gather(self.events, self.model_rows, self.settings.window());
        counts.rows = rows.len();
        if rows.is_empty() {
            return Err(fail(
                "no events to train on: the event log and the active model's training data are empty".into(),
                &counts,
            ));
        }
        enter(t, "split");
        let split = split_by_time(rows, self.settings.holdout());
        counts.train_rows = split.train.len();
        counts.holdout_rows = split.holdout.len();
        counts.users = split
            .train
            .iter()
            .chain(&split.holdout)
            .map(|r| &r.user_id)
            .collect::<HashSet<_>>()
            .len();
        if split.train.len() < self.settings.min_rows.max(2) {
            return Err(fail(
                format!(
                    "only {} rows before the held-out slice; [retrain] min_rows asks for {}",
                    split.train.len(),
                    self.settings.min_rows
                ),
                &counts,
            ));
        }
        let gate = gate_split(&self.items, &split, &self.dir);
        let users = gate.scored_users();
        counts.new_users = eval_users(&gate.onboard_test);
        counts.test_users = users.len();
        if users.is_empty() {
            return Err(fail(
                format!(
                    "the held-out slice (the last {}) has no user to score: none with history before it, and no new user with {} rows or more",
                    self.settings.holdout,
                    NEW_USER_ONBOARD + 1
                ),
                &counts,
            ));
        }
        let train_dir = self.dir.join("train");
        let mut train_rows = split.train.clone();
        if self.shuffle_items {
            shuffle_items(&self.items, &mut train_rows, &self.id);
        }
        if let Err(e) = std::fs::create_dir_all(&train_dir) {
            return Err(fail(
                format!("creating {}: {e}", train_dir.display()),
                &counts,
            ));
        }
        let written =
            crate::data::format::write_items(&train_dir.join("items.csv"), &self.items, true)
                .and_then(|()| {
                    crate::data::format::write_interactions(
                        &train_dir.join("interactions.csv"),
                        &train_rows,
                        true,
                    )
                })
                .and_then(|()| {
                    crate::data::format::write_interactions(
                        &self.dir.join("holdout.csv"),
                        &split.holdout,
                        true,
                    )
                });
        if let Err(e) = written {
            return Err(fail(format!("writing the run's data: {e}"), &counts));
        }
        drop(train_rows);

        enter(t, "train");
        let cfg = train_config(&self.active, &self.settings, &self.id);
        let (mut model, _) = crate::model::train_on_data(&cfg, &train_dir, self.settings.validate)
            .map_err(|e| fail(format!("training: {e}"), &counts))?;
        model.manifest_mut().model_version = self.id.clone();
        model.manifest_mut().command = cfg.command.clone();
        let model_dir = self.dir.join("model");

        enter(t, "gate");
        let score = |m: &TwoTower| -> Result<BTreeMap<String, f64>, String> {
            let lists =
                eval::recommend(m, &gate, &users, eval::MAX_K).map_err(|e| e.to_string())?;
            Ok(eval::score(&lists, &gate))
        };
        let candidate_metrics =
            score(&model).map_err(|e| fail(format!("scoring the candidate: {e}"), &counts))?;
        let active_metrics = score(self.active.as_ref())
            .map_err(|e| fail(format!("scoring the active model: {e}"), &counts))?;
        model.manifest_mut().metrics.test = candidate_metrics.clone();
        model
            .save(&model_dir)
            .map_err(|e| fail(format!("writing the candidate: {e}"), &counts))?;
        Ok(Outcome {
            version: self.id,
            model_dir,
            counts,
            newest: split.newest,
            holdout_from: split.holdout_from,
            candidate_metrics,
            active_metrics,
        })
    }
}

fn eval_users(rows: &[Interaction]) -> usize {
    rows.iter()
        .map(|r| &r.user_id)
        .collect::<HashSet<_>>()
        .len()
}

/// The union of the log's rows and the active model's, each (user, item, time, type) once,
/// keeping only the `window` before the newest row.
pub fn gather(
    events: Vec<Interaction>,
    model_rows: Vec<Interaction>,
    window: Duration,
) -> Vec<Interaction> {
    let mut seen: HashSet<(UserId, ItemId, i64, crate::domain::EventType)> = HashSet::new();
    let mut rows: Vec<Interaction> = model_rows
        .into_iter()
        .chain(events)
        .filter(|r| {
            seen.insert((
                r.user_id.clone(),
                r.item_id.clone(),
                r.timestamp,
                r.event_type,
            ))
        })
        .collect();
    let Some(newest) = rows.iter().map(|r| r.timestamp).max() else {
        return rows;
    };
    let from = newest.saturating_sub(window.as_secs() as i64);
    rows.retain(|r| r.timestamp > from);
    // Time order (stable: equal times keep their order), as a log reads.
    rows.sort_by_key(|r| r.timestamp);
    rows
}

/// Rows split at `newest - holdout`: `train` strictly before, `holdout` at or after.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeSplit {
    pub train: Vec<Interaction>,
    pub holdout: Vec<Interaction>,
    pub newest: i64,
    /// The first second of the held-out slice.
    pub holdout_from: i64,
}

pub fn split_by_time(rows: Vec<Interaction>, holdout: Duration) -> TimeSplit {
    let newest = rows.iter().map(|r| r.timestamp).max().unwrap_or(0);
    // The slice is the last `holdout` seconds, the newest second included.
    let holdout_from = newest.saturating_sub(holdout.as_secs() as i64) + 1;
    let (holdout, train): (Vec<Interaction>, Vec<Interaction>) =
        rows.into_iter().partition(|r| r.timestamp >= holdout_from);
    TimeSplit {
        train,
        holdout,
        newest,
        holdout_from,
    }
}

/// The gate's test set in the evaluation protocol's shape: known rows are the training rows;
/// a held-out user with training history is scored on their held-out items; a user new in
/// the slice with at least 6 rows is a new user (first 5 rows known, the rest the truth).
/// Held-out rows of items outside the catalog are dropped (no model can recommend them).
pub fn gate_split(items: &[Item], split: &TimeSplit, dir: &Path) -> Split {
    let catalog: HashSet<&ItemId> = items.iter().map(|i| &i.item_id).collect();
    let known: HashSet<&UserId> = split.train.iter().map(|r| &r.user_id).collect();
    let mut test = Vec::new();
    let mut fresh: HashMap<&UserId, Vec<&Interaction>> = HashMap::new();
    for r in split
        .holdout
        .iter()
        .filter(|r| catalog.contains(&r.item_id))
    {
        if known.contains(&r.user_id) {
            test.push(r.clone());
        } else {
            fresh.entry(&r.user_id).or_default().push(r);
        }
    }
    let mut onboard = Vec::new();
    let mut onboard_test = Vec::new();
    let mut users: Vec<&UserId> = fresh.keys().copied().collect();
    users.sort();
    for u in users {
        let rows = &fresh[u];
        if rows.len() <= NEW_USER_ONBOARD {
            continue;
        }
        onboard.extend(rows[..NEW_USER_ONBOARD].iter().map(|r| (*r).clone()));
        onboard_test.extend(rows[NEW_USER_ONBOARD..].iter().map(|r| (*r).clone()));
    }
    Split {
        dir: dir.to_path_buf(),
        on: On::Test,
        items: items.to_vec(),
        train: split.train.clone(),
        onboard,
        test,
        onboard_test,
    }
}

/// Whether the candidate passes, and why, in words. The gate metric must be present for
/// both models (a slice without new users cannot score `newuser_recall@20`).
pub fn decide(
    metric: &str,
    margin: f64,
    candidate: &BTreeMap<String, f64>,
    active: &BTreeMap<String, f64>,
) -> Result<(bool, String), String> {
    let (Some(&c), Some(&a)) = (candidate.get(metric), active.get(metric)) else {
        return Err(format!(
            "the gate cannot be scored: the held-out slice gives no {metric}"
        ));
    };
    let needed = a * (1.0 + margin);
    let passed = c > a && c >= needed;
    let change = if a > 0.0 {
        format!("{:+.1}%", 100.0 * (c - a) / a)
    } else {
        "from 0".to_string()
    };
    let margin_pct = format!("{:.1}%", 100.0 * margin);
    Ok(if passed {
        (
            true,
            format!("{metric} {c:.4} vs {a:.4} ({change}) beats the active model by the {margin_pct} margin"),
        )
    } else {
        (
            false,
            format!("{metric} {c:.4} vs {a:.4} ({change}) does not beat the active model by the {margin_pct} margin"),
        )
    })
}

/// The active model's training settings (its manifest), with `[retrain]`'s overrides.
pub fn train_config(active: &TwoTower, s: &RetrainSettings, id: &str) -> TrainConfig {
    let m = active.manifest();
    let t = &m.training;
    TrainConfig {
        dim: m.dim,
        input_dim: m.input_dim,
        hidden: m.hidden,
        epochs: if s.epochs > 0 {
            s.epochs
        } else {
            t.epochs.max(1)
        },
        batch_size: t.batch_size.max(2),
        lr: t.lr,
        weight_decay: t.weight_decay,
        temperature: t.temperature,
        id_dropout: t.id_dropout,
        logq: t.logq,
        min_item_count: t.min_item_count,
        content_loss: t.content_loss,
        similar_popularity_removal: m.similar.popularity_removal,
        similar_content_weight: m.similar.content_weight,
        seed: t.seed,
        threads: t.threads.max(1),
        pooling: m.pooling.clone(),
        length_buckets: m.length_buckets,
        features: m.features.clone(),
        progress: false,
        command: format!("tandem retrain (run {id}, settings of {})", m.model_version),
        ..TrainConfig::default()
    }
}

/// The control run's sabotage: every item id in the rows is replaced by another catalog
/// item's, one fixed random permutation, so the candidate learns the wrong items.
fn shuffle_items(items: &[Item], rows: &mut [Interaction], seed: &str) {
    let ids: Vec<&ItemId> = items.iter().map(|i| &i.item_id).collect();
    let mut permuted = ids.clone();
    let seed = crate::model::features::hash(0, "retrain-shuffle", seed);
    permuted.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let map: HashMap<&ItemId, &ItemId> = ids.into_iter().zip(permuted).collect();
    for r in rows {
        if let Some(to) = map.get(&r.item_id) {
            r.item_id = (*to).clone();
        }
    }
}

/// The rows the active model was trained on: its manifest's `data.source`, a data directory
/// (interactions.csv) or a split directory (train, onboard and test files).
fn model_rows(source: &Path) -> Result<Vec<Interaction>, String> {
    if source.as_os_str().is_empty() || !source.is_dir() {
        return Err(format!(
            "the active model's training data {:?} is not a directory here",
            source.display()
        ));
    }
    if let Ok(file) = crate::data::find_file(source, "interactions") {
        return crate::data::read_interactions(&file).map_err(|e| e.to_string());
    }
    let split = Split::load(source, On::Test).map_err(|e| e.to_string())?;
    let mut rows = split.train;
    rows.extend(split.onboard);
    rows.extend(split.test);
    rows.extend(split.onboard_test);
    Ok(rows)
}

/// Registers the candidate and promotes it as `[retrain] promote` says; returns what it did.
async fn promote(
    state: &Serving,
    s: &RetrainSettings,
    model_dir: &Path,
    version: &str,
) -> Result<String, String> {
    let lifecycle = &state.lifecycle;
    lifecycle
        .register(model_dir)
        .await
        .map_err(|e| format!("registering the candidate {version}: {e}"))?;
    let timeout = Duration::from_secs(s.promote_timeout_secs);
    match s.promote {
        Promote::RegisterOnly => Ok(format!(
            "registered {version} (promote = register-only; `tandem models activate {version}` serves it)"
        )),
        Promote::Activate => {
            lifecycle
                .activate(version)
                .await
                .map_err(|e| format!("activating {version}: {e}"))?;
            wait_for(state, version, ModelStatus::Active, timeout).await?;
            Ok(format!("activated {version}"))
        }
        Promote::Experiment => {
            let current = state.experiments.list();
            if let Some(running) = current.iter().find(|e| e.enabled) {
                return Ok(format!(
                    "registered {version}; no experiment started, since {:?} is running (one at a time)",
                    running.name
                ));
            }
            lifecycle
                .prepare(version)
                .await
                .map_err(|e| format!("preparing {version}: {e}"))?;
            wait_for(state, version, ModelStatus::Ready, timeout).await?;
            let name = format!("retrain-{version}");
            let mut all = current;
            all.push(Experiment {
                name: name.chars().take(64).collect(),
                salt: version.to_string(),
                unit: Unit::User,
                enabled: true,
                variants: vec![
                    Variant {
                        name: CONTROL_VARIANT.into(),
                        share: 1.0 - s.experiment_share,
                        model_version: None,
                        rerank: None,
                    },
                    Variant {
                        name: "challenger".into(),
                        share: s.experiment_share,
                        model_version: Some(version.to_string()),
                        rerank: None,
                    },
                ],
            });
            crate::config::experiments::validate(&all)
                .map_err(|e| format!("the experiment for {version}: {e}"))?;
            state
                .experiments
                .apply(all, state.bus.as_deref(), &state.lifecycle)
                .await
                .map_err(|e| format!("starting the experiment: {e}"))?;
            Ok(format!(
                "experiment {name:?} started: {version} serves {:.0}% of the traffic as the challenger",
                100.0 * s.experiment_share
            ))
        }
    }
}

/// Waits until `version` has `status`; an activation that failed (back to registered with
/// `last_error`) or a timeout is an error.
async fn wait_for(
    state: &Serving,
    version: &str,
    status: ModelStatus,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let record = state
            .lifecycle
            .models()
            .into_iter()
            .find(|m| m.version == version)
            .ok_or_else(|| format!("{version} left the registry"))?;
        if record.status == status {
            return Ok(());
        }
        if record.status != ModelStatus::Indexing {
            if let Some(e) = record.last_error {
                return Err(format!("promoting {version}: {e}"));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "promoting {version}: not {status:?} after {} s (still {:?}); the active model keeps serving",
                timeout.as_secs(),
                record.status
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Keeps the report in the registry and the metrics.
fn record(state: &Serving, report: &RetrainReport) {
    if let Err(e) = state
        .lifecycle
        .registry()
        .record_retrain(report.clone(), state.settings.retrain.keep_runs)
    {
        tracing::error!(run = report.id, error = %e, "could not record the retrain report");
    }
    crate::telemetry::record_retrain(report);
}

fn failed_report(id: String, trigger: &str, s: &RetrainSettings, reason: String) -> RetrainReport {
    let now = now_rfc3339();
    RetrainReport {
        dir: String::new(),
        id,
        trigger: trigger.to_string(),
        started_at: now.clone(),
        finished_at: now,
        decision: Decision::Failed,
        reason,
        promote: s.promote,
        candidate: None,
        active: None,
        gate_metric: s.metric.clone(),
        margin: s.margin,
        counts: DataCounts::default(),
        candidate_metrics: BTreeMap::new(),
        active_metrics: BTreeMap::new(),
        stages: Vec::new(),
        seconds: 0.0,
        newest: None,
        holdout_from: None,
        shuffled_items: false,
    }
}

/// `rt-20261207t051500-3f9a`: sortable by time, unique, and a valid model version.
fn new_run_id() -> String {
    format!(
        "rt-{}-{}",
        chrono::Utc::now().format("%Y%m%dt%H%M%S"),
        &uuid::Uuid::new_v4().simple().to_string()[..6]
    )
}

fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn unix_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EventType;

    fn row(user: &str, item: &str, ts: i64) -> Interaction {
        Interaction {
            user_id: UserId::parse(user).unwrap(),
            item_id: ItemId::parse(item).unwrap(),
            rating: 1.0,
            timestamp: ts,
            event_type: EventType::Click,
        }
    }

    const DAY: i64 = 86_400;

    #[test]
    fn the_held_out_slice_never_reaches_the_training_rows() {
        // Ten users, a row a day for 30 days each, the log and the model's data overlapping.
        let mut events = Vec::new();
        let mut model = Vec::new();
        for u in 0..10 {
            for d in 0..30 {
                let r = row(
                    &format!("u{u}"),
                    &format!("i{}", (u * 7 + d) % 40),
                    d * DAY + u,
                );
                if d < 20 {
                    model.push(r.clone());
                }
                if d >= 15 {
                    events.push(r);
                }
            }
        }
        let rows = gather(events, model, Duration::from_secs(90 * DAY as u64));
        assert_eq!(rows.len(), 300, "the overlap is counted once");
        let split = split_by_time(rows.clone(), Duration::from_secs(3 * DAY as u64));
        let key = |r: &Interaction| (r.user_id.clone(), r.item_id.clone(), r.timestamp);
        let train: HashSet<_> = split.train.iter().map(key).collect();
        let held: HashSet<_> = split.holdout.iter().map(key).collect();
        assert!(train.is_disjoint(&held));
        assert_eq!(train.len() + held.len(), 300, "every row is in one set");
        assert_eq!(held.len(), 30, "the last 3 days of 10 users");
        assert!(split.train.iter().all(|r| r.timestamp < split.holdout_from));
        assert!(split
            .holdout
            .iter()
            .all(|r| r.timestamp >= split.holdout_from));
        // The gate's known rows are exactly the training rows.
        let items: Vec<Item> = (0..40)
            .map(|i| Item::new(ItemId::parse(format!("i{i}")).unwrap(), format!("item {i}")))
            .collect();
        let gate = gate_split(&items, &split, Path::new("."));
        assert_eq!(gate.train, split.train);
        assert!(gate.onboard.is_empty());
        assert_eq!(gate.test.len(), 30);
        assert_eq!(gate.scored_users().len(), 10);
    }

    #[test]
    fn the_window_counts_back_from_the_newest_row() {
        let rows = vec![
            row("a", "1", 0),
            row("a", "2", 50 * DAY),
            row("a", "3", 100 * DAY),
        ];
        let kept = gather(rows, Vec::new(), Duration::from_secs(60 * DAY as u64));
        let times: Vec<i64> = kept.iter().map(|r| r.timestamp).collect();
        assert_eq!(times, vec![50 * DAY, 100 * DAY]);
    }

    #[test]
    fn users_new_in_the_slice_are_scored_as_new_users() {
        let mut rows: Vec<Interaction> = (0..10)
            .map(|d| row("old", &format!("i{d}"), d * DAY))
            .collect();
        rows.extend((0..8).map(|k| row("new", &format!("i{k}"), 9 * DAY + k)));
        rows.extend((0..3).map(|k| row("brief", &format!("i{k}"), 9 * DAY + k)));
        let split = split_by_time(rows, Duration::from_secs(DAY as u64));
        let items: Vec<Item> = (0..10)
            .map(|i| Item::new(ItemId::parse(format!("i{i}")).unwrap(), format!("item {i}")))
            .collect();
        let gate = gate_split(&items, &split, Path::new("."));
        assert_eq!(gate.onboard.len(), 5);
        assert_eq!(gate.onboard_test.len(), 3);
        assert_eq!(gate.test.len(), 1, "the old user's last day");
        let users: Vec<String> = gate.scored_users().iter().map(|u| u.to_string()).collect();
        assert_eq!(
            users,
            vec!["old", "new"],
            "a new user with fewer than 6 rows is dropped"
        );
    }

    #[test]
    fn the_gate_asks_for_the_margin_and_names_the_numbers() {
        let m = |v: f64| BTreeMap::from([("recall@20".to_string(), v)]);
        let (pass, why) = decide("recall@20", 0.05, &m(0.2), &m(0.1)).unwrap();
        assert!(pass, "{why}");
        assert!(why.contains("0.2000 vs 0.1000 (+100.0%)"), "{why}");
        let (pass, why) = decide("recall@20", 0.05, &m(0.104), &m(0.1)).unwrap();
        assert!(!pass, "4% is under a 5% margin: {why}");
        let (pass, _) = decide("recall@20", 0.0, &m(0.1), &m(0.1)).unwrap();
        assert!(!pass, "a tie does not pass");
        let err = decide("newuser_recall@20", 0.0, &m(0.2), &m(0.1)).unwrap_err();
        assert!(err.contains("cannot be scored"), "{err}");
    }
}
