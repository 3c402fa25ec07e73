//! The online flow, in one place: the only module where session, model, index and re-ranker
//! meet. `Recommender::recommend` reads as the product's story, one named step per line; each
//! step is timed, and the timings are logged with the request id and exported as metrics.
//!
//! Nothing here fails a request because a dependency is down: a session store that does not
//! answer means no personalisation, an index that does not answer means trending or popular
//! items, and every such shortcut is reported in `degraded`.

use crate::arms::{Arm, Arms};
use crate::catalog::{Catalog, CatalogEntry};
use crate::config::{RerankSettings, ServerSettings};
use crate::domain::{EventType, Filter, IdMap, IdSet, ItemId, SessionId, UserId};
use crate::index::VectorIndex;
use crate::model::{TwoTower, UserEvent};
use crate::rerank::{self, Candidate, Context, Ranked, SessionItem};
use crate::session::{Actor, RecentItem, SessionStore};
use crate::telemetry;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Degraded {
    /// The session store: no recent activity or history was used.
    Session,
    /// The user tower failed: the fallback list was served.
    Model,
    /// The vector index: the fallback list was served.
    Index,
    /// Trending counters: the catalog's popularity order was used.
    Trending,
    /// The candidate cache: it was bypassed.
    Cache,
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

#[derive(Debug, Clone)]
pub struct RecommendRequest {
    pub request_id: String,
    pub user: Option<UserId>,
    pub session: Option<SessionId>,
    pub k: usize,
    pub filter: Filter,
    pub variant: String,
    /// The model the variant's experiment arm pins, if it pins one; served when it is active
    /// or serving as an arm, and otherwise the active model answers.
    pub model_version: Option<String>,
    /// The boost rules in force for this request (its variant's and its own `boost=`).
    pub boosts: Vec<(String, crate::config::BoostRule)>,
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
}

/// What the request knows about the user: recent activity and history, merged newest first
/// with one entry per item.
#[derive(Debug, Default)]
struct Activity {
    events: Vec<(Arc<CatalogEntry>, RecentItem)>,
    purchased: IdSet,
    viewed: IdSet,
}

/// Per-request stage timings.
struct Stages {
    started: Instant,
    laps: Vec<(&'static str, Duration)>,
}

/// Runs one pipeline step and records how long it took under its name.
macro_rules! step {
    ($stages:ident, $name:literal, $e:expr) => {{
        let t = Instant::now();
        let v = $e;
        $stages.laps.push(($name, t.elapsed()));
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

pub struct Recommender {
    /// Behind `ArcSwap` so a new checkpoint can be activated without a restart; each request
    /// takes one snapshot and uses it throughout.
    pub model: Arc<ArcSwap<TwoTower>>,
    pub index: Arc<dyn VectorIndex>,
    pub sessions: Arc<dyn SessionStore>,
    pub catalog: Arc<Catalog>,
    pub settings: ServerSettings,
    /// Per-variant weights; experiments replace it at run time (`experiment::Experiments`).
    pub rerank: Arc<ArcSwap<RerankSettings>>,
    /// Models serving beside the active one, for experiments.
    pub arms: Arc<Arms>,
    trending: TrendingCache,
}

impl Recommender {
    pub fn new(
        model: Arc<ArcSwap<TwoTower>>,
        index: Arc<dyn VectorIndex>,
        sessions: Arc<dyn SessionStore>,
        catalog: Arc<Catalog>,
        settings: ServerSettings,
        rerank: Arc<ArcSwap<RerankSettings>>,
        arms: Arc<Arms>,
    ) -> Self {
        Recommender {
            model,
            index,
            sessions,
            catalog,
            settings,
            rerank,
            arms,
            trending: TrendingCache::default(),
        }
    }

    /// Personal recommendations for a user and/or session; trending for strangers.
    #[rustfmt::skip]
    pub async fn recommend(&self, req: &RecommendRequest) -> Recommendations {
        let mut stages = Stages::new();
        let mut degraded = Vec::new();
        let (model, arm) = self.serving_model(req);
        let mut activity = step!(stages, "read_session", self.read_activity(req, &mut degraded).await);
        let fingerprint = activity_fingerprint(&model, &req.filter, &activity);
        let cached = step!(stages, "cache_get", self.cached_candidates(&fingerprint, &mut degraded).await);
        let user_vector = step!(stages, "user_vector", self.user_vector(&model, &activity, cached.is_some(), &mut degraded));
        let (source, candidates) = step!(stages, "fetch_candidates", self.fetch_candidates(req, &model, arm.as_deref(), &activity, cached, user_vector, &fingerprint, &mut degraded).await);
        let candidates = match &arm {
            Some(arm) => step!(stages, "arm_vectors", self.in_arm_space(arm, &mut activity, candidates, &mut degraded).await),
            None => candidates,
        };
        let trending = step!(stages, "trending", self.trending_list(None, &mut degraded).await);
        let ranked = step!(stages, "rerank", self.rerank(req, &activity, &trending.scores, candidates));
        let items = step!(stages, "business_rules", self.apply_business_rules(ranked, &req.filter, &activity.purchased, req.k));
        stages.finish(&req.request_id, "recommend");
        respond(req, &model, source, degraded, items)
    }

    /// Items like `item`, under the same filters.
    #[rustfmt::skip]
    pub async fn similar(
        &self,
        item: &ItemId,
        req: &RecommendRequest,
    ) -> Result<Recommendations, PipelineError> {
        let mut stages = Stages::new();
        let mut degraded = Vec::new();
        let model = self.model.load_full();
        let anchor = self.catalog.get(item).ok_or_else(|| PipelineError::UnknownItem(item.clone()))?;
        let filter = filter_excluding(&req.filter, [anchor.id().clone()]);
        // The checkpoint's `similar` query (content in, see `TwoTower::similar_query`); an
        // older checkpoint answers with the anchor's own vector.
        let query = model.similar_query(&anchor.item).unwrap_or_else(|_| anchor.vector.to_vec());
        let candidates = step!(stages, "fetch_candidates", self.search(&model, None, &query, &filter, req.k + MMR_SLACK, &mut degraded).await);
        let candidates = candidates.unwrap_or_default();
        let ranked = step!(stages, "rerank", self.rerank(req, &Activity::default(), &IdMap::default(), candidates));
        let items = step!(stages, "business_rules", self.apply_business_rules(ranked, &filter, &IdSet::default(), req.k));
        stages.finish(&req.request_id, "similar");
        Ok(respond(req, &model, Source::Similar, degraded, items))
    }

    /// Trending items under the filter; the catalog's popularity order when trending is empty.
    #[rustfmt::skip]
    pub async fn trending(&self, req: &RecommendRequest) -> Recommendations {
        let mut stages = Stages::new();
        let mut degraded = Vec::new();
        let model = self.model.load_full();
        let candidates = step!(stages, "fetch_candidates", self.fallback_candidates(&req.filter, req.k, &mut degraded).await);
        let ranked: Vec<Ranked> = candidates
            .into_iter()
            .map(|c| Ranked {
                score: c.ann_score,
                components: rerank::Components {
                    relevance: c.ann_score,
                    ..Default::default()
                },
                entry: c.entry,
            })
            .collect();
        let items = step!(stages, "business_rules", self.apply_business_rules(ranked, &req.filter, &IdSet::default(), req.k));
        stages.finish(&req.request_id, "trending");
        respond(req, &model, Source::Trending, degraded, items)
    }

    /// Cold start for users: seeds the history with the liked items and the most popular
    /// items of each chosen category, so the very next request is personal. Returns the seeds.
    pub async fn onboard(
        &self,
        user: &UserId,
        categories: &[String],
        liked: &[Arc<CatalogEntry>],
        now_ms: i64,
    ) -> Result<Vec<RecentItem>, crate::session::SessionError> {
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
                .filter(|g| categories.contains(g))
                .count() as f32
                / n
        };
        let per_category: Vec<Vec<Arc<CatalogEntry>>> = categories
            .iter()
            .map(|c| {
                let filter = Filter {
                    include_categories: vec![c.clone()],
                    available_only: true,
                    ..Default::default()
                };
                let mut top = self.catalog.popular(&filter, SEED_POOL);
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
        self.sessions.seed_history(user, &seeds).await?;
        Ok(seeds)
    }

    // ---- the steps ----------------------------------------------------------------------

    /// The model that answers: the one the request's experiment arm pins when that one is
    /// serving (as the active model or as an arm), and otherwise the active model.
    fn serving_model(&self, req: &RecommendRequest) -> (Arc<TwoTower>, Option<Arc<Arm>>) {
        let active = self.model.load_full();
        match req.model_version.as_deref() {
            Some(v) if v != active.version() => match self.arms.get(v) {
                Some(arm) => (arm.model.clone(), Some(arm)),
                None => (active, None),
            },
            _ => (active, None),
        }
    }

    /// An arm's request: the candidates and the session's items take the arm's vectors, so
    /// that the re-ranker's similarities are the arm model's. If the arm's collection does
    /// not answer, both keep the live model's vectors (still one space) and `index` is
    /// reported degraded.
    async fn in_arm_space(
        &self,
        arm: &Arm,
        activity: &mut Activity,
        candidates: Vec<Candidate>,
        degraded: &mut Vec<Degraded>,
    ) -> Vec<Candidate> {
        let n = candidates.len();
        let entries: Vec<Arc<CatalogEntry>> = candidates
            .iter()
            .map(|c| c.entry.clone())
            .chain(activity.events.iter().map(|(e, _)| e.clone()))
            .collect();
        let Some(moved) = self.arms.in_space(arm, entries).await else {
            if !degraded.contains(&Degraded::Index) {
                degraded.push(Degraded::Index);
            }
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

    async fn read_activity(
        &self,
        req: &RecommendRequest,
        degraded: &mut Vec<Degraded>,
    ) -> Activity {
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
            degraded.push(Degraded::Session);
        }
        self.merge_activity(all)
    }

    fn merge_activity(&self, mut all: Vec<RecentItem>) -> Activity {
        all.sort_by_key(|r| std::cmp::Reverse(r.timestamp_ms));
        let mut activity = Activity::default();
        let mut seen = IdSet::default();
        let entries = self.catalog.get_many(all.iter().map(|r| &r.item_id));
        for (r, entry) in all.into_iter().zip(entries) {
            match r.event_type {
                EventType::Purchase => {
                    activity.purchased.insert(r.item_id.clone());
                }
                EventType::View | EventType::Click => {
                    activity.viewed.insert(r.item_id.clone());
                }
                _ => {}
            }
            // Impressions are not interest; unknown (deleted) items have no features.
            if r.event_type == EventType::Impression || !seen.insert(r.item_id.clone()) {
                continue;
            }
            if let Some(e) = entry {
                if activity.events.len() < self.settings.history_limit {
                    activity.events.push((e, r));
                }
            }
        }
        activity
    }

    async fn cached_candidates(
        &self,
        key: &Option<String>,
        degraded: &mut Vec<Degraded>,
    ) -> Option<Vec<Candidate>> {
        let key = key.as_ref()?;
        let bytes = match self.sessions.cache_get(key).await {
            Ok(b) => {
                telemetry::record_cache(b.is_some());
                b?
            }
            Err(e) => {
                tracing::warn!(error = %e, "candidate cache");
                degraded.push(Degraded::Cache);
                return None;
            }
        };
        let list: Vec<(ItemId, f32)> = serde_json::from_slice(&bytes).ok()?;
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

    fn user_vector(
        &self,
        model: &TwoTower,
        activity: &Activity,
        have_cached: bool,
        degraded: &mut Vec<Degraded>,
    ) -> Option<Vec<f32>> {
        if have_cached || activity.events.is_empty() {
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
        match model.embed_user(&history) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::warn!(error = %e, "user tower");
                degraded.push(Degraded::Model);
                None
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch_candidates(
        &self,
        req: &RecommendRequest,
        model: &TwoTower,
        arm: Option<&Arm>,
        activity: &Activity,
        cached: Option<Vec<Candidate>>,
        user_vector: Option<Vec<f32>>,
        cache_key: &Option<String>,
        degraded: &mut Vec<Degraded>,
    ) -> (Source, Vec<Candidate>) {
        if let Some(c) = cached {
            return (Source::Cached, c);
        }
        let k = self.settings.k_candidates.max(req.k + MMR_SLACK);
        if let Some(v) = user_vector {
            if let Some(found) = self.search(model, arm, &v, &req.filter, k, degraded).await {
                let found = self
                    .with_popularity_prior(
                        model,
                        arm,
                        activity.events.len(),
                        &v,
                        &req.filter,
                        found,
                    )
                    .await;
                self.cache_candidates(cache_key, &found);
                return (Source::Personal, found);
            }
        }
        (
            Source::Trending,
            self.fallback_candidates(&req.filter, k, degraded).await,
        )
    }

    /// Adds the checkpoint's popularity prior to the ANN scores, as offline evaluation ranks
    /// (`eval::Ranker`). When the prior has weight (short histories, mostly), the most popular
    /// items under the filter join the candidates, scored the same way, since the ANN search
    /// by the user vector alone need not reach them.
    async fn with_popularity_prior(
        &self,
        model: &TwoTower,
        arm: Option<&Arm>,
        history_len: usize,
        user: &[f32],
        filter: &Filter,
        mut found: Vec<Candidate>,
    ) -> Vec<Candidate> {
        let prior = model.manifest().popularity_prior;
        if !prior.is_active() {
            return found;
        }
        if prior.weight(history_len) > 0.0 {
            let seen: IdSet = found.iter().map(|c| c.entry.id().clone()).collect();
            let mut popular = self.catalog.popular(filter, POPULAR_CANDIDATES);
            if let Some(arm) = arm {
                // Scored against the arm's user vector, so in the arm's space.
                popular = self.arms.in_space(arm, popular).await.unwrap_or_default();
            }
            for entry in popular {
                if !seen.contains(entry.id()) && entry.vector.len() == user.len() {
                    let ann_score = rerank::dot(user, &entry.vector);
                    found.push(Candidate { entry, ann_score });
                }
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
        model: &TwoTower,
        arm: Option<&Arm>,
        vector: &[f32],
        filter: &Filter,
        k: usize,
        degraded: &mut Vec<Degraded>,
    ) -> Option<Vec<Candidate>> {
        let collection = match arm {
            Some(arm) => Some(arm.collection.clone()),
            None => self.arms.collection_of(model.version()),
        };
        let hits = match &collection {
            Some(c) => self.index.search_in(c, vector, filter, k).await,
            None => self.index.search(vector, filter, k).await,
        };
        let hits = match hits {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "index search");
                degraded.push(Degraded::Index);
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
        let list: Vec<(&ItemId, f32)> = found.iter().map(|c| (c.entry.id(), c.ann_score)).collect();
        let bytes = serde_json::to_vec(&list).expect("ids and floats serialize");
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
    async fn fallback_candidates(
        &self,
        filter: &Filter,
        k: usize,
        degraded: &mut Vec<Degraded>,
    ) -> Vec<Candidate> {
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
                self.trending_list(c.clone(), degraded)
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
    async fn trending_list(
        &self,
        category: Option<String>,
        degraded: &mut Vec<Degraded>,
    ) -> Arc<Trending> {
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
                if !degraded.contains(&Degraded::Trending) {
                    degraded.push(Degraded::Trending);
                }
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
        req: &RecommendRequest,
        activity: &Activity,
        trending: &IdMap<f32>,
        candidates: Vec<Candidate>,
    ) -> Vec<Ranked> {
        let rerank = self.rerank.load();
        let weights = rerank.for_variant(&req.variant);
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
            mmr_depth: req.k + MMR_SLACK,
            boosts: &req.boosts,
        };
        rerank::rerank(&ctx, candidates)
    }

    /// The last word, and the cut to `k`: in rank order, each item is checked against the
    /// live catalog (an item made unavailable or deleted since the candidates were fetched or
    /// cached drops out here) and the request's filter, and purchased items never pass. The
    /// check stops once `k` have passed.
    fn apply_business_rules(
        &self,
        ranked: Vec<Ranked>,
        filter: &Filter,
        purchased: &IdSet,
        k: usize,
    ) -> Vec<Ranked> {
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

fn respond(
    req: &RecommendRequest,
    model: &TwoTower,
    source: Source,
    degraded: Vec<Degraded>,
    items: Vec<Ranked>,
) -> Recommendations {
    for cause in &degraded {
        telemetry::record_degraded(cause.as_str());
    }
    Recommendations {
        request_id: req.request_id.clone(),
        model_version: model.version().to_string(),
        variant: req.variant.clone(),
        source,
        degraded,
        items,
    }
}

fn filter_excluding(filter: &Filter, ids: impl IntoIterator<Item = ItemId>) -> Filter {
    let mut f = filter.clone();
    f.exclude_items.extend(ids);
    f
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
