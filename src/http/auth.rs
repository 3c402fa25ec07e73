//! Who may write the catalog and use the admin API: both need the `X-API-Key` header with the
//! admin key (`TANDEM_ADMIN_KEY`), checked here ([`check`]) for both. `POST /v1/items`,
//! `PATCH` and `DELETE /v1/items/{item_id}` change what every visitor is served: 401 without
//! the key or with a wrong one, and 403 when no key is configured at all (catalog writes are
//! then off, as the admin API is). Reads, recommendations, events and onboarding stay open:
//! browsers send them.
//! Every call of the Gorse API (`/api/...`, `http::gorse`) is under the catalog-write rule.

use super::error::AppError;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The header that carries the admin key.
pub const API_KEY_HEADER: &str = "x-api-key";

/// The key catalog writes need, hashed; `None` turns catalog writes off.
#[derive(Clone)]
pub struct CatalogKey {
    digest: Option<[u8; 32]>,
}

impl CatalogKey {
    /// `key` is the admin key (an empty value counts as unset).
    pub fn new(key: Option<&str>) -> Self {
        CatalogKey {
            digest: digest(key),
        }
    }
}

/// 403 when no key is configured, 401 when the header is missing or wrong.
pub async fn authorize_catalog_write(
    State(key): State<CatalogKey>,
    req: Request,
    next: Next,
) -> Response {
    let checked = check(
        key.digest,
        req.headers(),
        AppError::CatalogWritesDisabled,
        "catalog writes and the Gorse API need the X-API-Key header",
    );
    match checked {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// The SHA-256 of a configured key; `None` when there is none (an empty value counts as
/// unset).
pub fn digest(key: Option<&str>) -> Option<[u8; 32]> {
    key.filter(|k| !k.is_empty())
        .map(|k| Sha256::digest(k.as_bytes()).into())
}

/// `X-API-Key` against the key's digest: `disabled` when no key is configured, 401 when the
/// header is missing or wrong. Both keys are hashed first, so the comparison takes the same
/// time whatever the length or content of the guess.
pub fn check(
    want: Option<[u8; 32]>,
    headers: &HeaderMap,
    disabled: AppError,
    missing: &'static str,
) -> Result<(), AppError> {
    let want = want.ok_or(disabled)?;
    let given = headers
        .get(API_KEY_HEADER)
        .ok_or(AppError::Unauthorized(missing))?;
    let given: [u8; 32] = Sha256::digest(given.as_bytes()).into();
    if bool::from(given.ct_eq(&want)) {
        Ok(())
    } else {
        Err(AppError::Unauthorized("wrong X-API-Key"))
    }
}
