//! The Redis session store, for deployments with several stateless replicas.
//!
//! Keys (every one starts with the deployment's `key_prefix`; the part in braces is the Redis
//! Cluster hash tag, so that everything one script or one multi-key command touches lives in
//! one slot):
//! - `P:{log}:stream`: the event log, a Stream; entries `e` = the event as JSON. XADD trims
//!   it to about `stream_maxlen` entries.
//! - `P:{log}:seen:<event_id>`: idempotency markers (`SET NX PX`), in the stream's slot so
//!   that one Lua script does the check and the XADD atomically: they cannot disagree.
//! - `P:{user:<id>}:recent`, `P:{session:<id>}:recent`: recent lists (LPUSH, LTRIM, PEXPIRE).
//! - `P:{user:<id>}:history`: long-term history (LPUSH, LTRIM; no TTL).
//! - Trending, per trending key `T` = `P:{trending}:g:` (global) or `P:{trending}:c:<category>:`:
//!   - `T<bucket>`: each item's weighted count in one time bucket (a sorted set);
//!   - `Tsums`: each item's decayed sum over the live buckets, relative to bucket `base`, so
//!     that a read is the top k of one sorted set (a read that merged every bucket cost
//!     O(items trending) and held Redis for 20-30 ms at 100k items);
//!   - `Tmeta`: `base`, `through` (the buckets before it are out of the window and have been
//!     subtracted from the sums; the one at it may be in part) and `newest` (the newest bucket
//!     written).
//!
//!   Scripts keep the three consistent: every write and read first subtracts the buckets that
//!   left the window, once, whichever replica gets there first. The scripts name the bucket
//!   keys from `T`, which the hash tag keeps in the declared keys' slot.
//! - `P:cache:<key>`: the candidate cache (SET PX).
//! - The Gorse edge's users and feedback (`session::users`), in one slot: `P:{gorse}:users`
//!   (a hash, id -> JSON) with `P:{gorse}:user_ids` (a sorted set of the ids, all at score 0,
//!   paged with ZRANGEBYLEX), and `P:{gorse}:feedback` with `P:{gorse}:feedback_keys` alike,
//!   keyed by `FeedbackRecord::key`.
//!
//! With `session.redis_cluster = true`, `redis_url` lists seed nodes of a Redis Cluster
//! (comma-separated) and the store talks to it through the crate's cluster client, which
//! routes each command, script and pipeline part by the slot of its keys; the hash tags
//! above keep each multi-key operation in one slot.
//!
//! Every call runs under one budget (`redis_timeout_ms`, 200 ms by default), connection set-up
//! included; past it the call fails with [`SessionError::Unavailable`] so that callers
//! degrade instead of hanging. The `ConnectionManager` reconnects on the next call after
//! Redis comes back.

use super::users::{FeedbackRecord, UserRecord, UserStore};
use super::{Actor, AppendOutcome, Event, RecentItem, SessionError, SessionStore};
use crate::config::SessionSettings;
use crate::domain::{ItemId, UserId};
use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, RedisFuture, RedisResult};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Checks every event id and appends the new ones, in one atomic step.
/// KEYS[1] = stream, KEYS[1+i] = idempotency key of event i;
/// ARGV[1] = idempotency TTL (ms), ARGV[2] = stream MAXLEN, ARGV[2+i] = event i as JSON.
/// Returns one 1 (appended) or 0 (duplicate) per event.
const APPEND_SCRIPT: &str = r#"
local out = {}
for i = 2, #KEYS do
  if redis.call('SET', KEYS[i], '1', 'NX', 'PX', ARGV[1]) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[i + 1])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"#;

/// What both trending scripts share. ARGV[1..4] = now (bucket), window (buckets), bucket
/// seconds, half-life seconds. `settle` brings one trending key up to `now`: it subtracts the
/// buckets that left the window from the sums and deletes them, drops the sums once no bucket
/// is live, builds them from the live buckets when they are missing, and re-bases them before
/// their factor grows too large, as `TrendingCounts` does in the memory store.
const TRENDING_LIB: &str = r#"
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local bucket_secs, half_life = tonumber(ARGV[3]), tonumber(ARGV[4])
local oldest = now - window + 1
local function decay(age) return 0.5 ^ (age * bucket_secs / half_life) end
local function num(x) return string.format('%.17g', x) end
local SETTLE_BUDGET = 2000

local function settle(prefix, meta, sums)
  local m = redis.call('HMGET', meta, 'base', 'through', 'newest')
  local base, through, newest = tonumber(m[1]), tonumber(m[2]), tonumber(m[3])
  if not base then
    redis.call('DEL', sums)
    base = now
    for b = oldest, now do
      local counts = redis.call('ZRANGE', prefix .. b, 0, -1, 'WITHSCORES')
      for i = 1, #counts, 2 do
        redis.call('ZINCRBY', sums, num(tonumber(counts[i + 1]) / decay(b - base)), counts[i])
      end
      if #counts > 0 then newest = b end
    end
    if not newest then return nil end
    redis.call('HSET', meta, 'base', base, 'through', oldest, 'newest', newest)
    return base
  end
  if newest < oldest then
    redis.call('DEL', meta, sums)
    return nil
  end
  -- At most SETTLE_BUDGET counts per call, so that an hour's bucket of 100k items does not
  -- hold Redis at once: the next calls go on where this one stopped. Meanwhile the sums still
  -- hold the rest of a bucket a whole window old, at its decayed weight.
  local budget, done = SETTLE_BUDGET, through
  while done < oldest and budget > 0 do
    local bucket = prefix .. done
    local g = 1 / decay(done - base)
    local counts = redis.call('ZRANGE', bucket, 0, budget - 1, 'WITHSCORES')
    for i = 1, #counts, 2 do
      local gone = tonumber(counts[i + 1]) * g
      local left = tonumber(redis.call('ZINCRBY', sums, num(-gone), counts[i]))
      -- What is left of an item no live bucket holds is rounding error.
      if left <= gone * 1e-9 then redis.call('ZREM', sums, counts[i]) end
    end
    budget = budget - #counts / 2
    if budget > 0 then
      redis.call('DEL', bucket)
      done = done + 1
    else
      redis.call('ZREMRANGEBYRANK', bucket, 0, #counts / 2 - 1)
    end
  end
  if done > through then redis.call('HSET', meta, 'through', done) end
  if 1 / decay(now - base) > 1e12 then
    redis.call('ZUNIONSTORE', sums, 1, sums, 'WEIGHTS', num(decay(now - base)))
    base = now
    redis.call('HSET', meta, 'base', base)
  end
  return base
end
"#;

/// Counts events in trending. KEYS = (meta, sums) per trending key; ARGV[5] = how many trending
/// keys, then their prefixes, then groups of counts: key number, bucket, how many counts, and
/// (item, weight) per count. Groups out of the window (by this script's `now`) are dropped.
const TRENDING_ADD_SCRIPT: &str = r#"
local n = tonumber(ARGV[5])
local bucket_ms = bucket_secs * 1000
local bases, newest = {}, {}
for j = 1, n do bases[j] = settle(ARGV[5 + j], KEYS[2 * j - 1], KEYS[2 * j]) end
local i = 6 + n
while i <= #ARGV do
  local j, b, m = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if b >= oldest then
    local bucket, meta, sums = ARGV[5 + j] .. b, KEYS[2 * j - 1], KEYS[2 * j]
    if not bases[j] then
      bases[j] = now
      redis.call('HSET', meta, 'base', now, 'through', oldest, 'newest', b)
    end
    local g = 1 / decay(b - bases[j])
    for c = i + 3, i + 1 + 2 * m, 2 do
      redis.call('ZINCRBY', bucket, ARGV[c + 1], ARGV[c])
      redis.call('ZINCRBY', sums, num(tonumber(ARGV[c + 1]) * g), ARGV[c])
    end
    -- Kept a window past leaving it, so that a later settle can still subtract it.
    redis.call('PEXPIREAT', bucket, (b + 2 * window) * bucket_ms)
    if not newest[j] or b > newest[j] then newest[j] = b end
  end
  i = i + 3 + 2 * m
end
for j, b in pairs(newest) do
  local meta, sums = KEYS[2 * j - 1], KEYS[2 * j]
  local known = tonumber(redis.call('HGET', meta, 'newest'))
  if b > known then
    redis.call('HSET', meta, 'newest', b)
    known = b
  end
  redis.call('PEXPIREAT', meta, (known + window) * bucket_ms)
  redis.call('PEXPIREAT', sums, (known + window) * bucket_ms)
end
return 1
"#;

/// The top k of one trending key, flat [member, score, ...]: the k best, then the members tied
/// with the k-th (lowest ids first), so that the caller breaks ties by id as the memory store
/// does. KEYS = meta, sums; ARGV[5] = prefix, ARGV[6] = k.
const TRENDING_TOP_SCRIPT: &str = r#"
local base = settle(ARGV[5], KEYS[1], KEYS[2])
if not base then return {} end
local k = tonumber(ARGV[6])
local top = redis.call('ZRANGE', KEYS[2], 0, k - 1, 'REV', 'WITHSCORES')
if #top == 2 * k then
  local last = top[#top]
  local tied = redis.call('ZRANGE', KEYS[2], last, last, 'BYSCORE', 'LIMIT', 0, k, 'WITHSCORES')
  for i = 1, #tied do top[#top + 1] = tied[i] end
end
local w = decay(now - base)
for i = 2, #top, 2 do top[i] = num(tonumber(top[i]) * w) end
return top
"#;

/// Stream entries read per XRANGE call when reading the log.
const READ_CHUNK: usize = 5_000;

/// One Redis server or a Redis Cluster.
enum Client {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
}

/// A live connection of either kind; both reconnect by themselves after failures.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

pub struct RedisStore {
    settings: SessionSettings,
    client: Client,
    manager: ArcSwapOption<Conn>,
    connecting: tokio::sync::Mutex<()>,
    timeout: Duration,
    append_script: redis::Script,
    trending_add_script: redis::Script,
    trending_top_script: redis::Script,
}

impl RedisStore {
    /// The newest `limit` entries of a recent-items or history list.
    async fn read_entries(
        &self,
        what: &str,
        key: String,
        limit: usize,
    ) -> Result<Vec<RecentItem>, SessionError> {
        let raw: Vec<String> = self
            .bounded(what, async {
                let mut con = self.manager().await?;
                redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(limit as i64 - 1)
                    .query_async(&mut con)
                    .await
            })
            .await?;
        Ok(parse_entries(raw))
    }

    /// Creates the store. It does not need Redis to be up: the connection is made on the
    /// first call and remade after failures, so the service can start while Redis is down
    /// and serve degraded until it returns.
    pub async fn connect(settings: &SessionSettings) -> Result<Self, SessionError> {
        let prefix = &settings.key_prefix;
        if prefix.is_empty() || prefix.contains(['*', '?', '[', ']', '{', '}', ' ']) {
            return Err(SessionError::Backend(format!(
                "session.key_prefix {prefix:?} must be non-empty without glob characters, braces or spaces"
            )));
        }
        let bad_url = |e: RedisError| {
            SessionError::Backend(format!("session.redis_url {:?}: {e}", settings.redis_url))
        };
        let timeout = Duration::from_millis(settings.redis_timeout_ms);
        let client = if settings.redis_cluster {
            let nodes: Vec<&str> = settings.redis_url.split(',').map(str::trim).collect();
            Client::Cluster(
                redis::cluster::ClusterClientBuilder::new(nodes)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(1)
                    .build()
                    .map_err(bad_url)?,
            )
        } else {
            Client::Single(redis::Client::open(settings.redis_url.as_str()).map_err(bad_url)?)
        };
        let store = RedisStore {
            settings: settings.clone(),
            client,
            manager: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
            timeout,
            append_script: redis::Script::new(APPEND_SCRIPT),
            trending_add_script: redis::Script::new(&format!(
                "{TRENDING_LIB}{TRENDING_ADD_SCRIPT}"
            )),
            trending_top_script: redis::Script::new(&format!(
                "{TRENDING_LIB}{TRENDING_TOP_SCRIPT}"
            )),
        };
        // Try once so that a healthy start is connected at once; a failure is not fatal.
        if let Err(e) = store.ping().await {
            tracing::warn!(error = %e, "Redis is not reachable yet; session calls fail as unavailable until it is");
        }
        Ok(store)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.settings.key_prefix)
    }

    fn recent_key(&self, actor: &Actor) -> String {
        match actor {
            Actor::User(u) => self.key(&format!("{{user:{u}}}:recent")),
            Actor::Session(s) => self.key(&format!("{{session:{s}}}:recent")),
        }
    }

    fn history_key(&self, user: &UserId) -> String {
        self.key(&format!("{{user:{user}}}:history"))
    }

    fn stream_key(&self) -> String {
        self.key("{log}:stream")
    }

    /// The prefix of one trending key's Redis keys: `<prefix><bucket>`, `<prefix>sums` and
    /// `<prefix>meta`.
    fn trending_prefix(&self, category: Option<&str>) -> String {
        match category {
            None => self.key("{trending}:g:"),
            Some(c) => self.key(&format!("{{trending}}:c:{c}:")),
        }
    }

    /// ARGV[1..4] of both trending scripts, at bucket `now`.
    fn trending_args(&self, invocation: &mut redis::ScriptInvocation<'_>, now: i64) {
        let s = &self.settings;
        invocation
            .arg(now)
            .arg(s.trending_buckets)
            .arg(s.trending_bucket_secs)
            .arg(s.trending_half_life_secs);
    }

    fn bucket_ms(&self) -> i64 {
        self.settings.trending_bucket_secs as i64 * 1000
    }

    async fn manager(&self) -> RedisResult<Conn> {
        if let Some(m) = self.manager.load_full() {
            return Ok((*m).clone());
        }
        let _guard = self.connecting.lock().await;
        if let Some(m) = self.manager.load_full() {
            return Ok((*m).clone());
        }
        let m = match &self.client {
            Client::Single(client) => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeout)
                    .set_response_timeout(self.timeout)
                    .set_number_of_retries(1)
                    .set_factor(10)
                    .set_max_delay(self.settings.redis_timeout_ms);
                Conn::Single(ConnectionManager::new_with_config(client.clone(), config).await?)
            }
            Client::Cluster(client) => Conn::Cluster(client.get_async_connection().await?),
        };
        self.manager.store(Some(Arc::new(m.clone())));
        Ok(m)
    }

    /// Runs one Redis operation under the time budget.
    async fn bounded<T>(
        &self,
        what: &str,
        op: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, SessionError> {
        match tokio::time::timeout(self.timeout, op).await {
            Err(_) => Err(SessionError::Unavailable(format!(
                "{what}: no answer from Redis within {} ms",
                self.timeout.as_millis()
            ))),
            Ok(Err(e)) => Err(map_error(what, e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Deletes every key under this store's prefix, for tests and decommissioning.
    /// Returns how many were deleted.
    pub async fn delete_all_keys(&self) -> Result<usize, SessionError> {
        let pattern = format!("{}:*", self.settings.key_prefix);
        if matches!(self.client, Client::Cluster(_)) {
            // SCAN walks one node; KEYS is sent to every primary and the answers merged.
            let keys: Vec<String> = self
                .bounded("delete keys", async {
                    let mut con = self.manager().await?;
                    redis::cmd("KEYS").arg(&pattern).query_async(&mut con).await
                })
                .await?;
            // The cluster client splits a multi-key UNLINK by slot and sums the answers. A
            // hundred keys at a time, so that each call fits in the time budget: a thousand
            // took over 200 ms on a local three-node cluster.
            let mut deleted = 0usize;
            for chunk in keys.chunks(100) {
                deleted += self
                    .bounded("delete keys", async {
                        let mut con = self.manager().await?;
                        redis::cmd("UNLINK")
                            .arg(chunk)
                            .query_async::<usize>(&mut con)
                            .await
                    })
                    .await?;
            }
            return Ok(deleted);
        }
        let mut deleted = 0usize;
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = self
                .bounded("delete keys", async {
                    let mut con = self.manager().await?;
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut con)
                        .await
                })
                .await?;
            if !keys.is_empty() {
                let n: usize = self
                    .bounded("delete keys", async {
                        let mut con = self.manager().await?;
                        redis::cmd("UNLINK").arg(&keys).query_async(&mut con).await
                    })
                    .await?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// Entries in the event stream (for the no-loss benchmark and tests).
    pub async fn stream_len(&self) -> Result<u64, SessionError> {
        let key = self.stream_key();
        self.bounded("stream length", async {
            let mut con = self.manager().await?;
            redis::cmd("XLEN").arg(&key).query_async(&mut con).await
        })
        .await
    }

    /// Queues the session and history updates of the accepted events, one pipeline per hash
    /// tag, since a Redis Cluster takes a pipeline only within one slot, and their trending
    /// counts, one script call.
    fn state_updates(
        &self,
        events: &[&Event],
        now: i64,
    ) -> (Vec<redis::Pipeline>, Option<redis::ScriptInvocation<'_>>) {
        let mut pipes: BTreeMap<String, redis::Pipeline> = Default::default();
        // (trending key, bucket) -> item -> summed weight
        let mut counts: BTreeMap<(Option<&str>, i64), BTreeMap<&str, f64>> = BTreeMap::new();
        let s = &self.settings;
        let window_buckets = s.trending_buckets as i64;
        let now_bucket = now.div_euclid(self.bucket_ms());
        for e in events {
            let weight = s.event_weights.get(e.event_type);
            if weight <= 0.0 {
                continue;
            }
            let entry = serde_json::to_string(&RecentItem {
                item_id: e.item_id.clone(),
                event_type: e.event_type,
                timestamp_ms: e.timestamp_ms,
            })
            .expect("a recent item serializes");
            if let Some(user) = &e.user_id {
                let pipe = pipes.entry(format!("user:{user}")).or_default();
                let key = self.recent_key(&Actor::User(user.clone()));
                push_capped(pipe, &key, &entry, s.recent_cap);
                pipe.cmd("PEXPIRE")
                    .arg(&key)
                    .arg(secs_to_ms(s.user_recent_ttl_secs))
                    .ignore();
                push_capped(pipe, &self.history_key(user), &entry, s.history_cap);
            }
            if let Some(session) = &e.session_id {
                let pipe = pipes.entry(format!("session:{session}")).or_default();
                let key = self.recent_key(&Actor::Session(session.clone()));
                push_capped(pipe, &key, &entry, s.recent_cap);
                pipe.cmd("PEXPIRE")
                    .arg(&key)
                    .arg(secs_to_ms(s.session_recent_ttl_secs))
                    .ignore();
            }
            // A timestamp ahead of the server clock counts as now, as in the memory backend.
            let bucket = e.timestamp_ms.min(now).div_euclid(self.bucket_ms());
            if bucket <= now_bucket - window_buckets {
                continue;
            }
            let categories =
                std::iter::once(None).chain(e.categories.iter().map(|c| Some(c.as_str())));
            for category in categories {
                *counts
                    .entry((category, bucket))
                    .or_default()
                    .entry(e.item_id.as_str())
                    .or_default() += weight;
            }
        }
        let trending = (!counts.is_empty()).then(|| {
            // Each trending key's number in the script, from 1, in the order of its KEYS.
            let mut keys: BTreeMap<Option<&str>, usize> =
                counts.keys().map(|(category, _)| (*category, 0)).collect();
            for (j, number) in keys.values_mut().enumerate() {
                *number = j + 1;
            }
            let mut invocation = self.trending_add_script.prepare_invoke();
            self.trending_args(&mut invocation, now_bucket);
            invocation.arg(keys.len());
            for category in keys.keys() {
                let prefix = self.trending_prefix(*category);
                invocation.key(format!("{prefix}meta"));
                invocation.key(format!("{prefix}sums"));
                invocation.arg(prefix);
            }
            for ((category, bucket), items) in &counts {
                invocation.arg(keys[category]).arg(*bucket).arg(items.len());
                for (item, weight) in items {
                    invocation.arg(*item).arg(*weight);
                }
            }
            invocation
        });
        (pipes.into_values().collect(), trending)
    }
}

fn push_capped(pipe: &mut redis::Pipeline, key: &str, entry: &str, cap: usize) {
    pipe.cmd("LPUSH").arg(key).arg(entry).ignore();
    pipe.cmd("LTRIM")
        .arg(key)
        .arg(0)
        .arg(cap as i64 - 1)
        .ignore();
}

fn secs_to_ms(s: f64) -> i64 {
    ((s * 1000.0).round() as i64).max(1)
}

/// Connection trouble is `Unavailable` (callers degrade and retry later); an error Redis
/// answered with is a `Backend` bug or misconfiguration.
fn map_error(what: &str, e: RedisError) -> SessionError {
    if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            redis::ErrorKind::BusyLoadingError | redis::ErrorKind::TryAgain
        )
    {
        SessionError::Unavailable(format!("{what}: {e}"))
    } else {
        SessionError::Backend(format!("{what}: {e}"))
    }
}

fn parse_entries(raw: Vec<String>) -> Vec<RecentItem> {
    raw.iter()
        .filter_map(|s| match serde_json::from_str(s) {
            Ok(item) => Some(item),
            Err(e) => {
                tracing::warn!(error = %e, entry = %s, "skipping an unreadable recent-list entry");
                None
            }
        })
        .collect()
}

#[async_trait]
impl SessionStore for RedisStore {
    async fn append(&self, events: &[Event]) -> Result<AppendOutcome, SessionError> {
        if events.is_empty() {
            return Ok(AppendOutcome::default());
        }
        let mut invocation = self.append_script.prepare_invoke();
        invocation.key(self.stream_key());
        for e in events {
            invocation.key(self.key(&format!("{{log}}:seen:{}", e.event_id)));
        }
        invocation
            .arg(self.settings.idempotency_ttl_secs.saturating_mul(1000))
            .arg(self.settings.stream_maxlen);
        for e in events {
            let json = serde_json::to_string(e)
                .map_err(|err| SessionError::Backend(format!("encoding an event: {err}")))?;
            invocation.arg(json);
        }
        let flags: Vec<i64> = self
            .bounded("append events", async {
                let mut con = self.manager().await?;
                invocation.invoke_async(&mut con).await
            })
            .await?;
        if flags.len() != events.len() {
            return Err(SessionError::Backend(format!(
                "append events: the script answered {} flags for {} events",
                flags.len(),
                events.len()
            )));
        }
        let accepted: Vec<&Event> = events
            .iter()
            .zip(&flags)
            .filter(|(_, &f)| f == 1)
            .map(|(e, _)| e)
            .collect();
        let outcome = AppendOutcome {
            accepted: accepted.len(),
            duplicates: events.len() - accepted.len(),
        };
        if !accepted.is_empty() {
            let (pipes, trending) = self.state_updates(&accepted, super::event::now_ms());
            let result: Result<(), SessionError> = self
                .bounded("update sessions", async {
                    let con = self.manager().await?;
                    // Sent together: on one connection they share the round trip.
                    let sessions = futures::future::try_join_all(pipes.iter().map(|pipe| {
                        let mut con = con.clone();
                        async move { pipe.query_async::<()>(&mut con).await }
                    }));
                    let trending = async {
                        match &trending {
                            Some(invocation) => {
                                let mut con = con.clone();
                                invocation.invoke_async::<()>(&mut con).await
                            }
                            None => Ok(()),
                        }
                    };
                    futures::future::try_join(sessions, trending)
                        .await
                        .map(|_| ())
                })
                .await;
            // The events are in the log, which is what acknowledgement promises; the derived
            // state only loses these few updates, so report success and say so in the log.
            if let Err(e) = result {
                tracing::warn!(error = %e, events = accepted.len(), "events were logged but session and trending updates failed");
            }
        }
        Ok(outcome)
    }

    async fn read_log(&self, from_ms: i64, to_ms: i64) -> Result<Vec<Event>, SessionError> {
        let key = self.stream_key();
        let mut out = Vec::new();
        let mut start = "-".to_string();
        loop {
            let reply: redis::streams::StreamRangeReply = self
                .bounded("read the event log", async {
                    let mut con = self.manager().await?;
                    redis::cmd("XRANGE")
                        .arg(&key)
                        .arg(&start)
                        .arg("+")
                        .arg("COUNT")
                        .arg(READ_CHUNK)
                        .query_async(&mut con)
                        .await
                })
                .await?;
            let n = reply.ids.len();
            for entry in &reply.ids {
                let Some(redis::Value::BulkString(bytes)) = entry.map.get("e") else {
                    continue;
                };
                match serde_json::from_slice::<Event>(bytes) {
                    Ok(e) if e.timestamp_ms >= from_ms && e.timestamp_ms < to_ms => out.push(e),
                    Ok(_) => {}
                    Err(err) => {
                        tracing::warn!(id = %entry.id, error = %err, "skipping an unreadable stream entry")
                    }
                }
            }
            match reply.ids.last() {
                Some(last) if n == READ_CHUNK => start = format!("({}", last.id),
                _ => return Ok(out),
            }
        }
    }

    async fn recent(&self, actor: &Actor, limit: usize) -> Result<Vec<RecentItem>, SessionError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read_entries("read recent items", self.recent_key(actor), limit)
            .await
    }

    async fn history(&self, user: &UserId, limit: usize) -> Result<Vec<RecentItem>, SessionError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read_entries("read history", self.history_key(user), limit)
            .await
    }

    /// Both lists in one pipeline: their keys share the user's hash tag, so this is one
    /// round trip to one node, in a cluster too.
    async fn user_activity(
        &self,
        user: &UserId,
        recent_limit: usize,
        history_limit: usize,
    ) -> Result<(Vec<RecentItem>, Vec<RecentItem>), SessionError> {
        let mut pipe = redis::pipe();
        for (key, limit) in [
            (self.recent_key(&Actor::User(user.clone())), recent_limit),
            (self.history_key(user), history_limit),
        ] {
            // LRANGE 0 -1 would be the whole list: a zero limit asks for nothing instead.
            pipe.cmd("LRANGE").arg(key).arg(0).arg(limit as i64 - 1);
        }
        let (recent, history): (Vec<String>, Vec<String>) = self
            .bounded("read user activity", async {
                let mut con = self.manager().await?;
                pipe.query_async(&mut con).await
            })
            .await?;
        let take = |raw: Vec<String>, limit: usize| {
            if limit == 0 {
                Vec::new()
            } else {
                parse_entries(raw)
            }
        };
        Ok((take(recent, recent_limit), take(history, history_limit)))
    }

    async fn seed_history(&self, user: &UserId, items: &[RecentItem]) -> Result<(), SessionError> {
        if items.is_empty() {
            return Ok(());
        }
        let key = self.history_key(user);
        let mut pipe = redis::pipe();
        // `items` is newest first: push the oldest first so the newest ends at the head.
        for item in items.iter().rev() {
            let entry = serde_json::to_string(item)
                .map_err(|e| SessionError::Backend(format!("encoding history: {e}")))?;
            pipe.cmd("LPUSH").arg(&key).arg(entry).ignore();
        }
        pipe.cmd("LTRIM")
            .arg(&key)
            .arg(0)
            .arg(self.settings.history_cap as i64 - 1)
            .ignore();
        self.bounded("seed history", async {
            let mut con = self.manager().await?;
            pipe.query_async::<()>(&mut con).await
        })
        .await
    }

    async fn trending(
        &self,
        category: Option<&str>,
        k: usize,
    ) -> Result<Vec<(ItemId, f64)>, SessionError> {
        if k == 0 {
            return Ok(Vec::new());
        }
        let now_bucket = super::event::now_ms().div_euclid(self.bucket_ms());
        let prefix = self.trending_prefix(category);
        let mut invocation = self.trending_top_script.prepare_invoke();
        invocation.key(format!("{prefix}meta"));
        invocation.key(format!("{prefix}sums"));
        self.trending_args(&mut invocation, now_bucket);
        invocation.arg(prefix).arg(k);
        let flat: Vec<String> = self
            .bounded("read trending", async {
                let mut con = self.manager().await?;
                invocation.invoke_async(&mut con).await
            })
            .await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        for pair in flat.chunks_exact(2) {
            let (Ok(item), Ok(score)) = (ItemId::parse(pair[0].as_str()), pair[1].parse::<f64>())
            else {
                continue;
            };
            out.push((item, score));
        }
        // Same tie order as the memory backend: score descending, then item id ascending. The
        // members tied with the k-th come twice when they are among the k best.
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out.dedup_by(|a, b| a.0 == b.0);
        out.truncate(k);
        Ok(out)
    }

    async fn cache_get(&self, key: &str) -> Result<Option<Vec<u8>>, SessionError> {
        let key = self.key(&format!("cache:{key}"));
        self.bounded("read the cache", async {
            let mut con = self.manager().await?;
            redis::cmd("GET").arg(&key).query_async(&mut con).await
        })
        .await
    }

    async fn cache_set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), SessionError> {
        let key = self.key(&format!("cache:{key}"));
        let ttl_ms = (ttl.as_millis() as u64).max(1);
        self.bounded("write the cache", async {
            let mut con = self.manager().await?;
            redis::cmd("SET")
                .arg(&key)
                .arg(value)
                .arg("PX")
                .arg(ttl_ms)
                .query_async::<()>(&mut con)
                .await
        })
        .await
    }

    async fn incr_counters(&self, key: &str, deltas: &[(String, i64)]) -> Result<(), SessionError> {
        if deltas.is_empty() {
            return Ok(());
        }
        let key = self.key(&format!("counters:{key}"));
        self.bounded("add to counters", async {
            let mut con = self.manager().await?;
            // One round trip for the whole batch; HINCRBY is atomic per field, so replicas
            // adding at the same time never lose a count.
            let mut pipe = redis::pipe();
            for (field, by) in deltas {
                pipe.cmd("HINCRBY").arg(&key).arg(field).arg(*by).ignore();
            }
            pipe.query_async::<()>(&mut con).await
        })
        .await
    }

    async fn read_counters(
        &self,
        key: &str,
    ) -> Result<std::collections::HashMap<String, i64>, SessionError> {
        let key = self.key(&format!("counters:{key}"));
        self.bounded("read counters", async {
            let mut con = self.manager().await?;
            redis::cmd("HGETALL").arg(&key).query_async(&mut con).await
        })
        .await
    }

    async fn ping(&self) -> Result<(), SessionError> {
        self.bounded("ping", async {
            let mut con = self.manager().await?;
            redis::cmd("PING").query_async::<()>(&mut con).await
        })
        .await
    }
}

/// The lexical range of every member that starts with `prefix` (its last character is the
/// unit separator, so the first string after the range ends in the next character, a space).
fn prefix_range(prefix: &str) -> (String, String) {
    let stem = prefix.strip_suffix('\u{1f}').unwrap_or(prefix);
    (format!("[{prefix}"), format!("({stem} "))
}

impl RedisStore {
    fn gorse_key(&self, name: &str) -> String {
        self.key(&format!("{{gorse}}:{name}"))
    }

    /// Members of the sorted set `zset` in `[min, max]` (ZRANGEBYLEX syntax), at most `n`,
    /// with their JSON records from the hash `hash`.
    async fn lex_records<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        zset: &str,
        hash: &str,
        (min, max): (String, String),
        n: usize,
    ) -> Result<Vec<T>, SessionError> {
        let ids: Vec<String> = self
            .bounded(what, async {
                let mut con = self.manager().await?;
                redis::cmd("ZRANGEBYLEX")
                    .arg(zset)
                    .arg(&min)
                    .arg(&max)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(n.min(i64::MAX as usize) as i64)
                    .query_async(&mut con)
                    .await
            })
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<Option<String>> = self
            .bounded(what, async {
                let mut con = self.manager().await?;
                redis::cmd("HMGET")
                    .arg(hash)
                    .arg(&ids)
                    .query_async(&mut con)
                    .await
            })
            .await?;
        // A member without its record was deleted between the two reads: skipped.
        raw.into_iter()
            .flatten()
            .map(|json| {
                serde_json::from_str(&json)
                    .map_err(|e| SessionError::Backend(format!("{what}: a stored record: {e}")))
            })
            .collect()
    }

    /// Removes `item` from a user's recent list and history: each stored entry that names it
    /// is removed by its exact text (LREM), so entries pushed meanwhile stay.
    async fn forget_item(&self, user: &UserId, item: &ItemId) -> Result<(), SessionError> {
        let keys = [
            self.recent_key(&Actor::User(user.clone())),
            self.history_key(user),
        ];
        let mut read = redis::pipe();
        for k in &keys {
            read.cmd("LRANGE").arg(k).arg(0).arg(-1);
        }
        let (recent, history): (Vec<String>, Vec<String>) = self
            .bounded("read activity to forget", async {
                let mut con = self.manager().await?;
                read.query_async(&mut con).await
            })
            .await?;
        let mut pipe = redis::pipe();
        for (key, raw) in keys.iter().zip([recent, history]) {
            for entry in raw {
                let names_it =
                    serde_json::from_str::<RecentItem>(&entry).is_ok_and(|r| &r.item_id == item);
                if names_it {
                    pipe.cmd("LREM").arg(key).arg(0).arg(entry).ignore();
                }
            }
        }
        self.bounded("forget an item", async {
            let mut con = self.manager().await?;
            pipe.query_async::<()>(&mut con).await
        })
        .await
    }

    async fn remove_feedback(&self, records: &[FeedbackRecord]) -> Result<(), SessionError> {
        if records.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = records.iter().map(FeedbackRecord::key).collect();
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HDEL")
            .arg(self.gorse_key("feedback"))
            .arg(&keys)
            .ignore();
        pipe.cmd("ZREM")
            .arg(self.gorse_key("feedback_keys"))
            .arg(&keys)
            .ignore();
        self.bounded("delete feedback", async {
            let mut con = self.manager().await?;
            pipe.query_async::<()>(&mut con).await
        })
        .await
    }

    async fn feedback_with_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<FeedbackRecord>, SessionError> {
        self.lex_records(
            "read feedback",
            &self.gorse_key("feedback_keys"),
            &self.gorse_key("feedback"),
            prefix_range(prefix),
            usize::MAX,
        )
        .await
    }
}

#[async_trait]
impl UserStore for RedisStore {
    async fn put_users(&self, users: &[UserRecord]) -> Result<(), SessionError> {
        if users.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for u in users {
            let json = serde_json::to_string(u)
                .map_err(|e| SessionError::Backend(format!("encoding a user: {e}")))?;
            pipe.cmd("HSET")
                .arg(self.gorse_key("users"))
                .arg(u.user_id.as_str())
                .arg(json)
                .ignore();
            pipe.cmd("ZADD")
                .arg(self.gorse_key("user_ids"))
                .arg(0)
                .arg(u.user_id.as_str())
                .ignore();
        }
        self.bounded("write users", async {
            let mut con = self.manager().await?;
            pipe.query_async::<()>(&mut con).await
        })
        .await
    }

    async fn user(&self, id: &UserId) -> Result<Option<UserRecord>, SessionError> {
        let raw: Option<String> = self
            .bounded("read a user", async {
                let mut con = self.manager().await?;
                redis::cmd("HGET")
                    .arg(self.gorse_key("users"))
                    .arg(id.as_str())
                    .query_async(&mut con)
                    .await
            })
            .await?;
        raw.map(|json| {
            serde_json::from_str(&json)
                .map_err(|e| SessionError::Backend(format!("a stored user: {e}")))
        })
        .transpose()
    }

    async fn users_after(
        &self,
        after: Option<&UserId>,
        n: usize,
    ) -> Result<Vec<UserRecord>, SessionError> {
        let min = after.map_or("-".to_string(), |a| format!("({a}"));
        self.lex_records(
            "read users",
            &self.gorse_key("user_ids"),
            &self.gorse_key("users"),
            (min, "+".to_string()),
            n,
        )
        .await
    }

    async fn delete_user(&self, id: &UserId) -> Result<bool, SessionError> {
        let feedback = self
            .feedback_with_prefix(&super::users::user_feedback_prefix(id))
            .await?;
        self.remove_feedback(&feedback).await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        pipe.cmd("HDEL")
            .arg(self.gorse_key("users"))
            .arg(id.as_str());
        pipe.cmd("ZREM")
            .arg(self.gorse_key("user_ids"))
            .arg(id.as_str())
            .ignore();
        let (removed,): (i64,) = self
            .bounded("delete a user", async {
                let mut con = self.manager().await?;
                pipe.query_async(&mut con).await
            })
            .await?;
        let mut activity = redis::pipe();
        activity
            .cmd("DEL")
            .arg(self.recent_key(&Actor::User(id.clone())))
            .arg(self.history_key(id))
            .ignore();
        self.bounded("delete a user's activity", async {
            let mut con = self.manager().await?;
            activity.query_async::<()>(&mut con).await
        })
        .await?;
        Ok(removed > 0)
    }

    async fn put_feedback(&self, records: &[FeedbackRecord]) -> Result<(), SessionError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for r in records {
            let json = serde_json::to_string(r)
                .map_err(|e| SessionError::Backend(format!("encoding feedback: {e}")))?;
            let key = r.key();
            pipe.cmd("HSET")
                .arg(self.gorse_key("feedback"))
                .arg(&key)
                .arg(json)
                .ignore();
            pipe.cmd("ZADD")
                .arg(self.gorse_key("feedback_keys"))
                .arg(0)
                .arg(&key)
                .ignore();
        }
        self.bounded("write feedback", async {
            let mut con = self.manager().await?;
            pipe.query_async::<()>(&mut con).await
        })
        .await
    }

    async fn feedback_after(
        &self,
        after: Option<&str>,
        n: usize,
    ) -> Result<Vec<FeedbackRecord>, SessionError> {
        let min = after.map_or("-".to_string(), |a| format!("({a}"));
        self.lex_records(
            "read feedback",
            &self.gorse_key("feedback_keys"),
            &self.gorse_key("feedback"),
            (min, "+".to_string()),
            n,
        )
        .await
    }

    async fn user_feedback(&self, user: &UserId) -> Result<Vec<FeedbackRecord>, SessionError> {
        self.feedback_with_prefix(&super::users::user_feedback_prefix(user))
            .await
    }

    async fn delete_feedback(
        &self,
        user: &UserId,
        item: &ItemId,
        feedback_type: Option<&str>,
    ) -> Result<Vec<FeedbackRecord>, SessionError> {
        let prefix = format!("{}{item}\u{1f}", super::users::user_feedback_prefix(user));
        let on_item = self.feedback_with_prefix(&prefix).await?;
        let (gone, kept): (Vec<_>, Vec<_>) = on_item
            .into_iter()
            .partition(|r| feedback_type.is_none_or(|t| r.feedback_type == t));
        self.remove_feedback(&gone).await?;
        if kept.is_empty() {
            self.forget_item(user, item).await?;
        }
        Ok(gone)
    }
}
