//! Reading the request log back: a filtered, newest-first, cursor-paginated listing for
//! `/admin/records` and the dashboard's table, and one whole record with its feedback.

use serde_json::{Map, Value};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{COLUMNS, Store};

/// Which records to list: each `Some` field must match; newest first, `limit` of them,
/// strictly older than `before` (the cursor a previous page returned).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordFilter {
    /// The model that answered, or the one requested when none did.
    pub model: Option<String>,
    pub feature: Option<String>,
    pub user: Option<String>,
    /// An outcome class (`ok`, `api_error`, ...).
    pub outcome: Option<String>,
    pub since_ms: Option<i64>,
    pub before: Option<Cursor>,
    pub limit: u32,
}

/// A position in the newest-first order: `(started_at_ms, request_id)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub started_at_ms: i64,
    pub request_id: String,
}

impl Cursor {
    /// `MS:REQUEST_ID`, as [`Cursor::parse`] reads it.
    pub fn encode(&self) -> String {
        format!("{}:{}", self.started_at_ms, self.request_id)
    }

    pub fn parse(s: &str) -> Option<Cursor> {
        let (ms, id) = s.split_once(':')?;
        Some(Cursor {
            started_at_ms: ms.parse().ok()?,
            request_id: id.to_string(),
        })
    }
}

/// What a listing shows of each record (the detail view has every column).
const SUMMARY: [&str; 18] = [
    "request_id",
    "started_at_ms",
    "endpoint",
    "stream",
    "key_id",
    "user_id",
    "feature",
    "model_requested",
    "model",
    "outcome",
    "status",
    "error_code",
    "cache_status",
    "prompt_tokens",
    "completion_tokens",
    "cost_nanos",
    "latency_ms",
    "ttft_ms",
];

/// A column's SQL type, so rows read through the `Any` driver become typed JSON.
enum Kind {
    Text,
    Int,
    Real,
}

fn kind(column: &str) -> Kind {
    match column {
        "started_at_ms"
        | "stream"
        | "status"
        | "retries"
        | "upstream_calls"
        | "prompt_tokens"
        | "completion_tokens"
        | "tokens_estimated"
        | "cost_micros"
        | "cost_nanos"
        | "cost_saved_nanos"
        | "cached_prompt_tokens" => Kind::Int,
        "latency_ms" | "ttft_ms" | "upstream_ms" | "overhead_ms" => Kind::Real,
        _ => Kind::Text,
    }
}

fn to_json(row: &AnyRow, columns: &[&str]) -> Result<Map<String, Value>, sqlx::Error> {
    let mut out = Map::new();
    for &c in columns {
        let v = match kind(c) {
            Kind::Text => row.try_get::<Option<String>, _>(c)?.map(Value::from),
            Kind::Int => row.try_get::<Option<i64>, _>(c)?.map(Value::from),
            Kind::Real => row.try_get::<Option<f64>, _>(c)?.map(Value::from),
        };
        out.insert(c.to_string(), v.unwrap_or(Value::Null));
    }
    Ok(out)
}

/// A bound parameter.
#[derive(Debug, PartialEq)]
enum Param {
    Text(String),
    Int(i64),
}

/// ` WHERE ...` for `f` (empty when it selects everything), with its parameters in the
/// order of their `$N`.
fn conditions(f: &RecordFilter) -> (String, Vec<Param>) {
    let mut parts = Vec::new();
    let mut params = Vec::new();
    for (column, value) in [
        ("COALESCE(model, model_requested)", &f.model),
        ("feature", &f.feature),
        ("user_id", &f.user),
        ("outcome", &f.outcome),
    ] {
        if let Some(v) = value {
            params.push(Param::Text(v.clone()));
            parts.push(format!("{column} = ${}", params.len()));
        }
    }
    if let Some(since) = f.since_ms {
        params.push(Param::Int(since));
        parts.push(format!("started_at_ms >= ${}", params.len()));
    }
    if let Some(c) = &f.before {
        params.push(Param::Int(c.started_at_ms));
        let at = params.len();
        params.push(Param::Text(c.request_id.clone()));
        let id = params.len();
        parts.push(format!(
            "(started_at_ms < ${at} OR (started_at_ms = ${at} AND request_id < ${id}))"
        ));
    }
    let where_sql = if parts.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", parts.join(" AND "))
    };
    (where_sql, params)
}

impl Store {
    /// Records `f` selects, newest first, with the cursor of the next page when there
    /// is one.
    pub async fn list_records(
        &self,
        f: &RecordFilter,
    ) -> Result<(Vec<Map<String, Value>>, Option<Cursor>), sqlx::Error> {
        let (where_sql, params) = conditions(f);
        let sql = format!(
            "SELECT {} FROM requests{where_sql} ORDER BY started_at_ms DESC, request_id DESC LIMIT ${}",
            SUMMARY.join(", "),
            params.len() + 1
        );
        let mut q = sqlx::query(&sql);
        for p in params {
            q = match p {
                Param::Text(t) => q.bind(t),
                Param::Int(i) => q.bind(i),
            };
        }
        // One more than asked: whether it exists says if there is a next page.
        let limit = i64::from(f.limit.max(1));
        let rows = q.bind(limit + 1).fetch_all(&self.pool).await?;
        let more = rows.len() as i64 > limit;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows.iter().take(f.limit.max(1) as usize) {
            out.push(to_json(r, &SUMMARY)?);
        }
        let next = if more {
            out.last().and_then(|last| {
                Some(Cursor {
                    started_at_ms: last.get("started_at_ms")?.as_i64()?,
                    request_id: last.get("request_id")?.as_str()?.to_string(),
                })
            })
        } else {
            None
        };
        Ok((out, next))
    }

    /// One record, every column, and the feedback on it; `None` when there is none.
    pub async fn get_record(
        &self,
        request_id: &str,
    ) -> Result<Option<Map<String, Value>>, sqlx::Error> {
        let sql = format!(
            "SELECT {} FROM requests WHERE request_id = $1",
            COLUMNS.join(", ")
        );
        let Some(row) = sqlx::query(&sql)
            .bind(request_id.to_string())
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let mut record = to_json(&row, &COLUMNS)?;
        let feedback = sqlx::query(
            "SELECT score, comment, created_at_ms FROM feedback WHERE request_id = $1 ORDER BY created_at_ms",
        )
        .bind(request_id.to_string())
        .fetch_all(&self.pool)
        .await?;
        let feedback: Vec<Value> = feedback
            .iter()
            .map(|r| {
                Ok(serde_json::json!({
                    "score": r.try_get::<f64, _>("score")?,
                    "comment": r.try_get::<Option<String>, _>("comment")?,
                    "created_at_ms": r.try_get::<i64, _>("created_at_ms")?,
                }))
            })
            .collect::<Result<_, sqlx::Error>>()?;
        record.insert("feedback".into(), Value::Array(feedback));
        Ok(Some(record))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_number_every_parameter_in_bind_order() {
        let (sql, params) = conditions(&RecordFilter {
            feature: Some("chat".into()),
            outcome: Some("ok".into()),
            since_ms: Some(5),
            before: Cursor::parse("10:req_1"),
            ..RecordFilter::default()
        });
        assert_eq!(
            sql,
            " WHERE feature = $1 AND outcome = $2 AND started_at_ms >= $3 AND \
             (started_at_ms < $4 OR (started_at_ms = $4 AND request_id < $5))"
        );
        assert_eq!(
            params,
            [
                Param::Text("chat".into()),
                Param::Text("ok".into()),
                Param::Int(5),
                Param::Int(10),
                Param::Text("req_1".into())
            ]
        );
        assert_eq!(conditions(&RecordFilter::default()).0, "");
        assert_eq!(Cursor::parse("x:y"), None);
        assert_eq!(
            Cursor::parse("12:a:b").map(|c| c.encode()),
            Some("12:a:b".into())
        );
    }
}
