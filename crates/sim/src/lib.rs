//! The simulated LLM upstream: deterministic OpenAI and Anthropic replies, injectable
//! failures, and an HTTP server speaking both wire formats.
//!
//! The pure functions ([`openai`], [`anthropic`]) are what the server sends, byte for
//! byte, so the gateway's in-process `sim` provider can call them directly and get what
//! the HTTP server would have answered.

pub mod anthropic;
pub mod chaos;
pub mod openai;
pub mod outage;
pub mod reply;
pub mod server;

pub use chaos::{Chaos, ChaosConfig, Decision, RateWindow};
pub use server::{MockArgs, MockServer};
