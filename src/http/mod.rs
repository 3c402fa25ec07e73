//! The HTTP layer. Only this module (and `main`) knows axum.

pub mod admin;
pub mod admin_client;
