//! Spend in the request log: where budget counters start from when a process first
//! touches them (or Redis lost them), so a restart loses nothing, and what
//! `/admin/budgets` lists for counters no live store knows yet. Sums are of the exact
//! cost in nano-dollars (`cost_micros` x 1000 for rows written before that column).

use sqlx::Row;

use super::Store;

/// The exact cost of a row, in nano-dollars.
const COST_NANOS: &str = "COALESCE(cost_nanos, cost_micros * 1000)";

/// Which requests to add up: started in `[since_ms, until_ms)`, and each `Some` field
/// equal. `owner` compares with a missing owner read as `""` (keyless and master-key
/// requests), as budget counters name them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpendFilter {
    pub since_ms: i64,
    pub until_ms: i64,
    pub key_id: Option<String>,
    pub owner: Option<String>,
    pub user: Option<String>,
    pub tier: Option<String>,
    pub feature: Option<String>,
}

/// What to add up by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendGroup {
    Key,
    Owner,
    /// End users, each within its key's owner.
    User,
    Feature,
}

/// One group's spend. `owner` is set for [`SpendGroup::User`] only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendRow {
    pub owner: Option<String>,
    pub value: String,
    pub nanos: i64,
}

/// `WHERE ...` for `f`, with its parameters from `$1` on.
fn conditions(f: &SpendFilter) -> (String, Vec<String>) {
    let mut sql = String::from("started_at_ms >= $1 AND started_at_ms < $2");
    let mut params = Vec::new();
    for (column, value) in [
        ("key_id", &f.key_id),
        ("COALESCE(owner, '')", &f.owner),
        ("user_id", &f.user),
        ("tier", &f.tier),
        ("feature", &f.feature),
    ] {
        if let Some(v) = value {
            params.push(v.clone());
            sql.push_str(&format!(" AND {column} = ${}", params.len() + 2));
        }
    }
    (sql, params)
}

impl Store {
    /// Nano-dollars spent by the requests `f` selects.
    pub async fn spend(&self, f: &SpendFilter) -> Result<i64, sqlx::Error> {
        let (cond, params) = conditions(f);
        let sql = format!(
            "SELECT CAST(COALESCE(SUM({COST_NANOS}), 0) AS BIGINT) AS spent FROM requests WHERE {cond}"
        );
        let mut q = sqlx::query(&sql).bind(f.since_ms).bind(f.until_ms);
        for p in params {
            q = q.bind(p);
        }
        q.fetch_one(&self.pool).await?.try_get("spent")
    }

    /// The `limit` biggest spenders among the requests `f` selects, by `group`; rows
    /// without the grouped attribute are left out.
    pub async fn spend_by(
        &self,
        f: &SpendFilter,
        group: SpendGroup,
        limit: usize,
    ) -> Result<Vec<SpendRow>, sqlx::Error> {
        let (cond, params) = conditions(f);
        let (owner, value) = match group {
            SpendGroup::Key => ("NULL", "key_id"),
            SpendGroup::Owner => ("NULL", "owner"),
            SpendGroup::User => ("COALESCE(owner, '')", "user_id"),
            SpendGroup::Feature => ("NULL", "feature"),
        };
        let limit_param = params.len() + 3;
        let sql = format!(
            "SELECT {owner} AS g_owner, {value} AS g_value, CAST(SUM({COST_NANOS}) AS BIGINT) AS spent \
             FROM requests WHERE {cond} AND {value} IS NOT NULL \
             GROUP BY g_owner, g_value HAVING SUM({COST_NANOS}) IS NOT NULL \
             ORDER BY spent DESC, g_value LIMIT ${limit_param}"
        );
        let mut q = sqlx::query(&sql).bind(f.since_ms).bind(f.until_ms);
        for p in params {
            q = q.bind(p);
        }
        let rows = q
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(SpendRow {
                    owner: r.try_get("g_owner")?,
                    value: r.try_get("g_value")?,
                    nanos: r.try_get("spent")?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_number_their_parameters_after_the_time_range() {
        let (sql, params) = conditions(&SpendFilter {
            owner: Some("acme".into()),
            feature: Some("chat".into()),
            ..SpendFilter::default()
        });
        assert_eq!(
            sql,
            "started_at_ms >= $1 AND started_at_ms < $2 AND COALESCE(owner, '') = $3 AND feature = $4"
        );
        assert_eq!(params, ["acme", "chat"]);
    }
}
