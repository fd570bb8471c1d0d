//! `GET /dashboard`: one page for the person on call, and the read-only admin routes it
//! draws from ([`api`]), described in an OpenAPI document ([`openapi`]).
//!
//! The page, its script, its style and the chart library (uPlot, vendored from npm with
//! its licence under `assets/dashboard/vendor`) are compiled into the binary: no CDN, no
//! build step. Access is the admin key's: `POST /dashboard/login` takes it from a form
//! and sets a session cookie that is not the key ([`crate::auth::Auth::issue_session`]:
//! an HMAC of its expiry, `HttpOnly; Secure; SameSite=Strict`). The cookie opens
//! `GET`/`HEAD` requests only, under `/dashboard` and `/admin` alike, so a cross-site
//! form can never use it to create or revoke a key. Without a master key the dashboard
//! is off, like `/admin`: every route answers 401 saying how to turn it on.

pub mod api;
pub mod openapi;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::FormRejection;
use axum::extract::{Form, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, body::Body};
use serde::Deserialize;

use crate::pipeline::Gateway;
use crate::stats::now_ms;

/// The session cookie's name.
pub const COOKIE: &str = "sluice_session";
/// How long a dashboard login lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

const PAGE: &str = include_str!("../../assets/dashboard/index.html");
const LOGIN: &str = include_str!("../../assets/dashboard/login.html");
const APP_JS: &str = include_str!("../../assets/dashboard/app.js");
const APP_CSS: &str = include_str!("../../assets/dashboard/app.css");
const UPLOT_JS: &str = include_str!("../../assets/dashboard/vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("../../assets/dashboard/vendor/uPlot.min.css");

/// The `/dashboard` routes. Mount at the root (they carry their `/dashboard` prefix).
pub fn router(gateway: Arc<Gateway>) -> Router<Arc<Gateway>> {
    let assets = Router::new()
        .route("/dashboard/assets/{name}", get(asset))
        .layer(middleware::from_fn_with_state(gateway, require_session));
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/", get(page))
        .route("/dashboard/login", post(login))
        .route("/dashboard/logout", post(logout))
        .merge(assets)
}

/// Whether a request carries a valid dashboard session and may use it: reads only, and
/// only when it presents no key of its own (a wrong bearer key is not rescued by a
/// cookie).
pub fn has_session(gw: &Gateway, method: &Method, headers: &HeaderMap) -> bool {
    if !(method == Method::GET || method == Method::HEAD)
        || headers.contains_key(header::AUTHORIZATION)
        || headers.contains_key("x-api-key")
    {
        return false;
    }
    session_cookie(headers).is_some_and(|token| gw.auth.session_valid(token, now_ms()))
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// Signed in: a session, or the master key as the bearer key.
fn signed_in(gw: &Gateway, method: &Method, headers: &HeaderMap) -> bool {
    has_session(gw, method, headers) || gw.auth.authenticate_admin(headers).is_ok()
}

async fn require_session(State(gw): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    if signed_in(&gw, request.method(), request.headers()) {
        next.run(request).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "Sign in at /dashboard first.",
        )
            .into_response()
    }
}

/// The page when signed in; otherwise the login form, with 401.
async fn page(State(gw): State<Arc<Gateway>>, method: Method, headers: HeaderMap) -> Response {
    if signed_in(&gw, &method, &headers) {
        return html(StatusCode::OK, PAGE.to_string());
    }
    let message = if gw.auth.has_master_key() {
        ""
    } else {
        "The dashboard is off: no admin key is configured. Set SLUICE_MASTER_KEY (or [server] master_key) and restart."
    };
    login_page(message)
}

fn login_page(message: &str) -> Response {
    html(
        StatusCode::UNAUTHORIZED,
        LOGIN.replace("{{message}}", &escape_html(message)),
    )
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        body,
    )
        .into_response()
}

/// The login form's body.
#[derive(Deserialize)]
struct LoginForm {
    key: String,
}

/// Check the admin key from the form; on success set the session cookie and go to the
/// page (303), else show the form again with 401.
async fn login(
    State(gw): State<Arc<Gateway>>,
    form: Result<Form<LoginForm>, FormRejection>,
) -> Response {
    if !gw.auth.has_master_key() {
        return login_page(
            "The dashboard is off: no admin key is configured. Set SLUICE_MASTER_KEY (or [server] master_key) and restart.",
        );
    }
    let Ok(Form(form)) = form else {
        return login_page("Send the admin key in the form's `key` field.");
    };
    let expires = now_ms().saturating_add(i64::try_from(SESSION_TTL.as_millis()).unwrap_or(0));
    match gw
        .auth
        .is_admin_key(&form.key)
        .then(|| gw.auth.issue_session(expires))
        .flatten()
    {
        Some(token) => {
            tracing::info!("dashboard: signed in");
            redirect_with_cookie(&format!(
                "{COOKIE}={token}; Max-Age={}; Path=/; HttpOnly; Secure; SameSite=Strict",
                SESSION_TTL.as_secs()
            ))
        }
        None => {
            tracing::warn!("dashboard: sign-in with a wrong key");
            login_page("That is not the admin key.")
        }
    }
}

async fn logout() -> Response {
    redirect_with_cookie(&format!(
        "{COOKIE}=; Max-Age=0; Path=/; HttpOnly; Secure; SameSite=Strict"
    ))
}

fn redirect_with_cookie(cookie: &str) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SEE_OTHER;
    response
        .headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static("/dashboard"));
    if let Ok(v) = HeaderValue::from_str(cookie) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

async fn asset(Path(name): Path<String>) -> Response {
    let (body, kind) = match name.as_str() {
        "app.js" => (APP_JS, "text/javascript; charset=utf-8"),
        "app.css" => (APP_CSS, "text/css; charset=utf-8"),
        "uPlot.iife.min.js" => (UPLOT_JS, "text/javascript; charset=utf-8"),
        "uPlot.min.css" => (UPLOT_CSS, "text/css; charset=utf-8"),
        _ => {
            return crate::error::ApiError::RouteNotFound {
                path: format!("/dashboard/assets/{name}"),
            }
            .into_response();
        }
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "private, max-age=300"),
        ],
        body,
    )
        .into_response()
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; sluice_session=123.abc; b=2"),
        );
        assert_eq!(session_cookie(&h), Some("123.abc"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("sluice_sessionx=1"),
        );
        assert_eq!(session_cookie(&h), None);
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            escape_html("<a href=\"x\">&"),
            "&lt;a href=&quot;x&quot;&gt;&amp;"
        );
    }
}
