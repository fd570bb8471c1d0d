//! Virtual keys in process: created in the store, accepted by every gateway instance,
//! refused everywhere soon after revocation, stored only as hashes; the `/admin` API
//! behind the master key. Both backends; PostgreSQL through `support`.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] fns fail loudly by design"
)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sluice_gateway::config::{Config, ConfigSource};
use sluice_gateway::pipeline::Gateway;
use sluice_gateway::store::{NewKey, StorageTarget, Store, hash_key};
use sluice_gateway::telemetry::{ChannelSink, RequestRecord};
use sqlx::Row;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

const ADMIN: &str = "admin-secret-for-tests";

fn config(master: bool) -> String {
    format!(
        r#"
{}
[limits]
key_refresh = "200ms"
[[tiers]]
name = "free"
[[tiers]]
name = "pro"
[[providers]]
name = "sim"
kind = "sim"
[[models]]
name = "m"
provider = "sim"
"#,
        if master {
            format!("[server]\nmaster_key = \"{ADMIN}\"")
        } else {
            String::new()
        }
    )
}

/// One gateway instance on `store`, ready (its first key load done).
struct Instance {
    app: axum::Router,
    gateway: Arc<Gateway>,
    records: UnboundedReceiver<RequestRecord>,
    tasks: TaskTracker,
}

async fn instance(toml: &str, store: Arc<Store>) -> Instance {
    let config = Config::from_toml(
        toml,
        &[("UNUSED", "")],
        ConfigSource::Embedded { simulated: false },
    )
    .unwrap_or_else(|e| panic!("test config invalid: {e}"));
    let tasks = TaskTracker::new();
    let (tx, records) = tokio::sync::mpsc::unbounded_channel();
    let gateway = Gateway::start(
        Arc::new(config),
        store,
        vec![Box::new(ChannelSink(tx))],
        tasks.clone(),
    )
    .unwrap();
    gateway.auth.ready().await.unwrap();
    Instance {
        app: sluice_gateway::server::app(gateway.clone()),
        gateway,
        records,
        tasks,
    }
}

impl Instance {
    async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        call_raw(&self.app, method, path, key, body.map(|b| b.to_string())).await
    }

    async fn models(&self, key: Option<&str>) -> (StatusCode, Value) {
        self.call(Method::GET, "/v1/models", key, None).await
    }

    /// Stop as `server::start` does at the end of its grace period, and wait for every
    /// task of the gateway (key reloads included) to end.
    async fn stop(self) {
        self.gateway.shutdown.cancel();
        drop(self.app);
        drop(self.gateway);
        self.tasks.close();
        tokio::time::timeout(Duration::from_secs(5), self.tasks.wait())
            .await
            .expect("the gateway's tasks, key reloads included, end at shutdown");
    }
}

async fn call_raw(
    app: &axum::Router,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<String>,
) -> (StatusCode, Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::from(body.unwrap_or_default())).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn chat() -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "Tell me about sluices"}]})
}

fn new_key(owner: &str) -> NewKey {
    NewKey {
        owner: owner.into(),
        tier: Some("pro".into()),
        models: Some(vec!["m".into()]),
        can_assert_tier: true,
    }
}

/// Poll `check` every 20 ms until it holds; how long that took, or a panic after 5 s.
async fn within_5s<F, Fut>(what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if check().await {
            return start.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: not within 5 s");
}

/// No piece of the key (8 characters or more) in `text`.
fn assert_no_key(key: &str, text: &str) {
    let random = &key[sluice_gateway::store::KEY_PREFIX.len()..];
    for start in 0..=random.len() - 8 {
        let piece = &random[start..start + 8];
        assert!(
            !text.contains(piece),
            "`{piece}` of the key found in: {text}"
        );
    }
}

#[tokio::test]
async fn revoked_key_is_refused_on_every_instance_of_both_backends() {
    for (name, target) in support::backends() {
        // SQLite in memory is one connection: both instances share the store. PostgreSQL:
        // each instance has its own pool on the same schema, as two processes would.
        let store_a = support::open(name, &target).await;
        let store_b = match target {
            StorageTarget::Memory => store_a.clone(),
            _ => support::open(name, &target).await,
        };
        // Created before the gateways start: it works from their first request on.
        let (row, key) = store_a.create_key(new_key("team-a")).await.unwrap();
        let key = key.expose_secret().to_string();
        let mut a = instance(&config(true), store_a.clone()).await;
        let b = instance(&config(true), store_b.clone()).await;
        for gw in [&a, &b] {
            assert_eq!(gw.models(Some(&key)).await.0, StatusCode::OK, "{name}");
            assert_eq!(gw.models(None).await.0, StatusCode::UNAUTHORIZED, "{name}");
        }
        let principal = {
            let mut h = axum::http::HeaderMap::new();
            h.insert("authorization", format!("Bearer {key}").parse().unwrap());
            a.gateway.auth.authenticate(&h).unwrap()
        };
        assert_eq!(principal.key_id.as_deref(), Some(row.id.as_str()));
        assert_eq!(principal.owner.as_deref(), Some("team-a"));
        assert_eq!(principal.tier.as_deref(), Some("pro"));
        assert_eq!(principal.models, vec!["m".to_string()]);
        assert!(principal.can_assert_tier && !principal.admin);

        // The record names the key by id, and holds nothing of the key itself.
        let (status, body) = a
            .call(
                Method::POST,
                "/v1/chat/completions",
                Some(&key),
                Some(chat()),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{name}: {body}");
        let record = tokio::time::timeout(Duration::from_secs(10), a.records.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(record.key_id.as_deref(), Some(row.id.as_str()));
        assert_no_key(&key, &serde_json::to_string(&record).unwrap());
        assert_no_key(&key, &format!("{record:?}"));

        // A key created after start reaches both instances at their next reload.
        let (_, later) = store_b.create_key(new_key("team-c")).await.unwrap();
        let later = later.expose_secret().to_string();
        let later = later.as_str();
        for gw in [&a, &b] {
            within_5s("a new key accepted", || async move {
                gw.models(Some(later)).await.0 == StatusCode::OK
            })
            .await;
        }

        assert!(store_a.revoke_key(&row.id).await.unwrap());
        assert!(!store_a.revoke_key(&row.id).await.unwrap(), "revoked once");
        let key = key.as_str();
        for gw in [&a, &b] {
            let took = within_5s("the revoked key refused", || async move {
                gw.models(Some(key)).await.0 == StatusCode::UNAUTHORIZED
            })
            .await;
            // One refresh interval (200 ms) and the query, with room for a slow machine.
            assert!(took < Duration::from_secs(2), "{name}: took {took:?}");
            let (status, body) = gw.models(Some(key)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_eq!(body["error"]["code"], "invalid_api_key");
            assert_no_key(key, &body.to_string());
            // The other key is untouched.
            assert_eq!(gw.models(Some(later)).await.0, StatusCode::OK);
        }
        a.stop().await;
        b.stop().await;
        store_a.close().await;
    }
}

/// Every value of every column of every row of `api_keys`, as text.
async fn dump_keys_table(url: &str) -> Vec<Vec<String>> {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(url).await.unwrap();
    let rows = sqlx::query("SELECT * FROM api_keys")
        .fetch_all(&pool)
        .await
        .unwrap();
    pool.close().await;
    rows.iter()
        .map(|r| {
            (0..r.len())
                .map(|i| {
                    if let Ok(v) = r.try_get::<Option<String>, _>(i) {
                        format!("{v:?}")
                    } else if let Ok(v) = r.try_get::<Option<i64>, _>(i) {
                        format!("{v:?}")
                    } else if let Ok(v) = r.try_get::<Option<bool>, _>(i) {
                        format!("{v:?}")
                    } else {
                        panic!("column {i} of api_keys has an unexpected type")
                    }
                })
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn only_hashes_are_stored_on_both_backends() {
    let sqlite = std::env::temp_dir().join(format!("sluice-keys-{}.db", support::uuid_like()));
    let pg = support::postgres_target();
    let StorageTarget::Postgres {
        schema: Some(schema),
        ..
    } = &pg
    else {
        unreachable!()
    };
    let targets = [
        (
            "sqlite",
            StorageTarget::Sqlite(sqlite.clone()),
            format!("sqlite://{}", sqlite.display()),
        ),
        (
            "postgres",
            pg.clone(),
            format!(
                "{}?options=-csearch_path%3D{schema}",
                support::database_url()
            ),
        ),
    ];
    for (name, target, url) in targets {
        let store = support::open(name, &target).await;
        let mut keys = Vec::new();
        for owner in ["a", "b", "c"] {
            let (row, key) = store
                .create_key(NewKey {
                    owner: owner.into(),
                    ..NewKey::default()
                })
                .await
                .unwrap();
            keys.push((row, key.expose_secret().to_string()));
        }
        assert!(store.revoke_key(&keys[2].0.id).await.unwrap());
        let dump = dump_keys_table(&url).await;
        assert_eq!(dump.len(), 3, "{name}");
        let text = format!("{dump:?}");
        for (row, key) in &keys {
            assert!(!text.contains(key.as_str()), "{name}: the key is stored");
            assert_no_key(key, &text);
            // What is there: the hash, and the last four characters as a hint.
            assert!(text.contains(&hash_key(key)), "{name}: no hash of the key");
            assert_eq!(row.key_hash, hash_key(key));
            assert_eq!(row.hint, key[key.len() - 4..]);
        }
        let listed = store.list_keys().await.unwrap();
        assert_eq!(listed.len(), 3);
        // Keys made in the same millisecond sort by their (random) id, so find the
        // revoked one by id rather than by position.
        let revoked = listed
            .iter()
            .find(|r| r.id == keys[2].0.id)
            .expect("the revoked key is listed");
        assert!(revoked.revoked_at_ms.is_some(), "{name}");
        assert!(
            listed.iter().filter(|r| r.revoked_at_ms.is_some()).count() == 1,
            "{name}: only the revoked key is marked"
        );
        assert!(revoked.updated_at_ms >= revoked.created_at_ms);
        let changed = store
            .keys_changed_since(revoked.updated_at_ms)
            .await
            .unwrap();
        assert!(changed.iter().any(|r| r.id == keys[2].0.id), "{name}");
        store.close().await;
    }
    let _ = std::fs::remove_file(&sqlite);
}

#[tokio::test]
async fn admin_creates_lists_and_revokes_keys() {
    let store = support::open("sqlite", &StorageTarget::Memory).await;
    let gw = instance(&config(true), store.clone()).await;
    let (status, created) = gw
        .call(
            Method::POST,
            "/admin/keys",
            Some(ADMIN),
            Some(
                json!({"owner": "team-b", "tier": "pro", "models": ["m"], "can_assert_tier": true}),
            ),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let key = created["key"].as_str().unwrap().to_string();
    let id = created["id"].as_str().unwrap().to_string();
    assert!(key.starts_with("sk-sluice-"), "{created}");
    assert!(id.starts_with("key_"), "{created}");
    assert_eq!(created["owner"], "team-b");
    assert_eq!(created["tier"], "pro");
    assert_eq!(created["models"], json!(["m"]));
    assert_eq!(created["can_assert_tier"], true);
    assert_eq!(created["status"], "active");
    assert_eq!(created["hint"], key[key.len() - 4..]);
    // Works at once on the instance that created it.
    assert_eq!(gw.models(Some(&key)).await.0, StatusCode::OK);

    let (status, list) = gw.call(Method::GET, "/admin/keys", Some(ADMIN), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["data"].as_array().unwrap().len(), 1);
    assert_eq!(list["data"][0]["id"], id.as_str());
    assert!(list["data"][0].get("key").is_none(), "{list}");
    assert_no_key(&key, &list.to_string());
    assert!(!list.to_string().contains(&hash_key(&key)), "{list}");

    let (status, revoked) = gw
        .call(
            Method::DELETE,
            &format!("/admin/keys/{id}"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert_eq!(revoked["status"], "revoked");
    assert!(revoked["revoked_at_ms"].is_i64(), "{revoked}");
    // Refused at once on the instance that revoked it.
    assert_eq!(gw.models(Some(&key)).await.0, StatusCode::UNAUTHORIZED);
    // Revoking again (the POST alias) is harmless.
    let (status, again) = gw
        .call(
            Method::POST,
            &format!("/admin/keys/{id}/revoke"),
            Some(ADMIN),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(again["revoked_at_ms"], revoked["revoked_at_ms"]);
    let (status, missing) = gw
        .call(Method::DELETE, "/admin/keys/key_nope", Some(ADMIN), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(missing["error"]["code"], "key_not_found");

    let (status, tiers) = gw
        .call(Method::GET, "/admin/tiers", Some(ADMIN), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<&str> = tiers["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["free", "pro"]);
    gw.stop().await;
}

#[tokio::test]
async fn admin_refuses_bad_input_with_precise_codes() {
    let store = support::open("sqlite", &StorageTarget::Memory).await;
    let gw = instance(&config(true), store.clone()).await;
    let cases = [
        (json!({}).to_string(), "missing_owner", Some("owner")),
        (
            json!({"owner": " "}).to_string(),
            "missing_owner",
            Some("owner"),
        ),
        (
            json!({"owner": "x", "tier": "gold"}).to_string(),
            "unknown_tier",
            Some("tier"),
        ),
        (
            json!({"owner": "x", "models": []}).to_string(),
            "invalid_models",
            Some("models"),
        ),
        (
            json!({"owner": "x", "colour": "red"}).to_string(),
            "invalid_request",
            None,
        ),
        ("{\"owner\": ".to_string(), "invalid_json", None),
    ];
    for (body, code, param) in cases {
        let (status, error) = call_raw(
            &gw.app,
            Method::POST,
            "/admin/keys",
            Some(ADMIN),
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {error}");
        assert_eq!(error["error"]["code"], code, "{body}: {error}");
        if let Some(param) = param {
            assert_eq!(error["error"]["param"], param, "{body}: {error}");
        }
    }
    assert!(store.list_keys().await.unwrap().is_empty());
    gw.stop().await;
}

/// Every `/admin` route, with a body that would succeed.
fn admin_routes() -> Vec<(Method, &'static str, Option<Value>)> {
    vec![
        (Method::GET, "/admin/keys", None),
        (
            Method::POST,
            "/admin/keys",
            Some(json!({"owner": "intruder"})),
        ),
        (Method::DELETE, "/admin/keys/key_0000000000000000", None),
        (
            Method::POST,
            "/admin/keys/key_0000000000000000/revoke",
            None,
        ),
        (Method::GET, "/admin/tiers", None),
        (Method::GET, "/admin/budgets", None),
        (Method::GET, "/admin/penalties", None),
        (Method::DELETE, "/admin/penalties/p:-:someone", None),
        (Method::GET, "/admin/no-such-route", None),
    ]
}

#[tokio::test]
async fn every_admin_route_needs_the_master_key() {
    let store = support::open("sqlite", &StorageTarget::Memory).await;
    let (_, virtual_key) = store.create_key(new_key("team-a")).await.unwrap();
    let virtual_key = virtual_key.expose_secret().to_string();
    let gw = instance(&config(true), store.clone()).await;
    let wrong = format!("{ADMIN}x");
    for (method, path, body) in admin_routes() {
        for key in [None, Some(wrong.as_str()), Some(virtual_key.as_str())] {
            let (status, error) = gw.call(method.clone(), path, key, body.clone()).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {key:?}"
            );
            assert_eq!(error["error"]["code"], "invalid_api_key", "{error}");
            assert_eq!(error["error"]["type"], "authentication_error", "{error}");
            assert!(!error.to_string().contains(&wrong), "{error}");
        }
    }
    // Nothing was created, nothing revoked.
    let keys = store.list_keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert!(!keys[0].is_revoked());
    gw.stop().await;
}

#[tokio::test]
async fn admin_is_off_without_a_master_key() {
    let store = support::open("sqlite", &StorageTarget::Memory).await;
    let gw = instance(&config(false), store.clone()).await;
    for (method, path, body) in admin_routes() {
        for key in [None, Some("anything")] {
            let (status, error) = gw.call(method.clone(), path, key, body.clone()).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
            let message = error["error"]["message"].as_str().unwrap();
            assert!(message.contains("SLUICE_MASTER_KEY"), "{message}");
        }
    }
    assert!(store.list_keys().await.unwrap().is_empty());
    gw.stop().await;
}

#[tokio::test]
async fn the_first_key_turns_auth_on_and_revoking_it_keeps_it_on() {
    let store = support::open("sqlite", &StorageTarget::Memory).await;
    let gw = instance(&config(false), store.clone()).await;
    assert!(gw.gateway.auth.is_keyless());
    assert_eq!(gw.models(None).await.0, StatusCode::OK);
    let (row, key) = store.create_key(new_key("team-a")).await.unwrap();
    let key = key.expose_secret().to_string();
    let (g, key) = (&gw, key.as_str());
    within_5s("auth on once a key exists", || async move {
        g.models(None).await.0 == StatusCode::UNAUTHORIZED
    })
    .await;
    assert_eq!(gw.models(Some(key)).await.0, StatusCode::OK);
    assert_eq!(gw.models(Some("made-up")).await.0, StatusCode::UNAUTHORIZED);
    assert!(store.revoke_key(&row.id).await.unwrap());
    within_5s("the revoked key refused", || async move {
        g.models(Some(key)).await.0 == StatusCode::UNAUTHORIZED
    })
    .await;
    // No key is active, yet the gateway does not fall back to keyless.
    assert!(!gw.gateway.auth.is_keyless());
    assert_eq!(gw.models(None).await.0, StatusCode::UNAUTHORIZED);
    gw.stop().await;
}
