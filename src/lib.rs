//! tandem: a recommendation service.
//!
//! Layout and data flow (see `../shared/DESIGN.md` and the README):
//! - [`domain`]: validated ids, items, interactions, filters. Every layer speaks these.
//! - [`config`]: `Settings` from a TOML file, then `TANDEM_*` env vars, validated at start-up.
//! - [`data`]: the common file format, MovieLens import, the synthetic generator, the split.
//! - [`index`]: the `VectorIndex` trait and its backends (edge, qdrant, exact).
//! - [`session`]: the `SessionStore` trait: event log, recent activity, trending, cache.
//! - [`model`]: the two-tower model (candle): featurization, towers, training, checkpoints.
//! - [`eval`]: the offline protocol's metrics, identical to `score.py`, and `tandem eval`.
//! - [`catalog`], [`rerank`], [`pipeline`], [`http`]: serving. The in-memory catalog, the
//!   re-ranker (a pure function), the online flow (`Recommender`: variant, serving and
//!   impression), and the axum API (wire work only) with `http::serve`, the one entry point
//!   of `tandem serve` and the API tests.
//! - [`items`]: the catalog's write path (embed, index, journal, arms, catalog, announce)
//!   and its start-up loading.
//! - [`cluster`]: what replicas share through Redis (the change stream, the registry, the
//!   experiments), so that several replicas behind a load balancer serve as one.
//! - [`registry`], [`lifecycle`], [`experiment`]: registered checkpoints, zero-downtime
//!   activation and rollback, A/B experiments; driven by the admin API (`http::admin`).
//! - [`retrain`]: the offline loop (gather, split by time, train, gate, promote, record),
//!   on demand or on the `[retrain] every` schedule.
//! - [`telemetry`], [`degrade`]: operations. Logs, `/metrics` and its metric names; time
//!   budgets and circuit breakers that turn a slow or absent Redis or Qdrant into a degraded
//!   answer instead of an error.
//! - `http::ui` serves the storefront, onboarding and admin pages from `web/`, and
//!   `http::stats` the live figures behind `GET /v1/stats`.
//! - [`vector`]: the dot product (SIMD where the CPU has it) and the cosine similarity behind
//!   every similarity.

pub mod arms;
pub mod catalog;
pub mod cluster;
pub mod config;
pub mod data;
pub mod degrade;
pub mod domain;
pub mod eval;
pub mod experiment;
pub mod http;
pub mod index;
pub mod items;
pub mod lifecycle;
pub mod model;
pub mod pipeline;
pub mod registry;
pub mod rerank;
pub mod retrain;
pub mod session;
pub mod telemetry;
pub mod vector;
