//! Every failure a client can see, and its one mapping to a status and a JSON body. The match
//! in `status` and `code` is exhaustive, so a new variant cannot slip through unmapped. A 5xx
//! detail is logged, never returned.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A stable machine-readable code, e.g. `invalid_input`, `not_found`.
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
    /// The input field at fault (`k`, `items[3].price`, `body`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A field is missing, has the wrong type, or is out of range.
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    /// The body is not JSON at all.
    #[error("body is not valid JSON: {reason}")]
    MalformedJson { reason: String },
    #[error("body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The body did not arrive within `server.body_timeout_ms` (a client trickling it).
    #[error("the request body did not arrive within {ms} ms")]
    BodyTimeout { ms: u64 },
    #[error("{what} {id:?} not found")]
    NotFound { what: &'static str, id: String },
    /// A body names an item that does not exist (an onboarding `liked_items` entry): 404 like
    /// an unknown item in a path, with the field that named it.
    #[error("unknown item {id:?}")]
    UnknownItemIn { field: String, id: String },
    /// A registered-model operation that the registry's state does not allow now (already
    /// active, busy with another switch, nothing to roll back...).
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// A checkpoint failed validation; the reason names the file.
    #[error("rejected checkpoint: {reason}")]
    InvalidCheckpoint { reason: String },
    #[error("the admin API is disabled: start the server with {env} set to a secret (`make run` sets one and prints it), then send it in the X-API-Key header", env = crate::config::ADMIN_KEY_ENV)]
    AdminDisabled,
    #[error("catalog writes are disabled: set the {env} environment variable to a secret and send it in the X-API-Key header", env = crate::config::ADMIN_KEY_ENV)]
    CatalogWritesDisabled,
    #[error("{0}")]
    Unauthorized(&'static str),
    /// A body sent as anything but `application/json`.
    #[error("the body must be sent with Content-Type: application/json")]
    UnsupportedMediaType,
    #[error("no route for {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("method {method} is not allowed here")]
    MethodNotAllowed { method: String },
    #[error("the server is at its concurrency limit; retry shortly")]
    Overloaded,
    #[error("the request took longer than {ms} ms")]
    Timeout { ms: u64 },
    /// A dependency needed for a write (index, session store) did not answer.
    #[error("{dependency} is unavailable")]
    Unavailable {
        dependency: &'static str,
        detail: String,
    },
    /// A bug or an unexpected backend failure; the detail is logged only.
    #[error("internal error")]
    Internal { detail: String },
}

impl AppError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        AppError::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AppError::Invalid { .. }
            | AppError::MalformedJson { .. }
            | AppError::InvalidCheckpoint { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::Conflict { .. } => StatusCode::CONFLICT,
            AppError::AdminDisabled | AppError::CatalogWritesDisabled => StatusCode::FORBIDDEN,
            AppError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AppError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            AppError::NotFound { .. }
            | AppError::UnknownItemIn { .. }
            | AppError::NoRoute { .. } => StatusCode::NOT_FOUND,
            AppError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            AppError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            AppError::Timeout { .. } | AppError::Unavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            AppError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            AppError::Invalid { .. } => "invalid_input",
            AppError::MalformedJson { .. } => "malformed_json",
            AppError::InvalidCheckpoint { .. } => "invalid_checkpoint",
            AppError::Conflict { code, .. } => code,
            AppError::AdminDisabled => "admin_disabled",
            AppError::CatalogWritesDisabled => "catalog_writes_disabled",
            AppError::UnsupportedMediaType => "unsupported_media_type",
            AppError::Unauthorized(_) => "unauthorized",
            AppError::PayloadTooLarge { .. } => "payload_too_large",
            AppError::BodyTimeout { .. } => "body_timeout",
            AppError::NotFound { .. } | AppError::UnknownItemIn { .. } => "not_found",
            AppError::NoRoute { .. } => "no_route",
            AppError::MethodNotAllowed { .. } => "method_not_allowed",
            AppError::Overloaded => "overloaded",
            AppError::Timeout { .. } => "timeout",
            AppError::Unavailable { .. } => "unavailable",
            AppError::Internal { .. } => "internal",
        }
    }

    pub fn field(&self) -> Option<&str> {
        match self {
            AppError::Invalid { field, .. } | AppError::UnknownItemIn { field, .. } => Some(field),
            AppError::MalformedJson { .. }
            | AppError::PayloadTooLarge { .. }
            | AppError::BodyTimeout { .. } => Some("body"),
            AppError::InvalidCheckpoint { .. } => Some("path"),
            AppError::UnsupportedMediaType => Some("content-type"),
            AppError::NotFound { .. }
            | AppError::Conflict { .. }
            | AppError::AdminDisabled
            | AppError::CatalogWritesDisabled
            | AppError::Unauthorized(_)
            | AppError::NoRoute { .. }
            | AppError::MethodNotAllowed { .. }
            | AppError::Overloaded
            | AppError::Timeout { .. }
            | AppError::Unavailable { .. }
            | AppError::Internal { .. } => None,
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code().to_string(),
            message: self.to_string(),
            field: self.field().map(str::to_string),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        match &self {
            AppError::Internal { detail } => tracing::error!(detail, "internal error"),
            AppError::Unavailable { dependency, detail } => {
                tracing::warn!(dependency, detail, "dependency unavailable")
            }
            _ => {}
        }
        (self.status(), axum::Json(self.body())).into_response()
    }
}

impl From<crate::index::IndexError> for AppError {
    fn from(e: crate::index::IndexError) -> Self {
        use crate::index::IndexError as E;
        match e {
            E::EmptyBatch => AppError::invalid("items", "must not be empty"),
            E::Unavailable(detail) => AppError::Unavailable {
                dependency: "index",
                detail,
            },
            // Vectors come from our own model, so a dimension or NaN problem is our bug.
            E::WrongDim { .. }
            | E::NonFinite { .. }
            | E::UnknownVersion(_)
            | E::NoActiveVersion
            | E::BadVersionName(_)
            | E::Backend(_) => AppError::Internal {
                detail: e.to_string(),
            },
        }
    }
}

impl From<crate::lifecycle::LifecycleError> for AppError {
    fn from(e: crate::lifecycle::LifecycleError) -> Self {
        use crate::lifecycle::LifecycleError as E;
        use crate::registry::RegistryError as R;
        let conflict = |code, e: &E| AppError::Conflict {
            code,
            message: e.to_string(),
        };
        match e {
            E::Registry(R::Invalid(m)) => AppError::InvalidCheckpoint {
                reason: m.to_string(),
            },
            E::Registry(R::BadPath { path, reason }) => {
                AppError::invalid("path", format!("{path:?}: {reason}"))
            }
            E::Registry(R::AlreadyRegistered(_)) => conflict("already_registered", &e),
            E::Registry(R::Unknown(version)) => AppError::NotFound {
                what: "model version",
                id: version,
            },
            E::Registry(R::Storage { .. }) => AppError::Unavailable {
                dependency: "model registry",
                detail: e.to_string(),
            },
            E::AlreadyActive(_) => conflict("already_active", &e),
            E::AlreadyPrepared(..) => conflict("already_prepared", &e),
            E::Busy(_) => conflict("busy", &e),
            E::NothingToRollBack => conflict("nothing_to_roll_back", &e),
            E::Model { .. } => AppError::Internal {
                detail: e.to_string(),
            },
            E::Index(e) => e.into(),
            E::ShuttingDown => AppError::Unavailable {
                dependency: "server (shutting down)",
                detail: e.to_string(),
            },
            E::Shared(detail) => AppError::Unavailable {
                dependency: "the replicas' shared store",
                detail,
            },
        }
    }
}

impl From<crate::experiment::ExperimentError> for AppError {
    fn from(e: crate::experiment::ExperimentError) -> Self {
        use crate::experiment::ExperimentError as E;
        match e {
            E::Unknown(name) => AppError::NotFound {
                what: "experiment",
                id: name,
            },
            E::Store(e) => e.into(),
        }
    }
}

impl From<crate::config::ConfigError> for AppError {
    fn from(e: crate::config::ConfigError) -> Self {
        match e {
            crate::config::ConfigError::Invalid { field, reason } => {
                AppError::Invalid { field, reason }
            }
            other => AppError::Internal {
                detail: other.to_string(),
            },
        }
    }
}

impl From<crate::items::WriteError> for AppError {
    fn from(e: crate::items::WriteError) -> Self {
        use crate::items::WriteError as E;
        match e {
            E::UnknownItem(id) => AppError::NotFound {
                what: "item",
                id: id.to_string(),
            },
            E::Index(e) => e.into(),
            E::Announce(e) => AppError::Unavailable {
                dependency: "replica stream",
                detail: e.to_string(),
            },
            E::Model(_) | E::Journal(_) | E::Task(_) => AppError::Internal {
                detail: e.to_string(),
            },
        }
    }
}

impl From<crate::session::SessionError> for AppError {
    fn from(e: crate::session::SessionError) -> Self {
        use crate::session::SessionError as E;
        match e {
            E::Unavailable(detail) => AppError::Unavailable {
                dependency: "session store",
                detail,
            },
            // The event log refused or failed a write (a full disk, a failed fsync): the
            // events were not acknowledged, and a retry (deduplicated by `event_id`) may
            // succeed on another replica or after an operator's fix, so 503 + Retry-After.
            E::Log { .. } => AppError::Unavailable {
                dependency: "event log",
                detail: e.to_string(),
            },
            E::Backend(_) => AppError::Internal {
                detail: e.to_string(),
            },
        }
    }
}

impl From<crate::pipeline::PipelineError> for AppError {
    fn from(e: crate::pipeline::PipelineError) -> Self {
        use crate::pipeline::PipelineError as E;
        match e {
            E::UnknownItem(id) => AppError::NotFound {
                what: "item",
                id: id.to_string(),
            },
            // Only onboarding seeds, and its `categories` chose nothing to seed.
            E::NothingToSeed => AppError::invalid("categories", e.to_string()),
            E::Session(e) => e.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_bodies_name_the_field() {
        let e = AppError::invalid("k", "must be between 1 and 200, got 0");
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let b = e.body();
        assert_eq!(b.field.as_deref(), Some("k"));
        assert_eq!(b.message, "k: must be between 1 and 200, got 0");
        let e = AppError::Internal {
            detail: "secret path /x".into(),
        };
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.body().message.contains("secret"));
        assert_eq!(
            AppError::PayloadTooLarge { limit: 1 }.status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
