//! The admin API under `/admin`: the model registry (list, register, prepare, activate, roll
//! back) and the experiments (replace, report). Every route needs the `X-API-Key` header,
//! compared in constant time with `TANDEM_ADMIN_KEY`; with no key configured the API answers
//! 403 and says how to enable it.

use crate::experiment::{Experiment, ExperimentError, ExperimentReport, Experiments};
use crate::lifecycle::{ActivateOutcome, Lifecycle, LifecycleError};
use crate::registry::{ModelRecord, ModelStatus, RegistryError};
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;

/// The header that carries the admin key.
pub const API_KEY_HEADER: &str = "x-api-key";
/// The environment variable that enables the admin API.
pub const ADMIN_KEY_ENV: &str = "TANDEM_ADMIN_KEY";

/// What the admin handlers share.
#[derive(Clone)]
pub struct AdminState {
    pub lifecycle: Arc<Lifecycle>,
    pub experiments: Arc<Experiments>,
    /// The replicas' shared stream: experiments set here are set on every replica.
    pub bus: Option<Arc<crate::cluster::Bus>>,
    /// SHA-256 of the configured key; `None` disables the admin API.
    key_digest: Option<[u8; 32]>,
}

impl AdminState {
    /// `key` is `TANDEM_ADMIN_KEY` (`Settings::admin_key`; an empty value counts as unset).
    pub fn new(
        lifecycle: Arc<Lifecycle>,
        experiments: Arc<Experiments>,
        bus: Option<Arc<crate::cluster::Bus>>,
        key: Option<&str>,
    ) -> Self {
        AdminState {
            lifecycle,
            experiments,
            bus,
            key_digest: key.filter(|k| !k.is_empty()).map(digest),
        }
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// The admin routes, to be nested under `/admin` in a router of any state.
pub fn router<S>(state: AdminState) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/models", get(list_models).post(register_model))
        .route("/models/rollback", post(rollback))
        .route("/models/{version}/activate", post(activate))
        .route("/models/{version}/prepare", post(prepare))
        .route("/experiments", get(list_experiments).put(put_experiments))
        .route("/experiments/{name}", get(experiment_report))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            authorize,
        ))
        .with_state(state)
}

/// 403 when disabled, 401 when the key is missing or wrong. Both keys are hashed first, so
/// the comparison takes the same time whatever the length or content of the guess.
async fn authorize(State(s): State<AdminState>, req: Request, next: Next) -> Response {
    let Some(want) = s.key_digest else {
        return AdminError::Disabled.into_response();
    };
    let Some(given) = req.headers().get(API_KEY_HEADER) else {
        return AdminError::Unauthorized("missing X-API-Key header").into_response();
    };
    let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
    if bool::from(given.ct_eq(&want)) {
        next.run(req).await
    } else {
        AdminError::Unauthorized("wrong X-API-Key").into_response()
    }
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelList {
    /// The serving version.
    pub active: Option<String>,
    /// Every registered version, oldest first.
    pub models: Vec<ModelRecord>,
}

async fn list_models(State(s): State<AdminState>) -> Json<ModelList> {
    let models = s.lifecycle.models();
    let active = models
        .iter()
        .find(|m| m.status == ModelStatus::Active)
        .map(|m| m.version.clone());
    Json(ModelList { active, models })
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// A checkpoint directory on the server (model.safetensors + manifest.json).
    pub path: String,
}

async fn register_model(
    State(s): State<AdminState>,
    AdminJson(body): AdminJson<RegisterRequest>,
) -> Result<(StatusCode, Json<ModelRecord>), AdminError> {
    if body.path.trim().is_empty() {
        return Err(AdminError::Invalid {
            field: "path".into(),
            reason: "must name a checkpoint directory".into(),
        });
    }
    let record = s
        .lifecycle
        .register(std::path::Path::new(&body.path))
        .await?;
    Ok((StatusCode::CREATED, Json(record)))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ActivateResponse {
    pub outcome: ActivateOutcome,
    pub model: ModelRecord,
}

async fn activate(
    State(s): State<AdminState>,
    Path(version): Path<String>,
) -> Result<(StatusCode, Json<ActivateResponse>), AdminError> {
    let outcome = s.lifecycle.activate(&version).await?;
    let model = s
        .lifecycle
        .models()
        .into_iter()
        .find(|m| m.version == version)
        .ok_or_else(|| LifecycleError::Registry(RegistryError::Unknown(version.clone())))?;
    let status = match outcome {
        ActivateOutcome::Started => StatusCode::ACCEPTED,
        ActivateOutcome::Switched => StatusCode::OK,
    };
    Ok((status, Json(ActivateResponse { outcome, model })))
}

/// Builds a version's collection in the background without switching to it (202), so that
/// an experiment can serve it beside the active model; `GET /admin/models` shows progress,
/// then `ready`.
async fn prepare(
    State(s): State<AdminState>,
    Path(version): Path<String>,
) -> Result<(StatusCode, Json<ModelRecord>), AdminError> {
    let model = s.lifecycle.prepare(&version).await?;
    Ok((StatusCode::ACCEPTED, Json(model)))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RollbackResponse {
    /// The version serving now.
    pub active: ModelRecord,
}

async fn rollback(State(s): State<AdminState>) -> Result<Json<RollbackResponse>, AdminError> {
    let active = s.lifecycle.rollback().await?;
    Ok(Json(RollbackResponse { active }))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSet {
    pub experiments: Vec<Experiment>,
}

async fn list_experiments(State(s): State<AdminState>) -> Json<ExperimentSet> {
    Json(ExperimentSet {
        experiments: s.experiments.list(),
    })
}

/// Replaces every experiment. A variant's `model_version` must be registered; in an enabled
/// experiment it must also have an index collection (be active, or ready after an
/// activation or a `prepare`), since the variant serves from it beside the active model.
async fn put_experiments(
    State(s): State<AdminState>,
    AdminJson(body): AdminJson<ExperimentSet>,
) -> Result<Json<ExperimentSet>, AdminError> {
    crate::experiment::validate(&body.experiments)?;
    let registry = s.lifecycle.registry();
    for (i, e) in body.experiments.iter().enumerate() {
        for (j, v) in e.variants.iter().enumerate() {
            let Some(mv) = &v.model_version else { continue };
            let field = format!("experiments[{i}].variants[{j}].model_version");
            let servable = if e.enabled {
                s.lifecycle.check_servable(mv)
            } else if registry.get(mv).is_none() {
                Err(format!("model version {mv:?} is not registered"))
            } else {
                Ok(())
            };
            if let Err(reason) = servable {
                return Err(AdminError::Invalid { field, reason });
            }
        }
    }
    // Every replica first (they apply it within a second), then this one: the models
    // first, so that the first request assigned to a new arm finds it serving.
    if let Some(bus) = &s.bus {
        bus.set_experiments(&body.experiments)
            .await
            .map_err(|e| AdminError::Unavailable(e.to_string()))?;
    }
    s.lifecycle
        .pin(crate::experiment::pinned_models(&body.experiments))
        .await;
    s.experiments.replace(body.experiments)?;
    Ok(Json(ExperimentSet {
        experiments: s.experiments.list(),
    }))
}

async fn experiment_report(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<ExperimentReport>, AdminError> {
    Ok(Json(s.experiments.report(&name).await?))
}

/// The body of every admin error: the same shape as the public API's errors.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdminErrorBody {
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("the admin API is disabled: set the {ADMIN_KEY_ENV} environment variable to a secret and send it in the X-API-Key header")]
    Disabled,
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    #[error(transparent)]
    Experiment(#[from] ExperimentError),
    /// The replicas' shared store did not take the change.
    #[error("the shared store did not answer: {0}")]
    Unavailable(String),
}

impl AdminError {
    fn status_code_field(&self) -> (StatusCode, &'static str, Option<String>) {
        match self {
            AdminError::Disabled => (StatusCode::FORBIDDEN, "admin_disabled", None),
            AdminError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized", None),
            AdminError::Invalid { field, .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_input",
                Some(field.clone()),
            ),
            AdminError::Lifecycle(e) => match e {
                LifecycleError::Registry(r) => match r {
                    RegistryError::Invalid(_) => (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_checkpoint",
                        Some("path".into()),
                    ),
                    RegistryError::BadPath { .. } => (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "invalid_input",
                        Some("path".into()),
                    ),
                    RegistryError::AlreadyRegistered(_) => {
                        (StatusCode::CONFLICT, "already_registered", None)
                    }
                    RegistryError::Unknown(_) => (StatusCode::NOT_FOUND, "not_found", None),
                    RegistryError::Storage { .. } => {
                        (StatusCode::INTERNAL_SERVER_ERROR, "internal", None)
                    }
                },
                LifecycleError::AlreadyActive(_) => (StatusCode::CONFLICT, "already_active", None),
                LifecycleError::AlreadyPrepared(..) => {
                    (StatusCode::CONFLICT, "already_prepared", None)
                }
                LifecycleError::Busy(_) => (StatusCode::CONFLICT, "busy", None),
                LifecycleError::NothingToRollBack => {
                    (StatusCode::CONFLICT, "nothing_to_roll_back", None)
                }
                LifecycleError::Model { .. } => {
                    (StatusCode::INTERNAL_SERVER_ERROR, "internal", None)
                }
                LifecycleError::Index(_) => {
                    (StatusCode::SERVICE_UNAVAILABLE, "index_unavailable", None)
                }
                LifecycleError::ShuttingDown => {
                    (StatusCode::SERVICE_UNAVAILABLE, "shutting_down", None)
                }
                LifecycleError::Shared(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None),
            },
            AdminError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None),
            AdminError::Experiment(e) => match e {
                ExperimentError::Invalid { field, .. } => (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_input",
                    Some(field.clone()),
                ),
                ExperimentError::Unknown(_) => (StatusCode::NOT_FOUND, "not_found", None),
                ExperimentError::Store(_) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "session_store_unavailable",
                    None,
                ),
            },
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, code, field) = self.status_code_field();
        let message = if status.is_server_error() {
            tracing::error!(error = %self, "admin request failed");
            match status {
                StatusCode::SERVICE_UNAVAILABLE => {
                    "a dependency is unavailable; retry shortly".to_string()
                }
                _ => "internal error".to_string(),
            }
        } else {
            self.to_string()
        };
        let body = AdminErrorBody {
            code: code.to_string(),
            message,
            field,
        };
        (status, Json(body)).into_response()
    }
}

/// JSON extractor whose rejection is an [`AdminError`] (422 naming the body), not axum's
/// plain-text one.
pub struct AdminJson<T>(pub T);

impl<S, T> FromRequest<S> for AdminJson<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = AdminError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(AdminJson(v)),
            Err(rejection) => Err(AdminError::Invalid {
                field: "body".into(),
                reason: rejection.body_text(),
            }),
        }
    }
}
