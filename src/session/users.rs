//! Users and feedback as a Gorse client knows them (`/api/user`, `/api/feedback`): a small
//! store beside the session store, in the same backend (the memory store's log, or Redis).
//!
//! Feedback is also an event: the Gorse edge appends it through the session store like any
//! `POST /v1/events`, which is what recommendations read. The records kept here are what the
//! Gorse routes list and page through, with the client's own feedback type. Deleting a
//! feedback or a user also takes the items out of the user's recent list and history
//! ([`UserStore::delete_feedback`], [`UserStore::delete_user`]), so recommendations stop
//! using them at once.
//!
//! Paging is by key order (users by id; feedback by user, item, type): a page starts after
//! the last key of the previous one, so a scan visits every record that exists throughout
//! it exactly once, whatever is written meanwhile.

use super::SessionError;
use crate::domain::{ItemId, UserId};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Longest feedback type, label or comment accepted by the Gorse edge.
pub const MAX_TYPE_LEN: usize = 64;

/// A user: Gorse's `Labels` and `Comment`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    pub user_id: UserId,
    #[serde(default)]
    pub labels: Vec<String>,
    #[serde(default)]
    pub comment: String,
}

/// One feedback, keyed by (user, item, type) as in Gorse: a second feedback of the same type
/// on the same item replaces the first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackRecord {
    /// The client's type (`star`, `read`...), as sent.
    pub feedback_type: String,
    pub user_id: UserId,
    pub item_id: ItemId,
    /// Unix milliseconds.
    pub timestamp_ms: i64,
    #[serde(default)]
    pub value: f64,
    #[serde(default)]
    pub comment: String,
}

impl FeedbackRecord {
    /// The paging key: user, item and type joined by the unit separator, which no id or
    /// type may hold (they refuse control characters), so the keys sort as the triples do.
    pub fn key(&self) -> String {
        feedback_key(&self.user_id, &self.item_id, &self.feedback_type)
    }
}

pub fn feedback_key(user: &UserId, item: &ItemId, feedback_type: &str) -> String {
    format!("{user}\u{1f}{item}\u{1f}{feedback_type}")
}

/// The first key of a user's feedback (every one of the user's keys sorts after it).
pub fn user_feedback_prefix(user: &UserId) -> String {
    format!("{user}\u{1f}")
}

#[async_trait]
pub trait UserStore: Send + Sync {
    /// Inserts or replaces users.
    async fn put_users(&self, users: &[UserRecord]) -> Result<(), SessionError>;
    async fn user(&self, id: &UserId) -> Result<Option<UserRecord>, SessionError>;
    /// At most `n` users with ids after `after` (from the first without it), in id order.
    async fn users_after(
        &self,
        after: Option<&UserId>,
        n: usize,
    ) -> Result<Vec<UserRecord>, SessionError>;
    /// Deletes a user, its feedback, and its recent list and history. False when the user
    /// was unknown (its feedback and activity are deleted anyway).
    async fn delete_user(&self, id: &UserId) -> Result<bool, SessionError>;
    /// Inserts or replaces feedback records (the events go through `SessionStore::append`).
    async fn put_feedback(&self, records: &[FeedbackRecord]) -> Result<(), SessionError>;
    /// At most `n` records with keys ([`FeedbackRecord::key`]) after `after`, in key order.
    async fn feedback_after(
        &self,
        after: Option<&str>,
        n: usize,
    ) -> Result<Vec<FeedbackRecord>, SessionError>;
    /// Every feedback record of a user, in key order.
    async fn user_feedback(&self, user: &UserId) -> Result<Vec<FeedbackRecord>, SessionError>;
    /// Deletes a user's feedback on an item, of one type or of every type, and returns what
    /// was deleted. Once no feedback of the user on the item is left, the item also leaves
    /// the user's recent list and history.
    async fn delete_feedback(
        &self,
        user: &UserId,
        item: &ItemId,
        feedback_type: Option<&str>,
    ) -> Result<Vec<FeedbackRecord>, SessionError>;
}
