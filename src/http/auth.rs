//! Who may write the catalog. `POST /v1/items`, `PATCH` and `DELETE /v1/items/{item_id}`
//! change what every visitor is served, so they need the `X-API-Key` header with the admin key
//! (`TANDEM_ADMIN_KEY`): 401 without it or with a wrong one, and 403 when no key is configured
//! at all (catalog writes are then off, as the admin API is). Every call of the Gorse API
//! (`/api/...`, `http::gorse`) is under the same rule. Reads, recommendations, events
//! and onboarding stay open: browsers send them.

use super::admin::{ADMIN_KEY_ENV, API_KEY_HEADER};
use super::error::ErrorBody;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The key catalog writes need, hashed; `None` turns catalog writes off.
#[derive(Clone)]
pub struct CatalogKey {
    digest: Option<[u8; 32]>,
}

impl CatalogKey {
    /// `key` is the admin key (an empty value counts as unset).
    pub fn new(key: Option<&str>) -> Self {
        CatalogKey {
            digest: key
                .filter(|k| !k.is_empty())
                .map(|k| Sha256::digest(k.as_bytes()).into()),
        }
    }
}

fn refuse(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        axum::Json(ErrorBody {
            code: code.into(),
            message,
            field: None,
        }),
    )
        .into_response()
}

/// 403 when no key is configured, 401 when the header is missing or wrong. Both keys are
/// hashed first, so the comparison takes the same time whatever the guess.
pub async fn authorize_catalog_write(
    State(key): State<CatalogKey>,
    req: Request,
    next: Next,
) -> Response {
    let Some(want) = key.digest else {
        return refuse(
            StatusCode::FORBIDDEN,
            "catalog_writes_disabled",
            format!("catalog writes and the Gorse API are disabled: set the {ADMIN_KEY_ENV} environment variable to a secret and send it in the X-API-Key header"),
        );
    };
    let Some(given) = req.headers().get(API_KEY_HEADER) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "catalog writes and the Gorse API need the X-API-Key header".into(),
        );
    };
    let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
    if bool::from(given.ct_eq(&want)) {
        next.run(req).await
    } else {
        refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong X-API-Key".into(),
        )
    }
}
