//! `qdrant`: a Qdrant server or cluster over gRPC (`qdrant-client`), for production.
//!
//! Versions are collections named `<collection>__<version>`; the serving name `<collection>`
//! is a real Qdrant alias, re-pointed in one alias operation so readers never see a gap.
//! Collections get `shard_number`/`replication_factor` from settings, and the configuration
//! of the embedded index (`edge.rs`): int8 scalar quantization kept in RAM (searches re-score
//! the best `2 × k` on the full vectors), the same HNSW `m`/`ef_construct`, payloads in RAM, and
//! payload indexes on the four filter fields with payload-aware graph links for
//! `categories` only. Upserts go in batches and retry transient errors with backoff.
//!
//! Round trips: a search is one RPC. [`VectorIndex::search_in`] names its collection, whose
//! dimension is asked once and cached. [`VectorIndex::search`] queries the alias itself, so the
//! server resolves it at the moment of the search; only the existence of the alias and its
//! dimension (for validating the query) are cached, for [`ALIAS_TTL`]. A cached answer that
//! turns out stale (another replica switched the alias to a collection of another dimension,
//! or dropped it) shows as an error of the call; the call then resolves the alias afresh and
//! runs once more. Hits carry the `item_id` payload field only: the serving process holds
//! the catalog in memory.

use super::payloads::{self, F_AVAILABLE, F_CATEGORIES, F_CREATED_AT, F_ITEM_ID, F_PRICE};
use super::plan::PlanConfig;
use super::validate::{check_dim, check_points, check_query, check_version_name};
use super::{Hit, IndexError, IndexPoint, Payload, PayloadPatch, ScrollPage, Vector, VectorIndex};
use crate::config::IndexSettings;
use crate::domain::{point_id, AttrFilter, Filter, ItemId};
use async_trait::async_trait;
use parking_lot::RwLock;
use qdrant_client::qdrant::{
    payload_index_params, point_id::PointIdOptions, vector_output, vectors_config,
    BoolIndexParamsBuilder, Condition, CountPointsBuilder, CreateAliasBuilder,
    CreateCollectionBuilder, CreateFieldIndexCollectionBuilder, DeleteCollectionBuilder,
    DeletePointsBuilder, Distance, FieldType, FloatIndexParamsBuilder, GetPointsBuilder,
    HnswConfigDiffBuilder, IntegerIndexParamsBuilder, KeywordIndexParamsBuilder,
    OptimizersConfigDiffBuilder, PayloadIncludeSelector, PointId, PointStruct, PointsIdsList,
    QuantizationSearchParamsBuilder, QuantizationType, Query, QueryBatchPointsBuilder, QueryPoints,
    QueryPointsBuilder, Range, ScalarQuantization, ScoredPoint, ScrollPointsBuilder,
    SearchParamsBuilder, SetPayloadPointsBuilder, UpsertPointsBuilder, VectorParamsBuilder,
};
use qdrant_client::{Qdrant, QdrantError};
use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

/// Points per upsert request.
pub const UPSERT_BATCH: usize = 512;
/// Attempts for a request that fails transiently.
const ATTEMPTS: u32 = 5;
/// How long connecting may take before the server counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Per-request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`VectorIndex::search`] and the other live-collection calls trust a resolution of
/// the alias (whether it exists, and its dimension) before asking the server again.
pub const ALIAS_TTL: Duration = Duration::from_secs(1);
/// Ids per `get_points` request of a fetch.
const FETCH_CHUNK: usize = 1_000;
/// Candidates scored on the int8 vectors per result, re-scored on the full vectors (as in
/// `edge.rs`).
const OVERSAMPLING: f64 = 2.0;
/// HNSW degree and build beam, as in `edge.rs`.
const HNSW_M: u64 = 16;
const HNSW_EF_CONSTRUCT: u64 = 100;

/// Collection thresholds, for tests that need a small collection to really get a graph.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Thresholds {
    /// Segments larger than this (KB of vectors) get an HNSW graph; `None`: the server's
    /// default (10 MB).
    pub indexing_threshold_kb: Option<u64>,
    /// Filtered searches whose estimated matches hold fewer KB of vectors than this scan
    /// the payload index instead of walking the graph; `None`: the server's default (10 MB).
    pub full_scan_threshold_kb: Option<u64>,
}

/// What the alias pointed at when last asked.
#[derive(Debug, Clone, Copy)]
struct LiveAlias {
    asked: Instant,
    /// The live collection's dimension; `None` when no alias exists.
    dim: Option<usize>,
}

/// The `qdrant` backend.
pub struct QdrantIndex {
    client: Qdrant,
    url: String,
    alias: String,
    shard_number: u32,
    replication_factor: u32,
    plan: PlanConfig,
    thresholds: Thresholds,
    /// Dimension of each known collection (by full collection name).
    dims: RwLock<HashMap<String, usize>>,
    /// The alias as last resolved; see [`ALIAS_TTL`].
    live: RwLock<Option<LiveAlias>>,
    /// Attribute names that get payload indexes in collections created from now on.
    filterable: Vec<String>,
}

/// Whether an error is worth retrying: the server is briefly unavailable, overloaded or slow.
fn transient(e: &QdrantError) -> bool {
    match e {
        QdrantError::ResponseError { status } => {
            let code = format!("{:?}", status.code());
            matches!(
                code.as_str(),
                "Unavailable" | "DeadlineExceeded" | "ResourceExhausted" | "Aborted"
            )
        }
        QdrantError::ResourceExhaustedError { .. } | QdrantError::Io(_) => true,
        _ => false,
    }
}

fn unreachable_or_backend(url: &str, e: QdrantError) -> IndexError {
    if let QdrantError::ResponseError { status } = &e {
        let code = format!("{:?}", status.code());
        if code == "Unavailable" || code == "DeadlineExceeded" {
            return IndexError::Unavailable(format!("Qdrant at {url}: {}", status.message()));
        }
        if code == "NotFound" {
            return IndexError::Backend(format!("Qdrant at {url}: {}", status.message()));
        }
    }
    IndexError::Backend(format!("Qdrant at {url}: {e}"))
}

impl QdrantIndex {
    /// Connects and checks the server answers within [`CONNECT_TIMEOUT`]; an unreachable
    /// server gives [`IndexError::Unavailable`] naming the URL.
    pub async fn connect(settings: &IndexSettings) -> Result<Self, IndexError> {
        let url = settings.qdrant_url.clone();
        let client = Qdrant::from_url(&url)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .skip_compatibility_check()
            .build()
            .map_err(|e| IndexError::Unavailable(format!("Qdrant at {url}: {e}")))?;
        match tokio::time::timeout(CONNECT_TIMEOUT * 2, client.health_check()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                return Err(IndexError::Unavailable(format!(
                    "Qdrant at {url} is unreachable: {e}"
                )))
            }
            Err(_) => {
                return Err(IndexError::Unavailable(format!(
                    "Qdrant at {url} did not answer within {:?}",
                    CONNECT_TIMEOUT * 2
                )))
            }
        }
        Ok(QdrantIndex {
            client,
            url,
            alias: settings.collection.clone(),
            shard_number: settings.shard_number,
            replication_factor: settings.replication_factor,
            plan: PlanConfig::default(),
            thresholds: Thresholds::default(),
            dims: RwLock::new(HashMap::new()),
            live: RwLock::new(None),
            filterable: crate::config::CatalogSettings::default().indexed_names(),
        })
    }

    /// Collections created from now on index these attribute names
    /// (`CatalogSettings::indexed_names`).
    pub fn with_filterable(mut self, names: Vec<String>) -> Self {
        self.filterable = names;
        self
    }

    /// Collections created from now on get these thresholds.
    pub fn with_thresholds(mut self, thresholds: Thresholds) -> Self {
        self.thresholds = thresholds;
        self
    }

    /// (points, vectors covered by an HNSW graph, status is green) of a version, for tests
    /// and benchmarks.
    pub async fn index_status(&self, version: &str) -> Result<(u64, u64, bool), IndexError> {
        let name = self.collection_name(version);
        let info = self
            .retry("collection_info", || self.client.collection_info(&name))
            .await?
            .result
            .ok_or_else(|| IndexError::UnknownVersion(version.to_string()))?;
        Ok((
            info.points_count.unwrap_or(0),
            info.indexed_vectors_count.unwrap_or(0),
            info.status == GREEN,
        ))
    }

    /// The server's name of a version's collection: `<collection>__<version>`.
    pub fn collection_name(&self, version: &str) -> String {
        format!("{}__{version}", self.alias)
    }

    /// Runs `f`, retrying transient errors with exponential backoff (50 ms, 100 ms, ...).
    async fn retry<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, IndexError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, QdrantError>>,
    {
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=ATTEMPTS {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < ATTEMPTS && transient(&e) => {
                    tracing::warn!(what, attempt, error = %e, "transient Qdrant error; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return Err(unreachable_or_backend(&self.url, e)),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// The dimension of a collection (or of the alias), asked once and cached.
    async fn dim_of(&self, name: &str) -> Result<usize, IndexError> {
        if let Some(d) = self.dims.read().get(name) {
            return Ok(*d);
        }
        let info = self
            .retry("collection_info", || self.client.collection_info(name))
            .await?;
        let dim = info
            .result
            .and_then(|i| i.config)
            .and_then(|c| c.params)
            .and_then(|p| p.vectors_config)
            .and_then(|v| v.config)
            .and_then(|c| match c {
                vectors_config::Config::Params(p) => Some(p.size as usize),
                vectors_config::Config::ParamsMap(_) => None,
            })
            .ok_or_else(|| {
                IndexError::Backend(format!(
                    "collection {name:?} has no single unnamed vector; it is not a tandem collection"
                ))
            })?;
        self.dims.write().insert(name.to_string(), dim);
        Ok(dim)
    }

    /// The live collection's dimension: from the cache when it is younger than
    /// [`ALIAS_TTL`] and `fresh` is false, else asked from the server (one `list_aliases`,
    /// plus one `collection_info` the first time a collection is seen).
    async fn live_dim(&self, fresh: bool) -> Result<usize, IndexError> {
        let known = *self.live.read();
        if !fresh {
            if let Some(l) = known {
                if l.asked.elapsed() < ALIAS_TTL {
                    return l.dim.ok_or(IndexError::NoActiveVersion);
                }
            }
        }
        let asked = Instant::now();
        let dim = match self.live_collection().await? {
            Some(name) => Some(self.dim_of(&name).await?),
            None => None,
        };
        *self.live.write() = Some(LiveAlias { asked, dim });
        dim.ok_or(IndexError::NoActiveVersion)
    }

    /// Runs `call` on the live collection (through the alias) with its dimension. When the
    /// dimension came from the cache and the call fails (other than by an unreachable
    /// server), the alias is resolved afresh and the call runs once more: the cache may have
    /// been stale.
    async fn on_live<T, F, Fut>(&self, call: F) -> Result<T, IndexError>
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = Result<T, IndexError>>,
    {
        let cached = self
            .live
            .read()
            .is_some_and(|l| l.asked.elapsed() < ALIAS_TTL);
        let dim = self.live_dim(false).await;
        match dim {
            Ok(dim) => match call(dim).await {
                Err(e) if cached && !matches!(e, IndexError::Unavailable(_)) => {
                    let dim = self.live_dim(true).await?;
                    call(dim).await.map_err(|e| self.not_found_is_no_version(e))
                }
                r => r.map_err(|e| self.not_found_is_no_version(e)),
            },
            Err(IndexError::NoActiveVersion) if cached => {
                let dim = self.live_dim(true).await?;
                call(dim).await.map_err(|e| self.not_found_is_no_version(e))
            }
            Err(e) => Err(e),
        }
    }

    /// The alias vanished between its resolution and the call.
    fn not_found_is_no_version(&self, e: IndexError) -> IndexError {
        match &e {
            IndexError::Backend(m) if m.contains("doesn't exist") || m.contains("Not found") => {
                *self.live.write() = None;
                IndexError::NoActiveVersion
            }
            _ => e,
        }
    }

    async fn live_collection(&self) -> Result<Option<String>, IndexError> {
        let aliases = self
            .retry("list_aliases", || self.client.list_aliases())
            .await?;
        Ok(aliases
            .aliases
            .into_iter()
            .find(|a| a.alias_name == self.alias)
            .map(|a| a.collection_name))
    }

    async fn upsert_to(
        &self,
        name: &str,
        points: &[IndexPoint],
        dim: usize,
    ) -> Result<(), IndexError> {
        check_points(points, dim)?;
        for chunk in points.chunks(UPSERT_BATCH) {
            let structs: Vec<PointStruct> = chunk
                .iter()
                .map(|p| {
                    PointStruct::new(
                        point_id(&p.payload.item_id).to_string(),
                        p.vector.to_vec(),
                        qdrant_client::Payload::from(payloads::to_json(&p.payload)),
                    )
                })
                .collect();
            self.retry("upsert", || {
                self.client
                    .upsert_points(UpsertPointsBuilder::new(name, structs.clone()).wait(true))
            })
            .await?;
        }
        Ok(())
    }

    /// The collection of a version that need not be live, and its dimension.
    async fn version_collection(&self, version: &str) -> Result<(String, usize), IndexError> {
        check_version_name(version)?;
        let name = self.collection_name(version);
        let dim = self
            .dim_of(&name)
            .await
            .map_err(|_| IndexError::UnknownVersion(version.to_string()))?;
        Ok((name, dim))
    }

    /// A version dropped since its dimension was cached (by another replica): forget it, and
    /// report it as unknown.
    fn forget_if_gone(&self, name: &str, version: &str, e: IndexError) -> IndexError {
        match &e {
            IndexError::Backend(m) if m.contains("doesn't exist") || m.contains("Not found") => {
                self.dims.write().remove(name);
                IndexError::UnknownVersion(version.to_string())
            }
            _ => e,
        }
    }

    async fn delete_on(&self, name: &str, ids: &[ItemId]) -> Result<(), IndexError> {
        if ids.is_empty() {
            return Ok(());
        }
        let list = PointsIdsList {
            ids: ids.iter().map(pid).collect(),
        };
        self.retry("delete", || {
            self.client.delete_points(
                DeletePointsBuilder::new(name)
                    .points(list.clone())
                    .wait(true),
            )
        })
        .await?;
        Ok(())
    }

    async fn set_payload_on(
        &self,
        name: &str,
        id: &ItemId,
        patch: &PayloadPatch,
    ) -> Result<(), IndexError> {
        let fields = payloads::patch_json(patch);
        if fields.is_empty() {
            return Ok(());
        }
        let payload = qdrant_client::Payload::from(fields);
        // By a has-id filter, not by id list: an item deleted meanwhile makes this a no-op
        // rather than a "no point" error.
        let only_this = qdrant_client::qdrant::Filter::must([Condition::has_id([pid(id)])]);
        self.retry("set_payload", || {
            self.client.set_payload(
                SetPayloadPointsBuilder::new(name, payload.clone())
                    .points_selector(only_this.clone())
                    .wait(true),
            )
        })
        .await?;
        Ok(())
    }

    /// One query request: the nearest `k` under `filter`, the `item_id` field only.
    fn query_request(
        &self,
        name: &str,
        vector: &[f32],
        filter: Option<qdrant_client::qdrant::Filter>,
        k: usize,
        exact: bool,
    ) -> QueryPoints {
        // The server plans filtered searches itself (a payload-index scan under its
        // full-scan threshold, else the graph, with payload-aware links per category); tandem
        // sets the beam width and the re-scoring of the int8 candidates.
        let mut req = QueryPointsBuilder::new(name)
            .query(Query::new_nearest(vector.to_vec()))
            .limit(k as u64)
            .with_payload(PayloadIncludeSelector {
                fields: vec![F_ITEM_ID.to_string()],
            })
            .params(
                SearchParamsBuilder::default()
                    .hnsw_ef(self.plan.base_ef(k) as u64)
                    .exact(exact)
                    .quantization(
                        QuantizationSearchParamsBuilder::default()
                            .rescore(true)
                            .oversampling(OVERSAMPLING),
                    ),
            );
        if let Some(f) = filter {
            req = req.filter(f);
        }
        req.build()
    }

    /// One round trip. A filter that includes several categories runs as one search per
    /// category in one batch request, merged by score: trained item vectors cluster by
    /// category, and a graph search under a filter that keeps several whole clusters loses
    /// recall (QDRANT_EDGE.md, pitfall 6), while each single category is either small enough
    /// for the server to scan exactly or large enough to have its own payload-aware links.
    async fn search_on(
        &self,
        name: &str,
        dim: usize,
        vector: &[f32],
        filter: &Filter,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        check_query(vector, dim)?;
        if k == 0 {
            return Ok(Vec::new());
        }
        let exact = self.attributes_need_exact(name, filter).await?;
        let fan_out = (2..=self.plan.fanout_max).contains(&filter.include_categories.len());
        if !fan_out {
            let req = self.query_request(name, vector, to_qdrant_filter(filter), k, exact);
            let res = self
                .retry("search", || self.client.query(req.clone()))
                .await?;
            return res.result.into_iter().map(hit_of).collect();
        }
        let requests: Vec<QueryPoints> = filter
            .include_categories
            .iter()
            .map(|c| {
                let one = Filter {
                    include_categories: vec![c.clone()],
                    ..filter.clone()
                };
                self.query_request(name, vector, to_qdrant_filter(&one), k, exact)
            })
            .collect();
        let batch = QueryBatchPointsBuilder::new(name, requests);
        let res = self
            .retry("search", || self.client.query_batch(batch.clone()))
            .await?;
        // An item in two included categories is found twice; keep it once.
        let mut best: HashMap<String, Hit> = HashMap::new();
        for p in res.result.into_iter().flat_map(|b| b.result) {
            let hit = hit_of(p)?;
            match best.get(hit.item_id.as_str()) {
                Some(h) if h.score >= hit.score => {}
                _ => {
                    best.insert(hit.item_id.to_string(), hit);
                }
            }
        }
        let mut merged: Vec<Hit> = best.into_values().collect();
        merged.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.item_id.cmp(&b.item_id)));
        merged.truncate(k);
        Ok(merged)
    }

    /// Whether a search under `filter` should be exact: it has attribute conditions and
    /// keeps at most `attr_exact_max_points` points by the server's estimate (one more
    /// round trip, for attribute filters only). An attribute can select whole clusters,
    /// where the server's filtered graph search loses recall (see `plan.rs`).
    async fn attributes_need_exact(&self, name: &str, filter: &Filter) -> Result<bool, IndexError> {
        if filter.attributes.is_empty() {
            return Ok(false);
        }
        let Some(f) = to_qdrant_filter(filter) else {
            return Ok(false);
        };
        let res = self
            .retry("count", || {
                self.client
                    .count(CountPointsBuilder::new(name).filter(f.clone()).exact(false))
            })
            .await?;
        let estimate = res.result.map(|r| r.count as usize).unwrap_or(0);
        Ok(estimate <= self.plan.attr_exact_max_points)
    }

    /// The stored points of `ids`, in the order of `ids`, [`FETCH_CHUNK`] per request.
    async fn fetch_on(
        &self,
        name: &str,
        ids: &[ItemId],
    ) -> Result<Vec<(Payload, Vector)>, IndexError> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(FETCH_CHUNK) {
            let pids: Vec<PointId> = chunk.iter().map(pid).collect();
            let res = self
                .retry("fetch", || {
                    self.client.get_points(
                        GetPointsBuilder::new(name, pids.clone())
                            .with_payload(true)
                            .with_vectors(true),
                    )
                })
                .await?;
            let mut by_id: HashMap<String, (Payload, Vector)> = HashMap::new();
            for p in res.result {
                let Some(id) = uuid_of(p.id) else { continue };
                let Some(vector) = dense_of(p.vectors) else {
                    continue;
                };
                by_id.insert(
                    id,
                    (payloads::from_json(json_of(p.payload))?, vector.into()),
                );
            }
            out.extend(
                chunk
                    .iter()
                    .filter_map(|i| by_id.remove(&point_id(i).to_string())),
            );
        }
        Ok(out)
    }

    /// One page of [`VectorIndex::scroll`] on collection (or alias) `name`.
    async fn scroll_on(
        &self,
        name: &str,
        offset: Option<String>,
        limit: usize,
    ) -> Result<ScrollPage, IndexError> {
        let offset = offset
            .map(|o| {
                uuid::Uuid::parse_str(&o)
                    .map(|u| PointId::from(u.to_string()))
                    .map_err(|_| IndexError::Backend(format!("invalid scroll cursor {o:?}")))
            })
            .transpose()?;
        let limit = u32::try_from(limit.max(1)).unwrap_or(u32::MAX);
        let res = self
            .retry("scroll", || {
                let mut req = ScrollPointsBuilder::new(name)
                    .limit(limit)
                    .with_payload(true)
                    .with_vectors(true);
                if let Some(o) = &offset {
                    req = req.offset(o.clone());
                }
                self.client.scroll(req)
            })
            .await?;
        let mut page = Vec::with_capacity(res.result.len());
        for p in res.result {
            let Some(vector) = dense_of(p.vectors) else {
                continue;
            };
            page.push((payloads::from_json(json_of(p.payload))?, vector.into()));
        }
        let next = match res.next_page_offset {
            None => None,
            Some(id) => Some(uuid_of(Some(id)).ok_or_else(|| {
                IndexError::Backend(format!("scroll of {name:?}: a numeric point id"))
            })?),
        };
        Ok((page, next))
    }
}

/// A search result as a hit: the `item_id` payload field and the score.
fn hit_of(mut p: ScoredPoint) -> Result<Hit, IndexError> {
    let item_id = p
        .payload
        .remove(F_ITEM_ID)
        .and_then(|v| match v.kind {
            Some(qdrant_client::qdrant::value::Kind::StringValue(s)) => ItemId::parse(s).ok(),
            _ => None,
        })
        .ok_or_else(|| {
            IndexError::Backend("a search hit has no valid item_id; not a tandem collection".into())
        })?;
    Ok(Hit {
        score: p.score,
        item_id,
    })
}

fn dense_of(v: Option<qdrant_client::qdrant::VectorsOutput>) -> Option<Vec<f32>> {
    v.and_then(|v| v.get_vector()).and_then(|v| match v {
        vector_output::Vector::Dense(d) => Some(d.data),
        _ => None,
    })
}

fn pid(id: &ItemId) -> PointId {
    PointId::from(point_id(id).to_string())
}

fn to_qdrant_filter(f: &Filter) -> Option<qdrant_client::qdrant::Filter> {
    let mut must = Vec::new();
    let mut must_not = Vec::new();
    if !f.include_categories.is_empty() {
        must.push(Condition::matches(
            F_CATEGORIES,
            f.include_categories.clone(),
        ));
    }
    if !f.exclude_categories.is_empty() {
        must_not.push(Condition::matches(
            F_CATEGORIES,
            f.exclude_categories.clone(),
        ));
    }
    if f.available_only {
        must.push(Condition::matches(F_AVAILABLE, true));
    }
    if f.price_min.is_some() || f.price_max.is_some() {
        must.push(Condition::range(
            F_PRICE,
            Range {
                gte: f.price_min.map(f64::from),
                lte: f.price_max.map(f64::from),
                ..Default::default()
            },
        ));
    }
    if let Some(after) = f.created_after {
        must.push(Condition::range(
            F_CREATED_AT,
            Range {
                gt: Some(after as f64),
                ..Default::default()
            },
        ));
    }
    attribute_conditions(&f.attributes, &mut must, &mut must_not);
    if !f.exclude_items.is_empty() {
        must_not.push(Condition::has_id(f.exclude_items.iter().map(pid)));
    }
    if must.is_empty() && must_not.is_empty() {
        return None;
    }
    Some(qdrant_client::qdrant::Filter {
        must,
        must_not,
        ..Default::default()
    })
}

/// The attribute conditions, on the keyword and number fields `payloads::to_json` writes (the
/// same translation as `edge.rs`).
fn attribute_conditions(a: &AttrFilter, must: &mut Vec<Condition>, must_not: &mut Vec<Condition>) {
    let any_of = |name: &str, values: &[String]| {
        Condition::matches(payloads::attr_keyword_path(name), values.to_vec())
    };
    for (name, values) in &a.any {
        must.push(any_of(name, values));
    }
    for (name, values) in &a.none {
        must_not.push(any_of(name, values));
    }
    for (name, values) in &a.any_or_unset {
        let unset = Condition::is_empty(payloads::attr_keyword_path(name));
        must.push(qdrant_client::qdrant::Filter::should([any_of(name, values), unset]).into());
    }
    let names: std::collections::BTreeSet<&String> = a.min.keys().chain(a.max.keys()).collect();
    for name in names {
        must.push(Condition::range(
            payloads::attr_number_path(name),
            Range {
                gte: a.min.get(name).copied(),
                lte: a.max.get(name).copied(),
                ..Default::default()
            },
        ));
    }
}

fn json_of(
    map: HashMap<String, qdrant_client::qdrant::Value>,
) -> serde_json::Map<String, serde_json::Value> {
    qdrant_client::Payload::from(map).into()
}

fn uuid_of(id: Option<PointId>) -> Option<String> {
    match id?.point_id_options? {
        PointIdOptions::Uuid(u) => Some(u),
        PointIdOptions::Num(_) => None,
    }
}

/// `CollectionStatus::Green`: every optimization done.
const GREEN: i32 = 1;

#[async_trait]
impl VectorIndex for QdrantIndex {
    async fn upsert(&self, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        self.on_live(|dim| self.upsert_to(&self.alias, &points, dim))
            .await
    }

    async fn delete(&self, ids: &[ItemId]) -> Result<(), IndexError> {
        self.on_live(|_| self.delete_on(&self.alias, ids)).await
    }

    async fn set_payload(&self, id: &ItemId, patch: &PayloadPatch) -> Result<(), IndexError> {
        self.on_live(|_| self.set_payload_on(&self.alias, id, patch))
            .await
    }

    async fn search(
        &self,
        vector: &[f32],
        filter: &Filter,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        self.on_live(|dim| self.search_on(&self.alias, dim, vector, filter, k))
            .await
    }

    async fn fetch(&self, ids: &[ItemId]) -> Result<Vec<(Payload, Vector)>, IndexError> {
        self.on_live(|_| self.fetch_on(&self.alias, ids)).await
    }

    async fn count(&self) -> Result<usize, IndexError> {
        self.on_live(|_| async {
            let res = self
                .retry("count", || {
                    self.client
                        .count(CountPointsBuilder::new(&self.alias).exact(true))
                })
                .await?;
            Ok(res.result.map(|r| r.count as usize).unwrap_or(0))
        })
        .await
    }

    async fn create_version(&self, version: &str, dim: usize) -> Result<(), IndexError> {
        check_version_name(version)?;
        check_dim(dim)?;
        let name = self.collection_name(version);
        let mut hnsw = HnswConfigDiffBuilder::default()
            .m(HNSW_M)
            .ef_construct(HNSW_EF_CONSTRUCT);
        if let Some(kb) = self.thresholds.full_scan_threshold_kb {
            hnsw = hnsw.full_scan_threshold(kb);
        }
        let mut optimizers = OptimizersConfigDiffBuilder::default();
        if let Some(kb) = self.thresholds.indexing_threshold_kb {
            optimizers = optimizers.indexing_threshold(kb);
        }
        // `always_ram`, not its successor `memory`: the server under test (1.18) reads it.
        #[allow(deprecated)]
        let quantization = ScalarQuantization {
            r#type: QuantizationType::Int8 as i32,
            quantile: Some(0.99),
            always_ram: Some(true),
            memory: None,
        };
        self.retry("create_collection", || {
            self.client.create_collection(
                CreateCollectionBuilder::new(&name)
                    .vectors_config(VectorParamsBuilder::new(dim as u64, Distance::Cosine))
                    .shard_number(self.shard_number)
                    .replication_factor(self.replication_factor)
                    .on_disk_payload(false)
                    .hnsw_config(hnsw.clone())
                    .optimizers_config(optimizers.clone())
                    .quantization_config(quantization),
            )
        })
        .await?;
        // Payload indexes before any point, so that the graph gets its payload-aware links;
        // as in `edge.rs`, only `categories` gets them.
        let builtin: [(&str, FieldType, payload_index_params::IndexParams); 4] = [
            (
                F_CATEGORIES,
                FieldType::Keyword,
                KeywordIndexParamsBuilder::default().into(),
            ),
            (
                F_AVAILABLE,
                FieldType::Bool,
                BoolIndexParamsBuilder::default().enable_hnsw(false).into(),
            ),
            (
                F_PRICE,
                FieldType::Float,
                FloatIndexParamsBuilder::default().enable_hnsw(false).into(),
            ),
            (
                F_CREATED_AT,
                FieldType::Integer,
                IntegerIndexParamsBuilder::new(false, true)
                    .enable_hnsw(false)
                    .into(),
            ),
        ];
        // Each filterable attribute: a keyword index on its keywords, a float index on its
        // number, no graph links (as in `edge.rs`).
        let attributes = self.filterable.iter().flat_map(|name| {
            [
                (
                    payloads::attr_keyword_path(name),
                    FieldType::Keyword,
                    KeywordIndexParamsBuilder::default()
                        .enable_hnsw(false)
                        .into(),
                ),
                (
                    payloads::attr_number_path(name),
                    FieldType::Float,
                    FloatIndexParamsBuilder::default().enable_hnsw(false).into(),
                ),
            ]
        });
        let indexes = builtin
            .into_iter()
            .map(|(f, t, p)| (f.to_string(), t, p))
            .chain(attributes);
        for (field, ty, params) in indexes {
            self.retry("create_field_index", || {
                self.client.create_field_index(
                    CreateFieldIndexCollectionBuilder::new(&name, &field, ty)
                        .field_index_params(params.clone())
                        .wait(true),
                )
            })
            .await?;
        }
        self.dims.write().insert(name, dim);
        Ok(())
    }

    async fn upsert_into(&self, version: &str, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        let (name, dim) = self.version_collection(version).await?;
        self.upsert_to(&name, &points, dim).await
    }

    async fn search_in(
        &self,
        version: &str,
        vector: &[f32],
        filter: &Filter,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        let (name, dim) = self.version_collection(version).await?;
        self.search_on(&name, dim, vector, filter, k)
            .await
            .map_err(|e| self.forget_if_gone(&name, version, e))
    }

    async fn fetch_from(
        &self,
        version: &str,
        ids: &[ItemId],
    ) -> Result<Vec<(Payload, Vector)>, IndexError> {
        let (name, _) = self.version_collection(version).await?;
        self.fetch_on(&name, ids)
            .await
            .map_err(|e| self.forget_if_gone(&name, version, e))
    }

    async fn delete_from(&self, version: &str, ids: &[ItemId]) -> Result<(), IndexError> {
        let (name, _) = self.version_collection(version).await?;
        self.delete_on(&name, ids)
            .await
            .map_err(|e| self.forget_if_gone(&name, version, e))
    }

    async fn set_payload_in(
        &self,
        version: &str,
        id: &ItemId,
        patch: &PayloadPatch,
    ) -> Result<(), IndexError> {
        let (name, _) = self.version_collection(version).await?;
        self.set_payload_on(&name, id, patch)
            .await
            .map_err(|e| self.forget_if_gone(&name, version, e))
    }

    async fn finalize_version(&self, version: &str) -> Result<(), IndexError> {
        check_version_name(version)?;
        // The server indexes in the background; wait until it reports green (optimizers
        // done) with every point written (`wait(true)`) counted.
        let started = Instant::now();
        loop {
            let (_, _, green) = self.index_status(version).await?;
            if green {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(3600) {
                return Err(IndexError::Backend(format!(
                    "collection {:?} was not indexed within an hour",
                    self.collection_name(version)
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn switch_to(&self, version: &str) -> Result<(), IndexError> {
        check_version_name(version)?;
        let name = self.collection_name(version);
        let dim = self
            .dim_of(&name)
            .await
            .map_err(|_| IndexError::UnknownVersion(version.to_string()))?;
        // Creating an alias that exists re-points it in one operation on the server.
        self.retry("create_alias", || {
            self.client
                .create_alias(CreateAliasBuilder::new(&name, &self.alias))
        })
        .await?;
        *self.live.write() = Some(LiveAlias {
            asked: Instant::now(),
            dim: Some(dim),
        });
        Ok(())
    }

    async fn drop_version(&self, version: &str) -> Result<(), IndexError> {
        check_version_name(version)?;
        let name = self.collection_name(version);
        let (names, live) = self.versions().await?;
        if live.as_deref() == Some(version) {
            return Err(IndexError::Backend(format!(
                "collection version {version:?} is live; switch to another version before dropping it"
            )));
        }
        if !names.iter().any(|n| n == version) {
            return Err(IndexError::UnknownVersion(version.to_string()));
        }
        self.retry("delete_collection", || {
            self.client
                .delete_collection(DeleteCollectionBuilder::new(&name))
        })
        .await?;
        self.dims.write().remove(&name);
        Ok(())
    }

    /// Two requests whatever the number of collections: `list_collections` and
    /// `list_aliases`.
    async fn versions(&self) -> Result<(Vec<String>, Option<String>), IndexError> {
        let prefix = format!("{}__", self.alias);
        let list = self
            .retry("list_collections", || self.client.list_collections())
            .await?;
        let mut names: Vec<String> = list
            .collections
            .into_iter()
            .filter_map(|c| c.name.strip_prefix(&prefix).map(str::to_string))
            .collect();
        names.sort();
        let live = self
            .live_collection()
            .await?
            .and_then(|c| c.strip_prefix(&prefix).map(str::to_string));
        Ok((names, live))
    }

    /// The server's own scroll, in point-id order: one request per page.
    async fn scroll(
        &self,
        version: Option<&str>,
        offset: Option<String>,
        limit: usize,
    ) -> Result<ScrollPage, IndexError> {
        match version {
            Some(v) => {
                let (name, _) = self.version_collection(v).await?;
                self.scroll_on(&name, offset, limit)
                    .await
                    .map_err(|e| self.forget_if_gone(&name, v, e))
            }
            None => {
                self.on_live(|_| self.scroll_on(&self.alias, offset.clone(), limit))
                    .await
            }
        }
    }
}
