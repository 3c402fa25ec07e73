//! A typed client of the admin API, behind `tandem models ...` (scripts and CI pipelines) and
//! the lifecycle tests.

use super::admin::{ActivateResponse, ModelList, RetrainStatus, RollbackResponse};
use super::auth::API_KEY_HEADER;
use super::error::ErrorBody;
use crate::registry::{ModelRecord, ModelStatus};
use serde::de::DeserializeOwned;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not reach {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an error; `message` is its explanation.
    #[error("{status} {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from {url}: {reason}")]
    Protocol { url: String, reason: String },
    #[error("{what} of {version} failed: {reason}")]
    ActivationFailed {
        what: &'static str,
        version: String,
        reason: String,
    },
    #[error("{what} of {version} did not finish within {secs} s (still {status})")]
    Timeout {
        what: &'static str,
        version: String,
        secs: u64,
        status: String,
    },
}

pub struct AdminClient {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    /// `base` is the server's root URL, e.g. `http://127.0.0.1:8080`.
    pub fn new(base: &str, key: Option<String>) -> Self {
        AdminClient {
            base: base.trim_end_matches('/').to_string(),
            key,
            http: reqwest::Client::new(),
        }
    }

    pub async fn list(&self) -> Result<ModelList, ClientError> {
        self.send(self.http.get(self.url("/admin/models"))).await
    }

    pub async fn register(&self, path: &str) -> Result<ModelRecord, ClientError> {
        let body = serde_json::json!({ "path": path });
        self.send(self.http.post(self.url("/admin/models")).json(&body))
            .await
    }

    pub async fn activate(&self, version: &str) -> Result<ActivateResponse, ClientError> {
        let url = self.url(&format!("/admin/models/{version}/activate"));
        self.send(self.http.post(url)).await
    }

    pub async fn prepare(&self, version: &str) -> Result<ModelRecord, ClientError> {
        let url = self.url(&format!("/admin/models/{version}/prepare"));
        self.send(self.http.post(url)).await
    }

    pub async fn rollback(&self) -> Result<RollbackResponse, ClientError> {
        self.send(self.http.post(self.url("/admin/models/rollback")))
            .await
    }

    /// Polls `GET /admin/models` until `version` is active (Ok) or its activation failed
    /// (the server's reason), calling `progress` with each poll's record.
    pub async fn wait_active(
        &self,
        version: &str,
        timeout: Duration,
        progress: impl FnMut(&ModelRecord),
    ) -> Result<ModelRecord, ClientError> {
        self.wait_for(version, ModelStatus::Active, timeout, progress)
            .await
    }

    /// Polls `GET /admin/models` until `version` is ready after a `prepare`.
    pub async fn wait_ready(
        &self,
        version: &str,
        timeout: Duration,
        progress: impl FnMut(&ModelRecord),
    ) -> Result<ModelRecord, ClientError> {
        self.wait_for(version, ModelStatus::Ready, timeout, progress)
            .await
    }

    async fn wait_for(
        &self,
        version: &str,
        want: ModelStatus,
        timeout: Duration,
        mut progress: impl FnMut(&ModelRecord),
    ) -> Result<ModelRecord, ClientError> {
        let what = match want {
            ModelStatus::Active => "activation",
            _ => "preparation",
        };
        let started = Instant::now();
        loop {
            let list = self.list().await?;
            let Some(m) = list.models.into_iter().find(|m| m.version == version) else {
                return Err(ClientError::ActivationFailed {
                    what,
                    version: version.into(),
                    reason: "the version is no longer registered".into(),
                });
            };
            progress(&m);
            match m.status {
                s if s == want => return Ok(m),
                ModelStatus::Indexing => {}
                _ => {
                    return Err(ClientError::ActivationFailed {
                        what,
                        version: version.into(),
                        reason: m
                            .last_error
                            .unwrap_or_else(|| format!("status is {:?}", m.status)),
                    })
                }
            }
            if started.elapsed() > timeout {
                return Err(ClientError::Timeout {
                    what,
                    version: version.into(),
                    secs: timeout.as_secs(),
                    status: format!("{:?}", m.status).to_lowercase(),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Starts a retrain run on the server (`POST /admin/retrain`); returns its id and stage.
    pub async fn retrain(
        &self,
        request: &crate::retrain::RetrainRequest,
    ) -> Result<crate::retrain::RunProgress, ClientError> {
        self.send(self.http.post(self.url("/admin/retrain")).json(request))
            .await
    }

    pub async fn retrain_status(&self) -> Result<RetrainStatus, ClientError> {
        self.send(self.http.get(self.url("/admin/retrain"))).await
    }

    /// Polls `GET /admin/retrain` until run `id` has its report, calling `progress` with the
    /// run in progress at each poll.
    pub async fn wait_retrain(
        &self,
        id: &str,
        timeout: Duration,
        mut progress: impl FnMut(&crate::retrain::RunProgress),
    ) -> Result<crate::retrain::RetrainReport, ClientError> {
        let started = Instant::now();
        loop {
            let status = self.retrain_status().await?;
            if let Some(report) = status.runs.into_iter().rev().find(|r| r.id == id) {
                return Ok(report);
            }
            if let Some(p) = status.running.as_ref().filter(|p| p.id == id) {
                progress(p);
            }
            if started.elapsed() > timeout {
                return Err(ClientError::Timeout {
                    what: "retrain",
                    version: id.into(),
                    secs: timeout.as_secs(),
                    status: status.running.map_or_else(|| "unknown".into(), |p| p.stage),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let req = match &self.key {
            Some(k) => req.header(API_KEY_HEADER, k),
            None => req,
        };
        let resp = req.send().await.map_err(|source| ClientError::Connect {
            url: self.base.clone(),
            source,
        })?;
        let status = resp.status();
        let url = resp.url().to_string();
        let bytes = resp.bytes().await.map_err(|source| ClientError::Connect {
            url: url.clone(),
            source,
        })?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(b) => ClientError::Api {
                    status: status.as_u16(),
                    code: b.code,
                    message: b.message,
                },
                Err(_) => ClientError::Api {
                    status: status.as_u16(),
                    code: "http_error".into(),
                    message: String::from_utf8_lossy(&bytes).into_owned(),
                },
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol {
            url,
            reason: e.to_string(),
        })
    }
}
