//! The default, in-process session store. Same semantics as the Redis backend: recent lists
//! per user and per session (capped, with a TTL refreshed on every event), a bounded
//! long-term history per user, trending counters in time buckets merged with decay weights,
//! a candidate cache with TTLs, and idempotency on `event_id` for `idempotency_ttl_secs`.
//!
//! Durability comes from the append-only log (`session::log`): `append` returns only after
//! its events are fsynced, and on start-up every piece of state, idempotency included, is
//! rebuilt by replaying the log. The state itself lives under one mutex: every operation on
//! it is a few hash-map touches, far shorter than the fsync it waits for. Trending counters
//! have a mutex of their own: a trending read is one pass over every trending item's running
//! sum (`TrendingCounts`), and session reads on the request path must not wait for it.

use super::log::{EventLog, LogError};
use super::users::{user_feedback_prefix, FeedbackRecord, UserRecord, UserStore};
use super::{Actor, AppendOutcome, Event, RecentItem, SessionError, SessionStore};
use crate::config::SessionSettings;
use crate::domain::{IdMap, ItemId, UserId};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// One record of the memory backend's log. `at_ms` is when the server accepted it; TTLs
/// and the idempotency window are measured from it, so a replay rebuilds exactly the state
/// that was live.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum LogRecord {
    Event {
        at_ms: i64,
        event: Event,
    },
    SeedHistory {
        at_ms: i64,
        user: UserId,
        items: Vec<RecentItem>,
    },
    /// The Gorse edge's users and feedback (`session::users`).
    PutUsers {
        users: Vec<UserRecord>,
    },
    DeleteUser {
        user: UserId,
    },
    PutFeedback {
        records: Vec<FeedbackRecord>,
    },
    DeleteFeedback {
        user: UserId,
        item: ItemId,
        feedback_type: Option<String>,
    },
}

impl From<LogError> for SessionError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Io { file, reason } => SessionError::Log { file, reason },
        }
    }
}

pub struct MemoryStore {
    settings: SessionSettings,
    log: Arc<EventLog>,
    state: parking_lot::Mutex<State>,
    trending: Arc<parking_lot::Mutex<Trending>>,
}

/// Category (None: global) -> its trending counters.
type Trending = HashMap<Option<String>, TrendingCounts>;

#[derive(Default)]
struct State {
    /// event_id -> (log sequence of the request that wrote it, accepted at).
    seen: HashMap<uuid::Uuid, (u64, i64)>,
    /// Ids in acceptance order, to expire `seen` without scanning it.
    seen_order: VecDeque<(i64, uuid::Uuid)>,
    recent: HashMap<Actor, RecentList>,
    history: HashMap<UserId, VecDeque<RecentItem>>,
    cache: HashMap<String, (Vec<u8>, i64)>,
    /// Named counter hashes (experiment counts). Not in the event log: they are aggregates
    /// that start again from zero with the process, like the cache.
    counters: HashMap<String, HashMap<String, i64>>,
    appends: u64,
    /// The Gorse edge's users by id, and feedback by key (`FeedbackRecord::key`): ordered,
    /// for paging.
    users: BTreeMap<UserId, UserRecord>,
    feedback: BTreeMap<String, FeedbackRecord>,
}

/// One trending key's counters: the weighted count of each item per time bucket, and each
/// item's decayed sum over the live buckets, kept up to date on every event so that a read
/// ranks the sums instead of adding up every bucket under the store's lock (tens of
/// thousands of items on a busy store, read every couple of seconds).
///
/// The sums are relative to bucket `base`: an event in bucket `b` adds
/// `weight / decay_weight(b - base)`, so an item's score at bucket `now` is its sum times
/// `decay_weight(now - base)`, a factor common to all items.
#[derive(Default)]
struct TrendingCounts {
    buckets: BTreeMap<i64, IdMap<f64>>,
    sums: IdMap<f64>,
    base: i64,
}

/// The sums are moved to a newer base once the factor between the base and a bucket passes
/// this, long before `f64` would overflow.
const MAX_GROWTH: f64 = 1e12;

impl TrendingCounts {
    fn add(&mut self, item: &ItemId, bucket: i64, weight: f64, s: &SessionSettings) {
        if self.buckets.is_empty() {
            self.base = bucket;
        }
        if 1.0 / decay_weight(bucket - self.base, s) > MAX_GROWTH {
            self.rebase(bucket, s);
        }
        *self
            .buckets
            .entry(bucket)
            .or_default()
            .entry(item.clone())
            .or_default() += weight;
        *self.sums.entry(item.clone()).or_default() += weight / decay_weight(bucket - self.base, s);
    }

    /// Drops the buckets older than `oldest` and takes them out of the sums, as their Redis
    /// keys would expire.
    fn expire(&mut self, oldest: i64, s: &SessionSettings) {
        while self
            .buckets
            .first_key_value()
            .is_some_and(|(&b, _)| b < oldest)
        {
            let Some((b, items)) = self.buckets.pop_first() else {
                break;
            };
            let g = 1.0 / decay_weight(b - self.base, s);
            for (item, count) in items {
                let gone = count * g;
                if let Some(sum) = self.sums.get_mut(&item) {
                    *sum -= gone;
                    // What is left of an item no live bucket holds is rounding error.
                    if *sum <= gone * 1e-9 {
                        self.sums.remove(&item);
                    }
                }
            }
        }
        if self.buckets.is_empty() {
            self.sums.clear();
        }
    }

    /// Re-expresses the sums relative to bucket `base`.
    fn rebase(&mut self, base: i64, s: &SessionSettings) {
        let f = decay_weight(base - self.base, s);
        self.sums.values_mut().for_each(|v| *v *= f);
        self.base = base;
    }

    /// The `k` best items at bucket `now`, best first (ties by id).
    fn top(&mut self, now: i64, k: usize, s: &SessionSettings) -> Vec<(ItemId, f64)> {
        if 1.0 / decay_weight(now - self.base, s) > MAX_GROWTH {
            self.rebase(now, s);
        }
        let w = decay_weight(now - self.base, s);
        let by_score =
            |a: &(&ItemId, f64), b: &(&ItemId, f64)| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0));
        let mut all: Vec<(&ItemId, f64)> = self.sums.iter().map(|(id, &v)| (id, v)).collect();
        if all.len() > k && k > 0 {
            all.select_nth_unstable_by(k - 1, by_score);
        }
        all.truncate(k);
        all.sort_by(by_score);
        all.into_iter().map(|(id, v)| (id.clone(), v * w)).collect()
    }
}

struct RecentList {
    items: VecDeque<RecentItem>,
    expires_at_ms: i64,
}

fn now_ms() -> i64 {
    super::event::now_ms()
}

fn secs_to_ms(s: f64) -> i64 {
    (s * 1000.0).round() as i64
}

impl MemoryStore {
    /// Opens the log at `log_path`, replays it, and returns the store. Blocking (it reads
    /// the whole log); `session::open` runs it on the blocking pool.
    pub fn open(settings: &SessionSettings, log_path: &Path) -> Result<Self, SessionError> {
        let mut state = State::default();
        let mut trending = Trending::default();
        let now = now_ms();
        let mut bad_records = 0u64;
        let rotation = super::log::Rotation {
            segment_bytes: settings.log_segment_bytes,
            keep_segments: settings.log_keep_segments,
        };
        let (log, _recovery) = EventLog::open_rotating(log_path, rotation, |payload| {
            match serde_json::from_slice::<LogRecord>(payload) {
                Ok(LogRecord::Event { at_ms, event }) => {
                    state.remember(event.event_id, 0, at_ms);
                    state.apply(&event, at_ms, settings);
                    count_trending(&mut trending, &event, at_ms, settings);
                }
                Ok(LogRecord::SeedHistory {
                    at_ms: _,
                    user,
                    items,
                }) => {
                    state.seed(&user, &items, settings);
                }
                Ok(record) => {
                    state.apply_users(&record);
                }
                // A record that checksums but does not decode was written by a newer
                // version; keep it in the file and skip it here.
                Err(_) => bad_records += 1,
            }
            Ok(())
        })?;
        if bad_records > 0 {
            tracing::warn!(file = %log_path.display(), bad_records, "event log records this version cannot decode were skipped");
        }
        state.expire_seen(now, settings);
        Ok(MemoryStore {
            settings: settings.clone(),
            log: Arc::new(log),
            state: parking_lot::Mutex::new(state),
            trending: Arc::new(parking_lot::Mutex::new(trending)),
        })
    }

    /// Reads the events of a log file without taking it over, for export while a server
    /// owns the file. Blocking.
    pub fn read_log_file(
        path: &Path,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<Event>, SessionError> {
        let mut out = Vec::new();
        super::log::read_segments(path, |p| {
            collect_event(p, from_ms, to_ms, &mut out);
            Ok(())
        })?;
        Ok(out)
    }

    fn encode(record: &LogRecord) -> Result<Vec<u8>, SessionError> {
        serde_json::to_vec(record)
            .map_err(|e| SessionError::Backend(format!("encoding an event: {e}")))
    }
}

fn collect_event(payload: &[u8], from_ms: i64, to_ms: i64, out: &mut Vec<Event>) {
    if let Ok(LogRecord::Event { event, .. }) = serde_json::from_slice::<LogRecord>(payload) {
        if event.timestamp_ms >= from_ms && event.timestamp_ms < to_ms {
            out.push(event);
        }
    }
}

impl State {
    fn remember(&mut self, id: uuid::Uuid, seq: u64, at_ms: i64) {
        self.seen.insert(id, (seq, at_ms));
        self.seen_order.push_back((at_ms, id));
    }

    fn expire_seen(&mut self, now: i64, s: &SessionSettings) {
        let horizon = now - s.idempotency_ttl_secs as i64 * 1000;
        while let Some(&(at, id)) = self.seen_order.front() {
            if at > horizon {
                break;
            }
            self.seen_order.pop_front();
            // Only forget it if this entry is the live one (an id can be re-accepted after
            // it expired).
            if self.seen.get(&id).is_some_and(|&(_, a)| a == at) {
                self.seen.remove(&id);
            }
        }
    }

    fn apply(&mut self, e: &Event, at_ms: i64, s: &SessionSettings) {
        let weight = s.event_weights.get(e.event_type);
        if weight <= 0.0 {
            return; // logged (and exported), but no signal for sessions or trending
        }
        let entry = RecentItem {
            item_id: e.item_id.clone(),
            event_type: e.event_type,
            timestamp_ms: e.timestamp_ms,
        };
        if let Some(user) = &e.user_id {
            let ttl = secs_to_ms(s.user_recent_ttl_secs);
            self.push_recent(Actor::User(user.clone()), &entry, at_ms, ttl, s.recent_cap);
            let h = self.history.entry(user.clone()).or_default();
            h.push_front(entry.clone());
            h.truncate(s.history_cap);
        }
        if let Some(session) = &e.session_id {
            let ttl = secs_to_ms(s.session_recent_ttl_secs);
            self.push_recent(
                Actor::Session(session.clone()),
                &entry,
                at_ms,
                ttl,
                s.recent_cap,
            );
        }
    }

    fn push_recent(
        &mut self,
        actor: Actor,
        entry: &RecentItem,
        at_ms: i64,
        ttl_ms: i64,
        cap: usize,
    ) {
        let list = self.recent.entry(actor).or_insert_with(|| RecentList {
            items: VecDeque::new(),
            expires_at_ms: 0,
        });
        if list.expires_at_ms <= at_ms {
            list.items.clear(); // the list had expired: start a new one, as Redis would
        }
        list.items.push_front(entry.clone());
        list.items.truncate(cap);
        list.expires_at_ms = at_ms + ttl_ms;
    }

    fn seed(&mut self, user: &UserId, items: &[RecentItem], s: &SessionSettings) {
        let h = self.history.entry(user.clone()).or_default();
        for item in items.iter().rev() {
            h.push_front(item.clone());
        }
        h.truncate(s.history_cap);
    }

    /// Applies a users-and-feedback record (`session::users`); returns the feedback a
    /// deletion removed. In log order on replay as when it was written, so a feedback given
    /// again after a deletion stays.
    fn apply_users(&mut self, record: &LogRecord) -> Vec<FeedbackRecord> {
        match record {
            LogRecord::PutUsers { users } => {
                for u in users {
                    self.users.insert(u.user_id.clone(), u.clone());
                }
                Vec::new()
            }
            LogRecord::PutFeedback { records } => {
                for r in records {
                    self.feedback.insert(r.key(), r.clone());
                }
                Vec::new()
            }
            LogRecord::DeleteUser { user } => {
                self.users.remove(user);
                let keys: Vec<String> = self.feedback_keys_of(user).into_iter().collect();
                let gone = keys
                    .iter()
                    .filter_map(|k| self.feedback.remove(k))
                    .collect();
                self.recent.remove(&Actor::User(user.clone()));
                self.history.remove(user);
                gone
            }
            LogRecord::DeleteFeedback {
                user,
                item,
                feedback_type,
            } => {
                let prefix = format!("{}{item}\u{1f}", user_feedback_prefix(user));
                let keys: Vec<String> = self
                    .feedback
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .filter(|(_, r)| feedback_type.as_ref().is_none_or(|t| &r.feedback_type == t))
                    .map(|(k, _)| k.clone())
                    .collect();
                let gone: Vec<FeedbackRecord> = keys
                    .iter()
                    .filter_map(|k| self.feedback.remove(k))
                    .collect();
                let left = self
                    .feedback
                    .range(prefix.clone()..)
                    .next()
                    .is_some_and(|(k, _)| k.starts_with(&prefix));
                if !left {
                    if let Some(l) = self.recent.get_mut(&Actor::User(user.clone())) {
                        l.items.retain(|r| &r.item_id != item);
                    }
                    if let Some(h) = self.history.get_mut(user) {
                        h.retain(|r| &r.item_id != item);
                    }
                }
                gone
            }
            LogRecord::Event { .. } | LogRecord::SeedHistory { .. } => Vec::new(),
        }
    }

    fn feedback_keys_of(&self, user: &UserId) -> Vec<String> {
        let prefix = user_feedback_prefix(user);
        self.feedback
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Occasional sweep of expired lists and cache entries, so that memory follows live
    /// users, not every user ever seen.
    fn sweep(&mut self, now: i64) {
        self.recent.retain(|_, l| l.expires_at_ms > now);
        self.cache.retain(|_, (_, exp)| *exp > now);
    }
}

/// Counts an accepted event in trending, globally and per category.
fn count_trending(trending: &mut Trending, e: &Event, at_ms: i64, s: &SessionSettings) {
    let weight = s.event_weights.get(e.event_type);
    if weight <= 0.0 {
        return;
    }
    // A timestamp ahead of the server clock counts as now, as in the Redis backend.
    let bucket = bucket_of(e.timestamp_ms.min(at_ms), s);
    let oldest = bucket_of(at_ms, s) - s.trending_buckets as i64 + 1;
    if bucket < oldest {
        return;
    }
    let keys = std::iter::once(None).chain(e.categories.iter().map(|c| Some(c.clone())));
    for key in keys {
        let counts = trending.entry(key).or_default();
        counts.add(&e.item_id, bucket, weight, s);
        counts.expire(oldest, s);
    }
}

fn bucket_of(ts_ms: i64, s: &SessionSettings) -> i64 {
    ts_ms.div_euclid(s.trending_bucket_secs as i64 * 1000)
}

/// The decay weight of a bucket `age` buckets old.
fn decay_weight(age: i64, s: &SessionSettings) -> f64 {
    0.5f64.powf(age as f64 * s.trending_bucket_secs as f64 / s.trending_half_life_secs)
}

#[async_trait]
impl SessionStore for MemoryStore {
    async fn append(&self, events: &[Event]) -> Result<AppendOutcome, SessionError> {
        if events.is_empty() {
            return Ok(AppendOutcome::default());
        }
        let now = now_ms();
        let mut payloads = Vec::with_capacity(events.len());
        for e in events {
            payloads.push(Self::encode(&LogRecord::Event {
                at_ms: now,
                event: e.clone(),
            })?);
        }
        // Deciding what is new, queueing it on the log and updating state happen under one
        // lock, so a resent id can never be accepted twice and state order follows log order.
        // State is updated before the fsync completes: if the fsync fails the log refuses
        // every later write, so the store stops acknowledging anything.
        let (wait_for, outcome, fresh) = {
            let mut st = self.state.lock();
            st.expire_seen(now, &self.settings);
            let mut fresh = Vec::new();
            let mut in_batch = HashSet::new();
            let mut wait_for = 0u64;
            for (i, e) in events.iter().enumerate() {
                if let Some(&(seq, _)) = st.seen.get(&e.event_id) {
                    // A duplicate is acknowledged only once its original is durable.
                    wait_for = wait_for.max(seq);
                } else if in_batch.insert(e.event_id) {
                    fresh.push(i);
                }
            }
            if !fresh.is_empty() {
                let batch: Vec<Vec<u8>> = fresh
                    .iter()
                    .map(|&i| std::mem::take(&mut payloads[i]))
                    .collect();
                let seq = self.log.enqueue(&batch)?;
                wait_for = wait_for.max(seq);
                for &i in &fresh {
                    st.remember(events[i].event_id, seq, now);
                    st.apply(&events[i], now, &self.settings);
                }
            }
            st.appends += 1;
            if st.appends.is_multiple_of(4096) {
                st.sweep(now);
            }
            let outcome = AppendOutcome {
                accepted: fresh.len(),
                duplicates: events.len() - fresh.len(),
            };
            (wait_for, outcome, fresh)
        };
        // Trending after the session state's lock is released (it has its own).
        if !fresh.is_empty() {
            let mut trending = self.trending.lock();
            for &i in &fresh {
                count_trending(&mut trending, &events[i], now, &self.settings);
            }
        }
        if wait_for > 0 {
            self.log.wait_durable(wait_for).await?;
        }
        Ok(outcome)
    }

    async fn read_log(&self, from_ms: i64, to_ms: i64) -> Result<Vec<Event>, SessionError> {
        let log = self.log.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            log.read(|p| {
                collect_event(p, from_ms, to_ms, &mut out);
                Ok(())
            })?;
            Ok(out)
        })
        .await
        .map_err(|e| SessionError::Backend(format!("reading the event log: {e}")))?
    }

    async fn recent(&self, actor: &Actor, limit: usize) -> Result<Vec<RecentItem>, SessionError> {
        let now = now_ms();
        let st = self.state.lock();
        Ok(match st.recent.get(actor) {
            Some(l) if l.expires_at_ms > now => l.items.iter().take(limit).cloned().collect(),
            _ => Vec::new(),
        })
    }

    async fn history(&self, user: &UserId, limit: usize) -> Result<Vec<RecentItem>, SessionError> {
        let st = self.state.lock();
        Ok(st
            .history
            .get(user)
            .map(|h| h.iter().take(limit).cloned().collect())
            .unwrap_or_default())
    }

    async fn seed_history(&self, user: &UserId, items: &[RecentItem]) -> Result<(), SessionError> {
        if items.is_empty() {
            return Ok(());
        }
        // Seeds are logged too (not as events: export and read_log skip them), so that an
        // onboarded user keeps their history across a restart, as with Redis.
        let payload = Self::encode(&LogRecord::SeedHistory {
            at_ms: now_ms(),
            user: user.clone(),
            items: items.to_vec(),
        })?;
        let seq = {
            let mut st = self.state.lock();
            let seq = self.log.enqueue(&[payload])?;
            st.seed(user, items, &self.settings);
            seq
        };
        self.log.wait_durable(seq).await?;
        Ok(())
    }

    async fn trending(
        &self,
        category: Option<&str>,
        k: usize,
    ) -> Result<Vec<(ItemId, f64)>, SessionError> {
        let s = &self.settings;
        let now_bucket = bucket_of(now_ms(), s);
        let oldest = now_bucket - s.trending_buckets as i64 + 1;
        let key = category.map(str::to_string);
        let trending = self.trending.clone();
        let s = s.clone();
        // A pass over every trending item: on the blocking pool, not a runtime worker.
        tokio::task::spawn_blocking(move || {
            let mut trending = trending.lock();
            let Some(counts) = trending.get_mut(&key) else {
                return Vec::new();
            };
            counts.expire(oldest, &s);
            counts.top(now_bucket, k, &s)
        })
        .await
        .map_err(|e| SessionError::Backend(format!("reading trending: {e}")))
    }

    async fn cache_get(&self, key: &str) -> Result<Option<Vec<u8>>, SessionError> {
        let now = now_ms();
        let mut st = self.state.lock();
        match st.cache.get(key) {
            Some((v, exp)) if *exp > now => Ok(Some(v.clone())),
            Some(_) => {
                st.cache.remove(key);
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn cache_set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), SessionError> {
        let now = now_ms();
        let mut st = self.state.lock();
        if st.cache.len() >= self.settings.cache_max_entries && !st.cache.contains_key(key) {
            st.cache.retain(|_, (_, exp)| *exp > now);
            // Still full of live entries: drop an arbitrary tenth. A cache miss only costs a
            // recomputation, so precision in eviction is not worth an LRU here.
            if st.cache.len() >= self.settings.cache_max_entries {
                let drop: Vec<String> = st
                    .cache
                    .keys()
                    .take(self.settings.cache_max_entries / 10 + 1)
                    .cloned()
                    .collect();
                for k in drop {
                    st.cache.remove(&k);
                }
            }
        }
        let ttl_ms = ttl.as_millis().min(i64::MAX as u128 / 2) as i64;
        st.cache
            .insert(key.to_string(), (value.to_vec(), now + ttl_ms));
        Ok(())
    }

    async fn incr_counters(&self, key: &str, deltas: &[(String, i64)]) -> Result<(), SessionError> {
        let mut st = self.state.lock();
        let hash = st.counters.entry(key.to_string()).or_default();
        for (field, by) in deltas {
            let c = hash.entry(field.clone()).or_insert(0);
            *c = c.saturating_add(*by);
        }
        Ok(())
    }

    async fn read_counters(&self, key: &str) -> Result<HashMap<String, i64>, SessionError> {
        Ok(self
            .state
            .lock()
            .counters
            .get(key)
            .cloned()
            .unwrap_or_default())
    }

    async fn ping(&self) -> Result<(), SessionError> {
        // The store is in-process; the only thing that can be down is the log.
        self.log.check().map_err(SessionError::from)
    }
}

impl MemoryStore {
    /// Logs a users-and-feedback record, applies it, and returns once it is durable.
    async fn write_users(&self, record: LogRecord) -> Result<Vec<FeedbackRecord>, SessionError> {
        let payload = Self::encode(&record)?;
        let (seq, gone) = {
            let mut st = self.state.lock();
            let seq = self.log.enqueue(&[payload])?;
            (seq, st.apply_users(&record))
        };
        self.log.wait_durable(seq).await?;
        Ok(gone)
    }
}

#[async_trait]
impl UserStore for MemoryStore {
    async fn put_users(&self, users: &[UserRecord]) -> Result<(), SessionError> {
        if users.is_empty() {
            return Ok(());
        }
        self.write_users(LogRecord::PutUsers {
            users: users.to_vec(),
        })
        .await
        .map(drop)
    }

    async fn user(&self, id: &UserId) -> Result<Option<UserRecord>, SessionError> {
        Ok(self.state.lock().users.get(id).cloned())
    }

    async fn users_after(
        &self,
        after: Option<&UserId>,
        n: usize,
    ) -> Result<Vec<UserRecord>, SessionError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let st = self.state.lock();
        let from = after.map_or(Unbounded, Excluded);
        Ok(st
            .users
            .range((from, Unbounded))
            .take(n)
            .map(|(_, u)| u.clone())
            .collect())
    }

    async fn delete_user(&self, id: &UserId) -> Result<bool, SessionError> {
        let known = self.state.lock().users.contains_key(id);
        self.write_users(LogRecord::DeleteUser { user: id.clone() })
            .await?;
        Ok(known)
    }

    async fn put_feedback(&self, records: &[FeedbackRecord]) -> Result<(), SessionError> {
        if records.is_empty() {
            return Ok(());
        }
        self.write_users(LogRecord::PutFeedback {
            records: records.to_vec(),
        })
        .await
        .map(drop)
    }

    async fn feedback_after(
        &self,
        after: Option<&str>,
        n: usize,
    ) -> Result<Vec<FeedbackRecord>, SessionError> {
        use std::ops::Bound::{Excluded, Unbounded};
        let st = self.state.lock();
        let from = after.map_or(Unbounded, |a| Excluded(a.to_string()));
        Ok(st
            .feedback
            .range((from, Unbounded))
            .take(n)
            .map(|(_, r)| r.clone())
            .collect())
    }

    async fn user_feedback(&self, user: &UserId) -> Result<Vec<FeedbackRecord>, SessionError> {
        let st = self.state.lock();
        Ok(st
            .feedback_keys_of(user)
            .iter()
            .filter_map(|k| st.feedback.get(k).cloned())
            .collect())
    }

    async fn delete_feedback(
        &self,
        user: &UserId,
        item: &ItemId,
        feedback_type: Option<&str>,
    ) -> Result<Vec<FeedbackRecord>, SessionError> {
        self.write_users(LogRecord::DeleteFeedback {
            user: user.clone(),
            item: item.clone(),
            feedback_type: feedback_type.map(str::to_string),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ItemId {
        ItemId::parse(s).unwrap()
    }

    /// What the sums must equal: every live bucket's counts, decayed from their age.
    fn summed(counts: &TrendingCounts, now: i64, s: &SessionSettings) -> IdMap<f64> {
        let mut out = IdMap::default();
        for (&b, items) in &counts.buckets {
            for (item, c) in items {
                *out.entry(item.clone()).or_default() += c * decay_weight(now - b, s);
            }
        }
        out
    }

    #[test]
    fn running_sums_match_the_buckets_through_expiry_and_rebasing() {
        // A two-bucket half-life moves the base every ~80 buckets (growth past 1e12).
        let s = SessionSettings {
            trending_bucket_secs: 60,
            trending_half_life_secs: 120.0,
            trending_buckets: 10,
            ..SessionSettings::default()
        };
        let mut counts = TrendingCounts::default();
        let items = ["a", "b", "c", "d"];
        for bucket in 0..300i64 {
            // "a" every bucket, the others now and then, with different weights.
            for (n, name) in items.iter().enumerate() {
                if bucket % (n as i64 + 1) == 0 {
                    counts.add(&id(name), bucket, 1.0 + n as f64, &s);
                }
            }
            counts.expire(bucket - s.trending_buckets as i64 + 1, &s);
            let top = counts.top(bucket, 10, &s);
            let want = summed(&counts, bucket, &s);
            assert_eq!(top.len(), want.len(), "bucket {bucket}: {top:?}");
            for (item, score) in &top {
                let w = want[item];
                assert!(
                    (score - w).abs() <= 1e-9 * w,
                    "bucket {bucket}: {item:?} {score} vs {w}"
                );
            }
            assert!(top.windows(2).all(|p| p[0].1 >= p[1].1), "best first");
        }
        assert!(counts.base > 0, "the base moved");
        // Once every bucket has left the window, nothing trends.
        counts.expire(400, &s);
        assert!(counts.top(400, 10, &s).is_empty());
    }

    #[test]
    fn top_k_keeps_the_best_and_breaks_ties_by_id() {
        let s = SessionSettings::default();
        let mut counts = TrendingCounts::default();
        for (name, w) in [("x", 1.0), ("b", 3.0), ("a", 3.0), ("y", 2.0), ("z", 0.5)] {
            counts.add(&id(name), 7, w, &s);
        }
        let top: Vec<String> = counts
            .top(7, 3, &s)
            .into_iter()
            .map(|(i, _)| i.as_str().to_string())
            .collect();
        assert_eq!(top, ["a", "b", "y"]);
    }
}
