//! The admin API the dashboard reads, and the dashboard's access: every `/admin` route
//! and the dashboard refuse a missing or wrong key (enumerated from `ROUTES`, the list
//! the admin router is built from, through the OpenAPI document); the login cookie is not the key and opens reads only; `/admin/stats` is
//! `sluice stats --json`; `/admin/records` filters, pages and shows one record; a
//! separate admin listener takes `/admin` and `/dashboard` off the main port.

#![expect(clippy::unwrap_used, reason = "test helpers fail loudly by design")]

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use serde_json::{Value, json};
use sluice_gateway::dashboard::openapi::ROUTES;
use support::{Harness, harness};
use tower::ServiceExt;

const ADMIN: &str = "sk-admin-test-0123456789";

fn config(extra: &str) -> String {
    format!(
        r#"
[server]
master_key = "{ADMIN}"
{extra}
[[providers]]
name = "sim"
kind = "sim"
[[providers]]
name = "broken"
kind = "sim"
chaos = {{ fail_first = 1000, fail_status = 500 }}
[[models]]
name = "gpt-4o-mini"
provider = "sim"
[[models]]
name = "gpt-4o"
provider = "sim"
[[models]]
name = "broken"
provider = "broken"
[retry]
max_attempts = 1
"#
    )
}

struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    text: String,
    json: Value,
}

async fn call(h: &Harness, request: Request<Body>) -> Answer {
    let response = h.app.clone().oneshot(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    Answer {
        status: parts.status,
        headers: parts.headers,
        json: serde_json::from_str(&text).unwrap_or(Value::Null),
        text,
    }
}

fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut r = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let body = if method == "POST" {
        r = r.header("content-type", "application/json");
        Body::from("{}")
    } else {
        Body::empty()
    };
    r.body(body).unwrap()
}

async fn admin_get(h: &Harness, path: &str) -> Answer {
    let auth = format!("Bearer {ADMIN}");
    call(h, request("GET", path, &[("authorization", &auth)])).await
}

/// Send chats and wait until the request log holds them all.
async fn chat(h: &mut Harness, model: &str, feature: &str, user: &str) -> String {
    let auth = format!("Bearer {ADMIN}");
    let reply = h
        .send(
            "/v1/chat/completions",
            json!({"model": model, "messages": [{"role": "user", "content": format!("hi from {user}")}], "user": user}),
            &[("authorization", &auth), ("x-sluice-feature", feature)],
        )
        .await;
    reply.record.request_id
}

async fn wait_for_rows(h: &Harness, n: i64) {
    for _ in 0..500 {
        if h.gateway.store.count().await.unwrap() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the request log never reached {n} rows");
}

/// A concrete path for a route: `{param}` filled in.
fn concrete(path: &str) -> String {
    path.replace("{id}", "key_0000")
        .replace("{key}", "user:nobody")
        .replace("{request_id}", "req_none")
        .replace("{name}", "no-such-experiment")
}

/// The session cookie a successful login sets, as `name=value`.
async fn login(h: &Harness, key: &str) -> Answer {
    call(
        h,
        Request::post("/dashboard/login")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(format!("key={key}")))
            .unwrap(),
    )
    .await
}

fn cookie_pair(a: &Answer) -> String {
    let set = a.headers[header::SET_COOKIE].to_str().unwrap();
    set.split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn every_admin_route_and_the_dashboard_refuse_a_missing_or_wrong_key() {
    let h = harness(&config("")).await;
    let doc = admin_get(&h, "/admin/openapi.json").await;
    assert_eq!(doc.status, StatusCode::OK);
    let mut routes: Vec<(String, String)> = Vec::new();
    for (path, item) in doc.json["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            routes.push((method.to_uppercase(), concrete(path)));
        }
    }
    assert_eq!(routes.len(), ROUTES.len(), "the document lists every route");
    for expected in [
        "/admin/keys",
        "/admin/tiers",
        "/admin/budgets",
        "/admin/stats",
        "/admin/records",
        "/admin/records/req_none",
        "/admin/overview",
        "/admin/openapi.json",
    ] {
        assert!(
            routes.iter().any(|(_, p)| p == expected),
            "{expected} is in the document"
        );
    }
    let wrong = [("authorization", "Bearer sk-wrong")];
    let virtual_like = [("x-api-key", "sk-sluice-not-admin")];
    for (method, path) in &routes {
        for headers in [&[][..], &wrong[..], &virtual_like[..]] {
            let a = call(&h, request(method, path, headers)).await;
            assert_eq!(
                a.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {headers:?}: {}",
                a.text
            );
            assert_eq!(
                a.json["error"]["code"], "invalid_api_key",
                "{method} {path}"
            );
        }
        // With the key, the route exists (a 404 here would be an unknown id, not a
        // missing route: say which).
        let auth = format!("Bearer {ADMIN}");
        let a = call(&h, request(method, path, &[("authorization", &auth)])).await;
        assert_ne!(a.status, StatusCode::UNAUTHORIZED, "{method} {path}");
        assert_ne!(a.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
        if a.status == StatusCode::NOT_FOUND {
            assert_ne!(
                a.json["error"]["code"], "route_not_found",
                "{method} {path}"
            );
        }
    }
    // The dashboard: the page shows the login form with 401, every asset 401. Only
    // `POST /dashboard/login` (the form that takes the key) and `POST /dashboard/logout`
    // (it clears the cookie) are open, by design.
    for path in [
        "/dashboard",
        "/dashboard/",
        "/dashboard/assets/app.js",
        "/dashboard/assets/app.css",
        "/dashboard/assets/uPlot.iife.min.js",
        "/dashboard/assets/uPlot.min.css",
    ] {
        for headers in [&[][..], &wrong[..], &virtual_like[..]] {
            let a = call(&h, request("GET", path, headers)).await;
            assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{path} {headers:?}");
        }
        // With the key the path is served: the 401 above is the key's doing.
        let auth = format!("Bearer {ADMIN}");
        let a = call(&h, request("GET", path, &[("authorization", &auth)])).await;
        assert_eq!(a.status, StatusCode::OK, "{path} with the key");
    }
    for path in ["/dashboard", "/dashboard/"] {
        let page = call(&h, request("GET", path, &[])).await;
        assert!(
            page.text.contains("action=\"/dashboard/login\""),
            "{path}: {}",
            page.text
        );
    }
    // An unknown route under /admin is 401 too before it is 404: nothing leaks.
    let a = call(&h, request("GET", "/admin/nope", &[])).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn login_sets_a_cookie_that_is_not_the_key_and_opens_reads_only() {
    let h = harness(&config("")).await;
    let wrong = login(&h, "sk-wrong").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.headers.get(header::SET_COOKIE).is_none());
    assert!(wrong.text.contains("not the admin key"), "{}", wrong.text);

    let ok = login(&h, ADMIN).await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER);
    assert_eq!(ok.headers[header::LOCATION], "/dashboard");
    let set = ok.headers[header::SET_COOKIE].to_str().unwrap().to_string();
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{attr} in {set}");
    }
    assert!(!set.contains(ADMIN), "the cookie is not the key: {set}");
    let cookie = cookie_pair(&ok);

    let with = |method: &str, path: &str| request(method, path, &[("cookie", &cookie)]);
    let page = call(&h, with("GET", "/dashboard")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text.contains("panel-records"));
    assert!(
        page.headers[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("default-src 'self'")
    );
    assert_eq!(
        call(&h, with("GET", "/dashboard/assets/app.js"))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        call(&h, with("GET", "/admin/stats")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        call(&h, with("GET", "/admin/keys")).await.status,
        StatusCode::OK
    );
    // Writes need the key itself: a cross-site form riding the cookie gets nothing.
    let create = call(&h, with("POST", "/admin/keys")).await;
    assert_eq!(create.status, StatusCode::UNAUTHORIZED, "{}", create.text);
    let revoke = call(&h, with("DELETE", "/admin/keys/key_0000")).await;
    assert_eq!(revoke.status, StatusCode::UNAUTHORIZED);
    // A forged or tampered token is refused.
    let (name, token) = cookie.split_once('=').unwrap();
    let (expiry, mac) = token.split_once('.').unwrap();
    let later: i64 = expiry.parse::<i64>().unwrap() + 86_400_000;
    for forged in [
        format!("{name}={later}.{mac}"),
        format!("{name}={expiry}.{}", "0".repeat(mac.len())),
        format!("{name}={ADMIN}"),
        format!("{name}=garbage"),
    ] {
        let a = call(&h, request("GET", "/admin/stats", &[("cookie", &forged)])).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{forged}");
    }
    // An expired token, genuinely signed, is refused.
    let expired = h.gateway.auth.issue_session(1).unwrap();
    let a = call(
        &h,
        request(
            "GET",
            "/admin/stats",
            &[("cookie", &format!("{name}={expired}"))],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    // A wrong bearer key is not rescued by a good cookie.
    let a = call(
        &h,
        request(
            "GET",
            "/admin/stats",
            &[("cookie", &cookie), ("authorization", "Bearer sk-wrong")],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);

    let out = call(
        &h,
        request("POST", "/dashboard/logout", &[("cookie", &cookie)]),
    )
    .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert!(
        out.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .contains("Max-Age=0")
    );
}

#[tokio::test]
async fn without_a_master_key_the_dashboard_is_off_and_says_how_to_turn_it_on() {
    let h = harness(support::SIM_CHAT).await;
    let page = call(&h, request("GET", "/dashboard", &[])).await;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);
    assert!(page.text.contains("SLUICE_MASTER_KEY"), "{}", page.text);
    let login = login(&h, "anything").await;
    assert_eq!(login.status, StatusCode::UNAUTHORIZED);
    assert!(login.headers.get(header::SET_COOKIE).is_none());
    let stats = call(&h, request("GET", "/admin/stats", &[])).await;
    assert_eq!(stats.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn stats_overview_and_records_read_the_request_log() {
    let mut h = harness(&config("")).await;
    let mut ids = Vec::new();
    for (model, feature, user) in [
        ("gpt-4o-mini", "chat", "alice"),
        ("gpt-4o-mini", "chat", "bob"),
        ("gpt-4o", "search", "alice"),
        ("gpt-4o", "chat", "carol"),
        ("broken", "search", "bob"),
    ] {
        ids.push(chat(&mut h, model, feature, user).await);
        // "Newest first" orders by start millisecond, then by the id's random tail;
        // a step between requests keeps the expected order from being a coin toss.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    wait_for_rows(&h, 5).await;

    // /admin/stats is what `sluice stats --json` computes over the same window.
    let a = admin_get(&h, "/admin/stats?since=1h&by=model").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let since_ms = a.json["since_ms"].as_i64().unwrap();
    // Computed here row by row; the endpoint aggregates in SQL.
    let rows = h.gateway.store.stat_rows(since_ms).await.unwrap();
    let feedback = h.gateway.store.feedback_since(since_ms).await.unwrap();
    let by = sluice_gateway::stats::GroupBy::Model;
    let expected = sluice_gateway::stats::stats_json(
        since_ms,
        by,
        sluice_gateway::stats::compute(&rows, &feedback, by),
    );
    assert_eq!(a.json, expected);
    assert_eq!(a.json["by"], "model");
    assert_eq!(a.json["groups"].as_array().unwrap().len(), 3);

    // The overview: the series adds up to the total; breakdowns and top users.
    let o = admin_get(&h, "/admin/overview?since=1h").await;
    assert_eq!(o.status, StatusCode::OK, "{}", o.text);
    assert_eq!(o.json["total"]["requests"], 5);
    assert_eq!(o.json["total"]["outcomes"]["api_error"], 1);
    let series_total: u64 = o.json["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(series_total, 5);
    let features: Vec<&str> = o.json["by_feature"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["group"].as_str().unwrap())
        .collect();
    assert_eq!(features, ["chat", "search"]);
    let top: Vec<&str> = o.json["top_users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["group"].as_str().unwrap())
        .collect();
    assert_eq!(top.len(), 3, "{top:?}");
    let costs: Vec<f64> = o.json["top_users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["cost_usd"].as_f64().unwrap())
        .collect();
    assert!(
        costs.windows(2).all(|w| w[0] >= w[1]),
        "most first: {costs:?}"
    );

    // Records: filters.
    let list = |q: &str| {
        let q = q.to_string();
        let h = &h;
        async move { admin_get(h, &format!("/admin/records{q}")).await }
    };
    let all = list("").await;
    assert_eq!(all.json["data"].as_array().unwrap().len(), 5);
    assert_eq!(
        all.json["data"][0]["request_id"],
        ids[4].as_str(),
        "newest first"
    );
    let search = list("?feature=search").await;
    let got: Vec<&str> = search.json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[4].as_str(), ids[2].as_str()]);
    let errors = list("?outcome=api_error").await;
    assert_eq!(errors.json["data"].as_array().unwrap().len(), 1);
    assert_eq!(errors.json["data"][0]["model_requested"], "broken");
    let alice_4o = list("?user=alice&model=gpt-4o").await;
    assert_eq!(alice_4o.json["data"].as_array().unwrap().len(), 1);
    assert_eq!(alice_4o.json["data"][0]["request_id"], ids[2].as_str());

    // Pages of 2 cover every record once, in order.
    let mut seen = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let q = match &before {
            Some(b) => format!("?limit=2&before={}", urlencode(b)),
            None => "?limit=2".into(),
        };
        let page = list(&q).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text);
        for r in page.json["data"].as_array().unwrap() {
            seen.push(r["request_id"].as_str().unwrap().to_string());
        }
        match page.json["next_before"].as_str() {
            Some(b) => before = Some(b.to_string()),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    // Bad input: 400 naming the parameter.
    for (q, param) in [
        ("?limit=0", "limit"),
        ("?limit=lots", "limit"),
        ("?outcome=fine", "outcome"),
        ("?since=yesterday", "since"),
        ("?before=nonsense", "before"),
        ("?colour=red", "colour"),
    ] {
        let a = list(q).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{q}: {}", a.text);
        assert_eq!(a.json["error"]["param"], param, "{q}");
        assert!(a.json["error"]["message"].as_str().unwrap().contains(param));
    }
    let a = admin_get(&h, "/admin/stats?by=colour").await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.json["error"]["param"], "by");

    // One record, with its feedback.
    let auth = format!("Bearer {ADMIN}");
    let fb = call(
        &h,
        Request::post("/v1/feedback")
            .header("authorization", &auth)
            .header("content-type", "application/json")
            .body(Body::from(
                json!({"request_id": ids[0], "score": 1, "comment": "good"}).to_string(),
            ))
            .unwrap(),
    )
    .await;
    assert_eq!(fb.status, StatusCode::OK, "{}", fb.text);
    let one = admin_get(&h, &format!("/admin/records/{}", ids[0])).await;
    assert_eq!(one.status, StatusCode::OK, "{}", one.text);
    assert_eq!(one.json["request_id"], ids[0].as_str());
    assert_eq!(one.json["user_id"], "alice");
    assert_eq!(one.json["feature"], "chat");
    assert_eq!(one.json["outcome"], "ok");
    assert_eq!(one.json["feedback"][0]["score"], 1.0);
    assert_eq!(one.json["feedback"][0]["comment"], "good");
    assert!(one.json["latency_ms"].as_f64().unwrap() >= 0.0);
    let missing = admin_get(&h, "/admin/records/req_missing").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.json["error"]["code"], "request_not_found");
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// With `admin_listen`, `/admin` and `/dashboard` answer only there; `/v1` only on the
/// main address. Without it (every other test here), both share the main port.
#[tokio::test]
async fn a_separate_admin_listener_takes_admin_and_dashboard_off_the_main_port() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = sluice_gateway::config::Config::from_toml(
        &config("admin_listen = \"127.0.0.1:0\""),
        &[("UNUSED", "")],
        sluice_gateway::config::ConfigSource::Embedded { simulated: false },
    )
    .unwrap();
    let running = sluice_gateway::server::start(config, "127.0.0.1:0".parse().unwrap(), Vec::new())
        .await
        .unwrap();
    let main = running.url();
    let admin = format!("http://{}", running.admin_addr.expect("an admin address"));
    let client = reqwest::Client::new();
    let get = |url: String| {
        let client = client.clone();
        async move {
            client
                .get(url)
                .bearer_auth(ADMIN)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(get(format!("{main}/admin/keys")).await, 404);
    assert_eq!(get(format!("{main}/dashboard")).await, 404);
    assert_eq!(get(format!("{main}/admin/openapi.json")).await, 404);
    assert_eq!(get(format!("{main}/v1/models")).await, 200);
    assert_eq!(get(format!("{admin}/admin/keys")).await, 200);
    assert_eq!(get(format!("{admin}/dashboard")).await, 200);
    assert_eq!(get(format!("{admin}/v1/models")).await, 404);
    assert_eq!(
        client
            .get(format!("{admin}/admin/keys"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    running.stop().await;
}
