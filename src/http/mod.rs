//! The HTTP layer. Only this module (and `main`) knows axum.

pub mod admin;
