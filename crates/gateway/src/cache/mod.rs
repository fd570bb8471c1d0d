//! Caching and batching: the exact-match response cache and the embeddings paths.
//!
//! - [`config`]: the `[cache]` section.
//! - [`key`]: 128-bit keys over everything that shapes an answer; [`is_deterministic`].
//! - [`store`]: [`ResponseCache`], an in-process tier (bytes-bounded, TTL per entry) in
//!   front of Redis, shared by instances; Redis trouble is a miss, never an error.
//! - [`flight`]: [`SingleFlight`], so concurrent identical misses make one upstream call.
//! - [`embeddings`]: the per-item embedding cache: only the misses go upstream.
//! - [`coalesce`]: [`Coalescer`], concurrent embedding requests as one upstream call.

pub mod coalesce;
pub mod config;
pub mod embeddings;
pub mod flight;
pub mod key;
pub mod store;

pub use coalesce::{CoalesceError, Coalescer};
pub use config::{CacheConfig, CacheScope};
pub use embeddings::{EmbeddingPlan, FetchedItems, Merged};
pub use flight::{Flight, FlightError, SingleFlight};
pub use key::{CacheKey, EmbeddingItem, Scope, chat_key, embedding_key, is_deterministic};
pub use store::{CacheStats, CachedAnswer, Lookup, ResponseCache, VectorLookup};
