//! Budget alerts: when a charge crosses a threshold, a `warn` log line, a metric
//! (`sluice_budget_alerts_total{budget,threshold}`) and, with `[budgets] webhook`, a JSON
//! POST, all off the request path. The POST is retried on connection errors, timeouts,
//! 408, 429 and 5xx with exponential backoff and full jitter, a bounded number of times;
//! each alert carries an `id` that stays the same across retries, so a receiver that
//! answered a retried POST twice can tell. With `webhook_secret`, every POST is signed:
//! `x-sluice-signature: t=UNIX_SECONDS,v1=HEX`, HEX the HMAC-SHA256 of `"{t}.{body}"`
//! under the secret (body as sent), so a receiver can check who sent it and when.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use tokio_util::task::TaskTracker;

use crate::telemetry::Metrics;

/// What an alert says. Serialized as the webhook's body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// Stable for one rule, counter, period and threshold.
    pub id: String,
    pub budget: String,
    pub scope: &'static str,
    /// The key, owner, end user or feature; `None` for a global budget.
    pub scope_value: Option<String>,
    /// The key's owner, for a budget per end user.
    pub owner: Option<String>,
    pub period: &'static str,
    /// RFC 3339, UTC.
    pub period_start: String,
    pub period_end: String,
    /// The share of the limit crossed, as configured (`0.8`).
    pub threshold: f64,
    pub spent_usd: f64,
    pub limit_usd: f64,
    /// When the crossing charge was made, RFC 3339.
    pub at: String,
}

/// How hard to try a webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts, the first included.
    pub attempts: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// Per attempt, connection to full response.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 5,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(8),
            timeout: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Full jitter: uniform in [0, min(max, base * 2^(attempt-1))].
    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .base_delay
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(16))
            .min(self.max_delay);
        let ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=ms))
    }
}

/// Where alerts are POSTed, and the secret that signs them.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// A secret: webhook URLs often carry their token.
    pub url: SecretString,
    pub secret: Option<SecretString>,
}

/// The header that signs a webhook POST.
pub const SIGNATURE_HEADER: &str = "x-sluice-signature";

/// `t=UNIX_SECONDS,v1=HEX`: HEX the HMAC-SHA256 of `"{t}.{body}"` under `secret`.
pub fn signature(secret: &SecretString, unix_s: u64, body: &[u8]) -> String {
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(secret.expose_secret().as_bytes()) {
        Ok(m) => m,
        // HMAC takes a key of any length; this arm is never taken.
        Err(_) => return String::new(),
    };
    mac.update(unix_s.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={unix_s},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Sends alerts.
#[derive(Clone)]
pub struct Alerter {
    client: reqwest::Client,
    webhook: Option<Webhook>,
    policy: RetryPolicy,
    metrics: Option<Arc<Metrics>>,
    tasks: TaskTracker,
}

impl Alerter {
    /// Deliveries run on `tasks`, so a gateway's shutdown waits for them.
    pub fn new(
        webhook: Option<Webhook>,
        policy: RetryPolicy,
        metrics: Option<Arc<Metrics>>,
        tasks: TaskTracker,
    ) -> anyhow::Result<Alerter> {
        static CRYPTO: std::sync::Once = std::sync::Once::new();
        CRYPTO.call_once(|| {
            // Another part of the process may have installed one first; either is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        let client = reqwest::Client::builder()
            .timeout(policy.timeout)
            .connect_timeout(policy.timeout)
            .build()?;
        Ok(Alerter {
            client,
            webhook,
            policy,
            metrics,
            tasks,
        })
    }

    /// Log, count, and (with a webhook) POST in the background. Never waits.
    pub fn fire(&self, alert: Alert) {
        tracing::warn!(
            budget = %alert.budget,
            scope = alert.scope,
            scope_value = alert.scope_value.as_deref().unwrap_or(""),
            threshold = alert.threshold,
            spent_usd = alert.spent_usd,
            limit_usd = alert.limit_usd,
            period_start = %alert.period_start,
            "budget threshold crossed"
        );
        if let Some(m) = &self.metrics {
            m.budget_alert(&alert.budget, &threshold_label(alert.threshold));
        }
        let Some(webhook) = self.webhook.clone() else {
            return;
        };
        let client = self.client.clone();
        let policy = self.policy;
        let metrics = self.metrics.clone();
        self.tasks.spawn(async move {
            if let Err(e) = deliver(&client, &webhook, &alert, policy).await {
                if let Some(m) = &metrics {
                    m.budget_webhook_failed(&alert.budget);
                }
                tracing::error!(budget = %alert.budget, threshold = alert.threshold, error = %e, "budget alert webhook not delivered");
            }
        });
    }
}

fn threshold_label(t: f64) -> String {
    // Thresholds are basis points, so four decimals say all of it.
    let s = format!("{t:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// POST `alert` to the webhook until a 2xx, a non-retryable answer, or the attempts run
/// out; signed when it has a secret (each attempt anew, with its own time). The attempts
/// made, or why it failed (never showing the URL: it may hold a token).
pub async fn deliver(
    client: &reqwest::Client,
    webhook: &Webhook,
    alert: &Alert,
    policy: RetryPolicy,
) -> Result<u32, String> {
    let body = serde_json::to_vec(alert).map_err(|e| format!("cannot encode the alert: {e}"))?;
    let mut last = String::new();
    for attempt in 1..=policy.attempts.max(1) {
        if attempt > 1 {
            tokio::time::sleep(policy.backoff(attempt - 1)).await;
        }
        let mut request = client
            .post(webhook.url.expose_secret())
            .header("user-agent", concat!("sluice/", env!("CARGO_PKG_VERSION")))
            .header("content-type", "application/json");
        if let Some(secret) = &webhook.secret {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            request = request.header(SIGNATURE_HEADER, signature(secret, now, &body));
        }
        let sent = request.body(body.clone()).send().await;
        match sent {
            Ok(r) if r.status().is_success() => return Ok(attempt),
            Ok(r) => {
                let status = r.status();
                last = format!("the receiver answered {status}");
                let retryable = status.is_server_error()
                    || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                    || status == reqwest::StatusCode::REQUEST_TIMEOUT;
                if !retryable {
                    return Err(last);
                }
            }
            // Without the URL: reqwest's message would include it.
            Err(e) => {
                last = if e.is_timeout() {
                    format!("no answer within {:?}", policy.timeout)
                } else if e.is_connect() {
                    "could not connect".into()
                } else {
                    "the request failed".into()
                };
            }
        }
        tracing::debug!(budget = %alert.budget, attempt, error = %last, "budget alert webhook failed; retrying");
    }
    Err(format!(
        "{last} (after {} attempts)",
        policy.attempts.max(1)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_full_jitter() {
        let p = RetryPolicy::default();
        for attempt in 1..40 {
            let d = p.backoff(attempt);
            let cap = (p.base_delay * 2u32.pow((attempt - 1).min(16))).min(p.max_delay);
            assert!(d <= cap, "{attempt}: {d:?} > {cap:?}");
        }
        assert_eq!(threshold_label(0.8), "0.8");
        assert_eq!(threshold_label(1.0), "1");
        assert_eq!(threshold_label(0.955), "0.955");
    }
}
