//! What replicas share, and how a change made on one reaches the others.
//!
//! With `index.backend = qdrant` and `session.backend = redis` ([`Settings::shared`]) every
//! replica serves the same catalog, model and experiments:
//! - the Qdrant collection is the catalog's source of truth: a replica loads its in-memory
//!   catalog from it at start-up (`items::load`), not from a local file;
//! - every change is announced on one Redis stream, `P:{cluster}:changes`, which every replica
//!   follows from where its catalog load began ([`Bus::follow`]): item upserts (with their
//!   vectors and the model that made them), patches and deletes, and "the registry changed"
//!   or "the experiments changed";
//! - the model registry is one JSON document, `P:{cluster}:registry`, changed in a
//!   WATCH/MULTI transaction that also announces the change (`registry`), and the checkpoints
//!   live in `registry.model_store`, a directory every replica reads;
//! - the experiments are `P:{cluster}:experiments`.
//!
//! A replica that was down catches up when it returns: it loads the catalog from the
//! collection again and follows the stream from there. The stream is trimmed to about
//! [`STREAM_MAXLEN`] entries, far more than replicas fall behind by while they run.
//!
//! The stream needs one Redis: with `session.redis_cluster = true` the shared state is
//! refused at start-up (the event store itself works on a cluster).

use crate::config::Settings;
use crate::domain::{Item, ItemId};
use futures::future::BoxFuture;
use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Entries the change stream keeps (trimmed approximately on every XADD).
pub const STREAM_MAXLEN: usize = 100_000;
/// How long one XREAD waits for news before the follower loops (and re-checks the registry).
const BLOCK: Duration = Duration::from_millis(1_000);
/// Most entries one XREAD returns.
const READ_COUNT: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("shared replica state in Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("shared replica state: {0}")]
    Invalid(String),
}

/// One item as an upsert announces it: what the catalog needs, and the vector the writer's
/// model made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpsertedItem {
    pub item: Item,
    pub popularity: f32,
    pub vector: Vec<f32>,
}

/// A change one replica made that every other one applies.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// Items written to the collection of `model`'s version.
    Upsert {
        model: String,
        items: Vec<UpsertedItem>,
    },
    Patch {
        item_id: ItemId,
        available: Option<bool>,
        price: Option<f32>,
    },
    Delete {
        item_ids: Vec<ItemId>,
    },
    /// The registry document changed (a registration, activation, rollback...).
    Registry,
    /// The experiments document changed.
    Experiments,
}

/// The shared keys of one deployment (`session.key_prefix`). One hash tag, so that a
/// transaction over the registry and the stream is one slot.
#[derive(Debug, Clone)]
pub struct Keys {
    pub stream: String,
    pub registry: String,
    pub experiments: String,
    /// Held by the replica that indexes the catalog into an empty collection.
    pub bootstrap: String,
    /// Held by the replica running an activation, preparation or rollback: one at a time
    /// across the replicas.
    pub lifecycle: String,
    /// Held by the replica running a retrain (`crate::retrain`): one run at a time.
    pub retrain: String,
    /// Prefix of the per-tick keys of the retrain schedule: the replica that sets a tick's
    /// key runs that tick.
    pub retrain_tick: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            stream: format!("{prefix}:{{cluster}}:changes"),
            registry: format!("{prefix}:{{cluster}}:registry"),
            experiments: format!("{prefix}:{{cluster}}:experiments"),
            bootstrap: format!("{prefix}:{{cluster}}:bootstrap"),
            lifecycle: format!("{prefix}:{{cluster}}:lifecycle"),
            retrain: format!("{prefix}:{{cluster}}:retrain"),
            retrain_tick: format!("{prefix}:{{cluster}}:retrain-tick"),
        }
    }
}

/// The XADD that announces `change` on `stream` as written by `origin` (trimmed to about
/// [`STREAM_MAXLEN`] entries): the one shape of a stream entry, `origin` and `change` (JSON).
pub fn announce(stream: &str, origin: &str, change: &Change) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream)
        .arg("MAXLEN")
        .arg("~")
        .arg(STREAM_MAXLEN)
        .arg("*")
        .arg("origin")
        .arg(origin)
        .arg("change")
        .arg(serde_json::to_string(change).expect("a change serializes"));
    cmd
}

/// A change read from the stream.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub id: String,
    /// The replica that made it.
    pub origin: String,
    pub change: Change,
}

/// This replica's handle on the shared state.
pub struct Bus {
    client: redis::Client,
    conn: MultiplexedConnection,
    keys: Keys,
    /// This process's id in `origin` fields: a replica skips its own catalog changes.
    origin: String,
}

impl Bus {
    /// Connects to the session store's Redis. Fails at once, naming the URL, when it does
    /// not answer: a replica must not serve a state of its own.
    pub async fn connect(settings: &Settings) -> Result<Arc<Bus>, ClusterError> {
        if settings.session.redis_cluster {
            return Err(ClusterError::Invalid(
                "replicas share their catalog, registry and experiments through one Redis; session.redis_cluster = true is not supported with index.backend = qdrant yet".into(),
            ));
        }
        let url = settings.session.redis_url.trim();
        let client = redis::Client::open(url)?;
        let conn = client
            .get_multiplexed_async_connection_with_config(&config(Duration::from_secs(5)))
            .await
            .map_err(|e| ClusterError::Invalid(format!("Redis at {url} does not answer: {e}")))?;
        Ok(Arc::new(Bus {
            client,
            conn,
            keys: Keys::new(&settings.session.key_prefix),
            origin: uuid::Uuid::new_v4().to_string(),
        }))
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// A blocking connection, for the registry (its methods are synchronous and rare).
    pub fn blocking_connection(&self) -> Result<redis::Connection, ClusterError> {
        let conn = self
            .client
            .get_connection_with_timeout(Duration::from_secs(5))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(conn)
    }

    /// Announces a change; returns its stream id once Redis has it.
    pub async fn publish(&self, change: &Change) -> Result<String, ClusterError> {
        Ok(announce(&self.keys.stream, &self.origin, change)
            .query_async(&mut self.conn.clone())
            .await?)
    }

    /// The id of the newest change, or `0-0`: following from here sees every later change.
    pub async fn head(&self) -> Result<String, ClusterError> {
        let reply: redis::streams::StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(&self.keys.stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(reply
            .ids
            .first()
            .map(|e| e.id.clone())
            .unwrap_or_else(|| "0-0".into()))
    }

    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, ClusterError> {
        let text: Option<String> = redis::cmd("GET")
            .arg(key)
            .query_async(&mut self.conn.clone())
            .await?;
        text.map(|t| {
            serde_json::from_str(&t)
                .map_err(|e| ClusterError::Invalid(format!("{key} holds invalid JSON: {e}")))
        })
        .transpose()
    }

    /// Stores the experiments document and announces it, in one transaction.
    pub async fn set_experiments<T: Serialize>(&self, value: &T) -> Result<(), ClusterError> {
        let text = serde_json::to_string(value).expect("experiments serialize");
        let mut pipe = redis::pipe();
        pipe.atomic().set(&self.keys.experiments, text).ignore();
        pipe.add_command(announce(
            &self.keys.stream,
            &self.origin,
            &Change::Experiments,
        ))
        .ignore();
        pipe.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }

    /// Takes a lease that expires after `ttl` unless released; `false` if another holds it.
    pub async fn try_lease(&self, key: &str, ttl: Duration) -> Result<bool, ClusterError> {
        let set: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(&self.origin)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(set.is_some())
    }

    /// Takes a lease and keeps it until the returned guard is dropped: it is renewed every
    /// third of `ttl`, so it lapses within `ttl` only if this process dies. `None` if
    /// another replica holds it.
    pub async fn hold(
        self: &Arc<Self>,
        key: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>, ClusterError> {
        if !self.try_lease(key, ttl).await? {
            return Ok(None);
        }
        let (bus, k) = (self.clone(), key.to_string());
        let renew = tokio::spawn(async move {
            let script = redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0",
            );
            loop {
                tokio::time::sleep(ttl / 3).await;
                let renewed = script
                    .key(&k)
                    .arg(&bus.origin)
                    .arg(ttl.as_millis() as u64)
                    .invoke_async::<i64>(&mut bus.conn.clone())
                    .await;
                if let Err(e) = renewed {
                    tracing::warn!(lease = k, error = %e, "renewing a lease");
                }
            }
        });
        Ok(Some(Lease {
            bus: self.clone(),
            key: key.to_string(),
            renew,
        }))
    }

    /// Releases a lease this replica holds (and only then).
    pub async fn release_lease(&self, key: &str) -> Result<(), ClusterError> {
        redis::Script::new(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
        )
        .key(key)
        .arg(&self.origin)
        .invoke_async::<i64>(&mut self.conn.clone())
        .await?;
        Ok(())
    }

    /// Follows the stream after `from` until the process ends: each batch of changes goes
    /// to `apply` in order, and `idle` runs whenever a read found nothing (a safety net that
    /// re-checks shared state). A Redis outage is retried every second; changes made
    /// meanwhile are read when it is back.
    pub fn follow(
        self: Arc<Self>,
        from: String,
        apply: impl Fn(Vec<Delivered>) -> BoxFuture<'static, ()> + Send + Sync + 'static,
        idle: impl Fn() -> BoxFuture<'static, ()> + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut last = from;
            let mut conn: Option<MultiplexedConnection> = None;
            loop {
                if conn.is_none() {
                    match self
                        .client
                        .get_multiplexed_async_connection_with_config(&config(BLOCK * 3))
                        .await
                    {
                        Ok(c) => conn = Some(c),
                        Err(e) => {
                            tracing::warn!(error = %e, "following replica changes: Redis does not answer; retrying");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    }
                }
                let c = conn.as_mut().expect("connected above");
                match read_after(c, &self.keys.stream, &last).await {
                    Ok((_, None)) => idle().await,
                    Ok((batch, Some(newest))) => {
                        last = newest;
                        if !batch.is_empty() {
                            apply(batch).await;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "following replica changes; retrying");
                        conn = None;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        })
    }
}

/// A lease held until dropped (see [`Bus::hold`]).
pub struct Lease {
    bus: Arc<Bus>,
    key: String,
    renew: tokio::task::JoinHandle<()>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renew.abort();
        let (bus, key) = (self.bus.clone(), std::mem::take(&mut self.key));
        // Released in the background; if the runtime is gone the lease lapses by itself.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = bus.release_lease(&key).await {
                    tracing::warn!(lease = key, error = %e, "releasing a lease; it lapses by itself");
                }
            });
        }
    }
}

fn config(response_timeout: Duration) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Duration::from_secs(5))
        .set_response_timeout(response_timeout)
}

/// Changes after `last`, waiting up to [`BLOCK`] for one, and the id of the newest entry
/// read (`None`: nothing new). An entry that does not parse (a newer release's change) is
/// logged and skipped.
async fn read_after(
    conn: &mut MultiplexedConnection,
    stream: &str,
    last: &str,
) -> Result<(Vec<Delivered>, Option<String>), ClusterError> {
    let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(READ_COUNT)
        .arg("BLOCK")
        .arg(BLOCK.as_millis() as u64)
        .arg("STREAMS")
        .arg(stream)
        .arg(last)
        .query_async(conn)
        .await?;
    let mut out = Vec::new();
    let mut newest = None;
    for key in reply.map(|r| r.keys).unwrap_or_default() {
        for entry in key.ids {
            newest = Some(entry.id.clone());
            let origin: Option<String> = entry.get("origin");
            let change: Option<String> = entry.get("change");
            match change.as_deref().map(serde_json::from_str::<Change>) {
                Some(Ok(change)) => out.push(Delivered {
                    id: entry.id,
                    origin: origin.unwrap_or_default(),
                    change,
                }),
                other => {
                    tracing::warn!(id = entry.id, problem = ?other.map(|r| r.err()), "skipping a replica change this release cannot read")
                }
            }
        }
    }
    Ok((out, newest))
}
