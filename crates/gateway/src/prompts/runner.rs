//! The prompt test runner: every test case of every prompt version (or one prompt),
//! sent through the same pipeline as live traffic (an in-process gateway built from the
//! config), its answer held to the case's assertions, each case `repeat` times for a
//! pass rate. `Record` saves the answers to the version's cassette; `Replay` answers
//! from it through a [`ReplayProvider`] (no network). A run the fallback template
//! answered fails: the runner keeps each answer a model gave (a [`Witness`] below the
//! pipeline), so it judges, reports and records what the model said, not the fallback.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use super::cassette::{self, Cassette, Recording, ReplayProvider};
use super::{PromptRegistry, PromptVersion, Version};
use crate::config::Config;
use crate::limits::capacity::Capacity;
use crate::pipeline::{Gateway, HEADER_CACHE, HEADER_FALLBACK, HEADER_MODEL};
use crate::providers::{ChatCall, ChunkStream, Provider, Timeouts, UpstreamError};
use crate::store::{StorageTarget, Store};
use crate::wire::{ChatResponse, EmbeddingsRequest, EmbeddingsResponse};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Ask the configured models.
    #[default]
    Live,
    /// Ask them and save the answers to each version's cassette.
    Record,
    /// Answer from the cassettes; no upstream is called.
    Replay,
}

#[derive(Debug, Clone)]
pub struct Options {
    /// `ID`, or `ID@VERSION` / `ID@LABEL` for one version; `None`: every prompt.
    pub prompt: Option<String>,
    /// Runs per case (the pass rate shows flaky prompts).
    pub repeat: u32,
    pub mode: Mode,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            prompt: None,
            repeat: 1,
            mode: Mode::Live,
        }
    }
}

/// One run of one case.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub run: u32,
    /// Failed assertions, or why there was no answer (or only the fallback's).
    pub failures: Vec<String>,
    /// The model's answer: with a fallback, the one it replaced (when a model answered).
    pub answer: Option<String>,
    /// The model that answered (`x-sluice-model`).
    pub model: Option<String>,
    /// A fallback template answered: the run failed, whatever the assertions say.
    pub fallback: bool,
    /// The answer's usage (prompt, completion tokens).
    pub usage: (u32, u32),
    pub duration: Duration,
}

impl RunOutcome {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Every run of one case.
#[derive(Debug, Clone)]
pub struct CaseReport {
    /// `id@version`.
    pub prompt: String,
    pub hash: String,
    pub case: String,
    pub runs: Vec<RunOutcome>,
}

impl CaseReport {
    pub fn passes(&self) -> usize {
        self.runs.iter().filter(|r| r.passed()).count()
    }

    pub fn passed(&self) -> bool {
        self.passes() == self.runs.len()
    }
}

/// What a test run found.
#[derive(Debug, Clone, Default)]
pub struct TestReport {
    pub cases: Vec<CaseReport>,
    /// Prompt files that did not load, cassettes that could not be written, a
    /// selection with no test cases.
    pub problems: Vec<String>,
}

impl TestReport {
    pub fn passed(&self) -> bool {
        self.problems.is_empty() && self.cases.iter().all(CaseReport::passed)
    }

    /// The readable report: one line per case with its pass rate, each failure under
    /// it, then a summary line.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for p in &self.problems {
            out.push_str(&format!("error: {p}\n"));
        }
        for c in &self.cases {
            let mark = if c.passed() { "ok  " } else { "FAIL" };
            let rate = if c.runs.len() > 1 {
                format!(
                    " ({}/{} runs passed, {:.0}%)",
                    c.passes(),
                    c.runs.len(),
                    100.0 * c.passes() as f64 / c.runs.len() as f64
                )
            } else {
                String::new()
            };
            out.push_str(&format!("{mark} {} {}{rate}\n", c.prompt, c.case));
            for r in c.runs.iter().filter(|r| !r.passed()) {
                for f in &r.failures {
                    out.push_str(&format!("       run {}: {f}\n", r.run + 1));
                }
                if let Some(a) = &r.answer {
                    let which = if r.fallback {
                        "the model's answer"
                    } else {
                        "answer"
                    };
                    out.push_str(&format!("       {which}: {}\n", one_line(a, 300)));
                }
            }
        }
        let failed = self.cases.iter().filter(|c| !c.passed()).count();
        let runs: usize = self.cases.iter().map(|c| c.runs.len()).sum();
        let passes: usize = self.cases.iter().map(CaseReport::passes).sum();
        out.push_str(&format!(
            "{} cases, {} failed; {passes}/{runs} runs passed{}\n",
            self.cases.len(),
            failed,
            if self.problems.is_empty() {
                String::new()
            } else {
                format!("; {} problem(s)", self.problems.len())
            }
        ));
        out
    }

    /// JUnit XML: one suite per prompt version, one test case per case (its runs'
    /// failures in the failure message).
    pub fn junit(&self) -> anyhow::Result<String> {
        use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
        let mut report = Report::new("sluice prompts test");
        let mut suites: BTreeMap<&str, TestSuite> = BTreeMap::new();
        for c in &self.cases {
            let status = if c.passed() {
                TestCaseStatus::success()
            } else {
                let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                let failures: Vec<String> = c
                    .runs
                    .iter()
                    .filter(|r| !r.passed())
                    .flat_map(|r| {
                        r.failures
                            .iter()
                            .map(move |f| format!("run {}: {f}", r.run + 1))
                    })
                    .collect();
                s.set_message(format!("{}/{} runs passed", c.passes(), c.runs.len()));
                s.set_description(failures.join("\n"));
                s
            };
            let mut case = TestCase::new(c.case.clone(), status);
            case.set_classname(c.prompt.clone());
            case.set_time(c.runs.iter().map(|r| r.duration).sum());
            suites
                .entry(c.prompt.as_str())
                .or_insert_with(|| TestSuite::new(c.prompt.clone()))
                .add_test_case(case);
        }
        if !self.problems.is_empty() {
            let mut s = TestCaseStatus::non_success(NonSuccessKind::Error);
            s.set_message(self.problems.join("; "));
            s.set_description(self.problems.join("\n"));
            let mut suite = TestSuite::new("prompt files");
            suite.add_test_case(TestCase::new("load", s));
            report.add_test_suite(suite);
        }
        report.add_test_suites(suites.into_values());
        Ok(report.to_string()?)
    }
}

fn one_line(text: &str, max: usize) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > max {
        format!("{}...", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}

/// Told about progress as runs finish (a progress bar, or plain lines).
pub trait Progress {
    fn start(&mut self, total_runs: u64);
    fn run_done(&mut self, prompt: &str, case: &str, outcome: &RunOutcome);
    fn finish(&mut self);
}

/// No progress output.
pub struct Quiet;

impl Progress for Quiet {
    fn start(&mut self, _: u64) {}
    fn run_done(&mut self, _: &str, _: &str, _: &RunOutcome) {}
    fn finish(&mut self) {}
}

/// The versions `--prompt` selects that have test cases: every version's, one
/// prompt's, or one version's. An unknown prompt or version is an error; a selection
/// with no test cases is the caller's to report (see [`nothing_selected`]).
fn select(registry: &PromptRegistry, prompt: Option<&str>) -> anyhow::Result<Vec<Version>> {
    let versions = match prompt {
        None => registry.all().cloned().collect(),
        Some(p) if p.contains('@') => vec![registry.resolve(p)?],
        Some(p) => {
            registry.resolve(p)?;
            registry.all().filter(|v| v.id == p).cloned().collect()
        }
    };
    Ok(versions
        .into_iter()
        .filter(|v: &Version| !v.tests.is_empty())
        .collect())
}

/// Why nothing ran: a run of no cases proves nothing, so it fails rather than pass.
fn nothing_selected(config: &Config, prompt: Option<&str>) -> String {
    match prompt {
        Some(p) if p.contains('@') => {
            format!("nothing to test: `{p}` has no test cases; add [[tests]] to its file")
        }
        Some(p) => format!(
            "nothing to test: no version of prompt `{p}` has test cases; add [[tests]] to its files"
        ),
        None => format!(
            "nothing to test: no prompt version under {} has test cases; add [[tests]] to the prompt files",
            config
                .prompts
                .dir
                .as_deref()
                .map(|d| d.display().to_string())
                .unwrap_or_default()
        ),
    }
}

/// Run the test cases through an in-process gateway built from `config` (its request
/// log kept in memory, so tests leave nothing in the real one).
pub async fn run(
    mut config: Config,
    options: &Options,
    progress: &mut dyn Progress,
) -> anyhow::Result<TestReport> {
    if config.prompts.dir.is_none() {
        anyhow::bail!("no prompts configured: set [prompts] dir in the config");
    }
    let registry = PromptRegistry::load(&config.prompts, None);
    let mut report = TestReport {
        cases: Vec::new(),
        problems: registry.problems.iter().map(|p| p.to_string()).collect(),
    };
    let versions = select(&registry, options.prompt.as_deref())?;
    if versions.is_empty() {
        report
            .problems
            .push(nothing_selected(&config, options.prompt.as_deref()));
        return Ok(report);
    }
    let repeat = options.repeat.max(1);
    config.storage.target = StorageTarget::Memory;
    let config = Arc::new(config);
    let store = Store::open(&config.storage.target).await?;
    let tasks = TaskTracker::new();
    let replay = ReplayProvider::default();
    let witness = Witness::default();
    let replaying = options.mode == Mode::Replay;
    let (answers, seen) = (replay.clone(), witness.clone());
    let wrap = move |model: &str, provider: Arc<dyn Provider>| -> Arc<dyn Provider> {
        let inner: Arc<dyn Provider> = if replaying {
            Arc::new(answers.clone())
        } else {
            provider
        };
        Arc::new(Watched {
            model: model.to_string(),
            inner,
            witness: seen.clone(),
        })
    };
    let gateway =
        Gateway::start_wrapping_providers(config.clone(), store, Vec::new(), tasks.clone(), &wrap)?;
    gateway.auth.ready().await?;
    let app = crate::server::app(gateway.clone());
    let bearer = config
        .server
        .master_key
        .as_ref()
        .map(|k| format!("Bearer {}", k.expose_secret()));

    let total: usize = versions.iter().map(|v| v.tests.len()).sum::<usize>() * repeat as usize;
    progress.start(total as u64);
    for version in &versions {
        let path = cassette::path_for(version);
        let (tape, tape_error) = match options.mode {
            Mode::Replay => match Cassette::load(version) {
                Ok(c) => (Some(c), None),
                Err(e) => (None, Some(e)),
            },
            Mode::Record => (Some(Cassette::new(version)), None),
            Mode::Live => (None, None),
        };
        let mut recorded = tape.clone().filter(|_| options.mode == Mode::Record);
        for case in &version.tests {
            let mut runs = Vec::with_capacity(repeat as usize);
            for run in 0..repeat {
                let started = Instant::now();
                witness.clear();
                let mut outcome = if options.mode == Mode::Replay {
                    let answer = match (&tape, &tape_error) {
                        (Some(t), _) => t.answer(&path, &case.name, run).cloned(),
                        (None, Some(e)) => Err(e.clone()),
                        (None, None) => Err("no cassette".to_string()),
                    };
                    match answer {
                        Ok(a) => {
                            replay.set(Some(a));
                            ask(&app, bearer.as_deref(), version, &case.variables).await
                        }
                        Err(e) => failed(e),
                    }
                } else {
                    ask(&app, bearer.as_deref(), version, &case.variables).await
                };
                outcome.run = run;
                outcome.duration = started.elapsed();
                // With a fallback, what the model said (if anything) is what is judged
                // and recorded: the fallback's text is never the model's answer.
                let model_answer = if outcome.fallback {
                    let seen = witness.take();
                    outcome.failures.push(fallback_failure(version, &seen));
                    let answer = seen.last_answer().cloned();
                    outcome.answer = answer.as_ref().map(|a| a.text.clone());
                    answer
                } else {
                    outcome.answer.as_ref().map(|text| Recording {
                        model: outcome.model.clone().unwrap_or_default(),
                        text: text.clone(),
                        prompt_tokens: outcome.usage.0,
                        completion_tokens: outcome.usage.1,
                    })
                };
                if let Some(answer) = &outcome.answer {
                    outcome
                        .failures
                        .extend(super::assert::failures(&case.assertions, answer));
                }
                if let Some(c) = recorded.as_mut() {
                    match model_answer {
                        Some(a) => {
                            c.answers.insert(cassette::key(&case.name, run), a);
                        }
                        None if outcome.fallback => outcome.failures.push(
                            "not recorded: no model answered, and the fallback's text is not the model's answer".into(),
                        ),
                        None => {}
                    }
                }
                progress.run_done(&version.reference(), &case.name, &outcome);
                runs.push(outcome);
            }
            report.cases.push(CaseReport {
                prompt: version.reference(),
                hash: version.hash.clone(),
                case: case.name.clone(),
                runs,
            });
        }
        if let Some(c) = recorded
            && let Err(e) = c.save(&path)
        {
            report.problems.push(e);
        }
    }
    progress.finish();
    replay.set(None);
    drop(app);
    drop(gateway);
    tasks.close();
    tasks.wait().await;
    Ok(report)
}

/// Why the fallback answered, from what the models did: the last thing that happened
/// decided it (an answer that failed the prompt's checks, or a failed call).
fn fallback_failure(version: &PromptVersion, seen: &Seen) -> String {
    let why = match seen.events.last() {
        Some(Ok(answer)) => {
            let failures = crate::guard::output::failures(&version.validators, &answer.text);
            if failures.is_empty() {
                format!("{}'s answer was not used", answer.model)
            } else {
                format!(
                    "{}'s answer failed the prompt's validators: {}",
                    answer.model,
                    failures.join("; ")
                )
            }
        }
        Some(Err(error)) => format!("every model failed; the last error: {error}"),
        None => "no model was called".into(),
    };
    format!("answered by the fallback template: {why}")
}

fn failed(why: String) -> RunOutcome {
    RunOutcome {
        run: 0,
        failures: vec![why],
        answer: None,
        model: None,
        fallback: false,
        usage: (0, 0),
        duration: Duration::ZERO,
    }
}

/// One request through the gateway, as a client would send it.
async fn ask(
    app: &axum::Router,
    bearer: Option<&str>,
    version: &PromptVersion,
    variables: &serde_json::Map<String, Value>,
) -> RunOutcome {
    let model = version
        .model
        .clone()
        .unwrap_or_else(|| super::config::DEFAULT_MODEL_ALIAS.to_string());
    let body = json!({
        "model": model,
        "messages": [],
        "sluice": {"prompt": version.reference(), "variables": variables},
    });
    let mut request = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .header(HEADER_CACHE, "no-store");
    if let Some(b) = bearer {
        request = request.header("authorization", b);
    }
    let request = match request.body(Body::from(body.to_string())) {
        Ok(r) => r,
        Err(e) => return failed(format!("cannot build the request: {e}")),
    };
    let response = match app.clone().oneshot(request).await {
        Ok(r) => r,
        Err(e) => match e {},
    };
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let model = header(HEADER_MODEL);
    let fallback = header(HEADER_FALLBACK).as_deref() == Some("template");
    let bytes = match axum::body::to_bytes(response.into_body(), usize::MAX).await {
        Ok(b) => b,
        Err(e) => return failed(format!("cannot read the answer: {e}")),
    };
    let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !status.is_success() {
        let message = json["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        return failed(format!("the gateway answered {status}: {message}"));
    }
    let Some(text) = json["choices"][0]["message"]["content"].as_str() else {
        return failed("the answer has no text content".into());
    };
    let tokens = |field: &str| {
        json["usage"][field]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    };
    RunOutcome {
        run: 0,
        failures: Vec::new(),
        answer: Some(text.to_string()),
        model,
        fallback,
        usage: (tokens("prompt_tokens"), tokens("completion_tokens")),
        duration: Duration::ZERO,
    }
}

/// Every chat call's result during one run, in order, seen below the pipeline.
#[derive(Debug, Default)]
struct Seen {
    events: Vec<Result<Recording, String>>,
}

impl Seen {
    fn last_answer(&self) -> Option<&Recording> {
        self.events.iter().rev().find_map(|e| e.as_ref().ok())
    }
}

/// The runner's view of what the models said: the response a client gets carries the
/// fallback's text instead of the answer that failed.
#[derive(Clone, Default)]
struct Witness(Arc<Mutex<Seen>>);

impl Witness {
    fn clear(&self) {
        drop(self.take());
    }

    fn take(&self) -> Seen {
        self.0
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default()
    }

    fn push(&self, event: Result<Recording, String>) {
        if let Ok(mut s) = self.0.lock() {
            s.events.push(event);
        }
    }
}

/// A model's provider that tells the [`Witness`] each whole answer (and failure).
struct Watched {
    /// The model entry it serves.
    model: String,
    inner: Arc<dyn Provider>,
    witness: Witness,
}

#[async_trait::async_trait]
impl Provider for Watched {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn chat(&self, call: ChatCall<'_>) -> Result<ChatResponse, UpstreamError> {
        let result = self.inner.chat(call).await;
        self.witness.push(match &result {
            Ok(response) => Ok(Recording {
                model: self.model.clone(),
                text: response
                    .choices
                    .first()
                    .map(|c| c.message.text())
                    .unwrap_or_default(),
                prompt_tokens: response.usage.as_ref().map_or(0, |u| u.prompt_tokens),
                completion_tokens: response.usage.as_ref().map_or(0, |u| u.completion_tokens),
            }),
            Err(e) => Err(e.to_string()),
        });
        result
    }

    async fn chat_stream(&self, call: ChatCall<'_>) -> Result<ChunkStream, UpstreamError> {
        self.inner.chat_stream(call).await
    }

    async fn embeddings(
        &self,
        request: &EmbeddingsRequest,
        upstream_model: &str,
        timeouts: Timeouts,
        capacity: Option<&Capacity>,
    ) -> Result<EmbeddingsResponse, UpstreamError> {
        self.inner
            .embeddings(request, upstream_model, timeouts, capacity)
            .await
    }
}
