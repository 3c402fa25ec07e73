//! What users just did: the durable event log, recent interactions per user and session,
//! long-term history, trending counters and the candidate cache. Backends: `memory` (the
//! default, with an append-only log file) and `redis`. Nothing here knows HTTP.

pub mod event;
pub mod export;
pub mod log;
pub mod memory;
pub mod redis;
pub mod users;

pub use self::redis::RedisStore;
pub use event::{validate_batch, EventError, EventInput, EventLimits, TimestampInput};
pub use memory::MemoryStore;
pub use users::{FeedbackRecord, UserRecord, UserStore};

use crate::config::{SessionBackend, SessionSettings, Settings};
use crate::domain::{EventType, ItemId, SessionId, UserId};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// Opens the session store the settings choose: the memory store over
/// `<data_dir>/events.log` (replaying it), or Redis at `session.redis_url`.
pub async fn open(settings: &Settings) -> Result<Arc<dyn SessionStore>, SessionError> {
    Ok(open_with_users(settings).await?.0)
}

/// Like [`open`], with the same store's users and feedback (`users`) for the Gorse edge.
pub async fn open_with_users(
    settings: &Settings,
) -> Result<(Arc<dyn SessionStore>, Arc<dyn UserStore>), SessionError> {
    match settings.session.backend {
        SessionBackend::Memory => {
            let session = settings.session.clone();
            let path = session.log_file(&settings.data_dir);
            let store = tokio::task::spawn_blocking(move || MemoryStore::open(&session, &path))
                .await
                .map_err(|e| SessionError::Backend(format!("opening the event log: {e}")))??;
            let store = Arc::new(store);
            Ok((store.clone(), store))
        }
        SessionBackend::Redis => {
            let store = Arc::new(RedisStore::connect(&settings.session).await?);
            Ok((store.clone(), store))
        }
    }
}

impl From<&SessionSettings> for EventLimits {
    fn from(s: &SessionSettings) -> Self {
        EventLimits {
            max_batch: s.max_batch,
            max_future_ms: (s.max_future_secs as i64).saturating_mul(1000),
        }
    }
}

/// A validated event. Validation (type, ids, uuid, timestamp bounds) happens when it is built
/// from wire input; see `session::event`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: uuid::Uuid,
    pub user_id: Option<UserId>,
    pub session_id: Option<SessionId>,
    pub item_id: ItemId,
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub value: Option<f32>,
    /// Unix milliseconds.
    pub timestamp_ms: i64,
    pub variant: Option<String>,
    pub context: Option<serde_json::Value>,
    /// Item categories, filled in by the server from the catalog, for per-category trending.
    #[serde(default)]
    pub categories: Vec<String>,
}

/// One entry of a recent-interaction list or history, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecentItem {
    pub item_id: ItemId,
    pub event_type: EventType,
    pub timestamp_ms: i64,
}

/// Whose activity to read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Actor {
    User(UserId),
    Session(SessionId),
}

/// Result of appending a batch: how many were new, how many were resent duplicates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendOutcome {
    pub accepted: usize,
    pub duplicates: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The backend did not answer within its budget; callers degrade instead of failing.
    #[error("session store unavailable: {0}")]
    Unavailable(String),
    #[error("session store error: {0}")]
    Backend(String),
    #[error("event log {file}: {reason}")]
    Log { file: String, reason: String },
}

#[async_trait]
pub trait SessionStore: Send + Sync {
    /// Appends events durably (idempotent on `event_id`), then updates recent lists, history
    /// and trending. When this returns Ok the events are durable.
    async fn append(&self, events: &[Event]) -> Result<AppendOutcome, SessionError>;
    /// Events from the log with `from_ms <= timestamp < to_ms`, in log order.
    async fn read_log(&self, from_ms: i64, to_ms: i64) -> Result<Vec<Event>, SessionError>;
    /// Recent interactions of a user or session, newest first, at most `limit`.
    async fn recent(&self, actor: &Actor, limit: usize) -> Result<Vec<RecentItem>, SessionError>;
    /// Long-term history of a user (bounded), newest first.
    async fn history(&self, user: &UserId, limit: usize) -> Result<Vec<RecentItem>, SessionError>;
    /// A user's recent items and history, as [`SessionStore::recent`] and
    /// [`SessionStore::history`] answer them, in one call: the request path reads both for
    /// every known user, and a networked backend answers them in one round trip.
    async fn user_activity(
        &self,
        user: &UserId,
        recent_limit: usize,
        history_limit: usize,
    ) -> Result<(Vec<RecentItem>, Vec<RecentItem>), SessionError> {
        let actor = Actor::User(user.clone());
        let (recent, history) = tokio::join!(
            self.recent(&actor, recent_limit),
            self.history(user, history_limit)
        );
        Ok((recent?, history?))
    }
    /// Seeds a user's history directly (onboarding), without going through the event log.
    async fn seed_history(&self, user: &UserId, items: &[RecentItem]) -> Result<(), SessionError>;
    /// Top trending items with decayed scores, globally or in one category.
    async fn trending(
        &self,
        category: Option<&str>,
        k: usize,
    ) -> Result<Vec<(ItemId, f64)>, SessionError>;
    async fn cache_get(&self, key: &str) -> Result<Option<Vec<u8>>, SessionError>;
    async fn cache_set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), SessionError>;
    /// A cheap round trip, for readiness.
    async fn ping(&self) -> Result<(), SessionError>;
    /// Adds each delta to a named counter of the hash `key` (creating both as needed). Shared
    /// by every replica, so experiment counts add up across the fleet.
    async fn incr_counters(&self, key: &str, deltas: &[(String, i64)]) -> Result<(), SessionError>;
    /// Every counter of the hash `key`; empty when it was never written.
    async fn read_counters(
        &self,
        key: &str,
    ) -> Result<std::collections::HashMap<String, i64>, SessionError>;
}
