//! Training: examples are (a user's history before t, the item at t). The loss is an in-batch
//! sampled softmax with temperature and a logQ correction for item frequency; duplicates of a
//! row's target elsewhere in the batch are masked out, not counted as negatives.
//!
//! The step itself (forward, backward) is written by hand over reused buffers
//! ([`super::step`]); it computes what the serving network's candle graph computes, which a
//! test checks. The dense layers train with one fused AdamW pass over their flat vector. The
//! embedding table trains with a lazy (row-sparse) AdamW: each step only touches the rows its
//! batch uses, so a step costs the same for a 10k or a 1M catalog. Per step, the touched rows
//! are copied into a small leaf buffer, the step computes their gradient, and the update is
//! applied to the master table in place.
//!
//! With validation, training runs twice: a first fit on the validation slice chooses the
//! number of epochs by Recall@20 (early stopping), and a second fit on all known data uses
//! that number. This keeps test and validation rows out of the model that is shipped.
//! The validation fit also holds out about one user in ten as new users (the protocol's
//! way), and after it [`tune_prior`] picks the manifest's popularity prior on that slice.

use super::checkpoint::{
    DataInfo, Manifest, Metrics, PopularityPrior, SimilarQuery, TrainingInfo, FORMAT_VERSION,
};
use super::features::{FeatureConfig, Featurizer, IdTable, ItemFeatures, PoolingConfig};
use super::loss::LogitBias;
use super::step::{adamw, AdamHyper, Batch, DenseLayout, DenseParams, Step};
use super::towers::{length_bucket, Bag, NetConfig};
use super::{ModelError, TwoTower};
use crate::domain::{EventType, Interaction, Item, ItemId, UserId};
use crate::eval::{self, On, Split};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

/// Every training knob. The defaults are the reference settings from DESIGN.md.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub dim: usize,
    pub input_dim: usize,
    pub hidden: usize,
    /// Epochs of the final fit; with validation, the most epochs the validation fit may run.
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub temperature: f64,
    /// Probability of dropping a target item's id row, so the content-only path learns.
    pub id_dropout: f64,
    /// Weight of the logQ correction (1 = full).
    pub logq: f64,
    /// Items with fewer training rows than this get no id row: their vector is their
    /// content-only vector, as a brand-new item's is. A row trained by a single example
    /// stays near its random start and only adds noise (on ml-latest-small items seen once
    /// ranked below never-seen ones at 1; see BENCHMARKS.md, issue 31, fourth session).
    pub min_item_count: usize,
    /// Weight of the content alignment loss: each target's content-only vector (no id row,
    /// the unseen popularity bucket: the vector a brand-new twin would get) must pick out
    /// the target's full vector among the batch's, by the same in-batch softmax. 0 = off.
    pub content_loss: f64,
    /// `SimilarQuery::popularity_removal` written to the manifest.
    pub similar_popularity_removal: f32,
    /// `SimilarQuery::content_weight` written to the manifest.
    pub similar_content_weight: f32,
    /// Epochs without a better validation Recall@20 before the validation fit stops.
    pub patience: usize,
    pub seed: u64,
    /// Threads for the candle CPU kernels (recorded; the caller sizes the pool).
    pub threads: usize,
    pub pooling: PoolingConfig,
    pub length_buckets: usize,
    /// Hash seed and numeric bucketing; the bucket counts of ids, categories and tokens are
    /// sized from the data at fit time.
    pub features: FeatureConfig,
    /// Draw the progress bar (off in tests).
    pub progress: bool,
    /// The command line, recorded in the manifest.
    pub command: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            dim: 64,
            input_dim: 64,
            hidden: 256,
            epochs: 7,
            batch_size: 1024,
            lr: 3e-3,
            weight_decay: 1e-4,
            temperature: 0.1,
            id_dropout: 0.25,
            logq: 1.0,
            min_item_count: 2,
            content_loss: 0.0,
            similar_popularity_removal: 0.0,
            similar_content_weight: 1.0,
            patience: 2,
            seed: 42,
            threads: 2,
            pooling: PoolingConfig::default(),
            length_buckets: 8,
            features: FeatureConfig::default(),
            progress: true,
            command: String::new(),
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &str, reason: &str| {
            Err(ModelError::InvalidConfig {
                field: field.into(),
                reason: reason.into(),
            })
        };
        for (field, v) in [
            ("dim", self.dim),
            ("input_dim", self.input_dim),
            ("hidden", self.hidden),
            ("epochs", self.epochs),
            ("threads", self.threads),
            ("length_buckets", self.length_buckets),
            ("pooling.max_history", self.pooling.max_history),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1");
            }
        }
        if self.batch_size < 2 {
            return bad(
                "batch_size",
                "must be at least 2 (negatives come from the batch)",
            );
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be a positive number");
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return bad("temperature", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.id_dropout) {
            return bad("id_dropout", "must be in [0, 1)");
        }
        if !(self.content_loss >= 0.0 && self.content_loss.is_finite()) {
            return bad("content_loss", "must be a non-negative number");
        }
        if !(self.similar_popularity_removal.is_finite() && self.similar_content_weight >= 0.0) {
            return bad(
                "similar",
                "popularity_removal must be finite and content_weight not negative",
            );
        }
        if !(self.weight_decay >= 0.0 && self.logq >= 0.0) {
            return bad("weight_decay", "weight_decay and logq must not be negative");
        }
        Ok(())
    }
}

/// What one fit did.
#[derive(Debug, Clone, Default)]
pub struct FitReport {
    pub epochs_run: usize,
    /// Epoch (1-based) with the best validation Recall@20; the last epoch without validation.
    pub best_epoch: usize,
    /// Validation metrics of the best epoch.
    pub best_val: BTreeMap<String, f64>,
    /// Validation Recall@20 per epoch.
    pub val_recall: Vec<f64>,
    pub examples: usize,
    /// Examples per second over the training loop only (batch assembly, forward, backward,
    /// updates; not validation).
    pub examples_per_sec: f64,
    pub train_seconds: f64,
    /// Seconds from the start of the fit to the end of the best validation epoch.
    pub seconds_to_best: f64,
    /// With validation: the model as it was after the best epoch.
    pub best_model: Option<TwoTower>,
    /// With validation: the popularity prior chosen on it (see [`tune_prior`]).
    pub prior: Option<(PopularityPrior, BTreeMap<String, f64>)>,
}

/// Every `NEW_USER_EVERY`-th validation user is held out as a new user with
/// `NEW_USER_ONBOARD` onboarding rows, as the protocol does for test.
const NEW_USER_EVERY: u64 = 10;
const NEW_USER_ONBOARD: usize = 5;
/// Prior weights tried on validation (the towers' scores are cosines in -1..=1).
const PRIOR_GRID: [f32; 17] = [
    0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.2, 2.0, 3.0, 5.0, 8.0, 12.0, 20.0,
];

/// Cold-item bonuses tried on validation, and the most of the main and new-user Recall@20
/// (relative) that one may cost.
const COLD_BONUS_GRID: [f32; 16] = [
    0.02, 0.04, 0.06, 0.08, 0.1, 0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.18, 0.2, 0.25, 0.3, 0.45,
];
const COLD_BONUS_COST: f64 = 0.05;
/// Cold affinities tried on validation with each cold bonus (a user's cold share is 0..=1;
/// the mean on ml-latest-small is about 0.07, the top fifth of users about 0.2).
const COLD_AFFINITY_GRID: [f32; 10] = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// Chooses the popularity prior on a validation split: the weight for short histories by the
/// new users' Recall@20, the weight for the rest by the main users' Recall@20 (ties go to the
/// smaller weight), then the cold-item bonus and the users' cold affinity together (see
/// [`PopularityPrior`]): the pair with the best cold-item Recall@20 that costs at most
/// `COLD_BONUS_COST` of either other Recall@20. Returns it with the validation metrics it
/// gives.
pub fn tune_prior(
    model: &TwoTower,
    val: &Split,
) -> Result<(PopularityPrior, BTreeMap<String, f64>), ModelError> {
    let users = val.scored_users();
    let ranker = eval::Ranker::new(model, val, &users).map_err(eval_to_model)?;
    let mut best_short = (f64::NEG_INFINITY, 0.0f32);
    let mut best_long = (f64::NEG_INFINITY, 0.0f32);
    for w in PRIOR_GRID {
        let prior = PopularityPrior {
            short: w,
            long: w,
            ..PopularityPrior::default()
        };
        let m = eval::score(&ranker.top_k(&prior, eval::MAX_K), val);
        let main = m.get("recall@20").copied().unwrap_or(0.0);
        let new = m.get("newuser_recall@20").copied().unwrap_or(0.0);
        tracing::info!(
            weight = w,
            val_recall_20 = main,
            val_newuser_recall_20 = new,
            "prior"
        );
        if main > best_long.0 + 1e-9 {
            best_long = (main, w);
        }
        if new > best_short.0 + 1e-9 {
            best_short = (new, w);
        }
    }
    let mut prior = PopularityPrior {
        short: best_short.1,
        long: best_long.1,
        ..PopularityPrior::default()
    };
    let base = eval::score(&ranker.top_k(&prior, eval::MAX_K), val);
    let get = |m: &BTreeMap<String, f64>, k: &str| m.get(k).copied().unwrap_or(0.0);
    let mut best = (get(&base, "cold_recall@20"), (0.0f32, 0.0f32), base.clone());
    for bonus in std::iter::once(0.0).chain(COLD_BONUS_GRID) {
        for affinity in COLD_AFFINITY_GRID {
            let trial = PopularityPrior {
                cold_bonus: bonus,
                cold_affinity: affinity,
                ..prior
            };
            let m = eval::score(&ranker.top_k(&trial, eval::MAX_K), val);
            let cold = get(&m, "cold_recall@20");
            let affordable = ["recall@20", "newuser_recall@20"]
                .iter()
                .all(|k| get(&m, k) >= (1.0 - COLD_BONUS_COST) * get(&base, k));
            tracing::info!(
                bonus,
                affinity,
                val_cold_recall_20 = cold,
                val_recall_20 = get(&m, "recall@20"),
                val_newuser_recall_20 = get(&m, "newuser_recall@20"),
                affordable,
                "cold bonus"
            );
            if affordable && cold > best.0 + 1e-9 {
                best = (cold, (bonus, affinity), m);
            }
        }
    }
    (prior.cold_bonus, prior.cold_affinity) = best.1;
    Ok((prior, best.2))
}

/// Trains on a split directory: the validation fit on `val/train.csv` (scored on
/// `val/test.csv`) picks the epoch count, then the final fit uses `train.csv` + `onboard.csv`.
/// With `validate = false`, only the final fit runs, for `cfg.epochs`.
pub fn train_on_split(
    cfg: &TrainConfig,
    dir: &Path,
    validate: bool,
) -> Result<(TwoTower, FitReport), ModelError> {
    let started = Instant::now();
    let (epochs, val_report) = if validate {
        let mut val = Split::load(dir, On::Val).map_err(eval_to_model)?;
        val.hold_out_new_users(NEW_USER_EVERY, NEW_USER_ONBOARD, cfg.seed);
        let rows: Vec<Interaction> = val.known_rows().cloned().collect();
        let (_, report) = fit(cfg, &val.items, &rows, Some(&val), None)?;
        (report.best_epoch, Some(report))
    } else {
        (cfg.epochs, None)
    };
    let full = Split::load(dir, On::Test).map_err(eval_to_model)?;
    let rows: Vec<Interaction> = full.known_rows().cloned().collect();
    let cfg_final = TrainConfig {
        epochs,
        ..cfg.clone()
    };
    let (mut model, mut report) = fit(&cfg_final, &full.items, &rows, None, val_report.as_ref())?;
    finish_manifest(&mut model, &mut report, val_report, dir, started);
    Ok((model, report))
}

/// Trains on a data directory (`items.csv` + `interactions.csv`). With validation, each user
/// with at least 5 interactions holds out their latest 20% (the protocol's rule) for the
/// validation fit; the final fit uses every row.
pub fn train_on_data(
    cfg: &TrainConfig,
    dir: &Path,
    validate: bool,
) -> Result<(TwoTower, FitReport), ModelError> {
    let started = Instant::now();
    let data = crate::data::Dataset::load(dir)?;
    let mut rows = data.interactions;
    sort_by_user_time(&mut rows);
    let (epochs, val_report) = if validate {
        let mut val = holdout(&data.items, &rows, dir);
        val.hold_out_new_users(NEW_USER_EVERY, NEW_USER_ONBOARD, cfg.seed);
        let known: Vec<Interaction> = val.known_rows().cloned().collect();
        let (_, report) = fit(cfg, &val.items, &known, Some(&val), None)?;
        (report.best_epoch, Some(report))
    } else {
        (cfg.epochs, None)
    };
    let cfg_final = TrainConfig {
        epochs,
        ..cfg.clone()
    };
    let (mut model, mut report) = fit(&cfg_final, &data.items, &rows, None, val_report.as_ref())?;
    finish_manifest(&mut model, &mut report, val_report, dir, started);
    Ok((model, report))
}

fn finish_manifest(
    model: &mut TwoTower,
    report: &mut FitReport,
    val_report: Option<FitReport>,
    dir: &Path,
    started: Instant,
) {
    let m = model.manifest_mut();
    m.data.source = dir.display().to_string();
    m.training.seconds = started.elapsed().as_secs_f64();
    if let Some(v) = val_report {
        m.metrics.val = v.best_val.clone();
        if let Some((prior, metrics)) = &v.prior {
            m.popularity_prior = *prior;
            m.metrics.val = metrics.clone();
        }
        m.training.best_epoch = v.best_epoch;
        report.best_val = v.best_val;
        report.val_recall = v.val_recall;
        report.seconds_to_best = v.seconds_to_best;
        report.best_epoch = v.best_epoch;
    }
}

fn eval_to_model(e: eval::EvalError) -> ModelError {
    match e {
        eval::EvalError::Data(d) => ModelError::Data(d),
        eval::EvalError::Model(m) => m,
        other => ModelError::TrainingData(other.to_string()),
    }
}

/// Stable sort by user (first appearance) then timestamp; equal timestamps keep file order.
fn sort_by_user_time(rows: &mut [Interaction]) {
    let mut first: HashMap<UserId, usize> = HashMap::new();
    for (i, r) in rows.iter().enumerate() {
        first.entry(r.user_id.clone()).or_insert(i);
    }
    rows.sort_by_key(|r| (first[&r.user_id], r.timestamp));
}

/// The protocol's per-user holdout (latest `max(1, n / 5)` of users with at least 5 rows) as
/// an in-memory validation split. `rows` must be sorted by user and time.
fn holdout(items: &[Item], rows: &[Interaction], dir: &Path) -> Split {
    let mut train = Vec::new();
    let mut test = Vec::new();
    let mut start = 0;
    while start < rows.len() {
        let mut end = start;
        while end < rows.len() && rows[end].user_id == rows[start].user_id {
            end += 1;
        }
        let n = end - start;
        let n_test = if n >= 5 { (n / 5).max(1) } else { 0 };
        train.extend_from_slice(&rows[start..end - n_test]);
        test.extend_from_slice(&rows[end - n_test..end]);
        start = end;
    }
    Split {
        dir: dir.to_path_buf(),
        on: On::Val,
        items: items.to_vec(),
        train,
        onboard: Vec::new(),
        test,
        onboard_test: Vec::new(),
    }
}

/// sha256 over the catalog ids and the (user, item, timestamp) rows, in order.
pub fn fingerprint(items: &[Item], rows: &[Interaction]) -> String {
    let mut h = Sha256::new();
    for i in items {
        h.update(i.item_id.as_str().as_bytes());
        h.update([0x1e]);
    }
    h.update([0x1d]);
    for r in rows {
        h.update(r.user_id.as_str().as_bytes());
        h.update([0x1f]);
        h.update(r.item_id.as_str().as_bytes());
        h.update([0x1f]);
        h.update(r.timestamp.to_le_bytes());
        h.update([0x1e]);
    }
    hex::encode(h.finalize())
}

/// One user's events in time order: (catalog index, event type).
type Sequence = Vec<(u32, EventType)>;

/// The training set in index form.
struct Prepared {
    sequences: Vec<Sequence>,
    /// (sequence, position) of every example.
    examples: Vec<(u32, u32)>,
    features: Vec<ItemFeatures>,
    /// Content-only rows per catalog item (as a brand-new item has them).
    content: Vec<Vec<(u32, f32)>>,
    /// `-logq * ln(q_i)` per catalog item, the logit correction.
    logq_correction: Vec<f32>,
    ids: IdTable,
    feature_config: FeatureConfig,
    users: usize,
}

fn next_pow2_at_least(n: usize, min: usize) -> usize {
    n.max(min).next_power_of_two()
}

fn prepare(
    cfg: &TrainConfig,
    items: &[Item],
    rows: &[Interaction],
) -> Result<Prepared, ModelError> {
    if items.is_empty() {
        return Err(ModelError::TrainingData("the catalog is empty".into()));
    }
    let index: HashMap<&ItemId, u32> = items
        .iter()
        .enumerate()
        .map(|(i, it)| (&it.item_id, i as u32))
        .collect();
    let mut seq_of: HashMap<&UserId, usize> = HashMap::new();
    let mut sequences: Vec<Sequence> = Vec::new();
    let mut counts = vec![0usize; items.len()];
    let mut unknown = 0usize;
    for r in rows {
        let Some(&i) = index.get(&r.item_id) else {
            unknown += 1;
            continue;
        };
        let s = *seq_of.entry(&r.user_id).or_insert_with(|| {
            sequences.push(Vec::new());
            sequences.len() - 1
        });
        sequences[s].push((i, r.event_type));
        counts[i as usize] += 1;
    }
    if unknown > 0 {
        tracing::warn!(
            rows = unknown,
            "interactions with items missing from the catalog were skipped"
        );
    }
    let total: usize = counts.iter().sum();
    if total < 2 {
        return Err(ModelError::TrainingData(format!(
            "only {total} usable interactions (rows whose item is in the catalog); need at least 2"
        )));
    }

    // Size the hashed blocks from the data: the id table at most half full, token and
    // category buckets about twice the distinct values (collisions are then rare, and the
    // shipped demo checkpoint stays small).
    let trained = counts
        .iter()
        .filter(|&&c| c >= cfg.min_item_count.max(1))
        .count();
    let mut fc = cfg.features.clone();
    fc.id_buckets = next_pow2_at_least(trained * 2, 64);
    let mut cats = std::collections::HashSet::new();
    let mut toks = std::collections::HashSet::new();
    for it in items {
        cats.extend(it.categories.iter().map(|g| g.to_lowercase()));
        toks.extend(super::features::title_tokens(&it.title));
        toks.extend(it.tags.iter().map(|t| format!("tag:{}", t.to_lowercase())));
    }
    fc.category_buckets = next_pow2_at_least(cats.len() * 4, 32);
    fc.token_buckets = next_pow2_at_least(toks.len() * 2, 256).min(1 << 18);
    fc.validate().map_err(|reason| ModelError::InvalidConfig {
        field: "features".into(),
        reason,
    })?;

    let mut ids = IdTable::new(fc.id_buckets);
    for (it, &c) in items.iter().zip(&counts) {
        if c >= cfg.min_item_count.max(1) {
            ids.insert(fc.hash_seed, it.item_id.as_str(), c as f32);
        }
    }
    let featurizer = Featurizer::new(fc.clone(), ids);
    let features: Vec<ItemFeatures> = items.iter().map(|it| featurizer.features(it)).collect();
    let content = items
        .iter()
        .map(|it| featurizer.content_features(it).content)
        .collect();
    let logq_correction = counts
        .iter()
        .map(|&c| {
            let q = (c.max(1) as f64) / total as f64;
            (-cfg.logq * q.ln()) as f32
        })
        .collect();
    let mut examples = Vec::with_capacity(total);
    for (s, seq) in sequences.iter().enumerate() {
        for t in 0..seq.len() {
            examples.push((s as u32, t as u32));
        }
    }
    Ok(Prepared {
        users: sequences.len(),
        sequences,
        examples,
        features,
        content,
        logq_correction,
        ids: featurizer.ids,
        feature_config: fc,
    })
}

/// The embedding table and its lazy AdamW state, outside candle's autograd.
struct SparseTable {
    width: usize,
    data: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// Scratch for [`SparseTable::update`]'s check that a step's rows are distinct.
    seen: Vec<bool>,
}

/// Base pointers of the table's three arrays, shared by the update's workers.
struct TablePtrs(*mut f32, *mut f32, *mut f32);
// SAFETY: the workers of `SparseTable::update` write disjoint rows through them (checked
// distinct first), and the parallel loop ends before the table is used again.
unsafe impl Sync for TablePtrs {}

impl SparseTable {
    fn new(rows: usize, width: usize, rng: &mut StdRng) -> Self {
        // Uniform with standard deviation 0.05.
        let a = 0.05f32 * 3f32.sqrt();
        SparseTable {
            width,
            data: (0..rows * width).map(|_| rng.gen_range(-a..a)).collect(),
            m: vec![0.0; rows * width],
            v: vec![0.0; rows * width],
            seen: vec![false; rows],
        }
    }

    /// AdamW on the given rows only (`grad` holds one row per entry of `rows`), with the
    /// global step's bias correction. Rows are split over the thread pool; they must be
    /// distinct (a batch lists each of its rows once), which is checked.
    fn update(&mut self, rows: &[u32], grad: &[f32], h: &AdamHyper) {
        use rayon::prelude::*;
        let w = self.width;
        assert_eq!(grad.len(), rows.len() * w, "one gradient row per table row");
        for &r in rows {
            let seen = &mut self.seen[r as usize];
            assert!(!*seen, "table row {r} listed twice in one step");
            *seen = true;
        }
        for &r in rows {
            self.seen[r as usize] = false;
        }
        let ptrs = TablePtrs(
            self.data.as_mut_ptr(),
            self.m.as_mut_ptr(),
            self.v.as_mut_ptr(),
        );
        let ptrs = &ptrs;
        const ROWS: usize = 256;
        rows.par_chunks(ROWS)
            .zip(grad.par_chunks(ROWS * w))
            .for_each(|(rows, grad)| {
                for (&r, g) in rows.iter().zip(grad.chunks_exact(w)) {
                    let at = r as usize * w;
                    // SAFETY: `r` is a row of the table (`seen` was indexed by it above), so
                    // `at..at + w` is in bounds of all three arrays, and rows are distinct, so
                    // no other worker touches these floats.
                    let (t, m, v) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(ptrs.0.add(at), w),
                            std::slice::from_raw_parts_mut(ptrs.1.add(at), w),
                            std::slice::from_raw_parts_mut(ptrs.2.add(at), w),
                        )
                    };
                    adamw(t, m, v, g, h);
                }
            });
    }
}

/// A snapshot of the current parameters as a servable model.
fn snapshot(
    table: &SparseTable,
    dense: &DenseParams,
    ids: &IdTable,
    manifest: &Manifest,
) -> candle_core::Result<TwoTower> {
    let net = dense.layout.to_net(&dense.values, &table.data)?;
    Ok(TwoTower::from_parts(net, ids.clone(), manifest.clone()))
}

/// Reusable per-step buffers, so batch assembly allocates little.
struct BatchBuilder {
    /// Local index of a table row in this step's leaf tensor (`u32::MAX` = unused).
    row_local: Vec<u32>,
    rows: Vec<u32>,
    /// Local index of a catalog item among this step's history items.
    item_local: Vec<u32>,
    items: Vec<u32>,
}

impl BatchBuilder {
    fn new(table_rows: usize, n_items: usize) -> Self {
        BatchBuilder {
            row_local: vec![u32::MAX; table_rows],
            rows: Vec::new(),
            item_local: vec![u32::MAX; n_items],
            items: Vec::new(),
        }
    }

    fn row(&mut self, r: u32) -> u32 {
        let slot = &mut self.row_local[r as usize];
        if *slot == u32::MAX {
            *slot = self.rows.len() as u32;
            self.rows.push(r);
        }
        *slot
    }

    fn item(&mut self, i: u32) -> (u32, bool) {
        let slot = &mut self.item_local[i as usize];
        if *slot == u32::MAX {
            *slot = self.items.len() as u32;
            self.items.push(i);
            return (*slot, true);
        }
        (*slot, false)
    }

    fn build(
        &mut self,
        p: &Prepared,
        cfg: &TrainConfig,
        examples: &[(u32, u32)],
        rng: &mut StdRng,
    ) -> Batch {
        let b = examples.len();
        let l = cfg.pooling.max_history;
        let mut history = Bag::with_capacity(b, b * l.min(16));
        let mut lengths = Vec::with_capacity(b);
        let mut targets = Vec::with_capacity(b);
        let mut target_bag = Bag::with_capacity(b, b * 10);
        let mut content_bag = Bag::with_capacity(b, 0);
        let mut new_items: Vec<u32> = Vec::new();
        for (e, &(s, t)) in examples.iter().enumerate() {
            let seq = &p.sequences[s as usize];
            let t = t as usize;
            let target = seq[t].0;
            targets.push(target);
            let f = &p.features[target as usize];
            if let Some(r) = f.id_row {
                if rng.gen::<f64>() >= cfg.id_dropout {
                    let lr = self.row(r);
                    target_bag.push(e as u32, lr, 1.0);
                }
            }
            for &(r, w) in &f.content {
                let lr = self.row(r);
                target_bag.push(e as u32, lr, w);
            }
            if cfg.content_loss > 0.0 {
                for &(r, w) in &p.content[target as usize] {
                    let lr = self.row(r);
                    content_bag.push(e as u32, lr, w);
                }
            }
            let start = t.saturating_sub(l);
            let hist = &seq[start..t];
            lengths.push(length_bucket(hist.len(), cfg.length_buckets));
            let mut total = 0.0f32;
            let first = history.rows.len();
            for (k, &(item, ev)) in hist.iter().rev().enumerate() {
                let w = cfg.pooling.weight(k, ev);
                total += w;
                let (li, fresh) = self.item(item);
                if fresh {
                    new_items.push(item);
                }
                history.push(e as u32, li, w);
            }
            if total > 0.0 {
                for w in &mut history.weights[first..] {
                    *w /= total;
                }
            }
        }
        let mut item_bag = Bag::with_capacity(self.items.len(), self.items.len() * 10);
        for k in 0..self.items.len() {
            let f = &p.features[self.items[k] as usize];
            if let Some(r) = f.id_row {
                let lr = self.row(r);
                item_bag.push(k as u32, lr, 1.0);
            }
            for &(r, w) in &f.content {
                let lr = self.row(r);
                item_bag.push(k as u32, lr, w);
            }
        }
        // Reset the scratch maps for the next step (only the entries this step set).
        for &i in &self.items {
            self.item_local[i as usize] = u32::MAX;
        }
        self.items.clear();
        let rows = std::mem::take(&mut self.rows);
        for &r in &rows {
            self.row_local[r as usize] = u32::MAX;
        }
        let bias = logit_bias(&targets, p);
        Batch {
            rows,
            item_bag,
            target_bag,
            content_bag,
            history,
            lengths,
            targets,
            bias,
        }
    }
}

/// The loss's logit bias for a batch's targets: column `j`'s logQ correction (kept finite
/// for a zero count, which targets cannot have), and for every target that appears more than
/// once, the other columns with that target masked in each of its rows (they are positives,
/// not negatives).
fn logit_bias(targets: &[u32], p: &Prepared) -> LogitBias {
    let columns: Vec<f32> = targets
        .iter()
        .map(|&t| p.logq_correction[t as usize])
        .map(|c| if c.is_finite() { c } else { 0.0 })
        .collect();
    let mut by_target: Vec<(u32, u32)> = targets
        .iter()
        .enumerate()
        .map(|(j, &t)| (t, j as u32))
        .collect();
    by_target.sort_unstable();
    let mut masked = Vec::new();
    for same in by_target
        .chunk_by(|a, b| a.0 == b.0)
        .filter(|c| c.len() > 1)
    {
        for &(_, r) in same {
            for &(_, j) in same {
                if j != r {
                    masked.push((r, j));
                }
            }
        }
    }
    masked.sort_unstable();
    LogitBias { columns, masked }
}

/// One fit. `val` enables per-epoch validation and early stopping; `val_report` (from an
/// earlier validation fit) is only recorded in the manifest.
pub fn fit(
    cfg: &TrainConfig,
    items: &[Item],
    rows: &[Interaction],
    val: Option<&Split>,
    val_report: Option<&FitReport>,
) -> Result<(TwoTower, FitReport), ModelError> {
    cfg.validate()?;
    let fit_start = Instant::now();
    let p = prepare(cfg, items, rows)?;
    let net = NetConfig {
        rows: p.feature_config.offsets().total,
        input_dim: cfg.input_dim,
        hidden: cfg.hidden,
        dim: cfg.dim,
        length_buckets: cfg.length_buckets,
    };
    let mut rng = StdRng::seed_from_u64(cfg.seed);
    let mut table = SparseTable::new(net.rows, net.input_dim, &mut rng);
    let mut dense = DenseParams::new(DenseLayout::new(&net), &mut rng);
    let mut work = Step::default();

    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        model_version: String::new(),
        created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        dim: cfg.dim,
        input_dim: cfg.input_dim,
        hidden: cfg.hidden,
        features: p.feature_config.clone(),
        pooling: cfg.pooling.clone(),
        length_buckets: cfg.length_buckets,
        training: TrainingInfo {
            epochs: cfg.epochs,
            best_epoch: cfg.epochs,
            batch_size: cfg.batch_size,
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            temperature: cfg.temperature,
            id_dropout: cfg.id_dropout,
            logq: cfg.logq,
            min_item_count: cfg.min_item_count,
            content_loss: cfg.content_loss,
            seed: cfg.seed,
            threads: cfg.threads,
            examples_per_epoch: p.examples.len(),
            examples_per_sec: 0.0,
            seconds: 0.0,
        },
        data: DataInfo {
            source: String::new(),
            fingerprint: fingerprint(items, rows),
            items: items.len(),
            users: p.users,
            interactions: rows.len(),
            trained_items: p.ids.len(),
        },
        metrics: Metrics {
            val: val_report.map(|r| r.best_val.clone()).unwrap_or_default(),
            test: BTreeMap::new(),
        },
        popularity_prior: PopularityPrior::default(),
        similar: SimilarQuery {
            popularity_removal: cfg.similar_popularity_removal,
            content_weight: cfg.similar_content_weight,
        },
        command: cfg.command.clone(),
    };
    manifest.model_version = format!(
        "tt-{}-{}",
        chrono::Utc::now().format("%Y%m%dt%H%M%S"),
        &manifest.data.fingerprint[..8]
    );

    let steps_per_epoch = p.examples.len().div_ceil(cfg.batch_size);
    let bar = if cfg.progress {
        ProgressBar::with_draw_target(
            Some((steps_per_epoch * cfg.epochs) as u64),
            ProgressDrawTarget::stderr(),
        )
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );

    let mut builder = BatchBuilder::new(net.rows, items.len());
    let mut builder_rng = StdRng::seed_from_u64(cfg.seed ^ 0x6261_7463_6865_7321);
    let mut report = FitReport::default();
    let mut order = p.examples.clone();
    let mut train_time = 0.0f64;
    let mut step = 0usize;
    let mut best: Option<(f64, usize)> = None;
    let inv_temp = (1.0 / cfg.temperature) as f32;
    for epoch in 1..=cfg.epochs {
        bar.set_prefix(format!("epoch {epoch}/{}", cfg.epochs));
        order.shuffle(&mut rng);
        let epoch_start = Instant::now();
        let mut loss_sum = 0.0f64;
        // Batches are assembled on a thread of their own, one or two steps ahead, while this
        // thread runs the step (the gather must wait for the previous step's update, so it
        // stays here). Id dropout draws from the builder's own seeded stream.
        std::thread::scope(|scope| -> Result<(), ModelError> {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(2);
            let (order, p, builder, builder_rng) = (&order, &p, &mut builder, &mut builder_rng);
            scope.spawn(move || {
                for chunk in order.chunks(cfg.batch_size).filter(|c| c.len() >= 2) {
                    if tx.send(builder.build(p, cfg, chunk, builder_rng)).is_err() {
                        break; // the step failed and its error is on the way out
                    }
                }
            });
            for batch in rx {
                step += 1;
                let loss = work.run(
                    &table.data,
                    &dense,
                    &batch,
                    inv_temp,
                    cfg.content_loss as f32,
                )?;
                let h = AdamHyper::new(cfg.lr, cfg.weight_decay, step);
                dense.update(&work.grad, &h);
                table.update(&batch.rows, &work.d_leaf, &h);
                loss_sum += loss as f64 * batch.targets.len() as f64;
                bar.inc(1);
            }
            Ok(())
        })?;
        let secs = epoch_start.elapsed().as_secs_f64();
        train_time += secs;
        report.examples += order.len();
        let eps = order.len() as f64 / secs;
        let loss = loss_sum / order.len() as f64;
        let mut msg = format!("loss {loss:.4} {eps:.0} ex/s");
        let mut stop = false;
        if let Some(val) = val {
            let model = snapshot(&table, &dense, &p.ids, &manifest)?;
            let users: Vec<UserId> = val.scored_users();
            let lists = eval::recommend(&model, val, &users, eval::MAX_K).map_err(eval_to_model)?;
            let metrics = eval::score(&lists, val);
            let r20 = metrics.get("recall@20").copied().unwrap_or(0.0);
            report.val_recall.push(r20);
            msg += &format!(" val R@20 {r20:.4}");
            if best.is_none_or(|(b, _)| r20 > b) {
                best = Some((r20, epoch));
                report.best_val = metrics;
                report.seconds_to_best = fit_start.elapsed().as_secs_f64();
                report.best_model = Some(model);
            } else if epoch - best.map_or(0, |b| b.1) >= cfg.patience {
                stop = true;
            }
        }
        bar.set_message(msg.clone());
        tracing::info!(epoch, "{msg}");
        report.epochs_run = epoch;
        if stop {
            break;
        }
    }
    bar.finish_and_clear();
    report.train_seconds = train_time;
    report.examples_per_sec = report.examples as f64 / train_time.max(1e-9);
    report.best_epoch = best.map_or(report.epochs_run, |b| b.1);
    manifest.training.examples_per_sec = report.examples_per_sec;
    manifest.training.epochs = report.epochs_run;
    manifest.training.best_epoch = report.best_epoch;
    if let (Some(val), Some(best)) = (val, &report.best_model) {
        report.prior = Some(tune_prior(best, val)?);
    }
    let mut model = snapshot(&table, &dense, &p.ids, &manifest)?;
    model.fit_popularity_direction(items)?;
    Ok((model, report))
}
