//! `qdrant`: a Qdrant server or cluster over gRPC (`qdrant-client`), for production.
//!
//! Versions are collections named `<collection>__<version>`; the serving name `<collection>`
//! is a real Qdrant alias, re-pointed in one alias operation so readers never see a gap.
//! Collections get `shard_number`/`replication_factor` from settings and payload indexes on
//! the filter fields. Upserts go in batches and retry transient errors with backoff.

use super::payloads::{self, F_AVAILABLE, F_CATEGORIES, F_CREATED_AT, F_PRICE};
use super::plan::PlanConfig;
use super::validate::{check_dim, check_points, check_query, check_version_name};
use super::{Hit, IndexError, IndexPoint, Payload, PayloadPatch, VectorIndex};
use crate::config::IndexSettings;
use crate::domain::{point_id, Filter, ItemId};
use async_trait::async_trait;
use parking_lot::RwLock;
use qdrant_client::qdrant::{
    point_id::PointIdOptions, vector_output, vectors_config, Condition, CountPointsBuilder,
    CreateAliasBuilder, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder,
    DeleteCollectionBuilder, DeletePointsBuilder, Distance, FieldType, GetPointsBuilder, PointId,
    PointStruct, PointsIdsList, Query, QueryPointsBuilder, Range, SearchParamsBuilder,
    SetPayloadPointsBuilder, UpsertPointsBuilder, VectorParamsBuilder,
};
use qdrant_client::{Qdrant, QdrantError};
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

/// Points per upsert request.
pub const UPSERT_BATCH: usize = 512;
/// Attempts for a request that fails transiently.
const ATTEMPTS: u32 = 5;
/// How long connecting may take before the server counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Per-request timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The `qdrant` backend.
pub struct QdrantIndex {
    client: Qdrant,
    url: String,
    alias: String,
    shard_number: u32,
    replication_factor: u32,
    plan: PlanConfig,
    /// Dimension of each known collection (by full collection name).
    dims: RwLock<HashMap<String, usize>>,
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
            dims: RwLock::new(HashMap::new()),
        })
    }

    fn collection_name(&self, version: &str) -> String {
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

    async fn live_dim(&self) -> Result<usize, IndexError> {
        if self.live_collection().await?.is_none() {
            return Err(IndexError::NoActiveVersion);
        }
        self.dim_of(&self.alias).await
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
        points: Vec<IndexPoint>,
        dim: usize,
    ) -> Result<(), IndexError> {
        check_points(&points, dim)?;
        for chunk in points.chunks(UPSERT_BATCH) {
            let structs: Vec<PointStruct> = chunk
                .iter()
                .map(|p| {
                    PointStruct::new(
                        point_id(&p.payload.item_id).to_string(),
                        p.vector.clone(),
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
        // The server plans filtered searches itself (exact scan under its full-scan
        // threshold); tandem sets the beam width.
        let mut req = QueryPointsBuilder::new(name)
            .query(Query::new_nearest(vector.to_vec()))
            .limit(k as u64)
            .with_payload(true)
            .params(SearchParamsBuilder::default().hnsw_ef(self.plan.base_ef(k) as u64));
        if let Some(f) = to_qdrant_filter(filter) {
            req = req.filter(f);
        }
        let req = req.build();
        let res = self
            .retry("search", || self.client.query(req.clone()))
            .await?;
        res.result
            .into_iter()
            .map(|p| {
                Ok(Hit {
                    score: p.score,
                    payload: std::sync::Arc::new(payloads::from_json(json_of(p.payload))?),
                })
            })
            .collect()
    }

    async fn fetch_on(
        &self,
        name: &str,
        ids: &[ItemId],
    ) -> Result<Vec<(Payload, Vec<f32>)>, IndexError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let pids: Vec<PointId> = ids.iter().map(pid).collect();
        let res = self
            .retry("fetch", || {
                self.client.get_points(
                    GetPointsBuilder::new(name, pids.clone())
                        .with_payload(true)
                        .with_vectors(true),
                )
            })
            .await?;
        let mut by_id: HashMap<String, (Payload, Vec<f32>)> = HashMap::new();
        for p in res.result {
            let Some(id) = uuid_of(p.id) else { continue };
            let Some(vector) = p
                .vectors
                .and_then(|v| v.get_vector())
                .and_then(|v| match v {
                    vector_output::Vector::Dense(d) => Some(d.data),
                    _ => None,
                })
            else {
                continue;
            };
            by_id.insert(id, (payloads::from_json(json_of(p.payload))?, vector));
        }
        Ok(ids
            .iter()
            .filter_map(|i| by_id.remove(&point_id(i).to_string()))
            .collect())
    }
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

#[async_trait]
impl VectorIndex for QdrantIndex {
    async fn upsert(&self, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        let dim = self.live_dim().await?;
        self.upsert_to(&self.alias, points, dim).await
    }

    async fn delete(&self, ids: &[ItemId]) -> Result<(), IndexError> {
        self.live_dim().await?;
        self.delete_on(&self.alias, ids).await
    }

    async fn set_payload(&self, id: &ItemId, patch: &PayloadPatch) -> Result<(), IndexError> {
        self.live_dim().await?;
        self.set_payload_on(&self.alias, id, patch).await
    }

    async fn search(
        &self,
        vector: &[f32],
        filter: &Filter,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        let dim = self.live_dim().await?;
        self.search_on(&self.alias, dim, vector, filter, k).await
    }

    async fn fetch(&self, ids: &[ItemId]) -> Result<Vec<(Payload, Vec<f32>)>, IndexError> {
        self.live_dim().await?;
        self.fetch_on(&self.alias, ids).await
    }

    async fn count(&self) -> Result<usize, IndexError> {
        self.live_dim().await?;
        let res = self
            .retry("count", || {
                self.client
                    .count(CountPointsBuilder::new(&self.alias).exact(true))
            })
            .await?;
        Ok(res.result.map(|r| r.count as usize).unwrap_or(0))
    }

    async fn create_version(&self, version: &str, dim: usize) -> Result<(), IndexError> {
        check_version_name(version)?;
        check_dim(dim)?;
        let name = self.collection_name(version);
        self.retry("create_collection", || {
            self.client.create_collection(
                CreateCollectionBuilder::new(&name)
                    .vectors_config(VectorParamsBuilder::new(dim as u64, Distance::Cosine))
                    .shard_number(self.shard_number)
                    .replication_factor(self.replication_factor)
                    .on_disk_payload(false),
            )
        })
        .await?;
        for (field, ty) in [
            (F_CATEGORIES, FieldType::Keyword),
            (F_AVAILABLE, FieldType::Bool),
            (F_PRICE, FieldType::Float),
            (F_CREATED_AT, FieldType::Integer),
        ] {
            self.retry("create_field_index", || {
                self.client.create_field_index(
                    CreateFieldIndexCollectionBuilder::new(&name, field, ty).wait(true),
                )
            })
            .await?;
        }
        self.dims.write().insert(name, dim);
        Ok(())
    }

    async fn upsert_into(&self, version: &str, points: Vec<IndexPoint>) -> Result<(), IndexError> {
        let (name, dim) = self.version_collection(version).await?;
        self.upsert_to(&name, points, dim).await
    }

    async fn search_in(
        &self,
        version: &str,
        vector: &[f32],
        filter: &Filter,
        k: usize,
    ) -> Result<Vec<Hit>, IndexError> {
        let (name, dim) = self.version_collection(version).await?;
        self.search_on(&name, dim, vector, filter, k).await
    }

    async fn fetch_from(
        &self,
        version: &str,
        ids: &[ItemId],
    ) -> Result<Vec<(Payload, Vec<f32>)>, IndexError> {
        let (name, _) = self.version_collection(version).await?;
        self.fetch_on(&name, ids).await
    }

    async fn delete_from(&self, version: &str, ids: &[ItemId]) -> Result<(), IndexError> {
        let (name, _) = self.version_collection(version).await?;
        self.delete_on(&name, ids).await
    }

    async fn set_payload_in(
        &self,
        version: &str,
        id: &ItemId,
        patch: &PayloadPatch,
    ) -> Result<(), IndexError> {
        let (name, _) = self.version_collection(version).await?;
        self.set_payload_on(&name, id, patch).await
    }

    async fn finalize_version(&self, version: &str) -> Result<(), IndexError> {
        check_version_name(version)?;
        let name = self.collection_name(version);
        // The server indexes in the background; wait until it reports green (optimizers done).
        let started = std::time::Instant::now();
        loop {
            let info = self
                .retry("collection_info", || self.client.collection_info(&name))
                .await?
                .result
                .ok_or_else(|| IndexError::UnknownVersion(version.to_string()))?;
            // CollectionStatus::Green == 1
            if info.status == 1 {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(3600) {
                return Err(IndexError::Backend(format!(
                    "collection {name:?} was not indexed within an hour"
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
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
        self.dims.write().insert(self.alias.clone(), dim);
        Ok(())
    }

    async fn drop_version(&self, version: &str) -> Result<(), IndexError> {
        check_version_name(version)?;
        let name = self.collection_name(version);
        if self.live_collection().await?.as_deref() == Some(name.as_str()) {
            return Err(IndexError::Backend(format!(
                "collection version {version:?} is live; switch to another version before dropping it"
            )));
        }
        let (names, _) = self.versions().await?;
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
}
