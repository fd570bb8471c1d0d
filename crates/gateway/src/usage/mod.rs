//! Usage: what a request cost, and what budgets let it spend.
//!
//! - [`prices`]: the shipped price table, per-model overrides, exact integer costs.
//! - [`budgets`]: the `[budgets]` section; [`calendar`]: its days and months.
//! - [`ledger`]: the spend counters, in process or in Redis, started from the log.
//! - [`enforce`]: [`Budgets`], which the pipeline asks before a request and tells
//!   after it; [`alerts`] go out when a threshold is crossed; [`forecast`] says when a
//!   budget runs out at the current rate.

pub mod alerts;
pub mod budgets;
pub mod calendar;
pub mod enforce;
pub mod forecast;
pub mod ledger;
pub mod prices;

pub use budgets::{BudgetsConfig, RawBudgets};
pub use enforce::{BudgetDecision, BudgetReport, Budgets, Counted, CounterReport, Subject};
pub use prices::{Cost, PriceBook, Prices, TokenUsage};

use crate::telemetry::RequestRecord;

/// Put a request's cost on its record: exact nano-dollars, the rounded micro-dollars,
/// and, for a cache hit, what it saved. `None` leaves the fields empty (no known price).
pub fn record_cost(record: &mut RequestRecord, cost: Option<Cost>, saved: Option<Cost>) {
    record.cost_nanos = cost.map(|c| c.nanos);
    record.cost_micros = cost.map(Cost::micros);
    record.cost_saved_nanos = saved.map(|c| c.nanos);
}

/// Milliseconds since the Unix epoch, now: the one clock for budgets, stats, reports and
/// dashboard sessions.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
