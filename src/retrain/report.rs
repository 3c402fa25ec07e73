//! A retrain run's report, as the registry keeps it and `/metrics` counts it: a file of its
//! own, so that the registry and telemetry can name it without depending on the loop.

use crate::config::retrain::Promote;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a run decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// The candidate beat the active model and was promoted (`promote` says how).
    Promoted,
    /// The candidate did not beat the active model by the margin; nothing changed.
    HeldBack,
    /// The run could not finish (`reason` says why); the active model is unchanged.
    Failed,
}

/// Rows at each step of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DataCounts {
    /// Interactions read from the event log (zero-weight events such as impressions left out).
    pub events: usize,
    /// Rows of the active model's training data.
    pub model_rows: usize,
    /// Distinct rows inside the window: the union of the two, duplicates dropped.
    pub rows: usize,
    /// Rows the candidate was trained on (before the held-out slice).
    pub train_rows: usize,
    /// Rows of the held-out slice.
    pub holdout_rows: usize,
    pub users: usize,
    /// Catalog items.
    pub items: usize,
    /// Users the gate scored with history before the slice, and new users among them.
    pub test_users: usize,
    pub new_users: usize,
}

/// How long one stage took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StageTime {
    pub stage: String,
    pub seconds: f64,
}

/// One run's report, as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RetrainReport {
    /// Also the candidate's model version.
    pub id: String,
    /// `schedule` or `admin` (`POST /admin/retrain`, `tandem retrain`, the admin page).
    pub trigger: String,
    /// RFC 3339.
    pub started_at: String,
    pub finished_at: String,
    pub decision: Decision,
    /// Why, in words: the gate's comparison, what the promotion did, or what failed.
    pub reason: String,
    pub promote: Promote,
    /// The candidate's version, once trained.
    pub candidate: Option<String>,
    /// The version it was compared with (the one serving when the run started).
    pub active: Option<String>,
    pub gate_metric: String,
    pub margin: f64,
    pub counts: DataCounts,
    /// The candidate's and the active model's metrics on the held-out slice (`tandem eval`'s
    /// keys), when the gate ran.
    #[schema(value_type = Object)]
    pub candidate_metrics: BTreeMap<String, f64>,
    #[schema(value_type = Object)]
    pub active_metrics: BTreeMap<String, f64>,
    pub stages: Vec<StageTime>,
    pub seconds: f64,
    /// Newest row gathered, and the start of the held-out slice (unix seconds): the candidate
    /// trained on nothing at or after `holdout_from`.
    pub newest: Option<i64>,
    pub holdout_from: Option<i64>,
    /// A control run: the candidate was trained with the item ids shuffled.
    pub shuffled_items: bool,
    /// The run's files: `train/` (items.csv, interactions.csv), `holdout.csv`, `model/`.
    pub dir: String,
}
