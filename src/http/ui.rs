//! The demo pages: the storefront at `/`, onboarding at `/onboarding`, the admin dashboard at
//! `/admin`, and their assets under `/ui/`. They are static files from `web/`, compiled into
//! the binary so that `tandem serve` needs nothing on disk, and they call only the public and
//! admin APIs, like any storefront would.

use super::error::AppError;
use axum::extract::Path;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// Scripts and styles come from this origin only; no inline script runs, so an injected
/// item title cannot execute. `connect-src 'self'` keeps the admin key on this server.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

/// Browsers ask for `/favicon.ico` on every page; an SVG answers it (Chromium and Firefox
/// read the content type, not the extension), so the log shows no 404 for it.
const FAVICON: &str = include_str!("../../web/favicon.svg");

/// (path, content type, body) of every page.
const PAGES: &[(&str, &str)] = &[
    ("/", include_str!("../../web/index.html")),
    ("/onboarding", include_str!("../../web/onboarding.html")),
    ("/admin", include_str!("../../web/admin.html")),
];

/// (file name under `/ui/`, content type, body) of every asset.
const ASSETS: &[(&str, &str, &str)] = &[
    ("app.css", CSS, include_str!("../../web/app.css")),
    ("common.js", JS, include_str!("../../web/common.js")),
    ("storefront.js", JS, include_str!("../../web/storefront.js")),
    ("onboarding.js", JS, include_str!("../../web/onboarding.js")),
    ("admin.js", JS, include_str!("../../web/admin.js")),
];

/// The page and asset routes, to merge into the API router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new()
        .route("/ui/{file}", get(asset))
        .route("/favicon.ico", get(|| async { file(SVG, FAVICON) }));
    for &(path, body) in PAGES {
        router = router.route(path, get(move || async move { file(HTML, body) }));
    }
    router
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some(&(_, kind, body)) => file(kind, body),
        None => AppError::NotFound {
            what: "UI asset",
            id: name,
        }
        .into_response(),
    }
}

fn file(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            // The files change only with the binary; revalidating is cheap and means an
            // upgraded server never serves a page with last version's script.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use axum::http::StatusCode;
    use tower::ServiceExt;

    async fn get_path(path: &str) -> (StatusCode, String, String) {
        let app: Router = routes();
        let res = app
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = res.status();
        let kind = res
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, kind, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn pages_are_served_as_html_with_their_scripts() {
        for (path, heading, script) in [
            ("/", "Recommended for you", "/ui/storefront.js"),
            ("/onboarding", "tell us what you like", "/ui/onboarding.js"),
            ("/admin", "Admin key", "/ui/admin.js"),
        ] {
            let (status, kind, body) = get_path(path).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert!(kind.starts_with("text/html"), "{path}: {kind}");
            assert!(body.contains(heading), "{path} lacks {heading:?}");
            assert!(body.contains(script), "{path} does not load {script}");
            assert!(body.contains("/ui/app.css"), "{path} has no stylesheet");
        }
    }

    #[tokio::test]
    async fn every_asset_a_page_references_exists() {
        for &(path, body) in PAGES {
            for part in body.split("\"/ui/").skip(1) {
                let name = &part[..part.find('"').unwrap()];
                let (status, kind, _) = get_path(&format!("/ui/{name}")).await;
                assert_eq!(
                    status,
                    StatusCode::OK,
                    "{path} references missing /ui/{name}"
                );
                let want = if name.ends_with(".css") {
                    "text/css"
                } else {
                    "text/javascript"
                };
                assert!(kind.starts_with(want), "/ui/{name}: {kind}");
            }
        }
    }

    #[tokio::test]
    async fn favicon_is_served() {
        let (status, kind, body) = get_path("/favicon.ico").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(kind, SVG);
        assert!(body.starts_with("<svg"), "{body}");
    }

    /// A 404 for an asset is the API's error body, like every other error.
    #[tokio::test]
    async fn unknown_asset_is_a_404_naming_it() {
        let (status, kind, body) = get_path("/ui/nope.js").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(kind.starts_with("application/json"));
        let error: super::super::ErrorBody = serde_json::from_str(&body).unwrap();
        assert_eq!(error.code, "not_found", "{body}");
        assert!(error.message.contains("nope.js"), "{body}");
    }

    /// The server's 403 says "the admin API is disabled: ..."; the page shows that message
    /// alone rather than saying it twice.
    #[test]
    fn the_admin_page_says_disabled_once() {
        let admin = ASSETS.iter().find(|a| a.0 == "admin.js").unwrap().2;
        assert!(!admin.contains("disabled on this server: ${"), "{admin}");
    }

    #[test]
    fn the_admin_key_never_goes_into_a_url_or_local_storage() {
        let admin = ASSETS.iter().find(|a| a.0 == "admin.js").unwrap().2;
        assert!(admin.contains("sessionStorage"));
        assert!(!admin.contains("localStorage.setItem"));
        assert!(admin.contains("\"X-API-Key\""));
        // No query parameter or path segment carries it.
        assert!(
            !admin.contains("api_key="),
            "the key must not be put in a URL"
        );
        assert!(
            !admin.contains("key()}"),
            "the key must not be interpolated into a path"
        );
    }
}
