//! `POST /v1/events` input: one event object or an array of them, validated by
//! `session::event` (which names the field), with each event's categories filled in from the
//! catalog so per-category trending can count it.

use super::error::AppError;
use super::extract::parse_json;
use super::AppState;
use crate::domain::Name;
use crate::session::event::{self, EventError, EventInput, EventLimits};
use crate::session::{AppendOutcome, Event};

pub fn parse_events(s: &AppState, body: &[u8]) -> Result<Vec<Event>, AppError> {
    let limits = EventLimits {
        max_batch: s.settings.session.max_batch,
        max_future_ms: (s.settings.session.max_future_secs as i64).saturating_mul(1000),
    };
    let now = event::now_ms();
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let mut events = if first == Some(&b'[') {
        let inputs: Vec<EventInput> = parse_json(body).map_err(|e| prefix(e, "events"))?;
        event::validate_batch(inputs, now, &limits).map_err(invalid)?
    } else {
        let input: EventInput = parse_json(body)?;
        vec![input.validate(now, &limits).map_err(invalid)?]
    };
    fill_categories(s, &mut events);
    Ok(events)
}

/// Each event's item categories, from the catalog, so per-category trending can count it.
pub fn fill_categories(s: &AppState, events: &mut [Event]) {
    let entries = s.catalog.get_many(events.iter().map(|e| &e.item_id));
    for (e, entry) in events.iter_mut().zip(entries) {
        if let Some(entry) = entry {
            e.categories = entry.item.categories.iter().map(Name::to_string).collect();
        }
    }
}

/// Appends validated events (durable when this returns Ok), counts them, and attributes them
/// to experiments: `POST /v1/events` and the Gorse edge's feedback both write through here.
pub async fn ingest(s: &AppState, events: Vec<Event>) -> Result<AppendOutcome, AppError> {
    let outcome = s.sessions.append(&events).await.inspect_err(|e| {
        let unavailable = matches!(e, crate::session::SessionError::Unavailable(_));
        crate::telemetry::record_events_refused(unavailable, events.len());
    })?;
    crate::telemetry::record_events(outcome.accepted, outcome.duplicates);
    // Resent duplicates must not count twice; a batch mixing new and resent events (a retry
    // of a half-failed batch) cannot tell which is which, so it is left out of the counts.
    if outcome.duplicates == 0 {
        let experiments = s.experiments.clone();
        tokio::spawn(async move { experiments.attribute(&events).await });
    }
    Ok(outcome)
}

fn invalid(e: EventError) -> AppError {
    let field = e.field().to_string();
    let reason = match &e {
        EventError::Invalid { reason, .. } => reason.clone(),
        EventError::BatchTooLarge { len, max, .. } => {
            format!("a batch of {len} events is larger than the limit of {max}")
        }
    };
    AppError::Invalid { field, reason }
}

/// `[3].type` from the array parser becomes `events[3].type`.
fn prefix(e: AppError, name: &str) -> AppError {
    match e {
        AppError::Invalid { field, reason } if field.starts_with('[') => AppError::Invalid {
            field: format!("{name}{field}"),
            reason,
        },
        other => other,
    }
}
