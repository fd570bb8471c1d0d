//! What an experiment report reads from the request log: its requests and the feedback
//! on them, per variant.

use sqlx::Row;

use super::Store;

/// One request of an experiment, as the report needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentRow {
    pub request_id: String,
    pub user: Option<String>,
    pub variant: String,
    pub outcome: String,
    pub latency_ms: f64,
    pub cost_nanos: Option<i64>,
    /// The final output check: `pass`, `fail:<action>`, or none.
    pub output_check: Option<String>,
    /// Every checked answer, `model:pass|fail`, in order.
    pub output_checks: Option<String>,
    pub regeneration: bool,
}

impl Store {
    /// The requests of `experiment` started in `[since_ms, until_ms)`.
    pub async fn experiment_rows(
        &self,
        experiment: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<ExperimentRow>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT request_id, user_id, variant, outcome, latency_ms, \
             COALESCE(cost_nanos, cost_micros * 1000) AS cost_nanos, output_check, output_checks, \
             regeneration_of FROM requests \
             WHERE experiment = $1 AND started_at_ms >= $2 AND started_at_ms < $3 AND variant IS NOT NULL",
        )
        .bind(experiment.to_string())
        .bind(since_ms)
        .bind(until_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ExperimentRow {
                    request_id: r.try_get("request_id")?,
                    user: r.try_get("user_id")?,
                    variant: r.try_get("variant")?,
                    outcome: r.try_get("outcome")?,
                    latency_ms: r.try_get("latency_ms")?,
                    cost_nanos: r.try_get("cost_nanos")?,
                    output_check: r.try_get("output_check")?,
                    output_checks: r.try_get("output_checks")?,
                    regeneration: r.try_get::<Option<String>, _>("regeneration_of")?.is_some(),
                })
            })
            .collect()
    }

    /// Feedback scores on those requests: (variant, score).
    pub async fn experiment_feedback(
        &self,
        experiment: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(String, f64)>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT r.variant AS variant, f.score AS score FROM feedback f \
             JOIN requests r ON r.request_id = f.request_id \
             WHERE r.experiment = $1 AND r.started_at_ms >= $2 AND r.started_at_ms < $3 AND r.variant IS NOT NULL",
        )
        .bind(experiment.to_string())
        .bind(since_ms)
        .bind(until_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("variant")?, r.try_get("score")?)))
            .collect()
    }
}
