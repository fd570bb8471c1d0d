//! What a run measured: HdrHistograms in microseconds, counters, and the report (a
//! human-readable block, or one JSON line for `bench/run.sh`).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;

use crate::client::Outcome;

/// Longest latency the histograms hold (60 s); longer values are clamped to it.
const MAX_US: u64 = 60_000_000;
/// Error messages kept to show the reader what went wrong.
const KEEP_ERRORS: usize = 5;

/// Everything measured inside the recording window, shared by all request tasks.
pub struct Stats {
    inner: Mutex<Inner>,
}

struct Inner {
    full: Histogram<u64>,
    first_byte: Histogram<u64>,
    /// Open loop only: how late the request was actually sent after its scheduled time.
    lag: Histogram<u64>,
    ok: u64,
    statuses: BTreeMap<u16, u64>,
    failures: u64,
    sample_errors: Vec<String>,
    last_done: Option<Instant>,
    /// Calls finished in any way, warm-up included: what the server did work for.
    calls: u64,
}

pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, MAX_US, 3)?)
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Stats {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self {
            inner: Mutex::new(Inner {
                full: histogram()?,
                first_byte: histogram()?,
                lag: histogram()?,
                ok: 0,
                statuses: BTreeMap::new(),
                failures: 0,
                sample_errors: Vec::new(),
                last_done: None,
                calls: 0,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counters half-updated in a way
        // that matters for a report, so a poisoned lock is still used.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn record(&self, outcome: Outcome) {
        let mut s = self.lock();
        match outcome {
            Outcome::Ok { first_byte, full } => {
                s.ok += 1;
                s.full.saturating_record(micros(full));
                s.first_byte.saturating_record(micros(first_byte));
            }
            Outcome::Status(code) => *s.statuses.entry(code).or_default() += 1,
            Outcome::Failed(message) => {
                s.failures += 1;
                if s.sample_errors.len() < KEEP_ERRORS {
                    s.sample_errors.push(message);
                }
            }
        }
        s.last_done = Some(Instant::now());
    }

    /// Count a finished call, recorded or not (warm-up), for per-request costs.
    pub fn count_call(&self) {
        self.lock().calls += 1;
    }

    pub fn record_lag(&self, lag: Duration) {
        self.lock().lag.saturating_record(micros(lag));
    }

    /// Freeze the figures; `window_start` is when recording began, `nominal` how long
    /// the recording window was meant to last.
    pub fn summary(&self, meta: Meta, window_start: Instant, nominal: Duration) -> Summary {
        let s = self.lock();
        // Throughput counts until the last recorded response, so responses that arrive
        // after the schedule ended (a backlog) do not inflate it.
        let elapsed = s
            .last_done
            .map_or(nominal, |t| t.saturating_duration_since(window_start))
            .max(nominal);
        let status_errors: u64 = s.statuses.values().sum();
        let errors = status_errors + s.failures;
        let total = s.ok + errors;
        Summary {
            meta,
            elapsed,
            calls: s.calls,
            ok: s.ok,
            errors,
            statuses: s.statuses.clone(),
            failures: s.failures,
            sample_errors: s.sample_errors.clone(),
            error_rate: if total == 0 {
                1.0
            } else {
                errors as f64 / total as f64
            },
            full: Percentiles::of(&s.full),
            first_byte: Percentiles::of(&s.first_byte),
            lag: (!s.lag.is_empty()).then(|| Percentiles::of(&s.lag)),
        }
    }
}

/// How the run was set up, echoed in the report.
pub struct Meta {
    pub label: String,
    pub url: String,
    /// `closed` or `open`.
    pub mode: &'static str,
    pub rate: Option<f64>,
    pub connections: usize,
    pub connections_opened: u64,
    pub stream: bool,
}

#[derive(Clone, Copy)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub mean: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "count": self.count, "p50_us": self.p50, "p90_us": self.p90, "p99_us": self.p99,
            "p999_us": self.p999, "max_us": self.max, "mean_us": self.mean.round(),
        })
    }
}

pub struct Summary {
    pub meta: Meta,
    pub elapsed: Duration,
    pub calls: u64,
    pub ok: u64,
    pub errors: u64,
    pub statuses: BTreeMap<u16, u64>,
    pub failures: u64,
    pub sample_errors: Vec<String>,
    pub error_rate: f64,
    pub full: Percentiles,
    pub first_byte: Percentiles,
    pub lag: Option<Percentiles>,
}

impl Summary {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let m = &self.meta;
        json!({
            "label": m.label,
            "url": m.url,
            "mode": m.mode,
            "rate": m.rate,
            "connections": m.connections,
            "connections_opened": m.connections_opened,
            "stream": m.stream,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "requests": self.ok,
            "requests_total": self.calls,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "rps": (self.rps() * 10.0).round() / 10.0,
            "latency": self.full.json(),
            "first_byte": m.stream.then(|| self.first_byte.json()),
            "send_lag": self.lag.map(|l| l.json()),
        })
    }

    pub fn print(&self, out: &mut impl std::io::Write) -> std::io::Result<()> {
        let m = &self.meta;
        let shape = match m.rate {
            Some(rate) => format!(
                "open loop, {rate} req/s scheduled, up to {} connections",
                m.connections
            ),
            None => format!("closed loop, {} connection(s)", m.connections),
        };
        let label = if m.label.is_empty() {
            String::new()
        } else {
            format!("[{}] ", m.label)
        };
        writeln!(
            out,
            "{label}{} — {shape}{}",
            m.url,
            if m.stream { ", stream" } else { "" }
        )?;
        writeln!(
            out,
            "  requests {}  in {:.2}s  = {:.1} req/s   connections opened {}",
            self.ok,
            self.elapsed.as_secs_f64(),
            self.rps(),
            m.connections_opened
        )?;
        let statuses: Vec<String> = self
            .statuses
            .iter()
            .map(|(code, n)| format!("{code}x{n}"))
            .collect();
        writeln!(
            out,
            "  errors {} ({:.3}%)  non-2xx [{}]  transport {}",
            self.errors,
            self.error_rate * 100.0,
            statuses.join(" "),
            self.failures
        )?;
        for e in &self.sample_errors {
            writeln!(out, "    e.g. {e}")?;
        }
        writeln!(
            out,
            "  {:<16}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9}",
            "µs", "p50", "p90", "p99", "p99.9", "max", "mean"
        )?;
        let row = |out: &mut dyn std::io::Write, name: &str, p: &Percentiles| {
            writeln!(
                out,
                "  {name:<16}{:>9}{:>9}{:>9}{:>9}{:>9}{:>9.0}",
                p.p50, p.p90, p.p99, p.p999, p.max, p.mean
            )
        };
        let latency_name = if m.rate.is_some() {
            "latency*"
        } else {
            "latency"
        };
        row(out, latency_name, &self.full)?;
        if m.stream {
            row(out, "first byte", &self.first_byte)?;
        }
        if let Some(lag) = &self.lag {
            row(out, "send lag", lag)?;
        }
        if m.rate.is_some() {
            writeln!(
                out,
                "  * measured from the scheduled send time (no coordinated omission)"
            )?;
        }
        Ok(())
    }
}

/// Write to stdout without the `print_stdout` lint: a report is this binary's output.
pub fn emit(summary: &Summary, as_json: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if as_json {
        writeln!(out, "{}", summary.to_json())
    } else {
        summary.print(&mut out)
    }
}

/// The same for the other modes' reports: one JSON line, or the text.
pub fn emit_line(json: &serde_json::Value, as_json: bool, text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if as_json {
        writeln!(out, "{json}")
    } else {
        write!(out, "{text}")
    }
}
