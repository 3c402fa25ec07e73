//! `Settings`: read from an optional TOML file, then overridden by `TANDEM_*` environment
//! variables, and validated once at start-up so that deeper code can trust them.
//!
//! Environment variables use `__` between section and key: `TANDEM_INDEX__BACKEND=qdrant`,
//! `TANDEM_SESSION__REDIS_URL=redis://..`. Top-level keys are plain: `TANDEM_DATA_DIR`.

pub mod experiments;
pub mod retrain;

pub use experiments::{Experiment, Unit, Variant};
pub use retrain::RetrainSettings;

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {file}: {reason}")]
    File { file: PathBuf, reason: String },
    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("setting `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IndexBackend {
    /// qdrant-edge, in-process, persisted under the data dir.
    #[default]
    #[serde(alias = "edge")]
    Embedded,
    /// A Qdrant server or cluster over gRPC.
    Qdrant,
    /// Brute-force exact search in memory.
    Exact,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SessionBackend {
    /// In-process store with a durable append-only event log file.
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Where collections, the event log and registered models live.
    pub data_dir: PathBuf,
    /// Address the HTTP server binds.
    pub bind: String,
    /// The checkpoint directory served at start-up.
    pub model_path: PathBuf,
    pub index: IndexSettings,
    pub session: SessionSettings,
    pub server: ServerSettings,
    pub rerank: RerankSettings,
    /// Item attributes that filters may use (`[catalog]`).
    pub catalog: CatalogSettings,
    /// Named boost rules (`[boosts.NAME]`) that `rerank.<variant>.boosts` or a request's
    /// `boost=` turn on.
    pub boosts: BoostRules,
    /// The model registry (`[registry]`).
    pub registry: RegistrySettings,
    /// A/B experiments (`[[experiments]]`); `PUT /admin/experiments` replaces them at run time.
    pub experiments: Vec<Experiment>,
    /// The Gorse-compatible API under `/api` (`[gorse]`).
    pub gorse: GorseSettings,
    /// The offline retrain loop (`[retrain]`, see `crate::retrain`).
    pub retrain: RetrainSettings,
    /// The admin API key, from `TANDEM_ADMIN_KEY` only (never from the file, never printed).
    #[serde(skip)]
    pub admin_key: AdminKey,
}

/// The environment variable that holds the admin key (the admin API and catalog writes).
pub const ADMIN_KEY_ENV: &str = "TANDEM_ADMIN_KEY";

/// A secret that `Debug` does not print.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AdminKey(pub Option<String>);

impl std::fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Some(***)"
        } else {
            "None"
        })
    }
}

/// `[gorse]`: how the Gorse-compatible API (`/api/...`, `http::gorse`) maps Gorse's
/// feedback types onto tandem's event types. Feedback of every type is kept as sent (the
/// feedback routes list it with its own type); what recommendations learn from it is the
/// event type it maps to, with that type's weight in `session.event_weights`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GorseSettings {
    /// Gorse feedback type -> tandem event type (`TANDEM_GORSE__FEEDBACK_TYPES__STAR=purchase`
    /// changes one of the defaults).
    pub feedback_types: std::collections::BTreeMap<String, crate::domain::EventType>,
    /// The event type of a feedback type missing from the table: `view` (weight 1 by
    /// default), or `impression` to keep unknown types without any signal.
    pub unknown_feedback_type: crate::domain::EventType,
}

impl Default for GorseSettings {
    fn default() -> Self {
        use crate::domain::EventType::*;
        let table = [
            ("star", Rating),
            ("rating", Rating),
            ("like", Click),
            ("favorite", Click),
            ("share", Click),
            ("click", Click),
            ("read", View),
            ("view", View),
            ("cart", AddToCart),
            ("add_to_cart", AddToCart),
            ("purchase", Purchase),
            ("buy", Purchase),
            ("order", Purchase),
            ("impression", Impression),
        ];
        GorseSettings {
            feedback_types: table.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            unknown_feedback_type: View,
        }
    }
}

impl GorseSettings {
    /// The event type a Gorse feedback type is recorded as.
    pub fn event_type(&self, feedback_type: &str) -> crate::domain::EventType {
        self.feedback_types
            .get(feedback_type)
            .copied()
            .unwrap_or(self.unknown_feedback_type)
    }
}

/// `[registry]`: registered checkpoints, under `model_store` (default `<data_dir>/models/`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrySettings {
    /// Registered versions kept; older ones are deleted with their index collections (the
    /// active version and the rollback target are always kept). At least 2.
    pub keep_last: usize,
    /// The directory registered checkpoints are copied into; empty means
    /// `<data_dir>/models`. With several replicas it is a volume every replica mounts: a
    /// model registered on one replica is loaded from here by all of them.
    pub model_store: PathBuf,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        RegistrySettings {
            keep_last: 5,
            model_store: PathBuf::new(),
        }
    }
}

impl RegistrySettings {
    /// Where registered checkpoints live.
    pub fn model_store(&self, data_dir: &Path) -> PathBuf {
        if self.model_store.as_os_str().is_empty() {
            data_dir.join("models")
        } else {
            self.model_store.clone()
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexSettings {
    pub backend: IndexBackend,
    /// gRPC URL of the Qdrant server (backend = qdrant).
    pub qdrant_url: String,
    /// Collection name prefix on the Qdrant server.
    pub collection: String,
    pub shard_number: u32,
    pub replication_factor: u32,
    /// Threads the embedded engine builds HNSW graphs with; 0 = every core. A serving
    /// replica that rebuilds while it answers (model activation) keeps a core for requests
    /// with 1.
    pub indexing_threads: usize,
    /// Embedded engine: a filter whose included categories hold at most this many items is
    /// answered by an exact scan of per-category vector blocks in RAM (4 × dim bytes per
    /// item); 0 turns the blocks off.
    pub scan_max_points: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionSettings {
    pub backend: SessionBackend,
    pub redis_url: String,
    /// `redis_url` lists the seed nodes of a Redis Cluster, comma-separated.
    pub redis_cluster: bool,
    /// Prefix of every Redis key, one per deployment.
    pub key_prefix: String,
    /// The memory backend's event log file; empty means `<data_dir>/events.log`.
    pub log_path: PathBuf,
    /// The memory backend's log file is sealed into a segment (`events.log.00000001`, ...)
    /// once it holds this many bytes; export and start-up read across the segments.
    pub log_segment_bytes: u64,
    /// Most sealed log segments kept; the oldest beyond it are deleted, with their events
    /// (0: keep every one, the default: the log is the record of every event).
    pub log_keep_segments: usize,
    /// Most entries kept in a user's or session's recent list.
    pub recent_cap: usize,
    /// Seconds a user's recent list lives after its last event.
    pub user_recent_ttl_secs: f64,
    /// Seconds an anonymous session's recent list lives after its last event.
    pub session_recent_ttl_secs: f64,
    /// Most entries kept in a user's long-term history (no TTL).
    pub history_cap: usize,
    /// Half-life of trending counters, in seconds.
    pub trending_half_life_secs: f64,
    /// Width of one trending time bucket, in seconds.
    pub trending_bucket_secs: u64,
    /// How many buckets trending looks back over; older ones are dropped.
    pub trending_buckets: u32,
    /// Seconds an `event_id` is remembered for idempotency.
    pub idempotency_ttl_secs: u64,
    /// Most events accepted in one batch.
    pub max_batch: usize,
    /// Seconds a timestamp may be ahead of the server clock.
    pub max_future_secs: u64,
    /// Approximate most entries kept in the Redis event stream (XADD MAXLEN ~).
    pub stream_maxlen: u64,
    /// Budget of every Redis call, in milliseconds; past it the call fails as unavailable.
    pub redis_timeout_ms: u64,
    /// Most entries in the memory backend's candidate cache.
    pub cache_max_entries: usize,
    /// Weight of each event type in trending, and whether it enters recent lists and history
    /// at all (weight 0: logged only).
    pub event_weights: EventWeights,
}

/// How much each event type counts. Impressions count 0 by default: being shown an item says
/// nothing about wanting it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventWeights {
    pub view: f64,
    pub click: f64,
    pub add_to_cart: f64,
    pub purchase: f64,
    pub rating: f64,
    pub impression: f64,
}

impl Default for EventWeights {
    fn default() -> Self {
        EventWeights {
            view: 1.0,
            click: 2.0,
            add_to_cart: 4.0,
            purchase: 8.0,
            rating: 3.0,
            impression: 0.0,
        }
    }
}

impl EventWeights {
    pub fn get(&self, t: crate::domain::EventType) -> f64 {
        use crate::domain::EventType::*;
        match t {
            View => self.view,
            Click => self.click,
            AddToCart => self.add_to_cart,
            Purchase => self.purchase,
            Rating => self.rating,
            Impression => self.impression,
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from("data"),
            bind: "0.0.0.0:8080".into(),
            model_path: PathBuf::from("models/demo"),
            index: IndexSettings::default(),
            session: SessionSettings::default(),
            server: ServerSettings::default(),
            rerank: RerankSettings::default(),
            catalog: CatalogSettings::default(),
            boosts: BoostRules::default(),
            registry: RegistrySettings::default(),
            experiments: Vec::new(),
            gorse: GorseSettings::default(),
            retrain: RetrainSettings::default(),
            admin_key: AdminKey::default(),
        }
    }
}

impl Default for IndexSettings {
    fn default() -> Self {
        IndexSettings {
            backend: IndexBackend::Embedded,
            qdrant_url: "http://127.0.0.1:6334".into(),
            collection: "tandem_items".into(),
            shard_number: 1,
            replication_factor: 1,
            indexing_threads: 0,
            scan_max_points: 200_000,
        }
    }
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            backend: SessionBackend::Memory,
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_cluster: false,
            key_prefix: "tandem".into(),
            log_path: PathBuf::new(),
            log_segment_bytes: 64 << 20,
            log_keep_segments: 0,
            recent_cap: 50,
            user_recent_ttl_secs: 7.0 * 86400.0,
            session_recent_ttl_secs: 1800.0,
            history_cap: 500,
            trending_half_life_secs: 6.0 * 3600.0,
            trending_bucket_secs: 3600,
            trending_buckets: 72,
            idempotency_ttl_secs: 7 * 86400,
            max_batch: 1000,
            max_future_secs: 3600,
            stream_maxlen: 10_000_000,
            redis_timeout_ms: 200,
            cache_max_entries: 100_000,
            event_weights: EventWeights::default(),
        }
    }
}

/// The HTTP server and the online pipeline (`tandem serve`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// The catalog (`items.{csv,jsonl}` in the common format) the server keeps in memory and,
    /// when the index is empty, embeds and indexes at start-up. Empty: the catalog comes from
    /// the index alone.
    pub catalog_dir: PathBuf,
    /// Largest accepted request body; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Requests served at once; the next one gets 429 instead of queueing without bound.
    pub max_concurrency: usize,
    /// Whole-request budget; a slower request gets 503. It starts once the body is read.
    pub request_timeout_ms: u64,
    /// Time to receive a request's whole body, read before the request takes one of the
    /// `max_concurrency` slots; a slower body gets 408. A client trickling its body so costs
    /// a connection for this long, never a slot.
    pub body_timeout_ms: u64,
    /// Candidates fetched from the index before re-ranking. 100, not 200: on the
    /// ml-latest-small replay (`examples/rerank_value.rs --k-candidates`) 200 changed no
    /// metric, and it costs about a third more CPU per request at 1M items (BENCHMARKS.md).
    pub k_candidates: usize,
    /// How long a user's candidate list stays in the cache. The key also holds the model
    /// version, the filter and the user's latest activity, so the TTL only bounds how long a
    /// newly added item can be missing from a cached list.
    pub cache_ttl_ms: u64,
    /// Recent interactions (session and user) read per request.
    pub recent_limit: usize,
    /// Long-term history read per request, pooled by the user tower.
    pub history_limit: usize,
    /// How long the in-process trending snapshot is reused before the store is asked again.
    pub trending_refresh_ms: u64,
    /// Budget of a session-store read on the request path (recent activity, history,
    /// trending, cache); past it the answer is served without it, `degraded:["session"]`.
    pub session_budget_ms: u64,
    /// Budget of an index search or fetch; past it the answer falls back to cached
    /// candidates or trending, `degraded:["index"]`.
    pub index_budget_ms: u64,
    /// Budget of a write to a dependency (event append, item upsert); past it the client gets
    /// 503 with `Retry-After` (a retried event is deduplicated by its `event_id`).
    pub write_budget_ms: u64,
    /// After a dependency fails, how long it is skipped before one request probes it again.
    pub breaker_cooldown_ms: u64,
    /// The `Retry-After` seconds sent with 429 and 503.
    pub retry_after_secs: u64,
    /// On SIGTERM, how long requests in flight may still run before the server exits.
    pub shutdown_grace_ms: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            catalog_dir: PathBuf::new(),
            max_body_bytes: 1 << 20,
            max_concurrency: 512,
            request_timeout_ms: 2_000,
            body_timeout_ms: 1_000,
            k_candidates: 100,
            cache_ttl_ms: 30_000,
            recent_limit: 20,
            history_limit: 50,
            trending_refresh_ms: 2_000,
            session_budget_ms: 50,
            index_budget_ms: 250,
            write_budget_ms: 1_000,
            breaker_cooldown_ms: 1_000,
            retry_after_secs: 1,
            shutdown_grace_ms: 10_000,
        }
    }
}

/// `[catalog]`: which item attributes filters may use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct CatalogSettings {
    /// Attribute names that `attr.<name>`, `attr_not.<name>`, `attr_min.<name>` and
    /// `attr_max.<name>` may filter on; each gets payload indexes in collections built from
    /// now on. `region` and `language` are always filterable. Other attributes are stored
    /// but not filterable (a request filtering on one gets 422).
    pub filterable: Vec<String>,
}

impl CatalogSettings {
    /// Every filterable name: `region`, `language`, then the declared ones.
    pub fn indexed_names(&self) -> Vec<String> {
        let mut names = vec![
            crate::domain::REGION.to_string(),
            crate::domain::LANGUAGE.to_string(),
        ];
        for n in &self.filterable {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names
    }

    pub fn is_filterable(&self, name: &str) -> bool {
        name == crate::domain::REGION
            || name == crate::domain::LANGUAGE
            || self.filterable.iter().any(|n| n == name)
    }
}

/// A boost rule: what it adds to (or takes from) the re-ranker's score, and to which items.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum BoostRule {
    /// Items created less than `days` ago get `+weight`.
    NewArrivals { weight: f32, days: f32 },
    /// Items whose attribute `attribute` is `true` (or the string "true") get `+weight`, at
    /// most `cap` of them per response (the best-scored ones).
    Promoted {
        weight: f32,
        cap: usize,
        #[serde(default = "promoted_attribute")]
        attribute: String,
    },
    /// Items whose numeric attribute `attribute` is below `below` get `-weight`.
    BuryLowStock {
        weight: f32,
        below: f64,
        #[serde(default = "stock_attribute")]
        attribute: String,
    },
}

fn promoted_attribute() -> String {
    "promoted".into()
}

fn stock_attribute() -> String {
    "stock".into()
}

impl BoostRule {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let (weight, extra) = match self {
            BoostRule::NewArrivals { weight, days } => (*weight, ("days", f64::from(*days))),
            BoostRule::Promoted { weight, cap, .. } => (*weight, ("cap", *cap as f64)),
            BoostRule::BuryLowStock { weight, below, .. } => (*weight, ("below", *below)),
        };
        if !weight.is_finite() || weight < 0.0 {
            return Err(ConfigError::Invalid {
                field: format!("{at}.weight"),
                reason: format!("{weight} must be a finite number >= 0"),
            });
        }
        if !extra.1.is_finite() || (extra.0 == "days" && extra.1 <= 0.0) {
            return Err(ConfigError::Invalid {
                field: format!("{at}.{}", extra.0),
                reason: format!("{} must be a finite number (days > 0)", extra.1),
            });
        }
        Ok(())
    }
}

/// `[boosts.NAME]`: the named rules. The built-in three (`new_arrivals`, `promoted`,
/// `bury_low_stock`) are there unless the file gives its own `[boosts]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BoostRules(pub std::collections::BTreeMap<String, BoostRule>);

impl Default for BoostRules {
    fn default() -> Self {
        BoostRules(
            [
                (
                    "new_arrivals".to_string(),
                    BoostRule::NewArrivals {
                        weight: 0.1,
                        days: 14.0,
                    },
                ),
                (
                    "promoted".to_string(),
                    BoostRule::Promoted {
                        weight: 0.3,
                        cap: 2,
                        attribute: promoted_attribute(),
                    },
                ),
                (
                    "bury_low_stock".to_string(),
                    BoostRule::BuryLowStock {
                        weight: 0.3,
                        below: 5.0,
                        attribute: stock_attribute(),
                    },
                ),
            ]
            .into(),
        )
    }
}

impl BoostRules {
    pub fn get(&self, name: &str) -> Option<&BoostRule> {
        self.0.get(name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }

    /// The rules a variant's list names (`rerank.<variant>.boosts`), in its order, each once.
    /// An unknown name is skipped: a variant's typo must not fail requests. It is logged the
    /// first time `warned` meets it, not on every request the variant serves (which, at
    /// thousands of requests a second, buried the log and cost a formatted line each).
    pub fn for_variant(&self, names: &[String], warned: &WarnedNames) -> Vec<(String, BoostRule)> {
        let mut out: Vec<(String, BoostRule)> = Vec::new();
        for name in names {
            match self.get(name) {
                Some(rule) if !out.iter().any(|(n, _)| n == name) => {
                    out.push((name.clone(), rule.clone()))
                }
                Some(_) => {}
                None if warned.first_time(name) => {
                    tracing::warn!(rule = %name, "the variant names an unknown boost rule; skipped")
                }
                None => {}
            }
        }
        out
    }
}

/// The names a warning was already logged for, so that each is logged once.
#[derive(Debug, Default)]
pub struct WarnedNames(parking_lot::Mutex<std::collections::BTreeSet<String>>);

impl WarnedNames {
    /// True the first time `name` is seen, false after.
    pub fn first_time(&self, name: &str) -> bool {
        let mut seen = self.0.lock();
        !seen.contains(name) && seen.insert(name.to_string())
    }
}

/// Re-rank weights per experiment variant: `[rerank.control]` is the default arm and
/// `[rerank.NAME]` adds another. A variant table's missing keys take the built-in defaults,
/// not control's values, so every arm reads complete on its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RerankSettings(pub std::collections::BTreeMap<String, RerankWeights>);

/// The variant every request gets unless an experiment assigns another.
pub const CONTROL_VARIANT: &str = "control";

impl Default for RerankSettings {
    fn default() -> Self {
        RerankSettings([(CONTROL_VARIANT.to_string(), RerankWeights::default())].into())
    }
}

impl RerankSettings {
    /// The weights of a variant; a variant without its own table gets control's.
    pub fn for_variant(&self, variant: &str) -> &RerankWeights {
        self.0
            .get(variant)
            .or_else(|| self.0.get(CONTROL_VARIANT))
            .unwrap_or(&DEFAULT_WEIGHTS)
    }
}

static DEFAULT_WEIGHTS: RerankWeights = RerankWeights::DEFAULT;

/// The blend of the re-ranker (see `rerank.rs` for what each component measures).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RerankWeights {
    /// The ANN (user vector to item) cosine similarity.
    pub ann: f32,
    /// Max cosine similarity to the session's recent items.
    pub session_max: f32,
    /// Mean cosine similarity to the session's recent items.
    pub session_mean: f32,
    /// Share of the session (recency weighted) in the candidate's categories.
    pub category_affinity: f32,
    /// Trending score, normalised to 0..=1.
    pub trending: f32,
    /// exp(-age / freshness_half_life_days * ln 2).
    pub freshness: f32,
    pub freshness_half_life_days: f32,
    /// Subtracted from items the user viewed or clicked recently.
    pub viewed_penalty: f32,
    /// MMR trade-off: 1.0 is pure relevance, lower values favour diversity.
    pub mmr_lambda: f32,
    /// MMR's category term: subtracted, times how far the largest share of the items already
    /// placed that is in one of the candidate's categories is past one half (scaled to 0..=1),
    /// so that one clicked category cannot fill the whole page (0 turns it off).
    pub category_repeat: f32,
    /// How many of the newest session/history items the session components look at.
    pub session_window: usize,
    /// Boost rules (names of `[boosts.NAME]`) always on for this variant; a request's
    /// `boost=` adds more.
    pub boosts: Vec<String>,
}

impl Default for RerankWeights {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl RerankWeights {
    pub const DEFAULT: RerankWeights = RerankWeights {
        ann: 1.0,
        session_max: 0.3,
        session_mean: 0.2,
        category_affinity: 0.2,
        trending: 0.1,
        freshness: 0.05,
        freshness_half_life_days: 30.0,
        viewed_penalty: 0.3,
        mmr_lambda: 0.85,
        // Tuned on the demo catalog (BENCHMARKS.md, "Diversity after one click").
        category_repeat: 1.0,
        session_window: 10,
        boosts: Vec::new(),
    };

    pub fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let fields = [
            ("ann", self.ann),
            ("session_max", self.session_max),
            ("session_mean", self.session_mean),
            ("category_affinity", self.category_affinity),
            ("trending", self.trending),
            ("freshness", self.freshness),
            ("viewed_penalty", self.viewed_penalty),
            ("category_repeat", self.category_repeat),
        ];
        for (name, w) in fields {
            if !w.is_finite() || w < 0.0 {
                return Err(ConfigError::Invalid {
                    field: format!("{at}.{name}"),
                    reason: format!("{w} must be a finite number >= 0"),
                });
            }
        }
        if !(self.freshness_half_life_days.is_finite() && self.freshness_half_life_days > 0.0) {
            return Err(ConfigError::Invalid {
                field: format!("{at}.freshness_half_life_days"),
                reason: "must be > 0".into(),
            });
        }
        if !(0.0..=1.0).contains(&self.mmr_lambda) {
            return Err(ConfigError::Invalid {
                field: format!("{at}.mmr_lambda"),
                reason: format!("{} must be within 0..=1", self.mmr_lambda),
            });
        }
        Ok(())
    }
}

impl Settings {
    /// Loads the file (if given), then applies `TANDEM_*` variables from the process
    /// environment, then validates.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_from(file, std::env::vars())
    }

    /// Like [`Settings::load`], with the environment passed in (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut doc = match file {
            Some(f) => {
                let text = std::fs::read_to_string(f).map_err(|e| ConfigError::File {
                    file: f.to_path_buf(),
                    reason: e.to_string(),
                })?;
                text.parse::<toml::Table>().map_err(|e| ConfigError::File {
                    file: f.to_path_buf(),
                    reason: e.to_string(),
                })?
            }
            None => toml::Table::new(),
        };
        let mut admin_key = None;
        for (var, value) in env {
            let Some(key) = var.strip_prefix("TANDEM_") else {
                continue;
            };
            if key == "ADMIN_KEY" {
                admin_key = Some(value).filter(|v| !v.is_empty());
                continue;
            }
            let path: Vec<String> = key
                .to_ascii_lowercase()
                .split("__")
                .map(String::from)
                .collect();
            if !Self::is_known_key(&path) {
                continue; // other TANDEM_* variables (TANDEM_ADMIN_KEY, TANDEM_LOG_FORMAT) are not settings
            }
            set_path(&mut doc, &path, &value);
        }
        let mut settings: Settings =
            toml::Value::Table(doc)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Invalid {
                    field: "config".into(),
                    reason: e.message().to_string(),
                })?;
        settings.admin_key = AdminKey(admin_key);
        settings.validate()?;
        Ok(settings)
    }

    fn is_known_key(path: &[String]) -> bool {
        let defaults = toml::Value::try_from(Settings::default()).expect("settings serialize");
        let mut v = &defaults;
        for p in path {
            match v.get(p) {
                Some(next) => v = next,
                None => return false,
            }
        }
        !v.is_table()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            field: field.into(),
            reason,
        };
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty".into()));
        }
        self.bind
            .parse::<std::net::SocketAddr>()
            .map_err(|e| invalid("bind", format!("{:?} is not host:port ({e})", self.bind)))?;
        if self.index.backend == IndexBackend::Qdrant && !self.index.qdrant_url.starts_with("http")
        {
            return Err(invalid(
                "index.qdrant_url",
                format!(
                    "{:?} must start with http:// or https://",
                    self.index.qdrant_url
                ),
            ));
        }
        if self.index.shard_number == 0 || self.index.replication_factor == 0 {
            return Err(invalid(
                "index.shard_number",
                "shard_number and replication_factor must be at least 1".into(),
            ));
        }
        if self.session.backend == SessionBackend::Redis
            && !self
                .session
                .redis_url
                .split(',')
                .all(|u| u.trim().starts_with("redis"))
        {
            return Err(invalid(
                "session.redis_url",
                format!(
                    "{:?} must start with redis:// or rediss://",
                    self.session.redis_url
                ),
            ));
        }
        let server = &self.server;
        for (field, v) in [
            ("server.max_body_bytes", server.max_body_bytes),
            ("server.max_concurrency", server.max_concurrency),
            ("server.k_candidates", server.k_candidates),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1".into()));
            }
        }
        if server.request_timeout_ms == 0 {
            return Err(invalid(
                "server.request_timeout_ms",
                "must be at least 1".into(),
            ));
        }
        if server.body_timeout_ms == 0 {
            return Err(invalid(
                "server.body_timeout_ms",
                "must be at least 1".into(),
            ));
        }
        for (field, v) in [
            ("server.session_budget_ms", server.session_budget_ms),
            ("server.index_budget_ms", server.index_budget_ms),
            ("server.write_budget_ms", server.write_budget_ms),
            ("server.breaker_cooldown_ms", server.breaker_cooldown_ms),
            ("server.retry_after_secs", server.retry_after_secs),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be at least 1".into()));
            }
        }
        for (name, w) in &self.rerank.0 {
            w.validate(&format!("rerank.{name}"))?;
            for (i, b) in w.boosts.iter().enumerate() {
                if self.boosts.get(b).is_none() {
                    return Err(invalid(
                        &format!("rerank.{name}.boosts[{i}]"),
                        format!(
                            "unknown boost rule {b:?}; [boosts] has: {}",
                            self.boosts.names().join(", ")
                        ),
                    ));
                }
            }
        }
        for (name, rule) in &self.boosts.0 {
            rule.validate(&format!("boosts.{name}"))?;
        }
        for (i, name) in self.catalog.filterable.iter().enumerate() {
            crate::domain::check_attr_name(name)
                .map_err(|r| invalid(&format!("catalog.filterable[{i}]"), r))?;
        }
        if self.registry.keep_last < 2 {
            return Err(invalid(
                "registry.keep_last",
                "must be at least 2 (the active version and its rollback target)".into(),
            ));
        }
        experiments::validate(&self.experiments)?;
        self.retrain.validate()?;
        self.session.validate()?;
        Ok(())
    }
}

impl Settings {
    /// Replicas share one state: the index is a Qdrant server and the session store is
    /// Redis, so the catalog's changes, the model registry and the experiments live there
    /// too (see `cluster`), and every replica serves the same. Any other combination is one
    /// process that keeps them itself.
    pub fn shared(&self) -> bool {
        self.index.backend == IndexBackend::Qdrant && self.session.backend == SessionBackend::Redis
    }
}

impl SessionSettings {
    /// The memory backend's log file under `data_dir` unless set.
    pub fn log_file(&self, data_dir: &Path) -> PathBuf {
        if self.log_path.as_os_str().is_empty() {
            data_dir.join("events.log")
        } else {
            self.log_path.clone()
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field: &str, reason: &str| {
            Err(ConfigError::Invalid {
                field: format!("session.{field}"),
                reason: reason.into(),
            })
        };
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if self.log_segment_bytes < 4096 {
            return invalid("log_segment_bytes", "must be at least 4096");
        }
        if self.recent_cap == 0 {
            return invalid("recent_cap", "must be at least 1");
        }
        if self.history_cap == 0 {
            return invalid("history_cap", "must be at least 1");
        }
        if !positive(self.user_recent_ttl_secs) {
            return invalid(
                "user_recent_ttl_secs",
                "must be a positive number of seconds",
            );
        }
        if !positive(self.session_recent_ttl_secs) {
            return invalid(
                "session_recent_ttl_secs",
                "must be a positive number of seconds",
            );
        }
        if !positive(self.trending_half_life_secs) {
            return invalid(
                "trending_half_life_secs",
                "must be a positive number of seconds",
            );
        }
        if self.trending_bucket_secs == 0 || self.trending_buckets == 0 {
            return invalid(
                "trending_bucket_secs",
                "buckets and their width must be at least 1",
            );
        }
        if self.max_batch == 0 {
            return invalid("max_batch", "must be at least 1");
        }
        if self.redis_timeout_ms == 0 {
            return invalid("redis_timeout_ms", "must be at least 1");
        }
        if self.stream_maxlen == 0 {
            return invalid("stream_maxlen", "must be at least 1");
        }
        let w = self.event_weights;
        for (name, v) in [
            ("view", w.view),
            ("click", w.click),
            ("add_to_cart", w.add_to_cart),
            ("purchase", w.purchase),
            ("rating", w.rating),
            ("impression", w.impression),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(ConfigError::Invalid {
                    field: format!("session.event_weights.{name}"),
                    reason: format!("{v} is not a non-negative number"),
                });
            }
        }
        Ok(())
    }
}

/// Sets `doc[path...] = value`, parsing the value as TOML (number, bool) when it can, else as
/// a string.
fn set_path(doc: &mut toml::Table, path: &[String], value: &str) {
    let (last, parents) = path.split_last().expect("non-empty path");
    let mut table = doc;
    for p in parents {
        table = table
            .entry(p.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("settings sections are tables");
    }
    let parsed = format!("v = {value}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !v.is_table() && !v.is_array())
        .unwrap_or_else(|| toml::Value::String(value.to_string()));
    table.insert(last.clone(), parsed);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` into a shared buffer: what a test subscriber logged.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A variant that names a rule the settings lack still serves (the rule is skipped), and
    /// the warning is logged once, not once per request.
    #[test]
    fn a_variants_unknown_boost_rule_is_skipped_and_logged_once() {
        let rules = BoostRules::default();
        let warned = WarnedNames::default();
        let log = Captured::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let names: Vec<String> = vec!["promoted".into(), "sparkle".into(), "promoted".into()];
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..50 {
                let got = rules.for_variant(&names, &warned);
                let got: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
                assert_eq!(got, ["promoted"]);
            }
        });
        let text = String::from_utf8(log.0.lock().clone()).unwrap();
        assert_eq!(text.matches("unknown boost rule").count(), 1, "{text}");
        assert!(text.contains("sparkle"));
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn env_overrides_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("tandem.toml");
        std::fs::write(
            &f,
            "bind = \"127.0.0.1:9000\"\n[index]\nbackend = \"qdrant\"\n",
        )
        .unwrap();
        let s = Settings::load_from(
            Some(&f),
            env(&[
                ("TANDEM_SESSION__BACKEND", "redis"),
                ("TANDEM_INDEX__SHARD_NUMBER", "3"),
                ("TANDEM_ADMIN_KEY", "not-a-setting"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(s.bind, "127.0.0.1:9000");
        assert_eq!(s.index.backend, IndexBackend::Qdrant);
        assert_eq!(s.index.shard_number, 3);
        assert_eq!(s.session.backend, SessionBackend::Redis);
    }

    #[test]
    fn bad_settings_name_the_field() {
        let err = Settings::load_from(None, env(&[("TANDEM_BIND", "nope")])).unwrap_err();
        assert!(err.to_string().contains("`bind`"), "{err}");
        let err =
            Settings::load_from(None, env(&[("TANDEM_INDEX__BACKEND", "faiss")])).unwrap_err();
        assert!(err.to_string().contains("faiss"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t.toml");
        std::fs::write(&f, "bindd = 1\n").unwrap();
        let err = Settings::load_from(Some(&f), env(&[])).unwrap_err();
        assert!(err.to_string().contains("bindd"), "{err}");
    }
}
