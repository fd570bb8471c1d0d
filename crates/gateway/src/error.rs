//! `ApiError`: every error a client can see, rendered as the OpenAI error body with the
//! status the official SDKs map to the right exception.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::limits::RateHeaders;
use crate::providers::{ErrorClass, UpstreamError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidJson { message: String },
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("The input is empty: it has no visible characters.")]
    EmptyInput { param: String },
    #[error("{message}")]
    InvalidEncoding { message: String },
    #[error("{message}")]
    InputTooLong { message: String, param: String },
    #[error("{count} messages; the limit is {limit}")]
    TooManyMessages { count: usize, limit: usize },
    #[error("JSON nested deeper than {limit} levels")]
    NestingTooDeep { limit: usize },
    #[error("The input was blocked by the `{detection}` check.")]
    InputBlocked { detection: &'static str },
    /// The answer failed its output checks and the rule says to refuse it.
    #[error("The model's answer failed its output checks: {message}")]
    OutputInvalid { message: String },
    #[error("request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{message}")]
    UnsupportedMediaType { message: String },
    #[error("{message}")]
    Unauthorized { message: String },
    #[error("The model `{model}` does not exist or you do not have access to it.")]
    ModelNotFound { model: String },
    #[error("{message}")]
    WrongModelKind { message: String },
    /// `x-sluice-experiment` names an experiment that is not configured.
    #[error("No experiment `{name}` is configured (`none` opts out of every experiment).")]
    UnknownExperiment { name: String },
    #[error("No request `{request_id}` is known to this gateway.")]
    RequestNotFound { request_id: String },
    #[error("Request `{request_id}` was made with another API key.")]
    RequestNotOwned { request_id: String },
    #[error("storage is unavailable: {0}")]
    StorageUnavailable(String),
    #[error("Unknown route {path}")]
    RouteNotFound { path: String },
    #[error("{method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// One of our limits refused the request (429 `rate_limit_exceeded`).
    #[error("{message}")]
    RateLimited {
        message: String,
        /// Which limit refused (`user:rpm`, `key:tpm`, ...), for the record.
        limit: String,
        /// `requests` or `tokens`, as OpenAI's `type` says.
        unit: &'static str,
        retry_after: Duration,
        headers: Box<RateHeaders>,
    },
    /// The end user is blocked for a while after repeated abuse signals.
    #[error("Requests from this user are blocked for {}s after repeated abuse signals.", retry_after.as_secs().max(1))]
    AbuseBlocked { retry_after: Duration },
    /// A budget is spent and its rule says `block` (429 `budget_exceeded`).
    #[error("The budget `{budget}` is exhausted for this period: {spent} of {limit} spent.")]
    BudgetExceeded {
        budget: String,
        spent: String,
        limit: String,
        retry_after: Duration,
    },
    /// Budget counters cannot be read and `[redis] on_failure = "closed"`.
    #[error(
        "budgets cannot be checked right now (the budget store is unreachable); try again shortly"
    )]
    BudgetsUnavailable,
    /// The key's tier (or the key) may not use this model.
    #[error("The model `{model}` is not available to {who}.")]
    ModelNotAllowed { model: String, who: String },
    /// The shared limit store is unreachable and `[redis] on_failure = "closed"`.
    #[error(
        "rate limits cannot be checked right now (the limit store is unreachable); try again shortly"
    )]
    LimitsUnavailable,
    /// An upstream failure that survived retries and fallbacks.
    #[error("{0}")]
    Upstream(UpstreamError),
    /// A prompt reference or its variables were refused (4xx, see [`PromptError`]).
    #[error("{0}")]
    Prompt(crate::prompts::PromptError),
    /// The gateway itself failed. Never for anything a client sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: param.into(),
        }
    }

    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson { .. } | ApiError::InvalidRequest { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::WrongModelKind { .. }
            | ApiError::UnknownExperiment { .. }
            | ApiError::EmptyInput { .. }
            | ApiError::InvalidEncoding { .. }
            | ApiError::InputTooLong { .. }
            | ApiError::TooManyMessages { .. }
            | ApiError::NestingTooDeep { .. }
            | ApiError::InputBlocked { .. } => StatusCode::BAD_REQUEST,
            ApiError::OutputInvalid { .. } => StatusCode::BAD_GATEWAY,
            ApiError::RateLimited { .. } | ApiError::AbuseBlocked { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::ModelNotAllowed { .. } => StatusCode::FORBIDDEN,
            ApiError::BudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::BudgetsUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::LimitsUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound { .. }
            | ApiError::RouteNotFound { .. }
            | ApiError::RequestNotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::RequestNotOwned { .. } => StatusCode::FORBIDDEN,
            ApiError::StorageUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Upstream(e) => upstream_status(e.class),
            ApiError::Prompt(e) if e.is_not_found() => StatusCode::NOT_FOUND,
            ApiError::Prompt(_) => StatusCode::BAD_REQUEST,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI `type` field.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::InvalidJson { .. }
            | ApiError::InvalidRequest { .. }
            | ApiError::PayloadTooLarge { .. }
            | ApiError::UnsupportedMediaType { .. }
            | ApiError::WrongModelKind { .. }
            | ApiError::UnknownExperiment { .. }
            | ApiError::EmptyInput { .. }
            | ApiError::InvalidEncoding { .. }
            | ApiError::InputTooLong { .. }
            | ApiError::TooManyMessages { .. }
            | ApiError::NestingTooDeep { .. }
            | ApiError::InputBlocked { .. }
            | ApiError::ModelNotFound { .. }
            | ApiError::RouteNotFound { .. }
            | ApiError::RequestNotFound { .. }
            | ApiError::MethodNotAllowed { .. }
            | ApiError::Prompt(_) => "invalid_request_error",
            ApiError::RequestNotOwned { .. } | ApiError::ModelNotAllowed { .. } => {
                "permission_error"
            }
            ApiError::RateLimited { unit, .. } => unit,
            ApiError::AbuseBlocked { .. } => "rate_limit_error",
            ApiError::LimitsUnavailable | ApiError::BudgetsUnavailable => "server_error",
            // What OpenAI calls an exhausted quota; SDKs raise their rate-limit error.
            ApiError::BudgetExceeded { .. } => "insufficient_quota",
            ApiError::OutputInvalid { .. } => "upstream_error",
            ApiError::StorageUnavailable(_) => "server_error",
            ApiError::Unauthorized { .. } => "authentication_error",
            ApiError::Upstream(e) => match e.class {
                ErrorClass::RateLimited | ErrorClass::CapacityExceeded => "rate_limit_error",
                ErrorClass::BadRequest | ErrorClass::ContentFilter => "invalid_request_error",
                ErrorClass::Overloaded
                | ErrorClass::Timeout
                | ErrorClass::Server
                | ErrorClass::Connection
                | ErrorClass::Auth
                | ErrorClass::NotFound
                | ErrorClass::InvalidResponse => "upstream_error",
            },
            ApiError::Internal(_) => "server_error",
        }
    }

    /// The OpenAI `code` field: precise and stable, for clients to branch on.
    pub fn code(&self) -> &str {
        match self {
            ApiError::InvalidJson { .. } => "invalid_json",
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::EmptyInput { .. } => "empty_input",
            ApiError::InvalidEncoding { .. } => "invalid_encoding",
            ApiError::InputTooLong { .. } => "input_too_long",
            ApiError::TooManyMessages { .. } => "too_many_messages",
            ApiError::NestingTooDeep { .. } => "nesting_too_deep",
            ApiError::InputBlocked { .. } => "input_blocked",
            ApiError::OutputInvalid { .. } => "output_invalid",
            ApiError::RateLimited { .. } => "rate_limit_exceeded",
            ApiError::AbuseBlocked { .. } => "abuse_blocked",
            ApiError::ModelNotAllowed { .. } => "model_not_allowed",
            ApiError::LimitsUnavailable => "rate_limiter_unavailable",
            ApiError::BudgetExceeded { .. } => "budget_exceeded",
            ApiError::BudgetsUnavailable => "budget_store_unavailable",
            ApiError::UnsupportedMediaType { .. } => "unsupported_media_type",
            ApiError::Unauthorized { .. } => "invalid_api_key",
            ApiError::ModelNotFound { .. } => "model_not_found",
            ApiError::WrongModelKind { .. } => "model_not_supported",
            ApiError::UnknownExperiment { .. } => "unknown_experiment",
            ApiError::RouteNotFound { .. } => "unknown_url",
            ApiError::RequestNotFound { .. } => "request_not_found",
            ApiError::RequestNotOwned { .. } => "request_not_owned",
            ApiError::StorageUnavailable(_) => "storage_unavailable",
            ApiError::MethodNotAllowed { .. } => "method_not_allowed",
            ApiError::Upstream(e) => match e.class {
                // A provider's own code is the most precise thing to say about a bad request.
                ErrorClass::BadRequest => e.code.as_deref().unwrap_or("upstream_bad_request"),
                ErrorClass::ContentFilter => "content_filter",
                ErrorClass::RateLimited => "upstream_rate_limited",
                ErrorClass::Overloaded => "upstream_overloaded",
                ErrorClass::Timeout => "upstream_timeout",
                ErrorClass::Server => "upstream_error",
                ErrorClass::Connection => "upstream_unreachable",
                ErrorClass::Auth => "upstream_auth_failed",
                ErrorClass::NotFound => "upstream_model_not_found",
                ErrorClass::InvalidResponse => "upstream_invalid_response",
                ErrorClass::CapacityExceeded => "capacity_exceeded",
            },
            ApiError::Prompt(e) => e.code(),
            ApiError::Internal(_) => "internal_error",
        }
    }

    pub fn param(&self) -> Option<String> {
        if let ApiError::Prompt(e) = self {
            return Some(e.param());
        }
        self.static_param().map(str::to_string)
    }

    fn static_param(&self) -> Option<&str> {
        match self {
            ApiError::InvalidRequest { param, .. } => param.as_deref(),
            ApiError::EmptyInput { param } => Some(param),
            ApiError::InputTooLong { param, .. } => Some(param),
            ApiError::TooManyMessages { .. } => Some("messages"),
            ApiError::InputBlocked { detection } => Some(detection),
            ApiError::InvalidEncoding { .. }
            | ApiError::NestingTooDeep { .. }
            | ApiError::OutputInvalid { .. }
            | ApiError::RateLimited { .. }
            | ApiError::AbuseBlocked { .. }
            | ApiError::LimitsUnavailable
            | ApiError::BudgetExceeded { .. }
            | ApiError::BudgetsUnavailable => None,
            ApiError::ModelNotFound { .. }
            | ApiError::WrongModelKind { .. }
            | ApiError::ModelNotAllowed { .. } => Some("model"),
            ApiError::Upstream(e) => e.param.as_deref(),
            ApiError::UnknownExperiment { .. } => Some("x-sluice-experiment"),
            ApiError::InvalidJson { .. }
            | ApiError::PayloadTooLarge { .. }
            | ApiError::UnsupportedMediaType { .. }
            | ApiError::Unauthorized { .. }
            | ApiError::RouteNotFound { .. }
            | ApiError::MethodNotAllowed { .. }
            | ApiError::StorageUnavailable(_)
            | ApiError::Prompt(_)
            | ApiError::Internal(_) => None,
            ApiError::RequestNotFound { .. } | ApiError::RequestNotOwned { .. } => {
                Some("request_id")
            }
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ApiError::Upstream(e)
                if matches!(
                    e.class,
                    ErrorClass::RateLimited | ErrorClass::CapacityExceeded
                ) =>
            {
                e.retry_after
            }
            ApiError::RateLimited { retry_after, .. }
            | ApiError::AbuseBlocked { retry_after }
            | ApiError::BudgetExceeded { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// The message shown to clients. Upstream messages are kept (they help the caller fix
    /// the request) but prefixed so nobody mistakes them for the gateway's own words.
    pub fn message(&self) -> String {
        match self {
            ApiError::Upstream(e) => match e.class {
                // The gateway's own queue said no: its message is already the whole story.
                ErrorClass::CapacityExceeded => e.message.clone(),
                ErrorClass::BadRequest | ErrorClass::ContentFilter => {
                    format!("upstream {} refused the request: {}", e.provider, e.message)
                }
                _ => format!(
                    "upstream {} failed after retries and fallbacks ({}): {}",
                    e.provider,
                    e.class.as_str(),
                    e.message
                ),
            },
            other => other.to_string(),
        }
    }

    /// The JSON body, also used for in-stream error events.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message(),
                "type": self.error_type(),
                "code": self.code(),
                "param": self.param(),
            }
        })
    }
}

fn upstream_status(class: ErrorClass) -> StatusCode {
    match class {
        ErrorClass::RateLimited | ErrorClass::CapacityExceeded => StatusCode::TOO_MANY_REQUESTS,
        ErrorClass::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        ErrorClass::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorClass::Server
        | ErrorClass::Connection
        | ErrorClass::Auth
        | ErrorClass::NotFound
        | ErrorClass::InvalidResponse => StatusCode::BAD_GATEWAY,
        ErrorClass::BadRequest | ErrorClass::ContentFilter => StatusCode::BAD_REQUEST,
    }
}

impl From<crate::prompts::PromptError> for ApiError {
    fn from(e: crate::prompts::PromptError) -> Self {
        ApiError::Prompt(e)
    }
}

impl From<UpstreamError> for ApiError {
    fn from(e: UpstreamError) -> Self {
        ApiError::Upstream(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status_code(), Json(self.body())).into_response();
        if let Some(after) = self.retry_after() {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if let ApiError::RateLimited { headers, .. } = &self {
            headers.apply(response.headers_mut());
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_openai_shape() {
        let e = ApiError::invalid("messages must not be empty", Some("messages".to_string()));
        assert_eq!(e.status_code(), StatusCode::BAD_REQUEST);
        let b = e.body();
        assert_eq!(b["error"]["code"], "invalid_request");
        assert_eq!(b["error"]["param"], "messages");
        assert_eq!(b["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn upstream_classes_map_to_sdk_statuses() {
        let mk = |class| ApiError::Upstream(UpstreamError::new(class, "openai", "x"));
        assert_eq!(
            mk(ErrorClass::RateLimited).status_code(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            mk(ErrorClass::Overloaded).status_code(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            mk(ErrorClass::Timeout).status_code(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            mk(ErrorClass::Server).status_code(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            mk(ErrorClass::BadRequest).status_code(),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn rate_limited_response_carries_retry_after() {
        let mut u = UpstreamError::new(ErrorClass::RateLimited, "openai", "slow down");
        u.retry_after = Some(Duration::from_millis(1200));
        let r = ApiError::Upstream(u).into_response();
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
    }
}
