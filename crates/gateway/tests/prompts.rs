//! Prompts through the whole pipeline: resolution by version and label, variable
//! checks (400 naming the variable), rendering, the record's prompt fields, model and
//! parameter defaults, the prompt's fallback, reload (label moves, broken files), and
//! the watcher switching traffic without a restart.

#![expect(
    clippy::unwrap_used,
    reason = "test helpers outside #[test] fns fail loudly by design"
)]

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use sluice_gateway::telemetry::Outcome;

mod support;

use support::harness;

const V1: &str = r#"
model = "gpt-4o-mini"
system = "You greet people."
user = "Say hello to {{ name }} from {{ company }}."

[variables.name]
type = "string"
max_length = 10

[variables.company]
type = "string"

[variables.count]
type = "integer"
required = false

[[tests]]
name = "hello"
variables = { name = "Dana", company = "Acme" }
assert = [{ min_words = 1 }]
"#;

const V2: &str = r#"
model = "gpt-4o-mini"
system = "You greet people warmly."
user = "Say a warm hello to {{ name }} from {{ company }}."
validators = [{ max_words = 3 }]
on_fail = "fallback"
fallback = "Hello {{ name }}!"

[params]
temperature = 0.2
max_tokens = 50

[variables.name]
type = "string"
max_length = 10

[variables.company]
type = "string"
"#;

/// A fresh folder with `greet/v1.toml` and `greet/v2.toml`, removed when dropped.
fn prompt_dir() -> PromptDir {
    let dir = tempfile::Builder::new()
        .prefix("sluice-prompts-")
        .tempdir()
        .unwrap();
    std::fs::create_dir_all(dir.path().join("greet")).unwrap();
    std::fs::write(dir.path().join("greet/v1.toml"), V1).unwrap();
    std::fs::write(dir.path().join("greet/v2.toml"), V2).unwrap();
    PromptDir(dir)
}

/// A test's prompt folder: a `Path` to the test, deleted with it.
struct PromptDir(tempfile::TempDir);

impl std::ops::Deref for PromptDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

fn config(dir: &Path, production: u32) -> String {
    format!(
        r#"
[[providers]]
name = "sim"
kind = "sim"

[[models]]
name = "gpt-4o-mini"
provider = "sim"

[[models]]
name = "gpt-4o"
provider = "sim"

[prompts]
dir = "{}"
watch = true
debounce = "50ms"

[prompts.labels.greet]
production = {production}
"#,
        dir.display()
    )
}

fn body(prompt: Option<&str>, variables: Value) -> Value {
    let mut sluice = json!({"variables": variables});
    if let Some(p) = prompt {
        sluice["prompt"] = json!(p);
    }
    json!({"model": "prompt", "sluice": sluice})
}

fn answer(reply: &support::Reply) -> String {
    reply.body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn a_version_renders_its_messages_and_names_itself_in_the_record() {
    let dir = prompt_dir();
    let mut h = harness(&config(&dir, 1)).await;
    let r = h
        .send(
            "/v1/chat/completions",
            body(
                None,
                json!({"name": "Dana", "company": "Acme", "unused": true}),
            ),
            &[("x-sluice-prompt", "greet@1")],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The simulator's answer is a pure function of the messages it got: the rendered ones.
    let expected = sluice_sim::reply::chat_reply(
        "gpt-4o-mini",
        "You greet people.\nSay hello to Dana from Acme.",
        None,
    );
    assert_eq!(answer(&r), expected.text);
    assert_eq!(r.headers["x-sluice-model"], "gpt-4o-mini");
    let v1 = h.gateway.prompts.registry().resolve("greet@1").unwrap();
    assert_eq!(r.record.prompt_id.as_deref(), Some("greet"));
    assert_eq!(r.record.prompt_version.as_deref(), Some("1"));
    assert_eq!(r.record.prompt_hash.as_deref(), Some(v1.hash.as_str()));
    assert_eq!(r.record.model_requested.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(v1.hash.len(), 16);

    // The client's own messages follow the rendered ones; its explicit model wins.
    let mut b = body(Some("greet@v1"), json!({"name": "Dana", "company": "Acme"}));
    b["model"] = json!("gpt-4o");
    b["messages"] = json!([{"role": "user", "content": "And add a joke."}]);
    let r = h.send("/v1/chat/completions", b, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let expected = sluice_sim::reply::chat_reply(
        "gpt-4o",
        "You greet people.\nSay hello to Dana from Acme.\nAnd add a joke.",
        None,
    );
    assert_eq!(answer(&r), expected.text);
    assert_eq!(r.headers["x-sluice-model"], "gpt-4o");
}

#[tokio::test]
async fn bad_variables_are_400s_naming_the_variable() {
    let dir = prompt_dir();
    let mut h = harness(&config(&dir, 1)).await;
    let cases = [
        (
            json!({"name": "Dana"}),
            "missing_variable",
            "company",
            "required",
        ),
        (
            json!({"name": "Dana", "company": null}),
            "missing_variable",
            "company",
            "required",
        ),
        (
            json!({"name": 42, "company": "Acme"}),
            "invalid_variable",
            "name",
            "must be a string, not a number",
        ),
        (
            json!({"name": "Dana", "company": "Acme", "count": "3"}),
            "invalid_variable",
            "count",
            "must be an integer",
        ),
        (
            json!({"name": "Bartholomew!", "company": "Acme"}),
            "invalid_variable",
            "name",
            "12 characters, at most 10",
        ),
    ];
    for (variables, code, name, says) in cases {
        let r = h
            .send(
                "/v1/chat/completions",
                body(Some("greet@1"), variables.clone()),
                &[],
            )
            .await;
        assert_eq!(r.status, 400, "{variables}: {}", r.text);
        let e = &r.body["error"];
        assert_eq!(e["code"], code, "{variables}: {}", r.text);
        assert_eq!(e["param"], format!("sluice.variables.{name}"));
        assert_eq!(e["type"], "invalid_request_error");
        assert!(e["message"].as_str().unwrap().contains(says), "{}", r.text);
        assert_eq!(r.record.outcome, Outcome::RejectedInput);
        assert_eq!(r.record.prompt_id.as_deref(), Some("greet"));
        assert_eq!(r.record.upstream_calls, 0);
    }
}

#[tokio::test]
async fn unknown_prompts_versions_and_labels_are_refused_clearly() {
    let dir = prompt_dir();
    let mut h = harness(&config(&dir, 1)).await;
    let vars = json!({"name": "Dana", "company": "Acme"});
    for (reference, status, code, says) in [
        (
            "nope@1",
            404,
            "prompt_not_found",
            "no prompt `nope` (prompts: greet)",
        ),
        (
            "greet@9",
            404,
            "prompt_not_found",
            "has no version 9 (versions: 1, 2)",
        ),
        (
            "greet@canary",
            404,
            "prompt_not_found",
            "no label `canary` (labels: production)",
        ),
        ("greet@", 400, "invalid_prompt_reference", "ID@VERSION"),
        ("a/b@1", 400, "invalid_prompt_reference", "not a prompt id"),
    ] {
        let r = h
            .send(
                "/v1/chat/completions",
                body(Some(reference), vars.clone()),
                &[],
            )
            .await;
        assert_eq!(r.status, status, "{reference}: {}", r.text);
        assert_eq!(r.body["error"]["code"], code, "{reference}");
        assert_eq!(r.body["error"]["param"], "sluice.prompt");
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{reference}: {message}");
    }
    // Without a prompt, an empty `messages` is still refused as before.
    let r = h
        .send(
            "/v1/chat/completions",
            json!({"model": "gpt-4o-mini", "messages": []}),
            &[],
        )
        .await;
    assert_eq!(r.status, 400);
    assert_eq!(r.body["error"]["param"], "messages");
}

#[tokio::test]
async fn parameters_fill_gaps_and_the_prompt_fallback_answers_a_failed_check() {
    let dir = prompt_dir();
    let mut h = harness(&config(&dir, 2)).await;
    // v2 allows 3 words: the simulator's 12+ word answer fails and the fallback answers.
    let r = h
        .send(
            "/v1/chat/completions",
            body(
                Some("greet@production"),
                json!({"name": "Dana", "company": "Acme"}),
            ),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(answer(&r), "Hello Dana!");
    assert_eq!(r.headers["x-sluice-fallback"], "template");
    assert_eq!(r.record.prompt_version.as_deref(), Some("2"));
    assert_eq!(r.record.output_check.as_deref(), Some("fail:fallback"));
    // The request's explicit max_tokens wins over the prompt's 50: cut to a word, the
    // answer passes the 3-word check and no fallback is needed.
    let mut b = body(Some("greet@2"), json!({"name": "Dana", "company": "Acme"}));
    b["max_tokens"] = json!(3);
    let r = h.send("/v1/chat/completions", b, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(answer(&r), "Simulated");
    assert_eq!(r.body["choices"][0]["finish_reason"], "length");
    assert!(r.headers.get("x-sluice-fallback").is_none());
    assert_eq!(r.record.output_check.as_deref(), Some("pass"));
}

#[tokio::test]
async fn moving_a_label_in_config_switches_traffic_and_a_broken_file_keeps_the_last_good() {
    let dir = prompt_dir();
    let mut h = harness(&config(&dir, 1)).await;
    let vars = json!({"name": "Dana", "company": "Acme"});
    let b = body(Some("greet@production"), vars.clone());
    let r = h.send("/v1/chat/completions", b.clone(), &[]).await;
    assert_eq!(r.record.prompt_version.as_deref(), Some("1"));

    // The label moves: the same gateway now serves v2.
    let moved = sluice_gateway::config::Config::from_toml(
        &config(&dir, 2),
        &[("UNUSED", "")],
        sluice_gateway::config::ConfigSource::Embedded { simulated: false },
    )
    .unwrap();
    h.gateway.prompts.reload(Some(moved.prompts));
    let r = h.send("/v1/chat/completions", b, &[]).await;
    assert_eq!(r.record.prompt_version.as_deref(), Some("2"));

    // v1 breaks on disk: the registry keeps the copy that loaded, and says so.
    let good = h
        .gateway
        .prompts
        .registry()
        .resolve("greet@1")
        .unwrap()
        .hash
        .clone();
    std::fs::write(dir.join("greet/v1.toml"), "system = \"{{ unclosed\"\n").unwrap();
    let registry = h.gateway.prompts.reload(None);
    assert_eq!(registry.resolve("greet@1").unwrap().hash, good);
    let problems: Vec<String> = registry.problems.iter().map(|p| p.to_string()).collect();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("v1.toml") && p.contains("invalid template")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("keeping the last good greet@1")),
        "{problems:?}"
    );
}

#[tokio::test]
async fn the_watcher_moves_traffic_when_the_config_label_changes() {
    let dir = prompt_dir();
    let config_path = dir.join("sluice.toml");
    std::fs::write(&config_path, config(&dir, 1)).unwrap();
    let running = serve(&config_path).await;
    let url = running.url();
    let (status, v1_answer) = ask_prompt(&url, "greet@production").await;
    assert_eq!(status, 200);
    assert!(
        v1_answer
            .as_deref()
            .is_some_and(|a| !a.starts_with("Hello Dana!")),
        "{v1_answer:?}"
    );
    // Give the watcher a moment to be armed, then move the label in the file.
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(&config_path, config(&dir, 2)).unwrap();
    production_is_v2(&url).await;
    running.stop().await;
}

/// Start a gateway (its request log in memory) on the config file at `path`.
async fn serve(path: &Path) -> sluice_gateway::server::Running {
    let cfg = sluice_gateway::config::Config::load(path, &[("UNUSED", "")]).unwrap();
    sluice_gateway::server::start(
        sluice_gateway::config::Config {
            storage: sluice_gateway::config::StorageConfig {
                target: sluice_gateway::store::StorageTarget::Memory,
                ..cfg.storage.clone()
            },
            ..cfg
        },
        "127.0.0.1:0".parse().unwrap(),
        Vec::new(),
    )
    .await
    .unwrap()
}

/// Ask `prompt` of `url` for Dana from Acme: the status and the answer's text.
async fn ask_prompt(url: &str, prompt: &str) -> (u16, Option<String>) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .header("x-sluice-prompt", prompt)
        .json(&body(None, json!({"name": "Dana", "company": "Acme"})))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let v = r.json::<Value>().await.unwrap();
    (
        status,
        v["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_string),
    )
}

/// Wait (up to 15 s) until `ask` gives what `done` wants.
async fn eventually<F, Fut>(what: &str, mut ask: F, done: impl Fn(&(u16, Option<String>)) -> bool)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (u16, Option<String>)>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let got = ask().await;
        if done(&got) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 15 s, last {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until `greet@production` answers as v2 does (its fallback, "Hello Dana!"): the
/// label move (`config(_, 2)`) was picked up.
async fn production_is_v2(url: &str) {
    eventually(
        "the label move",
        || ask_prompt(url, "greet@production"),
        |r| r.1.as_deref() == Some("Hello Dana!"),
    )
    .await;
}

/// A config change that moves `[prompts] dir` moves the watcher too: a version added to
/// the new folder afterwards is served without a restart or a signal.
#[tokio::test]
async fn the_watcher_follows_the_prompt_folder_when_the_config_moves_it() {
    let (first, second) = (prompt_dir(), prompt_dir());
    // The config lives in a folder of its own, beside neither prompt folder.
    let config_dir = tempfile::tempdir().unwrap();
    let config_path = config_dir.path().join("sluice.toml");
    std::fs::write(&config_path, config(&first, 1)).unwrap();
    let running = serve(&config_path).await;
    let url = running.url();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The config now points at the second folder, and moves the label so it shows.
    std::fs::write(&config_path, config(&second, 2)).unwrap();
    production_is_v2(&url).await;
    // A new version in the second folder: only a watch on that folder sees it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(
        second.join("greet/v3.toml"),
        V2.replace(
            "fallback = \"Hello {{ name }}!\"",
            "fallback = \"Hi there {{ name }}!\"",
        ),
    )
    .unwrap();
    eventually(
        "a version added to the moved folder",
        || ask_prompt(&url, "greet@3"),
        |r| r.0 == 200,
    )
    .await;
    assert_eq!(
        ask_prompt(&url, "greet@3").await.1.as_deref(),
        Some("Hi there Dana!")
    );
    running.stop().await;
}

/// Reloading reads the prompt files, which the watcher sees (inotify reports opens and
/// reads): that must not set off another reload, and another, for ever. One edit, one
/// reload (maybe two, when the editor's writes straddle a debounce window).
#[tokio::test]
async fn reading_the_files_does_not_set_off_more_reloads() {
    let dir = prompt_dir();
    let config_path = dir.join("sluice.toml");
    std::fs::write(&config_path, config(&dir, 1)).unwrap();
    let running = serve(&config_path).await;
    let url = running.url();
    let reloads = || running.gateway.prompts.reloads();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = reloads();
    std::fs::write(&config_path, config(&dir, 2)).unwrap();
    production_is_v2(&url).await;
    // Ten debounce windows later, nothing else changed: no reload since.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_edit = reloads();
    assert!(
        (1..=2).contains(&(after_edit - before)),
        "{before} -> {after_edit}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        reloads(),
        after_edit,
        "reloads kept coming with nothing changed"
    );
    running.stop().await;
}

/// A prompt request for the routing alias is routed over the messages the prompt
/// rendered (the client sent none): the input-size rule sees the prompt's tokens.
#[tokio::test]
async fn routing_reads_the_messages_a_prompt_rendered() {
    let dir = prompt_dir();
    std::fs::write(
        dir.join("greet/v3.toml"),
        V1.replace("model = \"gpt-4o-mini\"", "model = \"auto\""),
    )
    .unwrap();
    for (threshold, expected) in [(5, "gpt-4o"), (5000, "gpt-4o-mini")] {
        let text = format!(
            "{}\n[routing]\ndefault = \"gpt-4o-mini\"\n[[routing.rules]]\nname = \"long\"\n\
             input_tokens_over = {threshold}\nmodel = \"gpt-4o\"\n",
            config(&dir, 1)
        );
        let mut h = harness(&text).await;
        let mut b = body(Some("greet@1"), json!({"name": "Dana", "company": "Acme"}));
        b["model"] = json!("auto");
        let r = h.send("/v1/chat/completions", b, &[]).await;
        assert_eq!(r.status.as_u16(), 200, "{}", r.text);
        assert_eq!(r.headers["x-sluice-model"], expected, "over {threshold}");
        assert_eq!(r.record.model_requested.as_deref(), Some("auto"));
        assert_eq!(r.record.prompt_version.as_deref(), Some("1"));
        assert!(r.record.routed_by.is_some(), "over {threshold}");
        // A version whose own model is the alias is routed the same way.
        let r = h
            .send(
                "/v1/chat/completions",
                body(Some("greet@3"), json!({"name": "Dana", "company": "Acme"})),
                &[],
            )
            .await;
        assert_eq!(r.status.as_u16(), 200, "{}", r.text);
        assert_eq!(
            r.headers["x-sluice-model"], expected,
            "v3, over {threshold}"
        );
    }
}

#[tokio::test]
async fn a_prompt_streams_like_any_request() {
    let dir = prompt_dir();
    let mut h = harness(&config(&dir, 1)).await;
    let mut b = body(Some("greet"), json!({"name": "Dana", "company": "Acme"}));
    b["stream"] = json!(true);
    let r = h.send("/v1/chat/completions", b, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.text.contains("data: [DONE]"), "{}", r.text);
    // A bare id is the highest version: v2, whose 3-word check needs the whole answer,
    // so the fallback is replayed as a stream.
    assert!(r.text.contains("Hello Dana!"), "{}", r.text);
    assert!(r.record.stream);
    assert_eq!(r.record.prompt_version.as_deref(), Some("2"));
}

#[tokio::test]
async fn a_prompt_request_may_omit_model_and_one_without_a_prompt_may_not() {
    let dir = prompt_dir();
    let mut h = harness(&config(&dir, 1)).await;
    let variables = json!({"name": "Dana", "company": "Acme"});
    // Named by the header or in the body: the prompt's own model answers.
    let by_header = json!({"sluice": {"variables": variables}});
    let by_body = json!({"sluice": {"prompt": "greet@1", "variables": variables}});
    for (b, headers) in [
        (by_header, &[("x-sluice-prompt", "greet@1")][..]),
        (by_body, &[][..]),
    ] {
        let r = h.send("/v1/chat/completions", b, headers).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.headers["x-sluice-model"], "gpt-4o-mini");
        assert_eq!(r.record.model_requested.as_deref(), Some("gpt-4o-mini"));
    }
    // No prompt, no model: a 400 that names the parameter, absent or empty alike.
    let messages = json!([{"role": "user", "content": "hi"}]);
    for b in [
        json!({"messages": messages}),
        json!({"model": " ", "messages": messages}),
    ] {
        let r = h.send("/v1/chat/completions", b, &[]).await;
        assert_eq!(r.status, 400, "{}", r.text);
        assert_eq!(r.body["error"]["code"], "invalid_request", "{}", r.text);
        assert_eq!(r.body["error"]["param"], "model", "{}", r.text);
        let message = r.body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("`model` is required"), "{message}");
    }
}

/// A prompt-target experiment: requests naming the prompt get the variant's version,
/// sticky per user, rendered by the resolve stage and named in the record and header;
/// tiers with a model list still accept the prompt's model (the 403 check runs on the
/// model the prompt resolves to).
#[tokio::test]
async fn an_experiment_serves_each_user_the_version_of_their_variant() {
    let dir = prompt_dir();
    let experiment = r#"
[limits]
default_tier = "free"

[[tiers]]
name = "free"
models = ["gpt-4o-mini"]

[[experiments]]
name = "greeting"
target = "prompt"
prompt = "greet"
variants = [
  { name = "one", weight = 50, prompt = "greet@1" },
  { name = "two", weight = 50, prompt = "greet@2" },
]
"#;
    let mut h = harness(&format!("{}{experiment}", config(&dir, 1))).await;
    let mut seen = std::collections::HashMap::new();
    for i in 0..40 {
        let user = format!("user-{}", i % 20);
        let mut b = body(
            Some("greet@production"),
            json!({"name": "Dana", "company": "Acme"}),
        );
        b["user"] = json!(user);
        let r = h.send("/v1/chat/completions", b, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let variant = r.record.variant.clone().unwrap();
        let version = r.record.prompt_version.clone().unwrap();
        assert_eq!(r.record.experiment.as_deref(), Some("greeting"));
        assert_eq!(
            r.headers["x-sluice-experiment"],
            format!("greeting={variant}").as_str()
        );
        // The variant decides the version, whatever the label points to.
        let want = if variant == "one" { "1" } else { "2" };
        assert_eq!(version, want, "variant {variant}");
        let expected = if variant == "one" {
            "You greet people.\nSay hello to Dana from Acme."
        } else {
            "You greet people warmly.\nSay a warm hello to Dana from Acme."
        };
        if variant == "one" {
            let reply = sluice_sim::reply::chat_reply("gpt-4o-mini", expected, None);
            assert_eq!(answer(&r), reply.text);
        }
        // Sticky: a user's second request lands in the same variant.
        if let Some(before) = seen.insert(user.clone(), variant.clone()) {
            assert_eq!(before, variant, "{user} moved");
        }
    }
    let variants: std::collections::HashSet<_> = seen.values().collect();
    assert_eq!(variants.len(), 2, "20 users all landed in one variant");
}

/// The test runner on `greet@2` (3 words at most, else the fallback "Hello NAME!") and
/// `down@1` (its only model always fails), each with a case the fallback's text would
/// pass.
fn runner_config() -> (PromptDir, sluice_gateway::config::Config) {
    use sluice_gateway::config::{Config, ConfigSource};
    let dir = prompt_dir();
    std::fs::remove_file(dir.join("greet/v1.toml")).unwrap();
    let case = r#"
[[tests]]
name = "warm"
variables = { name = "Dana", company = "Acme" }
assert = [{ starts_with = "Hello Dana" }]
"#;
    std::fs::write(dir.join("greet/v2.toml"), format!("{V2}{case}")).unwrap();
    std::fs::create_dir_all(dir.join("down")).unwrap();
    let down = V2.replace("model = \"gpt-4o-mini\"", "model = \"broken\"\nlabels = []");
    std::fs::write(dir.join("down/v1.toml"), format!("{down}{case}")).unwrap();
    let toml = format!(
        r#"
[[providers]]
name = "sim"
kind = "sim"

[[providers]]
name = "down"
kind = "sim"
chaos = {{ fail_first = 1000, fail_status = 500 }}

[[models]]
name = "gpt-4o-mini"
provider = "sim"

[[models]]
name = "broken"
provider = "down"

[retry]
max_attempts = 1

[prompts]
dir = "{}"
watch = false
"#,
        dir.display()
    );
    let config = Config::from_toml(
        &toml,
        &[("UNUSED", "")],
        ConfigSource::Embedded { simulated: false },
    )
    .unwrap();
    (dir, config)
}

async fn run_tests(
    config: &sluice_gateway::config::Config,
    prompt: &str,
    mode: sluice_gateway::prompts::runner::Mode,
) -> sluice_gateway::prompts::runner::TestReport {
    use sluice_gateway::prompts::runner::{self, Options, Quiet};
    let options = Options {
        prompt: Some(prompt.into()),
        repeat: 1,
        mode,
    };
    runner::run(config.clone(), &options, &mut Quiet)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_run_the_fallback_answered_fails_and_records_the_models_answer() {
    use sluice_gateway::prompts::runner::Mode;
    let (dir, config) = runner_config();
    // The fallback's "Hello Dana!" would pass the case; the model's answer does not.
    let report = run_tests(&config, "greet@2", Mode::Live).await;
    assert!(!report.passed(), "{}", report.text());
    let run = &report.cases[0].runs[0];
    assert!(run.fallback);
    assert!(
        run.failures[0].starts_with(
            "answered by the fallback template: gpt-4o-mini's answer failed the prompt's validators: max_words"
        ),
        "{:?}",
        run.failures
    );
    assert!(
        run.failures[1].contains(r#"does not start with "Hello Dana""#),
        "{:?}",
        run.failures
    );
    let model_said = run.answer.clone().unwrap();
    assert!(!model_said.starts_with("Hello Dana"), "{model_said}");
    let text = report.text();
    assert!(text.contains("FAIL greet@2 warm"), "{text}");
    assert!(
        text.contains("run 1: answered by the fallback template: gpt-4o-mini's answer"),
        "{text}"
    );
    assert!(
        text.contains(&format!("the model's answer: {model_said}")),
        "{text}"
    );
    assert!(
        text.contains("1 cases, 1 failed; 0/1 runs passed"),
        "{text}"
    );
    let xml = report.junit().unwrap();
    assert!(
        xml.contains(r#"failures="1""#) && xml.contains("answered by the fallback template"),
        "{xml}"
    );

    // Recorded: the model's answer, never the fallback's text; replayed, the same verdict.
    let report = run_tests(&config, "greet@2", Mode::Record).await;
    assert!(!report.passed());
    let cassette: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("greet/v2.cassette.json")).unwrap())
            .unwrap();
    assert_eq!(cassette["answers"]["warm#0"]["text"], model_said.as_str());
    assert_eq!(cassette["answers"]["warm#0"]["model"], "gpt-4o-mini");
    let report = run_tests(&config, "greet@2", Mode::Replay).await;
    let run = &report.cases[0].runs[0];
    assert!(run.fallback && !run.passed(), "{}", report.text());
    assert_eq!(run.answer.as_deref(), Some(model_said.as_str()));
    assert!(
        run.failures[0].starts_with("answered by the fallback template: gpt-4o-mini's answer"),
        "{:?}",
        run.failures
    );
}

#[tokio::test]
async fn a_run_no_model_answered_fails_and_is_not_recorded() {
    use sluice_gateway::prompts::runner::Mode;
    let (dir, config) = runner_config();
    let report = run_tests(&config, "down@1", Mode::Record).await;
    assert!(!report.passed(), "{}", report.text());
    let run = &report.cases[0].runs[0];
    assert!(run.fallback && run.answer.is_none(), "{run:?}");
    assert!(
        run.failures[0]
            .starts_with("answered by the fallback template: every model failed; the last error: "),
        "{:?}",
        run.failures
    );
    assert!(
        run.failures
            .iter()
            .any(|f| f.starts_with("not recorded: no model answered")),
        "{:?}",
        run.failures
    );
    let cassette: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("down/v1.cassette.json")).unwrap())
            .unwrap();
    assert_eq!(cassette["answers"], json!({}), "{cassette}");
}
