//! Usage accounting and budgets without Redis: prices from config, the request log's
//! spend sums on both backends, budgets that block and downgrade, a restart that keeps
//! the spend, exactly one webhook alert per threshold (delivered through a failure), and
//! `/admin/budgets`.

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::{Request, StatusCode};
use secrecy::SecretString;
use serde_json::Value;
use sluice_gateway::config::{Config, ConfigSource};
use sluice_gateway::limits::config::FailMode;
use sluice_gateway::store::{SpendFilter, SpendGroup, SpendRow, Store};
use sluice_gateway::telemetry::{Endpoint, Outcome, RequestRecord};
use sluice_gateway::usage::alerts::{Alert, Alerter, RetryPolicy, Webhook, deliver};
use sluice_gateway::usage::budgets::{self, BudgetsConfig};
use sluice_gateway::usage::ledger::{BudgetLedger, MemoryLedger, SpendSource};
use sluice_gateway::usage::{
    BudgetDecision, Budgets, Cost, PriceBook, Prices, Subject, TokenUsage, record_cost,
};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn config(text: &str) -> Result<Config, Vec<(String, String)>> {
    Config::from_toml(
        text,
        &[("UNUSED", "")],
        ConfigSource::Embedded { simulated: false },
    )
    .map_err(|e| {
        e.problems
            .into_iter()
            .map(|p| (p.path, p.message))
            .collect()
    })
}

fn budgets_config(text: &str) -> BudgetsConfig {
    let raw: sluice_gateway::usage::RawBudgets =
        toml::from_str(text).unwrap_or_else(|e| panic!("{e}"));
    let mut problems = Vec::new();
    let c = budgets::build(raw, &[], &mut |p, m| problems.push((p, m)));
    assert!(problems.is_empty(), "{problems:?}");
    c
}

/// A request of `key` (owner `acme`), end user `user`, feature `chat`, tier `free`.
fn subject<'a>(key: &'a str, user: &'a str) -> Subject<'a> {
    Subject {
        key_id: Some(key),
        owner: Some("acme"),
        user: Some(user),
        tier: Some("free"),
        feature: Some("chat"),
        endpoint: Endpoint::ChatCompletions,
    }
}

fn record(id: &str, at_ms: i64, key: &str, user: &str, nanos: i64) -> RequestRecord {
    let mut r = RequestRecord {
        request_id: id.into(),
        started_at_ms: at_ms as u64,
        key_id: Some(key.into()),
        owner: Some("acme".into()),
        user: Some(user.into()),
        tier: Some("free".into()),
        feature: Some("chat".into()),
        model: Some("gpt-4o-mini".into()),
        outcome: Outcome::Ok,
        status: 200,
        prompt_tokens: 10,
        completion_tokens: 5,
        cached_prompt_tokens: 4,
        ..RequestRecord::default()
    };
    record_cost(&mut r, Some(Cost::from_nanos(nanos)), None);
    r
}

fn alerter(webhook: Option<String>, tasks: &TaskTracker) -> Alerter {
    Alerter::new(
        webhook.map(|url| Webhook {
            url: SecretString::from(url),
            secret: None,
        }),
        RetryPolicy {
            attempts: 4,
            base_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
            timeout: Duration::from_secs(5),
        },
        None,
        tasks.clone(),
    )
    .unwrap_or_else(|e| panic!("alerter: {e}"))
}

fn memory_budgets(config: BudgetsConfig, store: Arc<Store>, alerter: Alerter) -> Budgets {
    let source: Arc<dyn SpendSource> = store;
    let ledger: Arc<dyn BudgetLedger> = Arc::new(MemoryLedger::new(source.clone()));
    Budgets::with_parts(config, ledger, source, alerter, FailMode::Open, None)
}

#[test]
fn model_prices_and_budgets_load_from_config() {
    let c = config(
        r#"
        [[providers]]
        name = "up"
        kind = "openai"
        [[models]]
        name = "house"
        provider = "up"
        upstream = "some-llama"
        prices = { input = 0.15, output = 0.6, cached_input = 0.075 }
        [[models]]
        name = "gpt-4o-mini"
        provider = "up"
        [[models]]
        name = "claude-*"
        provider = "up"
        [budgets]
        timezone = "UTC"
        [[budgets.rules]]
        name = "daily"
        scope = "user"
        period = "day"
        limit_usd = 1.5
        on_exceeded = "downgrade"
        downgrade_to = "gpt-4o-mini"
        "#,
    )
    .unwrap_or_else(|p| panic!("{p:?}"));
    assert_eq!(
        c.model("house").unwrap().prices,
        Some(Prices::micros(150_000, 600_000, 75_000))
    );
    assert_eq!(c.budgets.rules.len(), 1);
    assert_eq!(c.budgets.rules[0].limit, Cost::from_nanos(1_500_000_000));

    let book = PriceBook::new(&c.models);
    // The override, whatever the upstream is called.
    assert_eq!(
        book.prices("house", "some-llama"),
        Some(Prices::micros(150_000, 600_000, 75_000))
    );
    // The shipped table, by the upstream's name first: a pattern's requests are priced
    // by the model that answered.
    assert_eq!(
        book.prices("claude-3-5-haiku-latest", "claude-3-5-haiku-20241022"),
        Some(Prices::micros(800_000, 4_000_000, 80_000))
    );
    assert_eq!(book.prices("claude-unknown", "claude-unknown"), None);
    let usage = TokenUsage {
        prompt: 1000,
        completion: 500,
        cached_prompt: 200,
    };
    assert_eq!(
        book.cost("gpt-4o-mini", "gpt-4o-mini-2024-07-18", usage),
        Some(Cost::from_nanos(435_000))
    );
    assert_eq!(book.cost("claude-x", "claude-x", usage), None);
}

#[test]
fn price_and_budget_problems_are_reported_with_their_paths() {
    let problems = config(
        r#"
        [[providers]]
        name = "up"
        kind = "openai"
        [[models]]
        name = "a"
        provider = "up"
        prices = { input = 0.1 }
        [[models]]
        name = "text-embedding-x"
        provider = "up"
        prices = { input = 0.02 }
        [[models]]
        name = "b"
        provider = "up"
        prices = { input = 0.0000001, output = 1 }
        [budgets]
        [[budgets.rules]]
        name = "cheap"
        scope = "global"
        period = "month"
        limit_usd = 10
        on_exceeded = "downgrade"
        downgrade_to = "text-embedding-x"
        [[budgets.rules]]
        name = "other"
        scope = "key"
        period = "day"
        limit_usd = 1
        on_exceeded = "downgrade"
        downgrade_to = "missing"
        "#,
    )
    .err()
    .unwrap();
    let paths: Vec<&str> = problems.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "models[2].prices.input",
            "models[0].prices.output",
            "budgets.rules[0].downgrade_to",
            "budgets.rules[1].downgrade_to",
        ],
        "{problems:?}"
    );
    assert!(problems[0].1.contains("six decimals"), "{problems:?}");
    let unknown = config("[budgets]\nbogus = 1").err().unwrap();
    assert_eq!(unknown[0].0, "budgets.bogus", "{unknown:?}");
}

#[tokio::test]
async fn the_log_sums_spend_by_scope_on_both_backends() {
    for (name, target) in support::backends() {
        let store = support::open(name, &target).await;
        let t = 1_750_000_000_000;
        let mut rows = vec![
            record("a", t, "k1", "alice", 1_050),
            record("b", t + 1, "k1", "bob", 2_000),
            record("c", t + 2, "k2", "alice", 4_000),
            // Outside the window.
            record("d", t + 10_000, "k1", "alice", 8_000),
        ];
        // Written before cost_nanos existed: micro-dollars only.
        rows[2].cost_nanos = None;
        rows[2].cost_micros = Some(4);
        // Another owner's end user with the same name.
        rows[1].owner = Some("globex".into());
        rows[1].user = Some("alice".into());
        // Keyless: no owner.
        let mut keyless = record("e", t + 3, "k3", "carol", 500);
        keyless.owner = None;
        keyless.tier = Some("pro".into());
        rows.push(keyless);
        store.insert(&rows).await.unwrap();

        let window = SpendFilter {
            since_ms: t,
            until_ms: t + 10_000,
            ..SpendFilter::default()
        };
        assert_eq!(store.spend(&window).await.unwrap(), 7_550, "{name}");
        let alice_at_acme = SpendFilter {
            owner: Some("acme".into()),
            user: Some("alice".into()),
            ..window.clone()
        };
        assert_eq!(store.spend(&alice_at_acme).await.unwrap(), 5_050, "{name}");
        let keyless_users = SpendFilter {
            owner: Some(String::new()),
            user: Some("carol".into()),
            ..window.clone()
        };
        assert_eq!(store.spend(&keyless_users).await.unwrap(), 500, "{name}");
        let free = SpendFilter {
            tier: Some("free".into()),
            key_id: Some("k1".into()),
            ..window.clone()
        };
        assert_eq!(store.spend(&free).await.unwrap(), 3_050, "{name}");
        let nothing = SpendFilter {
            feature: Some("search".into()),
            ..window.clone()
        };
        assert_eq!(store.spend(&nothing).await.unwrap(), 0, "{name}");

        let by_user = store.spend_by(&window, SpendGroup::User, 10).await.unwrap();
        assert_eq!(
            by_user,
            [
                SpendRow {
                    owner: Some("acme".into()),
                    value: "alice".into(),
                    nanos: 5_050
                },
                SpendRow {
                    owner: Some("globex".into()),
                    value: "alice".into(),
                    nanos: 2_000
                },
                SpendRow {
                    owner: Some(String::new()),
                    value: "carol".into(),
                    nanos: 500
                },
            ],
            "{name}"
        );
        let by_key = store.spend_by(&window, SpendGroup::Key, 1).await.unwrap();
        assert_eq!(
            by_key,
            [SpendRow {
                owner: None,
                value: "k2".into(),
                nanos: 4_000
            }],
            "{name}"
        );

        // The new columns round trip, and stats read the exact cost.
        let stat = store.stat_rows(t).await.unwrap();
        let a = stat.iter().find(|r| r.request_id == "a").unwrap();
        assert_eq!(
            (a.cost_nanos, a.cost_micros, a.cached_prompt_tokens),
            (Some(1_050), Some(1), 4),
            "{name}"
        );
        let c = stat.iter().find(|r| r.request_id == "c").unwrap();
        assert_eq!(c.cost_nanos, Some(4_000), "{name}: from cost_micros");
        store.close().await;
    }
}

#[tokio::test]
async fn budgets_block_downgrade_and_leave_other_requests_alone() {
    let store = support::open("sqlite", &sluice_gateway::store::StorageTarget::Memory).await;
    let tasks = TaskTracker::new();
    let b = memory_budgets(
        budgets_config(
            r#"
            [[rules]]
            name = "per-user"
            scope = "user"
            period = "day"
            limit_usd = 0.001
            on_exceeded = "downgrade"
            downgrade_to = "gpt-4o-mini"
            [[rules]]
            name = "free-chat"
            scope = "global"
            period = "month"
            limit_usd = 0.002
            match = { tier = "free", feature = "chat" }
            "#,
        ),
        store,
        alerter(None, &tasks),
    );
    let now = now_ms();
    let alice = subject("k1", "alice");
    assert_eq!(b.check(&alice, now).await, BudgetDecision::Allow);
    b.charge(&alice, now, Cost::from_nanos(1_000_000)).await;
    // Alice is over her own budget: downgraded; Bob is not.
    assert_eq!(
        b.check(&alice, now).await,
        BudgetDecision::Downgrade {
            budget: "per-user".into(),
            to: "gpt-4o-mini".into()
        }
    );
    assert_eq!(
        b.check(&subject("k1", "bob"), now).await,
        BudgetDecision::Allow
    );
    // An embeddings request has nothing to downgrade to: refused.
    let embeddings = Subject {
        endpoint: Endpoint::Embeddings,
        ..alice
    };
    assert!(matches!(
        b.check(&embeddings, now).await,
        BudgetDecision::Block { .. }
    ));
    // Bob's spend fills the global free-chat budget: everyone in it is blocked until the
    // month ends; a pro request is not counted by it.
    b.charge(&subject("k1", "bob"), now, Cost::from_nanos(1_000_000))
        .await;
    let BudgetDecision::Block {
        budget,
        spent,
        limit,
        retry_after,
    } = b.check(&subject("k2", "carol"), now).await
    else {
        panic!("expected a block")
    };
    assert_eq!(
        (budget.as_str(), spent, limit),
        (
            "free-chat",
            Cost::from_nanos(2_000_000),
            Cost::from_nanos(2_000_000)
        )
    );
    // Until the month (UTC) ends, to the millisecond.
    let month_end = sluice_gateway::usage::calendar::span(
        sluice_gateway::usage::calendar::Period::Month,
        now,
        0,
    )
    .end_ms;
    assert_eq!(
        retry_after,
        Duration::from_millis(u64::try_from(month_end - now).unwrap())
    );
    assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(31 * 86_400));
    let pro = Subject {
        tier: Some("pro"),
        ..subject("k2", "carol")
    };
    assert_eq!(b.check(&pro, now).await, BudgetDecision::Allow);
    // No end user: the per-user rule does not apply; keyless is its own owner ("").
    let anonymous = Subject {
        user: None,
        tier: Some("pro"),
        ..alice
    };
    assert_eq!(b.check(&anonymous, now).await, BudgetDecision::Allow);
}

#[tokio::test]
async fn a_restarted_gateway_keeps_the_spend_on_both_backends() {
    let text = r#"
        [[rules]]
        name = "monthly"
        scope = "key"
        period = "month"
        limit_usd = 0.00001
        "#;
    for (name, target) in support::backends() {
        let store = support::open(name, &target).await;
        let tasks = TaskTracker::new();
        let now = now_ms();
        // Spend from before the restart: 6 of 10 micro-dollars for k1.
        store
            .insert(&[
                record("r1", now - 1000, "k1", "u", 3_500),
                record("r2", now - 500, "k1", "u", 2_500),
                record("r3", now - 400, "k2", "u", 9_999),
            ])
            .await
            .unwrap();
        let first = memory_budgets(budgets_config(text), store.clone(), alerter(None, &tasks));
        assert_eq!(
            first.check(&subject("k1", "u"), now).await,
            BudgetDecision::Allow,
            "{name}"
        );
        // This instance adds 4 more (and writes the record, as the recorder would).
        let r4 = record("r4", now, "k1", "u", 4_000);
        first.charge_record(&r4).await;
        store.insert(&[r4]).await.unwrap();
        assert!(
            matches!(
                first.check(&subject("k1", "u"), now).await,
                BudgetDecision::Block { .. }
            ),
            "{name}"
        );

        // The pipeline's way: the check builds the counters, and the charge the
        // record's `after` hook runs in the background adds the record's cost to them.
        let first = Arc::new(first);
        let r5 = record("r5", now, "k2", "u", 1);
        let counted = first.count(&subject("k2", "u"), now);
        let charge = first
            .charging(counted, &r5)
            .unwrap_or_else(|| panic!("{name}: a record with a cost is charged"));
        charge.await;
        store.insert(&[r5]).await.unwrap();
        assert!(
            matches!(
                first.check(&subject("k2", "u"), now).await,
                BudgetDecision::Block { .. }
            ),
            "{name}: 9_999 + 1 reaches the limit"
        );
        drop(first);

        // A new process: its counters start from the log, so k1 is still blocked.
        let second = memory_budgets(budgets_config(text), store.clone(), alerter(None, &tasks));
        let BudgetDecision::Block { spent, .. } = second.check(&subject("k1", "u"), now).await
        else {
            panic!("{name}: the restart forgot the spend")
        };
        assert_eq!(spent, Cost::from_nanos(10_000), "{name}");
        assert!(
            matches!(
                second.check(&subject("k2", "u"), now).await,
                BudgetDecision::Block { .. }
            ),
            "{name}"
        );
        assert_eq!(
            second.check(&subject("k3", "u"), now).await,
            BudgetDecision::Allow,
            "{name}"
        );
        store.close().await;
    }
}

/// A webhook receiver that fails the first POST and records the others.
async fn receiver() -> (String, Arc<AtomicU32>, Arc<Mutex<Vec<Value>>>) {
    let attempts = Arc::new(AtomicU32::new(0));
    let received = Arc::new(Mutex::new(Vec::new()));
    let (a, r) = (attempts.clone(), received.clone());
    let app = Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let (a, r) = (a.clone(), r.clone());
            async move {
                if a.fetch_add(1, Ordering::SeqCst) == 0 {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                r.lock().unwrap_or_else(|e| e.into_inner()).push(body);
                StatusCode::NO_CONTENT
            }
        }),
    );
    let addr = support::serve(app).await;
    (format!("http://{addr}/hook"), attempts, received)
}

/// With `webhook_secret`, each POST carries `x-sluice-signature: t=..,v1=..`: the
/// HMAC-SHA256 of `"{t}.{body}"` under the secret, checked here from the raw body; a
/// tampered body or another secret does not verify. Without a secret, no header.
#[tokio::test]
async fn a_webhook_secret_signs_each_post() {
    use hmac::Mac;
    type Seen = Arc<Mutex<Vec<(Option<String>, axum::body::Bytes)>>>;
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    let app = Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let s2 = s2.clone();
                async move {
                    let signature = headers
                        .get("x-sluice-signature")
                        .map(|v| v.to_str().unwrap_or_default().to_string());
                    s2.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((signature, body));
                    StatusCode::NO_CONTENT
                }
            },
        ),
    );
    let url = format!("http://{}/hook", support::serve(app).await);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let policy = RetryPolicy {
        attempts: 1,
        base_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(1),
        timeout: Duration::from_secs(5),
    };
    let alert = Alert {
        id: "a1".into(),
        budget: "team".into(),
        scope: "owner",
        scope_value: Some("acme".into()),
        owner: None,
        period: "month",
        period_start: "2026-11-01T00:00:00Z".into(),
        period_end: "2026-12-01T00:00:00Z".into(),
        threshold: 0.8,
        spent_usd: 0.9,
        limit_usd: 1.0,
        at: "2026-11-27T12:00:00Z".into(),
    };
    for secret in [Some("whsec-test"), None] {
        let webhook = Webhook {
            url: SecretString::from(url.clone()),
            secret: secret.map(SecretString::from),
        };
        let before = now_ms() / 1000;
        assert_eq!(deliver(&client, &webhook, &alert, policy).await, Ok(1));
        let (signature, body) = seen.lock().unwrap().pop().unwrap();
        let sent: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(sent["id"], "a1");
        let Some(secret) = secret else {
            assert_eq!(signature, None);
            continue;
        };
        let signature = signature.expect("a signed POST");
        let (t, v1) = signature
            .strip_prefix("t=")
            .and_then(|rest| rest.split_once(",v1="))
            .unwrap_or_else(|| panic!("{signature}"));
        let t: i64 = t.parse().unwrap();
        assert!((before..=before + 5).contains(&t), "{t} vs {before}");
        let verify = |key: &str, body: &[u8]| {
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
            mac.update(format!("{t}.").as_bytes());
            mac.update(body);
            mac.verify_slice(&hex::decode(v1).unwrap()).is_ok()
        };
        assert!(verify(secret, &body), "{signature}");
        assert!(!verify("another-secret", &body));
        let mut tampered = body.to_vec();
        tampered[10] ^= 1;
        assert!(!verify(secret, &tampered));
    }
}

#[tokio::test]
async fn crossing_80_percent_sends_one_alert_through_a_failed_attempt() {
    let (url, attempts, received) = receiver().await;
    let store = support::open("sqlite", &sluice_gateway::store::StorageTarget::Memory).await;
    let tasks = TaskTracker::new();
    let b = memory_budgets(
        budgets_config(
            r#"
            [[rules]]
            name = "team"
            scope = "owner"
            period = "month"
            limit_usd = 1
            "#,
        ),
        store,
        alerter(Some(url), &tasks),
    );
    let now = now_ms();
    let s = subject("k1", "alice");
    // 0.3 + 0.3: below 80 %; + 0.3 crosses it; more of the same period: no alert.
    for _ in 0..6 {
        b.charge(&s, now, Cost::from_nanos(300_000_000)).await;
    }
    tasks.close();
    tasks.wait().await;
    assert_eq!(attempts.load(Ordering::SeqCst), 2, "one failure, one retry");
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 1, "{received:?}");
    let alert = &received[0];
    assert_eq!(alert["budget"], "team");
    assert_eq!(alert["scope"], "owner");
    assert_eq!(alert["scope_value"], "acme");
    assert_eq!(alert["threshold"], 0.8);
    assert_eq!(alert["spent_usd"], 0.9);
    assert_eq!(alert["limit_usd"], 1.0);
    assert_eq!(alert["period"], "month");
    assert!(
        alert["period_start"]
            .as_str()
            .unwrap()
            .ends_with("-01T00:00:00Z")
    );
    assert!(alert["id"].as_str().unwrap().starts_with("team:"));
}

/// An alert names the counter that crossed: its scope's value (and, for end users, the
/// key's owner they are counted within) and its period, whatever the scope. The values
/// come from the counters built at the check, so each scope is pinned here.
#[tokio::test]
async fn each_scope_s_alert_names_its_value_and_period() {
    let (url, _attempts, received) = receiver().await;
    let store = support::open("sqlite", &sluice_gateway::store::StorageTarget::Memory).await;
    let tasks = TaskTracker::new();
    let mut rules = String::new();
    for scope in ["global", "key", "owner", "user", "feature"] {
        rules.push_str(&format!(
            "[[rules]]\nname = \"{scope}\"\nscope = \"{scope}\"\nperiod = \"day\"\nlimit_usd = 1\n"
        ));
    }
    let b = memory_budgets(budgets_config(&rules), store, alerter(Some(url), &tasks));
    // 2025-06-15T12:00:00Z.
    let at = 1_749_988_800_000;
    b.charge(&subject("k1", "amy"), at, Cost::from_nanos(900_000_000))
        .await;
    tasks.close();
    tasks.wait().await;
    let mut seen: Vec<(String, Value, Value)> = received
        .lock()
        .unwrap()
        .iter()
        .map(|a| {
            assert_eq!(a["scope"], a["budget"], "{a}");
            assert_eq!(a["period_start"], "2025-06-15T00:00:00Z", "{a}");
            assert_eq!(a["period_end"], "2025-06-16T00:00:00Z", "{a}");
            let owner = a.get("owner").cloned().unwrap_or(Value::Null);
            (
                a["scope"].as_str().unwrap().to_string(),
                a["scope_value"].clone(),
                owner,
            )
        })
        .collect();
    seen.sort_by(|x, y| x.0.cmp(&y.0));
    let expected = [
        ("feature", Value::from("chat"), Value::Null),
        ("global", Value::Null, Value::Null),
        ("key", Value::from("k1"), Value::Null),
        ("owner", Value::from("acme"), Value::Null),
        ("user", Value::from("amy"), Value::from("acme")),
    ];
    let expected: Vec<(String, Value, Value)> = expected
        .into_iter()
        .map(|(s, v, o)| (s.to_string(), v, o))
        .collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn admin_budgets_shows_spend_limit_percent_and_forecast() {
    let store = support::open("sqlite", &sluice_gateway::store::StorageTarget::Memory).await;
    let tasks = TaskTracker::new();
    let now = now_ms();
    // A user seen only in the log (before a restart), and one live in this process.
    store
        .insert(&[record("old", now - 1, "k1", "zed", 100_000_000)])
        .await
        .unwrap();
    let b = Arc::new(memory_budgets(
        budgets_config(
            r#"
            [[rules]]
            name = "total"
            scope = "global"
            period = "month"
            limit_usd = 10
            [[rules]]
            name = "users"
            scope = "user"
            period = "day"
            limit_usd = 0.5
            "#,
        ),
        store,
        alerter(None, &tasks),
    ));
    b.charge(&subject("k1", "amy"), now, Cost::from_nanos(600_000_000))
        .await;
    let app = {
        let b = b.clone();
        Router::new().route(
            "/admin/budgets",
            axum::routing::get(move |uri: axum::http::Uri| {
                let b = b.clone();
                async move { sluice_gateway::admin::budgets_response(&b, uri.query()).await }
            }),
        )
    };
    let get = |uri: &str| Request::get(uri).body(axum::body::Body::empty()).unwrap();
    let response = app.clone().oneshot(get("/admin/budgets")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["counters"], "memory");
    let total = &v["data"][0];
    assert_eq!(total["name"], "total");
    // The log's 0.1 (read at first touch) plus amy's 0.6.
    assert_eq!(total["counters"][0]["spent_usd"], 0.7);
    assert_eq!(total["counters"][0]["percent"], 7.0);
    assert_eq!(total["counters"][0]["scope_value"], Value::Null);
    let users = &v["data"][1]["counters"];
    assert_eq!(users.as_array().unwrap().len(), 2, "{users}");
    assert_eq!(users[0]["scope_value"], "amy");
    assert_eq!(users[0]["owner"], "acme");
    assert_eq!(users[0]["exhausted"], true);
    assert_eq!(users[0]["percent"], 120.0);
    assert_eq!(users[0]["forecast_exhaustion"], Value::Null);
    assert_eq!(users[1]["scope_value"], "zed");
    assert_eq!(users[1]["spent_usd"], 0.1);
    assert_eq!(users[1]["exhausted"], false);

    let one = app
        .clone()
        .oneshot(get("/admin/budgets?limit=1"))
        .await
        .unwrap();
    let body = axum::body::to_bytes(one.into_body(), 1 << 20)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["data"][1]["counters"].as_array().unwrap().len(), 1);
    assert_eq!(v["data"][1]["truncated"], true);

    let bad = app.oneshot(get("/admin/budgets?limit=0")).await.unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let body = axum::body::to_bytes(bad.into_body(), 1 << 20)
        .await
        .unwrap();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["error"]["param"], "limit");
}
