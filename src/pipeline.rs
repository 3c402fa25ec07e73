//! The online flow, in one place: the only module where experiments, session, model, index
//! and re-ranker meet. A request's story runs here from the variant it is assigned to the
//! impression it is counted as: `Recommender::recommend` reads as that story, one named step
//! per line; each step is timed, and the timings are logged with the request id and exported
//! as metrics. The HTTP handlers only validate input and shape the answer.
//!
//! Nothing here fails a request because a dependency is down: a session store that does not
//! answer means no personalisation, an index that does not answer means trending or popular
//! items, and every such shortcut is reported in `degraded`.

use crate::arms::{Arm, Arms};
use crate::catalog::{Catalog, CatalogEntry};
use crate::config::experiments::Assignment;
use crate::config::{BoostRules, ServerSettings, WarnedNames, CONTROL_VARIANT};
use crate::domain::{EventType, Filter, IdMap, IdSet, ItemId, SessionId, UserId};
use crate::experiment::Experiments;
use crate::index::VectorIndex;
use crate::model::{TwoTower, UserEvent};
use crate::rerank::{self, Candidate, Context, Ranked, SessionItem};
use crate::session::{Actor, RecentItem, SessionError, SessionStore};
use crate::telemetry;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Onboarding seeds this many popular items of each chosen category...
const SEEDS_PER_CATEGORY: usize = 3;
/// ...chosen among this many of its most popular.
const SEED_POOL: usize = 30;
/// Popular items that join the ANN candidates when the popularity prior has weight.
const POPULAR_CANDIDATES: usize = 100;
/// Depth of the trending list kept in memory per category.
const TRENDING_DEPTH: usize = 500;
/// The MMR pass orders this many positions past the requested `k`, so that business rules
/// dropping a few items still leave a diversified page.
const MMR_SLACK: usize = 10;

/// A part of the pipeline that did not answer, so the response was made without it.
/// `degraded` names each once, in the order a request meets them (the order declared here).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Degraded {
    /// The session store: no recent activity or history was used.
    Session,
    /// The candidate cache: it was bypassed.
    Cache,
    /// The user tower failed: the fallback list was served.
    Model,
    /// The vector index: the fallback list was served.
    Index,
    /// Trending counters: the catalog's popularity order was used.
    Trending,
}

impl Degraded {
    /// The name clients see in `degraded:[..]`, and the metric's `cause` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Degraded::Session => "session",
            Degraded::Model => "model",
            Degraded::Index => "index",
            Degraded::Trending => "trending",
            Degraded::Cache => "cache",
        }
    }
}

/// Where the candidates came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// ANN search with the user vector (personalised).
    Personal,
    /// ANN search with the user vector, from the candidate cache.
    Cached,
    /// Nothing personal was known: trending, topped up with popular items.
    Trending,
    /// ANN search around one item.
    Similar,
}

/// What a client asked for, validated. The variant, the model and everything else a request
/// picks up on its way are the pipeline's ([`Serving`]).
#[derive(Debug, Clone)]
pub struct RecommendRequest {
    pub request_id: String,
    pub user: Option<UserId>,
    pub session: Option<SessionId>,
    pub k: usize,
    pub filter: Filter,
    /// The boost rules this request asked for (`boost=`); its variant's own rules
    /// (`rerank.<variant>.boosts`) are added when the variant is known.
    pub boosts: Vec<(String, crate::config::BoostRule)>,
}

/// Cold start for a user (`POST /v1/users/{id}/onboarding`), validated: the chosen categories
/// and the liked items, which the catalog holds.
#[derive(Debug, Clone)]
pub struct OnboardRequest {
    pub request_id: String,
    pub user: UserId,
    pub categories: Vec<String>,
    pub liked: Vec<Arc<CatalogEntry>>,
    pub k: usize,
    /// Region, language and attribute rules the first page keeps to.
    pub attributes: crate::domain::AttrFilter,
}

/// What onboarding seeded, newest first, and the first recommendations made from it.
#[derive(Debug, Clone)]
pub struct Onboarded {
    pub seeded: Vec<ItemId>,
    pub recommendations: Recommendations,
}

#[derive(Debug, Clone)]
pub struct Recommendations {
    pub request_id: String,
    pub model_version: String,
    pub variant: String,
    pub source: Source,
    pub degraded: Vec<Degraded>,
    pub items: Vec<Ranked>,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("item {0} not found")]
    UnknownItem(ItemId),
    /// Onboarding found nothing to seed: no liked item, and no available item in any chosen
    /// category.
    #[error("no available item is in any of these categories")]
    NothingToSeed,
    /// Onboarding could not write the seeded history.
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// What the request knows about the user: recent activity and history, merged newest first
/// with one entry per item.
#[derive(Debug, Default)]
struct Activity {
    events: Vec<(Arc<CatalogEntry>, RecentItem)>,
    purchased: IdSet,
    viewed: IdSet,
    /// The candidate cache's key for this activity under the request's model and filter
    /// ([`activity_fingerprint`]); `None` without activity.
    cache_key: Option<String>,
}

/// One request on its way through the pipeline: what was asked, the experiment arm it was
/// assigned to and the model that answers it, what did not answer (each cause once, however
/// many steps met it), and how long each step took.
struct Serving<'r> {
    req: &'r RecommendRequest,
    /// `None`: no experiment runs, or the request has no id to hash; it gets control.
    assignment: Option<Assignment>,
    variant: String,
    model: Arc<TwoTower>,
    /// The experiment arm serving a model other than the active one, if this request's is.
    arm: Option<Arc<Arm>>,
    degraded: BTreeSet<Degraded>,
    stages: Stages,
}

/// Per-request stage timings.
struct Stages {
    started: Instant,
    laps: Vec<(&'static str, Duration)>,
}

/// `step!(r, "name" => expr)`: runs one pipeline step and records how long it took under its
/// name (the `stage` label of `tandem_stage_seconds`). The `=>` keeps each step on its own
/// line: rustfmt leaves a macro call whose input is not an argument list as it is written.
macro_rules! step {
    ($serving:ident, $name:literal => $e:expr) => {{
        let t = Instant::now();
        let v = $e;
        $serving.stages.laps.push(($name, t.elapsed()));
        v
    }};
}

impl Stages {
    fn new() -> Self {
        Stages {
            started: Instant::now(),
            laps: Vec::with_capacity(8),
        }
    }

    fn finish(&self, request_id: &str, kind: &'static str) {
        let total = self.started.elapsed();
        for (name, d) in &self.laps {
            telemetry::record_stage(name, *d);
        }
        telemetry::record_pipeline(kind, total);
        tracing::debug!(
            request_id,
            kind,
            total_us = total.as_micros() as u64,
            stages = %self
                .laps
                .iter()
                .map(|(n, d)| format!("{n}={}us", d.as_micros()))
                .collect::<Vec<_>>()
                .join(" "),
            "pipeline"
        );
    }
}

/// One trending list, normalised to 0..=1, best first, with a lookup by id.
#[derive(Debug, Default)]
struct Trending {
    ranked: Vec<(ItemId, f32)>,
    scores: IdMap<f32>,
}

/// A short-lived in-process copy of the trending lists, so that a request does not pay a
/// store round trip for them; trending moves on a scale of minutes.
#[derive(Default)]
struct TrendingCache {
    /// Per category (`None`: all), when it was fetched and what.
    lists: Mutex<HashMap<Option<String>, Fetched>>,
}

type Fetched = (Instant, Arc<Trending>);

/// What the pipeline reads from. `Recommender::new` takes it whole, so that adding a
/// dependency does not lengthen an argument list.
pub struct Parts {
    /// Behind `ArcSwap` so a new checkpoint can be activated without a restart; each request
    /// takes one snapshot and uses it throughout.
    pub model: Arc<ArcSwap<TwoTower>>,
    pub index: Arc<dyn VectorIndex>,
    pub sessions: Arc<dyn SessionStore>,
    pub catalog: Arc<Catalog>,
    pub settings: ServerSettings,
    /// The boost rules a variant or a request may name (`[boosts]`).
    pub boosts: BoostRules,
    /// The running experiments: each request's variant, its re-rank weights, and the
    /// impression it is counted as.
    pub experiments: Arc<Experiments>,
    /// Models serving beside the active one, for experiments.
    pub arms: Arc<Arms>,
}

/// The online flow; its fields are the [`Parts`] it was built from.
pub struct Recommender {
    model: Arc<ArcSwap<TwoTower>>,
    index: Arc<dyn VectorIndex>,
    sessions: Arc<dyn SessionStore>,
    catalog: Arc<Catalog>,
    settings: ServerSettings,
    boosts: BoostRules,
    experiments: Arc<Experiments>,
    arms: Arc<Arms>,
    trending: TrendingCache,
    /// The unknown boost rule names a variant's list was already logged for.
    unknown_boosts: WarnedNames,
}

impl Recommender {
    pub fn new(parts: Parts) -> Self {
        let Parts {
            model,
            index,
            sessions,
            catalog,
            settings,
            boosts,
            experiments,
            arms,
        } = parts;
        Recommender {
            model,
            index,
            sessions,
            catalog,
            settings,
            boosts,
            experiments,
            arms,
            trending: TrendingCache::default(),
            unknown_boosts: WarnedNames::default(),
        }
    }

    /// Personal recommendations for a user and/or session; trending for strangers.
    pub async fn recommend(&self, req: &RecommendRequest) -> Recommendations {
        let mut r = self.start(req);
        let mut activity = step!(r, "read_session" => self.read_activity(&mut r).await);
        let cached = step!(r, "cache_get" => self.cached_candidates(&mut r, &activity).await);
        let user_vector = step!(r, "user_vector" => self.user_vector(&mut r, &activity, &cached));
        let (source, candidates) = step!(r, "fetch_candidates" => {
            if let Some(found) = cached {
                (Source::Cached, found)
            } else if let Some(found) = self.personal(&mut r, &activity, user_vector).await {
                (Source::Personal, found)
            } else {
                (Source::Trending, self.fallback_candidates(&mut r, self.depth(req)).await)
            }
        });
        let candidates =
            step!(r, "arm_vectors" => self.in_arm_space(&mut r, &mut activity, candidates).await);
        let trending = step!(r, "trending" => self.trending_list(&mut r, None).await);
        let ranked = step!(r, "rerank" => self.rerank(&r, &activity, &trending.scores, candidates));
        let items = step!(r, "business_rules" => self.business_rules(&r, ranked, &activity));
        self.finish(r, "recommend", source, items)
    }

    /// Items like `item`, under the same filters.
    pub async fn similar(
        &self,
        item: &ItemId,
        req: &RecommendRequest,
    ) -> Result<Recommendations, PipelineError> {
        let anchor = self
            .catalog
            .get(item)
            .ok_or_else(|| PipelineError::UnknownItem(item.clone()))?;
        let req = &RecommendRequest {
            filter: filter_excluding(&req.filter, [anchor.id().clone()]),
            ..req.clone()
        };
        let mut r = self.start(req);
        // The checkpoint's `similar` query (content in, see `TwoTower::similar_query`); an
        // older checkpoint answers with the anchor's own vector.
        let query = r
            .model
            .similar_query(&anchor.item)
            .unwrap_or_else(|_| anchor.vector.to_vec());
        let found =
            step!(r, "fetch_candidates" => self.search(&mut r, &query, req.k + MMR_SLACK).await);
        let (none, found) = (Activity::default(), found.unwrap_or_default());
        let ranked = step!(r, "rerank" => self.rerank(&r, &none, &IdMap::default(), found));
        let items = step!(r, "business_rules" => self.business_rules(&r, ranked, &none));
        Ok(self.finish(r, "similar", Source::Similar, items))
    }

    /// Trending items under the filter; the catalog's popularity order when trending is empty.
    pub async fn trending(&self, req: &RecommendRequest) -> Recommendations {
        let mut r = self.start(req);
        let found = step!(r, "fetch_candidates" => self.fallback_candidates(&mut r, req.k).await);
        let ranked = found.into_iter().map(unranked).collect();
        let items =
            step!(r, "business_rules" => self.business_rules(&r, ranked, &Activity::default()));
        self.finish(r, "trending", Source::Trending, items)
    }

    /// Cold start for users: seeds the history with the liked items and the most popular
    /// items of each chosen category, so that this very answer, and every request after it,
    /// is personal. What the user just said they like is history: answering with it again
    /// (at #1, as its own nearest neighbour) tells them nothing, as with purchased items.
    pub async fn onboard(&self, o: &OnboardRequest) -> Result<Onboarded, PipelineError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let seeds = self.seeds(&o.categories, &o.liked, &o.attributes, now_ms);
        if seeds.is_empty() {
            return Err(PipelineError::NothingToSeed);
        }
        self.sessions.seed_history(&o.user, &seeds).await?;
        let req = RecommendRequest {
            request_id: o.request_id.clone(),
            user: Some(o.user.clone()),
            session: None,
            k: o.k,
            filter: Filter {
                available_only: true,
                exclude_items: o.liked.iter().map(|e| e.id().clone()).collect(),
                attributes: o.attributes.clone(),
                ..Default::default()
            },
            boosts: Vec::new(),
        };
        Ok(Onboarded {
            seeded: seeds.into_iter().map(|r| r.item_id).collect(),
            recommendations: self.recommend(&req).await,
        })
    }

    // ---- the request's frame --------------------------------------------------------------

    /// A request's start: its experiment arm (the one place a variant is chosen), and the
    /// model that answers it: the one the arm pins when that one is serving (as the active
    /// model or as an arm), and otherwise the active model.
    fn start<'r>(&self, req: &'r RecommendRequest) -> Serving<'r> {
        let stages = Stages::new();
        let assignment = self
            .experiments
            .assign(req.user.as_ref(), req.session.as_ref());
        let variant = assignment
            .as_ref()
            .map_or_else(|| CONTROL_VARIANT.to_string(), |a| a.variant.clone());
        let active = self.model.load_full();
        let pinned = assignment.as_ref().and_then(|a| a.model_version.as_deref());
        let (model, arm) = match pinned {
            Some(v) if v != active.version() => match self.arms.get(v) {
                Some(arm) => (arm.model.clone(), Some(arm)),
                None => (active, None),
            },
            _ => (active, None),
        };
        Serving {
            req,
            assignment,
            variant,
            model,
            arm,
            degraded: BTreeSet::new(),
            stages,
        }
    }

    /// A request's end: its timings and degradations exported, and the answer counted as an
    /// impression of its experiment arm.
    fn finish(
        &self,
        r: Serving<'_>,
        kind: &'static str,
        source: Source,
        items: Vec<Ranked>,
    ) -> Recommendations {
        r.stages.finish(&r.req.request_id, kind);
        for cause in &r.degraded {
            telemetry::record_degraded(cause.as_str());
        }
        if let Some(a) = &r.assignment {
            self.experiments
                .record_served(a, &r.req.request_id, r.stages.started.elapsed());
        }
        Recommendations {
            request_id: r.req.request_id.clone(),
            model_version: r.model.version().to_string(),
            variant: r.variant,
            source,
            degraded: r.degraded.into_iter().collect(),
            items,
        }
    }

    // ---- the steps ----------------------------------------------------------------------

    /// Onboarding's seeds, newest first: the liked items, then round-robin over the chosen
    /// categories, their most popular available items that keep to the request's region,
    /// language and attribute rules (a seed becomes history, and the user tower pools it:
    /// an item the user cannot buy would pull the first pages towards its region's items);
    /// a category none of whose items keeps to them is seeded without them.
    fn seeds(
        &self,
        categories: &[String],
        liked: &[Arc<CatalogEntry>],
        attributes: &crate::domain::AttrFilter,
        now_ms: i64,
    ) -> Vec<RecentItem> {
        let mut seeds: Vec<RecentItem> = Vec::new();
        let mut seen = HashSet::new();
        // Newest first: liked items are the strongest signal, so they get the latest stamps.
        for e in liked {
            if seen.insert(e.id().clone()) {
                seeds.push(RecentItem {
                    item_id: e.id().clone(),
                    event_type: EventType::Rating,
                    timestamp_ms: now_ms - seeds.len() as i64,
                });
            }
        }
        // Per category, the most popular items that say the most about the choice: an item
        // only in chosen categories beats a more popular one that is mostly something else.
        let purity = |e: &CatalogEntry| {
            let n = e.item.categories.len().max(1) as f32;
            e.item
                .categories
                .iter()
                .filter(|g| categories.iter().any(|c| c == *g))
                .count() as f32
                / n
        };
        let per_category: Vec<Vec<Arc<CatalogEntry>>> = categories
            .iter()
            .map(|c| {
                let filter = Filter {
                    include_categories: vec![c.clone()],
                    available_only: true,
                    attributes: attributes.clone(),
                    ..Default::default()
                };
                let mut top = self.catalog.popular(&filter, SEED_POOL);
                if top.is_empty() && !attributes.is_empty() {
                    // No item of the category keeps to the rules (a region the shop has not
                    // stocked it in): its popular items still say what the user chose, and
                    // the answer itself keeps to the rules. Refusing would tell the user
                    // that the category is empty, which it is not.
                    let unruled = Filter {
                        attributes: Default::default(),
                        ..filter
                    };
                    top = self.catalog.popular(&unruled, SEED_POOL);
                }
                top.sort_by(|a, b| purity(b).total_cmp(&purity(a)));
                top
            })
            .collect();
        // Round-robin over the categories so each one is seeded.
        for rank in 0..SEEDS_PER_CATEGORY {
            for top in &per_category {
                if let Some(e) = top.get(rank) {
                    if seen.insert(e.id().clone()) {
                        seeds.push(RecentItem {
                            item_id: e.id().clone(),
                            event_type: EventType::Click,
                            timestamp_ms: now_ms - seeds.len() as i64,
                        });
                    }
                }
            }
        }
        seeds
    }

    /// An arm's request: the candidates and the session's items take the arm's vectors, so
    /// that the re-ranker's similarities are the arm model's. If the arm's collection does
    /// not answer, both keep the live model's vectors (still one space) and `index` is
    /// reported degraded. Any other request keeps its candidates as they are.
    async fn in_arm_space(
        &self,
        r: &mut Serving<'_>,
        activity: &mut Activity,
        candidates: Vec<Candidate>,
    ) -> Vec<Candidate> {
        let Some(arm) = r.arm.clone() else {
            return candidates;
        };
        let n = candidates.len();
        let entries: Vec<Arc<CatalogEntry>> = candidates
            .iter()
            .map(|c| c.entry.clone())
            .chain(activity.events.iter().map(|(e, _)| e.clone()))
            .collect();
        let Some(moved) = self.arms.in_space(&arm, entries).await else {
            r.degraded.insert(Degraded::Index);
            return candidates;
        };
        let mut by_id: HashMap<ItemId, Arc<CatalogEntry>> =
            moved.into_iter().map(|e| (e.id().clone(), e)).collect();
        let events = std::mem::take(&mut activity.events);
        activity.events = events
            .into_iter()
            .filter_map(|(e, r)| Some((by_id.get(e.id())?.clone(), r)))
            .collect();
        let mut out = Vec::with_capacity(n);
        for c in candidates {
            if let Some(entry) = by_id.remove(c.entry.id()) {
                out.push(Candidate {
                    entry,
                    ann_score: c.ann_score,
                });
            }
        }
        out
    }

    /// The user's and the session's recent activity and the user's history, merged. A store
    /// that does not answer leaves the request without them (`session` degraded).
    async fn read_activity(&self, r: &mut Serving<'_>) -> Activity {
        let req = r.req;
        let limit = self.settings.recent_limit;
        let store = &self.sessions;
        let session_recent = async {
            match &req.session {
                Some(s) => store.recent(&Actor::Session(s.clone()), limit).await,
                None => Ok(Vec::new()),
            }
        };
        let user = async {
            match &req.user {
                Some(u) => {
                    let read = store.user_activity(u, limit, self.settings.history_limit);
                    read.await
                        .map(|(recent, history)| [recent, history].concat())
                }
                None => Ok(Vec::new()),
            }
        };
        let (s, u) = tokio::join!(session_recent, user);
        let mut all = Vec::new();
        let mut failed = false;
        for part in [s, u] {
            match part {
                Ok(list) => all.extend(list),
                Err(e) => {
                    failed = true;
                    tracing::warn!(request_id = %req.request_id, error = %e, "session store");
                }
            }
        }
        if failed {
            r.degraded.insert(Degraded::Session);
        }
        let mut activity = self.merge_activity(all);
        activity.cache_key = activity_fingerprint(&r.model, &req.filter, &activity);
        activity
    }

    fn merge_activity(&self, mut all: Vec<RecentItem>) -> Activity {
        all.sort_by_key(|r| std::cmp::Reverse(r.timestamp_ms));
        let mut activity = Activity::default();
        let entries = self.catalog.get_many(all.iter().map(|r| &r.item_id));
        // Each item's newest event is its place in the history; impressions are not interest.
        // (Marked on borrowed ids: this runs on every personal request, over up to
        // `recent_limit + history_limit` events.)
        let newest: Vec<bool> = {
            let mut seen: HashSet<&str, foldhash::fast::RandomState> =
                HashSet::with_capacity_and_hasher(all.len(), Default::default());
            all.iter()
                .map(|r| r.event_type != EventType::Impression && seen.insert(r.item_id.as_str()))
                .collect()
        };
        for ((r, entry), newest) in all.into_iter().zip(entries).zip(newest) {
            let set = match r.event_type {
                EventType::Purchase => Some(&mut activity.purchased),
                EventType::View | EventType::Click => Some(&mut activity.viewed),
                _ => None,
            };
            if let Some(set) = set {
                if !set.contains(&r.item_id) {
                    set.insert(r.item_id.clone());
                }
            }
            // Unknown (deleted) items have no features.
            if let (true, Some(e)) = (newest, entry) {
                if activity.events.len() < self.settings.history_limit {
                    activity.events.push((e, r));
                }
            }
        }
        activity
    }

    /// The candidates an earlier request with the very same inputs found, if the cache still
    /// holds them.
    async fn cached_candidates(
        &self,
        r: &mut Serving<'_>,
        activity: &Activity,
    ) -> Option<Vec<Candidate>> {
        let key = activity.cache_key.as_ref()?;
        let bytes = match self.sessions.cache_get(key).await {
            Ok(b) => {
                telemetry::record_cache(b.is_some());
                b?
            }
            Err(e) => {
                tracing::warn!(error = %e, "candidate cache");
                r.degraded.insert(Degraded::Cache);
                return None;
            }
        };
        let list = decode_candidates(&bytes)?;
        let entries = self.catalog.get_many(list.iter().map(|(id, _)| id));
        Some(
            list.into_iter()
                .zip(entries)
                .filter_map(|((_, score), e)| {
                    e.map(|entry| Candidate {
                        entry,
                        ann_score: score,
                    })
                })
                .collect(),
        )
    }

    /// The user tower over the activity; not needed when the candidates were cached, and
    /// impossible without activity.
    fn user_vector(
        &self,
        r: &mut Serving<'_>,
        activity: &Activity,
        cached: &Option<Vec<Candidate>>,
    ) -> Option<Vec<f32>> {
        if cached.is_some() || activity.events.is_empty() {
            return None;
        }
        let history: Vec<UserEvent<'_>> = activity
            .events
            .iter()
            .map(|(e, r)| UserEvent {
                item: &e.item,
                event_type: r.event_type,
            })
            .collect();
        match r.model.embed_user(&history) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(error = %e, "user tower");
                r.degraded.insert(Degraded::Model);
                None
            }
        }
    }

    /// How many candidates a personal request fetches.
    fn depth(&self, req: &RecommendRequest) -> usize {
        self.settings.k_candidates.max(req.k + MMR_SLACK)
    }

    /// The ANN search by the user vector, with the popularity prior, written to the candidate
    /// cache; `None` without a vector or when the index does not answer.
    async fn personal(
        &self,
        r: &mut Serving<'_>,
        activity: &Activity,
        user_vector: Option<Vec<f32>>,
    ) -> Option<Vec<Candidate>> {
        let v = user_vector?;
        let found = self.search(r, &v, self.depth(r.req)).await?;
        let found = self
            .with_popularity_prior(r, activity.events.len(), &v, found)
            .await;
        self.cache_candidates(&activity.cache_key, &found);
        Some(found)
    }

    /// Adds the checkpoint's popularity prior to the ANN scores, as offline evaluation ranks
    /// (`eval::Ranker`). When the prior has weight (short histories, mostly), the most popular
    /// items under the filter join the candidates, scored the same way, since the ANN search
    /// by the user vector alone need not reach them.
    async fn with_popularity_prior(
        &self,
        r: &Serving<'_>,
        history_len: usize,
        user: &[f32],
        mut found: Vec<Candidate>,
    ) -> Vec<Candidate> {
        let model = &r.model;
        let prior = model.manifest().popularity_prior;
        if !prior.is_active() {
            return found;
        }
        if prior.weight(history_len) > 0.0 {
            let mut popular = self.catalog.popular(&r.req.filter, POPULAR_CANDIDATES);
            if let Some(arm) = &r.arm {
                // Scored against the arm's user vector, so in the arm's space.
                popular = self.arms.in_space(arm, popular).await.unwrap_or_default();
            }
            // The ids already found, borrowed (this runs on most personal requests).
            let fresh: Vec<Arc<CatalogEntry>> = {
                let seen: HashSet<&str, foldhash::fast::RandomState> =
                    found.iter().map(|c| c.entry.id().as_str()).collect();
                popular
                    .into_iter()
                    .filter(|e| !seen.contains(e.id().as_str()) && e.vector.len() == user.len())
                    .collect()
            };
            for entry in fresh {
                let ann_score = entry.vector.similarity(user);
                found.push(Candidate { entry, ann_score });
            }
        }
        for c in &mut found {
            let count = c.entry.popularity;
            c.ann_score += prior.term(history_len, count, model.prior_value(count));
        }
        found.sort_by(|a, b| b.ann_score.total_cmp(&a.ann_score));
        found
    }

    /// The collection of the model that made `vector`: the arm's when the request is an
    /// arm's, else the active model's (the live alias only while its collection is not
    /// known yet, see [`Arms::collection_of`]).
    async fn search(
        &self,
        r: &mut Serving<'_>,
        vector: &[f32],
        k: usize,
    ) -> Option<Vec<Candidate>> {
        let req = r.req;
        let filter = &req.filter;
        let collection = match &r.arm {
            Some(arm) => Some(arm.collection.clone()),
            None => self.arms.collection_of(r.model.version()),
        };
        let hits = match &collection {
            Some(c) => self.index.search_in(c, vector, filter, k).await,
            None => self.index.search(vector, filter, k).await,
        };
        let hits = match hits {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "index search");
                r.degraded.insert(Degraded::Index);
                return None;
            }
        };
        let entries = self.catalog.get_many(hits.iter().map(|h| &h.item_id));
        Some(
            hits.into_iter()
                .zip(entries)
                .filter_map(|(h, e)| {
                    e.map(|entry| Candidate {
                        entry,
                        ann_score: h.score,
                    })
                })
                .collect(),
        )
    }

    /// Writes the candidates to the cache in the background: the response does not wait
    /// for the write (with Redis, one more round trip; the cache read's p99 at 1,500 rps
    /// was 4.5 ms). A failed write is logged; the next request's cache read reports the
    /// store as degraded.
    fn cache_candidates(&self, key: &Option<String>, found: &[Candidate]) {
        let Some(key) = key.clone() else { return };
        let bytes = encode_candidates(found);
        let ttl = Duration::from_millis(self.settings.cache_ttl_ms);
        let sessions = self.sessions.clone();
        tokio::spawn(async move {
            if let Err(e) = sessions.cache_set(&key, &bytes, ttl).await {
                tracing::warn!(error = %e, "candidate cache");
            }
        });
    }

    /// Trending items passing the filter, topped up with the catalog's most popular ones.
    /// The base score is the normalised trending score, and below every trending item, the
    /// popularity rank, so that the order survives re-ranking without a session.
    async fn fallback_candidates(&self, r: &mut Serving<'_>, k: usize) -> Vec<Candidate> {
        let req = r.req;
        let filter = &req.filter;
        let mut out = Vec::with_capacity(k);
        let mut seen = IdSet::default();
        let categories: Vec<Option<String>> = if filter.include_categories.is_empty() {
            vec![None]
        } else {
            filter
                .include_categories
                .iter()
                .cloned()
                .map(Some)
                .collect()
        };
        let mut trending: Vec<(ItemId, f32)> = Vec::new();
        for c in &categories {
            trending.extend(
                self.trending_list(r, c.clone())
                    .await
                    .ranked
                    .iter()
                    .cloned(),
            );
        }
        trending.sort_by(|a, b| b.1.total_cmp(&a.1));
        let entries = self.catalog.get_many(trending.iter().map(|(id, _)| id));
        for ((_, score), entry) in trending.into_iter().zip(entries) {
            let Some(entry) = entry else { continue };
            if out.len() < k && filter.matches(&entry.item) && seen.insert(entry.id().clone()) {
                // Trending scores are in 0..=1; the popular top-up sits below them.
                out.push(Candidate {
                    entry,
                    ann_score: 1.0 + score,
                });
            }
        }
        if out.len() < k {
            let popular = self.catalog.popular(filter, k + seen.len());
            let n = popular.len().max(1) as f32;
            for (rank, entry) in popular.into_iter().enumerate() {
                if out.len() >= k {
                    break;
                }
                if seen.insert(entry.id().clone()) {
                    out.push(Candidate {
                        entry,
                        ann_score: 1.0 - rank as f32 / n,
                    });
                }
            }
        }
        out
    }

    /// The trending list of one category (or all), normalised to 0..=1, from the in-process
    /// snapshot when it is fresh enough. One request refreshes a stale snapshot; the requests
    /// meanwhile, and the next `trending_refresh_ms` after a failed refresh, use the old one.
    async fn trending_list(&self, r: &mut Serving<'_>, category: Option<String>) -> Arc<Trending> {
        let refresh = Duration::from_millis(self.settings.trending_refresh_ms);
        if let Some((at, list)) = self.trending.lists.lock().get_mut(&category) {
            if at.elapsed() < refresh {
                return list.clone();
            }
            // This request refreshes the list; until it is done, the others keep the old one
            // rather than all asking the store at once (a trending read is a pass over every
            // trending item, in Redis or in the memory store).
            *at = Instant::now();
        }
        let list = match self
            .sessions
            .trending(category.as_deref(), TRENDING_DEPTH)
            .await
        {
            Ok(raw) => {
                let max = raw.iter().map(|(_, s)| *s).fold(0.0, f64::max);
                let norm = if max > 0.0 { max } else { 1.0 };
                let ranked: Vec<(ItemId, f32)> = raw
                    .into_iter()
                    .map(|(id, s)| (id, (s / norm) as f32))
                    .collect();
                let scores = ranked.iter().cloned().collect();
                Arc::new(Trending { ranked, scores })
            }
            Err(e) => {
                tracing::warn!(error = %e, "trending");
                r.degraded.insert(Degraded::Trending);
                // Keep serving the last snapshot, however old, rather than nothing.
                if let Some((_, list)) = self.trending.lists.lock().get(&category) {
                    return list.clone();
                }
                return Arc::new(Trending::default());
            }
        };
        self.trending
            .lists
            .lock()
            .insert(category, (Instant::now(), list.clone()));
        list
    }

    fn rerank(
        &self,
        r: &Serving<'_>,
        activity: &Activity,
        trending: &IdMap<f32>,
        candidates: Vec<Candidate>,
    ) -> Vec<Ranked> {
        let rerank = self.experiments.weights();
        let weights = rerank.for_variant(&r.variant);
        // The variant's boost rules, then the ones the request asked for.
        let mut boosts = self
            .boosts
            .for_variant(&weights.boosts, &self.unknown_boosts);
        for (name, rule) in &r.req.boosts {
            if !boosts.iter().any(|(n, _)| n == name) {
                boosts.push((name.clone(), rule.clone()));
            }
        }
        let session: Vec<SessionItem> = activity
            .events
            .iter()
            .take(weights.session_window)
            .map(|(e, r)| SessionItem {
                entry: e.clone(),
                event_type: r.event_type,
            })
            .collect();
        let ctx = Context {
            weights,
            session: &session,
            purchased: &activity.purchased,
            viewed: &activity.viewed,
            trending,
            now_s: chrono::Utc::now().timestamp(),
            mmr_depth: r.req.k + MMR_SLACK,
            boosts: &boosts,
        };
        rerank::rerank(&ctx, candidates)
    }

    /// The last word, and the cut to `k`: in rank order, each item is checked against the
    /// live catalog (an item made unavailable or deleted since the candidates were fetched or
    /// cached drops out here) and the request's filter, and purchased items never pass. The
    /// check stops once `k` have passed.
    fn business_rules(
        &self,
        r: &Serving<'_>,
        ranked: Vec<Ranked>,
        activity: &Activity,
    ) -> Vec<Ranked> {
        let (filter, purchased, k) = (&r.req.filter, &activity.purchased, r.req.k);
        let mut kept = Vec::with_capacity(k.min(ranked.len()));
        for mut r in ranked {
            if kept.len() == k {
                break;
            }
            let Some(current) = self.catalog.get(r.entry.id()) else {
                continue;
            };
            if purchased.contains(current.id()) || !filter.matches(&current.item) {
                continue;
            }
            r.entry = current;
            kept.push(r);
        }
        kept
    }
}

/// A fallback candidate as it comes, for an answer that is not re-ranked (trending).
fn unranked(c: Candidate) -> Ranked {
    Ranked {
        score: c.ann_score,
        components: rerank::Components {
            relevance: c.ann_score,
            ..Default::default()
        },
        entry: c.entry,
    }
}

fn filter_excluding(filter: &Filter, ids: impl IntoIterator<Item = ItemId>) -> Filter {
    let mut f = filter.clone();
    f.exclude_items.extend(ids);
    f
}

/// The candidate cache's value: per candidate, in order, the id's length in bytes (u16), the
/// id and the score (f32), little-endian. A cache hit reads back up to 200 candidates: this
/// is a copy per id, where JSON was a parse of every id and score.
fn encode_candidates(found: &[Candidate]) -> Vec<u8> {
    let mut out = Vec::with_capacity(found.len() * 16);
    for c in found {
        let id = c.entry.id().as_str().as_bytes();
        let len = u16::try_from(id.len()).expect("ids are at most MAX_ID_LEN bytes");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&c.ann_score.to_le_bytes());
    }
    out
}

/// The (id, score) pairs [`encode_candidates`] wrote; `None` for bytes it did not write (a
/// JSON list an older version cached, say), which the caller takes as a miss.
///
/// The ids stay borrowed from `bytes`: they are only looked up in the catalog, and a hit of a
/// personal request reads a few hundred (issue 37: an `ItemId` each was two allocations).
/// A string that is no item's id finds nothing.
fn decode_candidates(mut bytes: &[u8]) -> Option<Vec<(&str, f32)>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (len, rest) = bytes.split_first_chunk::<2>()?;
        let (id, rest) = rest.split_at_checked(u16::from_le_bytes(*len) as usize)?;
        let (score, rest) = rest.split_first_chunk::<4>()?;
        out.push((std::str::from_utf8(id).ok()?, f32::from_le_bytes(*score)));
        bytes = rest;
    }
    Some(out)
}

/// The candidate cache key: the user vector is a function of the model and the pooled
/// activity, and the candidates of that plus the filter, so a key over exactly these inputs
/// can never serve candidates computed from other inputs. New activity is a new key; the TTL
/// only bounds how long a newly indexed item can be missing. `None` when there is no activity
/// (the fallback path, which is not cached here).
fn activity_fingerprint(model: &TwoTower, filter: &Filter, activity: &Activity) -> Option<String> {
    if activity.events.is_empty() {
        return None;
    }
    let mut h = Sha256::new();
    h.update(model.version().as_bytes());
    h.update([0]);
    h.update(serde_json::to_vec(filter).expect("filters serialize"));
    for (e, r) in &activity.events {
        h.update([0]);
        h.update(e.id().as_str().as_bytes());
        h.update([0]);
        h.update(r.event_type.as_str().as_bytes());
    }
    Some(format!("cand:{}", hex::encode(&h.finalize()[..16])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Item;

    #[test]
    fn cached_candidates_read_back_as_written_and_other_bytes_are_a_miss() {
        let found: Vec<Candidate> = [("a", 0.5), ("item-é", -1.25)]
            .iter()
            .map(|&(id, ann_score)| Candidate {
                entry: Arc::new(CatalogEntry {
                    item: Item::new(ItemId::parse(id).unwrap(), id),
                    popularity: 0.0,
                    vector: vec![1.0].into(),
                }),
                ann_score,
            })
            .collect();
        let bytes = encode_candidates(&found);
        let back = decode_candidates(&bytes).unwrap();
        let want: Vec<(&str, f32)> = found
            .iter()
            .map(|c| (c.entry.id().as_str(), c.ann_score))
            .collect();
        assert_eq!(back, want);
        assert_eq!(decode_candidates(&[]), Some(Vec::new()));
        // What the cache held before: a JSON list.
        assert_eq!(decode_candidates(br#"[["a",0.5]]"#), None);
        let mut cut = encode_candidates(&found);
        cut.pop();
        assert_eq!(decode_candidates(&cut), None);
    }
}
