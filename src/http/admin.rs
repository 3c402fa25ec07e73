//! The admin API under `/admin`: the model registry (list, register, prepare, activate, roll
//! back) and the experiments (replace, report). Every route needs the `X-API-Key` header,
//! compared in constant time with `TANDEM_ADMIN_KEY`; with no key configured the API answers
//! 403 and says how to enable it.

use super::auth;
use super::error::AppError;
use super::extract::ApiJson;
use super::AppState;
use crate::config::Experiment;
use crate::experiment::ExperimentReport;
use crate::lifecycle::{ActivateOutcome, LifecycleError};
use crate::registry::{ModelRecord, ModelStatus, RegistryError};
use crate::retrain::{RetrainError, RetrainReport, RetrainRequest, RunProgress};
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

/// The admin routes, nested under `/admin` by `http::router`.
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/models", get(list_models).post(register_model))
        .route("/models/rollback", post(rollback))
        .route("/models/{version}/activate", post(activate))
        .route("/models/{version}/prepare", post(prepare))
        .route("/experiments", get(list_experiments).put(put_experiments))
        .route("/experiments/{name}", get(experiment_report))
        .route("/retrain", get(retrain_status).post(start_retrain))
        .layer(axum::middleware::from_fn_with_state(state, authorize))
}

/// 403 when disabled, 401 when the key is missing or wrong (`auth::check`).
async fn authorize(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let checked = auth::check(
        auth::digest(s.settings.admin_key.0.as_deref()),
        req.headers(),
        AppError::AdminDisabled,
        "missing X-API-Key header",
    );
    match checked {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ModelList {
    /// The serving version.
    pub active: Option<String>,
    /// Every registered version, oldest first.
    pub models: Vec<ModelRecord>,
    /// The retrain loop's run reports, oldest first (`GET /admin/retrain` has the run in
    /// progress too).
    #[serde(default)]
    pub retrain_runs: Vec<RetrainReport>,
}

async fn list_models(State(s): State<AppState>) -> Json<ModelList> {
    let models = s.lifecycle.models();
    let active = models
        .iter()
        .find(|m| m.status == ModelStatus::Active)
        .map(|m| m.version.clone());
    Json(ModelList {
        active,
        models,
        retrain_runs: s.lifecycle.registry().retrain_runs(),
    })
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// A checkpoint directory on the server (model.safetensors + manifest.json).
    pub path: String,
}

async fn register_model(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<ModelRecord>), AppError> {
    if body.path.trim().is_empty() {
        return Err(AppError::invalid(
            "path",
            "must name a checkpoint directory",
        ));
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
    State(s): State<AppState>,
    Path(version): Path<String>,
) -> Result<(StatusCode, Json<ActivateResponse>), AppError> {
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
    State(s): State<AppState>,
    Path(version): Path<String>,
) -> Result<(StatusCode, Json<ModelRecord>), AppError> {
    let model = s.lifecycle.prepare(&version).await?;
    Ok((StatusCode::ACCEPTED, Json(model)))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RollbackResponse {
    /// The version serving now.
    pub active: ModelRecord,
}

async fn rollback(State(s): State<AppState>) -> Result<Json<RollbackResponse>, AppError> {
    let active = s.lifecycle.rollback().await?;
    Ok(Json(RollbackResponse { active }))
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSet {
    pub experiments: Vec<Experiment>,
}

async fn list_experiments(State(s): State<AppState>) -> Json<ExperimentSet> {
    Json(ExperimentSet {
        experiments: s.experiments.list(),
    })
}

/// Replaces every experiment. A variant's `model_version` must be registered; in an enabled
/// experiment it must also have an index collection (be active, or ready after an
/// activation or a `prepare`), since the variant serves from it beside the active model.
async fn put_experiments(
    State(s): State<AppState>,
    ApiJson(body): ApiJson<ExperimentSet>,
) -> Result<Json<ExperimentSet>, AppError> {
    crate::config::experiments::validate(&body.experiments)?;
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
                return Err(AppError::invalid(field, reason));
            }
        }
    }
    s.experiments
        .apply(body.experiments, s.bus.as_deref(), &s.lifecycle)
        .await
        .map_err(|e| AppError::Unavailable {
            dependency: "the replicas' shared store",
            detail: e.to_string(),
        })?;
    Ok(Json(ExperimentSet {
        experiments: s.experiments.list(),
    }))
}

async fn experiment_report(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ExperimentReport>, AppError> {
    Ok(Json(s.experiments.report(&name).await?))
}

/// `GET /admin/retrain`: the run in progress, every recorded run, and the loop's settings.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RetrainStatus {
    pub running: Option<RunProgress>,
    /// Oldest first.
    pub runs: Vec<RetrainReport>,
    /// `[retrain] every` ("off" when the server does not run it by itself).
    pub every: String,
    pub metric: String,
    pub margin: f64,
    pub promote: crate::config::retrain::Promote,
}

async fn retrain_status(State(s): State<AppState>) -> Json<RetrainStatus> {
    let r = &s.settings.retrain;
    Json(RetrainStatus {
        running: s.retrain.progress(),
        runs: s.lifecycle.registry().retrain_runs(),
        every: r.every.clone(),
        metric: r.metric.clone(),
        margin: r.margin,
        promote: r.promote,
    })
}

/// `POST /admin/retrain`: starts a run in the background (202 with its id); `GET
/// /admin/retrain` shows its stages, then its report. 409 while a run is in progress. The
/// body is optional: `{"shuffle_items": true}` is a control run whose candidate the gate
/// must hold back.
async fn start_retrain(
    State(s): State<AppState>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<RunProgress>), AppError> {
    let request: RetrainRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RetrainRequest::default()
    } else {
        let de = &mut serde_json::Deserializer::from_slice(&body);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let field = if path == "." {
                "body".to_string()
            } else {
                path
            };
            AppError::invalid(field, e.inner().to_string())
        })?
    };
    let (progress, _) = s
        .retrain
        .start(s.retrain_parts(), "admin", request)
        .await
        .map_err(|e| match e {
            RetrainError::Busy(_) | RetrainError::BusyElsewhere => AppError::Conflict {
                code: "busy",
                message: e.to_string(),
            },
            RetrainError::Shared(detail) => AppError::Unavailable {
                dependency: "the replicas' shared store",
                detail,
            },
        })?;
    Ok((StatusCode::ACCEPTED, Json(progress)))
}
