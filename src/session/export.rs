//! Export of the event log as `interactions.csv` in the common format, so that the next
//! `tandem train` learns from live traffic.
//!
//! Mapping:
//! - `user_id`: the user, or `session:<session_id>` for anonymous events (a session is a
//!   real behaviour sequence worth training on, and the prefix keeps it apart from users).
//! - `rating`: the event's `value` for `rating` events (1.0 when absent); for the other types
//!   the type's weight from `session.event_weights` (view 1, click 2, add_to_cart 4,
//!   purchase 8 by default), so a trainer that weights by rating sees stronger intent.
//! - `timestamp`: unix seconds. `event_type` is written as its own column.
//! - Event types with weight 0 (impressions, by default) are left out: training treats every
//!   row as a positive interaction, and an impression is not one.

use super::{Event, MemoryStore, SessionError};
use crate::config::{SessionBackend, Settings};
use crate::data::format::InteractionWriter;
use crate::domain::{EventType, Interaction, UserId};
use std::path::Path;

/// What an export wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportSummary {
    pub written: usize,
    /// Events left out because their type has weight 0.
    pub skipped_zero_weight: usize,
}

/// Reads the log of the configured backend from `since_ms` and writes
/// `out_dir/interactions.csv`. The memory backend's log file is read directly, without
/// taking it over, so this works while a server is running on it.
pub async fn export_events(
    settings: &Settings,
    out_dir: &Path,
    since_ms: i64,
) -> Result<ExportSummary, SessionError> {
    let events = match settings.session.backend {
        SessionBackend::Memory => {
            let path = settings.session.log_file(&settings.data_dir);
            if !path.exists() {
                return Err(SessionError::Log {
                    file: path.display().to_string(),
                    reason: "does not exist (no events were ever logged with this data_dir?)"
                        .into(),
                });
            }
            tokio::task::spawn_blocking(move || {
                MemoryStore::read_log_file(&path, since_ms, i64::MAX)
            })
            .await
            .map_err(|e| SessionError::Backend(format!("reading the event log: {e}")))??
        }
        SessionBackend::Redis => {
            let store = super::RedisStore::connect(&settings.session).await?;
            super::SessionStore::read_log(&store, since_ms, i64::MAX).await?
        }
    };
    write_interactions(settings, &events, out_dir)
}

/// Writes events as `out_dir/interactions.csv`.
pub fn write_interactions(
    settings: &Settings,
    events: &[Event],
    out_dir: &Path,
) -> Result<ExportSummary, SessionError> {
    let file_err = |reason: String| SessionError::Log {
        file: out_dir.join("interactions.csv").display().to_string(),
        reason,
    };
    std::fs::create_dir_all(out_dir).map_err(|e| file_err(e.to_string()))?;
    let mut writer = InteractionWriter::create(&out_dir.join("interactions.csv"), true)
        .map_err(|e| file_err(e.to_string()))?;
    let mut summary = ExportSummary::default();
    for e in events {
        match to_interaction(settings, e) {
            Some(row) => {
                writer.write(&row).map_err(|e| file_err(e.to_string()))?;
                summary.written += 1;
            }
            None => summary.skipped_zero_weight += 1,
        }
    }
    writer.finish().map_err(|e| file_err(e.to_string()))?;
    Ok(summary)
}

/// The interaction row for an event, or None when its type carries no signal.
pub fn to_interaction(settings: &Settings, e: &Event) -> Option<Interaction> {
    let weight = settings.session.event_weights.get(e.event_type);
    if weight <= 0.0 {
        return None;
    }
    let user_id = match (&e.user_id, &e.session_id) {
        (Some(u), _) => u.clone(),
        // Session ids are validated like user ids and the prefix adds 8 characters; a
        // maximal-length one would not fit, so fall back to its UUID v5 digest.
        (None, Some(s)) => UserId::parse(format!("session:{s}")).unwrap_or_else(|_| {
            UserId::parse(format!(
                "session:{}",
                uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, s.as_str().as_bytes())
            ))
            .expect("a uuid id is valid")
        }),
        (None, None) => return None, // validation rules this out
    };
    let rating = match e.event_type {
        EventType::Rating => e.value.unwrap_or(1.0),
        _ => weight as f32,
    };
    Some(Interaction {
        user_id,
        item_id: e.item_id.clone(),
        rating,
        timestamp: e.timestamp_ms.div_euclid(1000),
        event_type: e.event_type,
    })
}
