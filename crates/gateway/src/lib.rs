//! Sluice: a production gateway for LLM APIs, as a library. The `sluice` binary only
//! parses its command line and calls into here.

pub mod admin;
pub mod auth;
pub mod batch;
pub mod cache;
pub mod check;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod experiments;
pub mod guard;
pub mod limits;
pub mod pipeline;
pub mod prompts;
pub mod providers;
pub mod quality;
pub mod redis_conn;
pub mod redis_sync;
pub mod retry;
pub mod routing;
pub mod server;
pub mod stats;
pub mod store;
pub mod telemetry;
pub mod usage;
pub mod wire;

pub use config::Config;
pub use error::ApiError;
