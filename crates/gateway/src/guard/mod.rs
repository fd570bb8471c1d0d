//! Guards: the input guard (validation, sanitization, caps, detection) before a request
//! goes upstream, and the output guard (validators with on-fail actions) after.

pub mod config;
pub mod detect;
pub mod input;
pub mod output;
pub mod text;
pub mod tokens;

pub use config::{GuardConfig, OnFail, OutputRule};
pub use input::Report;
