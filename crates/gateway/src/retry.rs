//! Retries: exponential backoff with full jitter, `retry-after` honoured, bounded by
//! attempts, by the request's deadline, and by a retry budget shared by all requests so
//! that a failing upstream never turns into a retry storm.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use crate::config::RetryConfig;
use crate::providers::UpstreamError;
use crate::routing::Route;

/// Retry policy plus the shared budget.
pub struct Retrier {
    config: RetryConfig,
    budget: TpsBudget,
}

/// What happened while walking a chain, for the record and the response headers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Attempts {
    /// Upstream calls made, on all models.
    pub calls: u32,
    /// Calls that repeated a failed call to the same model.
    pub retries: u32,
    /// Index in the chain of the model that answered (0 = the requested model).
    pub answered_by: usize,
    /// A retry was wanted but the budget said no.
    pub budget_exhausted: bool,
    /// Time inside upstream calls, all attempts.
    pub upstream_time: Duration,
    /// Time slept between attempts.
    pub waited: Duration,
}

impl Retrier {
    pub fn new(config: RetryConfig) -> Arc<Self> {
        // tower's budget keeps its window in 10 slots; a 10 s window smooths bursts
        // without remembering old failures for long.
        let budget = TpsBudget::new(
            Duration::from_secs(10),
            config.budget_min_per_sec,
            config.budget_ratio,
        );
        Arc::new(Self { config, budget })
    }

    pub fn config(&self) -> &RetryConfig {
        &self.config
    }

    /// Full-jitter backoff for the retry after `attempt` calls (1-based): a uniform draw
    /// from [0, min(max_delay, base * 2^(attempt-1))]. Written here because backon's
    /// jitter adds to the delay instead of drawing the whole delay, which keeps clients
    /// synchronised at the floor (see the AWS "Exponential Backoff and Jitter" analysis).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = 2u32.saturating_pow(attempt.saturating_sub(1));
        let ceiling = self
            .config
            .base_delay
            .saturating_mul(exp)
            .min(self.config.max_delay);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }

    /// Call `call` on each route in turn, retrying retryable failures with backoff, until
    /// one answers or the chain is spent. Every request deposits into the retry budget
    /// once; each retry withdraws.
    pub async fn run_chain<T, F, Fut>(
        &self,
        chain: &[Arc<Route>],
        attempts: &mut Attempts,
        mut call: F,
    ) -> Result<T, UpstreamError>
    where
        F: FnMut(Arc<Route>) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        self.budget.deposit();
        let deadline = Instant::now() + self.config.deadline;
        let mut last_error: Option<UpstreamError> = None;
        for (index, route) in chain.iter().enumerate() {
            let mut attempt = 0u32;
            loop {
                attempt += 1;
                attempts.calls += 1;
                let call_started = Instant::now();
                let remaining = deadline.saturating_duration_since(call_started);
                let result = tokio::time::timeout(remaining, call(route.clone())).await;
                attempts.upstream_time += call_started.elapsed();
                let outcome = match result {
                    Ok(result) => result,
                    Err(_) => Err(UpstreamError::timeout(
                        route.provider.kind(),
                        "answer before the request deadline",
                        self.config.deadline,
                    )),
                };
                let error = match outcome {
                    Ok(value) => {
                        attempts.answered_by = index;
                        return Ok(value);
                    }
                    Err(e) => e,
                };
                let delay = self.delay_before_retry(&error, attempt, deadline, attempts);
                last_error = Some(error);
                match delay {
                    Some(d) => {
                        tokio::time::sleep(d).await;
                        attempts.waited += d;
                        attempts.retries += 1;
                    }
                    None => break,
                }
            }
            match &last_error {
                Some(e) if !e.class.may_fall_back() => break,
                _ => {}
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Err(last_error.unwrap_or_else(|| {
            UpstreamError::new(
                crate::providers::ErrorClass::Connection,
                "gateway",
                "no model to call",
            )
        }))
    }

    /// How long to wait before retrying the same model, or `None` to stop trying it.
    fn delay_before_retry(
        &self,
        error: &UpstreamError,
        attempt: u32,
        deadline: Instant,
        attempts: &mut Attempts,
    ) -> Option<Duration> {
        if !error.is_retryable() || attempt >= self.config.max_attempts {
            return None;
        }
        let delay = match error.retry_after {
            // The provider said when; a longer wait than we accept means: try elsewhere.
            Some(after) if after > self.config.max_retry_after => return None,
            Some(after) => after,
            None => self.backoff(attempt),
        };
        if Instant::now() + delay >= deadline {
            return None;
        }
        if !self.budget.withdraw() {
            attempts.budget_exhausted = true;
            return None;
        }
        Some(delay)
    }
}
