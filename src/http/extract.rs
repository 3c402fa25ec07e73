//! Extractors that turn every bad input into an [`AppError`] naming the field, instead of
//! axum's plain-text rejections: JSON bodies (size-limited, with the path of the bad field),
//! query strings (repeatable keys, unknown keys refused) and path segments.

use super::error::AppError;
use super::AppState;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_LENGTH;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;
use std::str::FromStr;

/// A JSON body, at most `server.max_body_bytes` long.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state.settings.server.max_body_bytes).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// The raw body bytes, refused with 413 past the limit (by the declared length when there is
/// one, so an oversized upload is refused before it is read).
pub async fn read_body(req: Request, limit: usize) -> Result<axum::body::Bytes, AppError> {
    let (parts, body) = req.into_parts();
    read_bytes(&parts.headers, body, limit).await
}

/// The bytes of a body of a request with `headers`, at most `limit` of them.
pub async fn read_bytes(
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
    limit: usize,
) -> Result<axum::body::Bytes, AppError> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(AppError::PayloadTooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let mut source: Option<&dyn std::error::Error> = Some(&e);
        while let Some(s) = source {
            if s.to_string().contains("length limit") {
                return AppError::PayloadTooLarge { limit };
            }
            source = s.source();
        }
        AppError::MalformedJson {
            reason: format!("could not read the body: {e}"),
        }
    })
}

/// Parses JSON, naming the field at fault: `items[2].price: invalid type: string "x", expected f32`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AppError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(AppError::MalformedJson {
            reason: "the body is empty; send a JSON document".into(),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        json_error(&path, &inner)
    })?;
    de.end().map_err(|e| json_error(".", &e))?;
    Ok(value)
}

fn json_error(path: &str, e: &serde_json::Error) -> AppError {
    use serde_json::error::Category;
    let full = e.to_string();
    // serde_json appends the position; the field path says more.
    let message = match full.rsplit_once(" at line ") {
        Some((m, _)) => m.to_string(),
        None => full.clone(),
    };
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => AppError::MalformedJson { reason: full },
        Category::Data => {
            let mut field = if path == "." {
                String::new()
            } else {
                path.to_string()
            };
            // "missing field `x`" and "unknown field `x`" are reported at the parent; name
            // the field itself.
            for prefix in ["missing field `", "unknown field `"] {
                if let Some(rest) = message.strip_prefix(prefix) {
                    if let Some((name, _)) = rest.split_once('`') {
                        // The path of an unknown field already ends with it.
                        let already = field == name || field.ends_with(&format!(".{name}"));
                        field = if already {
                            field
                        } else if field.is_empty() {
                            name.to_string()
                        } else {
                            format!("{field}.{name}")
                        };
                    }
                }
            }
            if field.is_empty() {
                field = "body".into();
            }
            AppError::Invalid {
                field,
                reason: message,
            }
        }
    }
}

/// The query string as key/value pairs, repeated keys kept in order.
pub struct QueryPairs(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for QueryPairs {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let q = parts.uri.query().unwrap_or("");
        Ok(QueryPairs(
            form_urlencoded::parse(q.as_bytes()).into_owned().collect(),
        ))
    }
}

impl QueryPairs {
    /// Refuses keys outside `allowed`, so a typo (`catgory=`) is an error, not ignored.
    pub fn allow_only(&self, allowed: &[&str]) -> Result<(), AppError> {
        match self.0.iter().find(|(k, _)| !allowed.contains(&k.as_str())) {
            Some((k, _)) => Err(AppError::invalid(
                k.clone(),
                format!(
                    "unknown query parameter; expected one of: {}",
                    allowed.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }

    /// Like [`Self::allow_only`], also letting through keys that start with one of
    /// `prefixes` followed by a name (`attr.brand`).
    pub fn allow_only_or_prefixed(
        &self,
        allowed: &[&str],
        prefixes: &[&str],
    ) -> Result<(), AppError> {
        let prefixed = |k: &str| {
            prefixes
                .iter()
                .any(|p| k.len() > p.len() && k.starts_with(p))
        };
        let unknown = self
            .0
            .iter()
            .find(|(k, _)| !allowed.contains(&k.as_str()) && !prefixed(k));
        match unknown {
            Some((k, _)) => Err(AppError::invalid(
                k.clone(),
                format!(
                    "unknown query parameter; expected one of: {}, or an attribute filter ({}<name>)",
                    allowed.join(", "),
                    prefixes.join("<name>, ")
                ),
            )),
            None => Ok(()),
        }
    }

    /// A key that may appear at most once.
    pub fn one(&self, key: &str) -> Result<Option<&str>, AppError> {
        let mut found = self
            .0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str());
        let first = found.next();
        if found.next().is_some() {
            return Err(AppError::invalid(key, "given more than once"));
        }
        Ok(first)
    }

    /// A repeatable key: every value, in order.
    pub fn many(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// A key parsed as `T`, with the value and the expected type in the error.
    pub fn parse<T: FromStr>(&self, key: &str, expected: &str) -> Result<Option<T>, AppError> {
        match self.one(key)? {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| AppError::invalid(key, format!("{v:?} is not {expected}"))),
        }
    }
}

/// A path segment, with a JSON rejection.
pub struct ApiPath<T>(pub T);

impl<T, S> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| AppError::invalid("path", e.body_text()))
    }
}

/// The request id: the caller's `x-request-id` if it sent one, else the one the server
/// generated (see the request-id layers in `http::router`).
pub struct RequestId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let id = parts
            .headers
            .get(super::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        Ok(RequestId(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        k: u32,
        items: Vec<Inner>,
    }
    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Inner {
        price: f32,
    }

    fn field_of(json: &str) -> (String, String) {
        match parse_json::<Body>(json.as_bytes()).unwrap_err() {
            AppError::Invalid { field, reason } => (field, reason),
            AppError::MalformedJson { reason } => ("<malformed>".into(), reason),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        assert_eq!(field_of(r#"{"k":"x","items":[]}"#).0, "k");
        assert_eq!(
            field_of(r#"{"k":1,"items":[{"price":1},{"price":"x"}]}"#).0,
            "items[1].price"
        );
        assert_eq!(field_of(r#"{"items":[]}"#).0, "k");
        assert_eq!(field_of(r#"{"k":1,"items":[{}]}"#).0, "items[0].price");
        assert_eq!(field_of(r#"{"k":1,"items":[],"zz":1}"#).0, "zz");
        assert_eq!(field_of(r#"{"k":1,"#).0, "<malformed>");
        assert_eq!(field_of("").0, "<malformed>");
        assert_eq!(field_of(r#"{"k":1,"items":[]} trailing"#).0, "<malformed>");
    }

    #[test]
    fn query_pairs_refuse_unknown_and_repeated_singletons() {
        let q = QueryPairs(vec![
            ("k".into(), "5".into()),
            ("category".into(), "a b".into()),
            ("category".into(), "c".into()),
        ]);
        assert!(q.allow_only(&["k", "category"]).is_ok());
        assert!(
            matches!(q.allow_only(&["k"]), Err(AppError::Invalid { field, .. }) if field == "category")
        );
        assert_eq!(q.parse::<u32>("k", "an integer").unwrap(), Some(5));
        assert_eq!(q.many("category"), ["a b", "c"]);
        let q = QueryPairs(vec![("k".into(), "x".into()), ("k".into(), "1".into())]);
        assert!(q.one("k").is_err());
    }
}
