//! tandem: a recommendation service.
//!
//! Layout and data flow (see `../shared/DESIGN.md` and the README):
//! - [`domain`]: validated ids, items, interactions, filters. Every layer speaks these.
//! - [`config`]: `Settings` from a TOML file, then `TANDEM_*` env vars, validated at start-up.
//! - [`data`]: the common file format, MovieLens import, the synthetic generator, the split.
//! - [`index`]: the `VectorIndex` trait and its backends (edge, qdrant, exact).
//! - [`session`]: the `SessionStore` trait: event log, recent activity, trending, cache.
//! - [`http`]: the axum edge; `http::ui` serves the storefront, onboarding and admin pages
//!   from `web/`, and `http::stats` the live figures behind `GET /v1/stats`.

pub mod config;
pub mod data;
pub mod domain;
pub mod http;
pub mod index;
pub mod session;
