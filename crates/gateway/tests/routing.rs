//! Routing rules through the whole pipeline: requests for `auto` get the cheap model
//! first and the strong one when a rule says so (input size, feature, asked quality,
//! tier), never a model the caller may not use; a cheap answer failing its output check
//! is re-asked of the strong model once, with both answers in the record.

#![expect(clippy::expect_used, reason = "test helpers fail loudly by design")]

use axum::http::StatusCode;
use serde_json::{Value, json};
use sluice_gateway::config::{Config, ConfigSource};
use sluice_gateway::telemetry::Outcome;

mod support;

use support::harness;

const AUTH: (&str, &str) = ("authorization", "Bearer k");

const CONFIG: &str = r#"
[server]
master_key = "k"

[[providers]]
name = "sim"
kind = "sim"

[[models]]
name = "cheap"
provider = "sim"
upstream = "gpt-4o-mini"
fallbacks = ["backup"]
[[models]]
name = "strong"
provider = "sim"
upstream = "gpt-4o"
[[models]]
name = "backup"
provider = "sim"
upstream = "gpt-4o-mini"

[[tiers]]
name = "standard"
[[tiers]]
name = "free"
models = ["cheap", "backup"]
[[tiers]]
name = "pro"

[limits]
default_tier = "standard"

[routing]
default = "cheap"
defaults = [{ feature = "research", model = "strong" }, { tier = "pro", model = "strong" }]
[[routing.rules]]
name = "long-input"
input_tokens_over = 200
model = "strong"
[[routing.rules]]
name = "sensitive"
features = ["legal", "medical"]
model = "strong"
[[routing.rules]]
name = "asked"
quality = "high"
model = "strong"
[[routing.rules]]
name = "escalate"
output_check_failed = true
model = "strong"
"#;

fn ask(text: &str) -> Value {
    json!({"model": "auto", "messages": [{"role": "user", "content": text}]})
}

/// A word the cheap model's answer to `q` uses and the strong model's does not.
fn word_only_in_cheap(q: &str) -> String {
    let cheap = sluice_sim::reply::chat_reply("gpt-4o-mini", q, None)
        .text
        .to_lowercase();
    let strong = sluice_sim::reply::chat_reply("gpt-4o", q, None)
        .text
        .to_lowercase();
    cheap
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 3)
        .find(|w| !strong.contains(*w))
        .map(str::to_string)
        .expect("the two simulated answers differ in some word")
}

#[tokio::test]
async fn cheap_first_strong_when_a_rule_says_so() {
    let mut h = harness(CONFIG).await;
    let small = h.send("/v1/chat/completions", ask("hello"), &[AUTH]).await;
    assert_eq!(small.status, StatusCode::OK, "{}", small.text);
    assert_eq!(small.headers["x-sluice-model"], "cheap");
    assert_eq!(small.record.model_requested.as_deref(), Some("auto"));
    assert_eq!(small.record.model.as_deref(), Some("cheap"));
    assert_eq!(small.record.routed_by.as_deref(), Some("default"));

    // About 4 characters a token: 1000 characters are ~250 tokens, over the 200 of the rule.
    let long = h
        .send(
            "/v1/chat/completions",
            ask(&"lorem ipsum ".repeat(84)),
            &[AUTH],
        )
        .await;
    assert_eq!(long.headers["x-sluice-model"], "strong");
    assert_eq!(long.record.routed_by.as_deref(), Some("rule:long-input"));

    let legal = h
        .send(
            "/v1/chat/completions",
            ask("hello"),
            &[AUTH, ("x-sluice-feature", "legal")],
        )
        .await;
    assert_eq!(legal.headers["x-sluice-model"], "strong");
    assert_eq!(legal.record.routed_by.as_deref(), Some("rule:sensitive"));

    let asked = h
        .send(
            "/v1/chat/completions",
            ask("hello"),
            &[AUTH, ("x-sluice-quality", "high")],
        )
        .await;
    assert_eq!(asked.headers["x-sluice-model"], "strong");
    assert_eq!(asked.record.routed_by.as_deref(), Some("rule:asked"));
    let mut body = ask("hello");
    body["sluice"] = json!({"quality": "high"});
    let extra = h.send("/v1/chat/completions", body, &[AUTH]).await;
    assert_eq!(extra.record.routed_by.as_deref(), Some("rule:asked"));

    let research = h
        .send(
            "/v1/chat/completions",
            ask("hello"),
            &[AUTH, ("x-sluice-feature", "research")],
        )
        .await;
    assert_eq!(
        research.record.routed_by.as_deref(),
        Some("default:feature=research")
    );
    let pro = h
        .send(
            "/v1/chat/completions",
            ask("hello"),
            &[AUTH, ("x-sluice-tier", "pro")],
        )
        .await;
    assert_eq!(pro.headers["x-sluice-model"], "strong");
    assert_eq!(pro.record.routed_by.as_deref(), Some("default:tier=pro"));

    // A model the caller's tier may not use is never routed to.
    let free = h
        .send(
            "/v1/chat/completions",
            ask(&"lorem ipsum ".repeat(84)),
            &[AUTH, ("x-sluice-tier", "free")],
        )
        .await;
    assert_eq!(free.status, StatusCode::OK, "{}", free.text);
    assert_eq!(free.headers["x-sluice-model"], "cheap");
    assert_eq!(free.record.routed_by.as_deref(), Some("default"));

    // A model named outright is not routed.
    let direct = h
        .send(
            "/v1/chat/completions",
            json!({"model": "cheap", "messages": [{"role": "user", "content": "lorem ipsum ".repeat(84)}]}),
            &[AUTH],
        )
        .await;
    assert_eq!(direct.headers["x-sluice-model"], "cheap");
    assert_eq!(direct.record.routed_by, None);
}

#[tokio::test]
async fn a_bad_quality_value_is_a_precise_400() {
    let mut h = harness(CONFIG).await;
    let r = h
        .send(
            "/v1/chat/completions",
            ask("hello"),
            &[AUTH, ("x-sluice-quality", "ultra")],
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["error"]["param"], "x-sluice-quality");
    assert_eq!(r.body["error"]["code"], "invalid_request");
    assert_eq!(r.record.outcome, Outcome::RejectedInput);
}

fn escalating(validators: &str) -> String {
    format!("[[guard.output.rules]]\nvalidators = [{validators}]\non_fail = \"escalate\"\n{CONFIG}")
}

#[tokio::test]
async fn a_failed_cheap_answer_is_re_asked_of_the_strong_model_with_both_in_the_record() {
    let q = "Explain sluice gates";
    let word = word_only_in_cheap(q);
    let mut h = harness(&escalating(&format!(r#"{{ not_contains = ["{word}"] }}"#))).await;
    let r = h.send("/v1/chat/completions", ask(q), &[AUTH]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // The escalation model, not the cheap model's own fallback (`backup`).
    assert_eq!(r.headers["x-sluice-model"], "strong");
    let strong = sluice_sim::reply::chat_reply("gpt-4o", q, None).text;
    assert_eq!(r.body["choices"][0]["message"]["content"], strong);
    assert_eq!(r.record.upstream_calls, 2);
    assert_eq!(
        r.record.output_checks.as_deref(),
        Some("cheap:fail,strong:pass")
    );
    assert_eq!(r.record.output_check.as_deref(), Some("pass"));
    assert_eq!(r.record.outcome, Outcome::Ok);
    // Both answers' tokens are counted: more than the strong answer alone.
    let usage = &r.body["usage"];
    let one =
        usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap();
    let recorded = u64::from(r.record.prompt_tokens + r.record.completion_tokens);
    assert!(recorded > one, "{recorded} vs {one}");
}

#[tokio::test]
async fn the_strong_model_is_asked_once() {
    // Both answers fail: the strong model is asked once, not its fallbacks after it nor
    // the cheap model's.
    let mut h = harness(&escalating(r#"{ max_words = 1 }"#)).await;
    let r = h.send("/v1/chat/completions", ask("hello"), &[AUTH]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "output_invalid");
    assert_eq!(r.record.upstream_calls, 2);
    assert_eq!(
        r.record.output_checks.as_deref(),
        Some("cheap:fail,strong:fail")
    );
}

#[test]
fn the_resolved_routing_table_reads_in_order() {
    let config = Config::from_toml(
        CONFIG,
        &[("X", "")],
        ConfigSource::Embedded { simulated: false },
    )
    .unwrap();
    let table = sluice_gateway::routing::rules::routing_table(&config);
    let expected = "\
routing: requests for model `auto`
rules, first match wins:
  1. long-input: input tokens > 200 -> strong
  2. sensitive: feature in [legal, medical] -> strong
  3. asked: x-sluice-quality: high -> strong
defaults, first match wins:
  feature = research -> strong
  tier = pro -> strong
  otherwise -> cheap (fallbacks: backup)
escalation on a failed output check, first match wins:
  escalate: output check failed (on_fail = \"escalate\") -> strong
";
    assert_eq!(table, expected);
    let off = Config::from_toml(
        "[[providers]]\nname = \"sim\"\nkind = \"sim\"\n",
        &[("X", "")],
        ConfigSource::Embedded { simulated: false },
    )
    .unwrap();
    assert!(sluice_gateway::routing::rules::routing_table(&off).starts_with("routing: off"));
}

#[test]
fn routing_problems_are_reported_with_their_paths() {
    let text = r#"
        [[providers]]
        name = "sim"
        kind = "sim"
        [[models]]
        name = "cheap"
        provider = "sim"
        [[models]]
        name = "text-embedding-3-small"
        provider = "sim"
        [routing]
        alias = "cheap"
        defaults = [{ model = "cheap" }, { tier = "gold", model = "cheap" }]
        [[routing.rules]]
        model = "nope"
        [[routing.rules]]
        features = ["x"]
        model = "text-embedding-3-small"
    "#;
    let err = Config::from_toml(
        text,
        &[("X", "")],
        ConfigSource::Embedded { simulated: false },
    )
    .unwrap_err();
    let paths: Vec<&str> = err.problems.iter().map(|p| p.path.as_str()).collect();
    for p in [
        "routing.default",
        "routing.alias",
        "routing.defaults[0]",
        "routing.rules[0].model",
        "routing.rules[0]",
        "routing.rules[1].model",
    ] {
        assert!(paths.contains(&p), "{p} missing from {paths:?}");
    }
}
