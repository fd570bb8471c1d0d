//! `GET /admin/experiments[?since=24h]` (every configured experiment's report) and
//! `GET /admin/experiments/{name}[?since=24h]` (one; 404 for an unknown name). Mounted
//! by [`crate::admin::router`], behind the admin key.

use std::sync::Arc;
use std::time::Duration;

use super::{Experiment, Report, now_ms, report_from};
use crate::admin::error_response;
use crate::pipeline::Gateway;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};

/// The `since` window from the query string, or the 400 to answer with.
fn since(uri: &Uri) -> Result<Option<Duration>, Box<Response>> {
    let bad = |message: String, code: &str, param: Option<&str>| {
        Box::new(error_response(
            StatusCode::BAD_REQUEST,
            &message,
            code,
            param,
        ))
    };
    let mut since = None;
    for pair in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("since", v)) => match humantime_serde::re::humantime::parse_duration(v) {
                Ok(d) => since = Some(d),
                Err(e) => {
                    return Err(bad(
                        format!("`since` must be a duration like 24h or 7d: {e}."),
                        "invalid_since",
                        Some("since"),
                    ));
                }
            },
            _ => {
                return Err(bad(
                    format!(
                        "Unknown query parameter `{}`; only `since` is read.",
                        pair.split('=').next().unwrap_or(pair)
                    ),
                    "invalid_request",
                    None,
                ));
            }
        }
    }
    Ok(since)
}

/// `GET /admin/experiments`.
#[derive(serde::Serialize)]
struct List {
    experiments: Vec<Report>,
}

async fn one(gw: &Gateway, e: &Experiment, since: Option<Duration>) -> Result<Report, Response> {
    match report_from(&gw.store, e, since, now_ms()).await {
        Ok(r) => Ok(r),
        Err(err) => {
            tracing::warn!(error = %err, "admin: experiment report could not be read");
            Err(crate::error::ApiError::StorageUnavailable(err.to_string()).into_response())
        }
    }
}

pub async fn list(State(gw): State<Arc<Gateway>>, uri: Uri) -> Response {
    let since = match since(&uri) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let mut reports = Vec::with_capacity(gw.config.experiments.len());
    for e in &gw.config.experiments {
        match one(&gw, e, since).await {
            Ok(r) => reports.push(r),
            Err(r) => return r,
        }
    }
    axum::Json(List {
        experiments: reports,
    })
    .into_response()
}

pub async fn get(State(gw): State<Arc<Gateway>>, Path(name): Path<String>, uri: Uri) -> Response {
    let since = match since(&uri) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let Some(e) = gw.config.experiments.iter().find(|e| e.name == name) else {
        return error_response(
            StatusCode::NOT_FOUND,
            &format!("No experiment `{name}` is configured."),
            "experiment_not_found",
            Some("name"),
        );
    };
    match one(&gw, e, since).await {
        Ok(r) => axum::Json(r).into_response(),
        Err(r) => r,
    }
}
