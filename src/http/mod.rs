//! The HTTP edge. (This file holds only the UI's modules until the serving branch lands.)

pub mod stats;
pub mod ui;
