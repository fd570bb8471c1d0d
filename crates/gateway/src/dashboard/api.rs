//! The read-only admin routes the dashboard draws from, each also a plain JSON API:
//!
//! | route | does |
//! | --- | --- |
//! | `GET /admin/stats[?since=24h&by=model]` | what `sluice stats --json` prints |
//! | `GET /admin/overview[?since=24h]` | totals, a time series, breakdowns by model, feature and hour, top users by cost |
//! | `GET /admin/records[?model&feature&user&outcome&since&limit&before]` | the request log, newest first, a page at a time |
//! | `GET /admin/records/{request_id}` | one record, every column, with its feedback |
//!
//! The figures come from [`crate::stats`] and the rows from the store's query layer;
//! nothing here writes SQL.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::admin::AdminError;
use crate::error::ApiError;
use crate::pipeline::Gateway;
use crate::stats::{self, GroupBy};
use crate::store::{Cursor, RecordFilter};
use crate::telemetry::Outcome;

/// Records per page unless `limit` says otherwise, and at most.
pub const RECORDS_DEFAULT: u32 = 50;
pub const RECORDS_MAX: u32 = 500;
/// The window when `since` is not given.
const DEFAULT_SINCE: Duration = Duration::from_secs(24 * 3600);

type Pairs = Query<Vec<(String, String)>>;

/// A 400 naming the parameter.
fn bad(param: &str, message: String) -> AdminError {
    AdminError::Api(ApiError::invalid(message, Some(param.to_string())))
}

fn unknown(param: &str, known: &str) -> AdminError {
    bad(
        param,
        format!("Unknown query parameter `{param}`; this route reads {known}."),
    )
}

/// `since` as a humantime duration (`30m`, `24h`, `7d`).
fn parse_since(v: &str) -> Result<Duration, AdminError> {
    humantime_serde::re::humantime::parse_duration(v).map_err(|e| {
        bad(
            "since",
            format!("`since` must be a duration such as 30m, 24h or 7d: {e}."),
        )
    })
}

/// `GET /admin/stats`: the same JSON as `sluice stats --json`.
pub async fn stats(
    State(gw): State<Arc<Gateway>>,
    Query(pairs): Pairs,
) -> Result<Response, AdminError> {
    let mut since = DEFAULT_SINCE;
    let mut by = GroupBy::None;
    for (k, v) in &pairs {
        match k.as_str() {
            "since" => since = parse_since(v)?,
            "by" => {
                by = <GroupBy as clap::ValueEnum>::from_str(v, true).map_err(|_| {
                    bad(
                        "by",
                        format!("`by` must be one of none, model, feature, user, hour; not `{v}`."),
                    )
                })?;
            }
            other => return Err(unknown(other, "`since` and `by`")),
        }
    }
    let since_ms = stats::since_ms(stats::now_ms(), since);
    let groups = stats::read(&gw.store, since_ms, by).await?;
    Ok(axum::Json(stats::stats_json(since_ms, by, groups)).into_response())
}

/// `GET /admin/overview`: everything the dashboard's charts show, aggregated by the store.
pub async fn overview(
    State(gw): State<Arc<Gateway>>,
    Query(pairs): Pairs,
) -> Result<Response, AdminError> {
    let mut since = DEFAULT_SINCE;
    for (k, v) in &pairs {
        match k.as_str() {
            "since" => since = parse_since(v)?,
            other => return Err(unknown(other, "`since`")),
        }
    }
    let now = stats::now_ms();
    let since_ms = stats::since_ms(now, since);
    Ok(axum::Json(stats::read_overview(&gw.store, since_ms, now).await?).into_response())
}

/// `GET /admin/records`: a page of the request log, newest first.
pub async fn records(
    State(gw): State<Arc<Gateway>>,
    Query(pairs): Pairs,
) -> Result<Response, AdminError> {
    let mut f = RecordFilter {
        limit: RECORDS_DEFAULT,
        ..RecordFilter::default()
    };
    for (k, v) in pairs {
        let value = Some(v.clone()).filter(|v| !v.is_empty());
        match k.as_str() {
            "model" => f.model = value,
            "feature" => f.feature = value,
            "user" => f.user = value,
            "outcome" => {
                if let Some(o) = &value
                    && Outcome::parse(o).is_none()
                {
                    let known: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
                    return Err(bad(
                        "outcome",
                        format!("`outcome` must be one of {}; not `{o}`.", known.join(", ")),
                    ));
                }
                f.outcome = value;
            }
            "since" => {
                f.since_ms = value
                    .map(|v| parse_since(&v).map(|d| stats::since_ms(stats::now_ms(), d)))
                    .transpose()?;
            }
            "limit" => {
                f.limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=RECORDS_MAX).contains(n))
                    .ok_or_else(|| {
                        bad(
                            "limit",
                            format!("`limit` must be a number from 1 to {RECORDS_MAX}."),
                        )
                    })?;
            }
            "before" => {
                f.before = value
                    .map(|v| {
                        Cursor::parse(&v).ok_or_else(|| {
                            bad(
                                "before",
                                "`before` must be a `next_before` value from a previous page."
                                    .into(),
                            )
                        })
                    })
                    .transpose()?;
            }
            other => {
                return Err(unknown(
                    other,
                    "`model`, `feature`, `user`, `outcome`, `since`, `limit` and `before`",
                ));
            }
        }
    }
    let (data, next) = gw.store.list_records(&f).await?;
    Ok(axum::Json(json!({
        "object": "list",
        "data": data,
        "next_before": next.map(|c| c.encode()),
    }))
    .into_response())
}

/// `GET /admin/records/{request_id}`: one record and its feedback, or 404.
pub async fn record(
    State(gw): State<Arc<Gateway>>,
    Path(request_id): Path<String>,
) -> Result<Response, AdminError> {
    match gw.store.get_record(&request_id).await? {
        Some(mut record) => {
            record.insert("object".into(), Value::from("request_record"));
            Ok((StatusCode::OK, axum::Json(record)).into_response())
        }
        None => Err(AdminError::Api(ApiError::RequestNotFound { request_id })),
    }
}
