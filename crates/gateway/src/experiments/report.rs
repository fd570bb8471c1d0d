//! `sluice experiments report NAME` and `/admin/experiments/NAME`: per variant, the
//! figures of its requests in the request log, and each against the control with a 95 %
//! interval and a p-value; a sample-ratio-mismatch check of the observed split.
//!
//! Definitions: `requests` counts every request assigned; latency and cost read the
//! answered ones (outcome `ok` or `bad_output`); `pass_rate` is the share of checked
//! requests whose *first* answer passed its output checks (an escalation that rescued
//! it does not hide the failure); `error_rate` is the share that failed upstream
//! (`api_error`); `regeneration_rate` the share that regenerated an earlier request.
//! A comparison is `significant` when its Holm-adjusted p-value (over all of the
//! report's comparisons) is below 0.05.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;

use serde::Serialize;

use super::assign::HOLDOUT;
use super::config::{Experiment, Unit};
use super::stats::{self, Difference, Sample};
use crate::store::ExperimentRow;

/// The report, as the dashboard, the admin API and `--json` read it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    pub name: String,
    pub active: bool,
    pub target: &'static str,
    pub assignment: &'static str,
    pub control: String,
    pub since_ms: i64,
    pub until_ms: i64,
    pub verdict: String,
    pub srm: Srm,
    pub variants: Vec<VariantStats>,
    pub comparisons: Vec<Comparison>,
    /// The units kept out (served as asked), when the experiment has a holdout.
    pub holdout: Option<VariantStats>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Srm {
    pub expected: BTreeMap<String, f64>,
    /// Units per variant: end users (and requests without one) for user assignment,
    /// requests for request assignment.
    pub observed: BTreeMap<String, u64>,
    pub chi_square: Option<f64>,
    pub p_value: Option<f64>,
    pub warning: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VariantStats {
    pub name: String,
    pub weight: u32,
    pub requests: u64,
    pub users: u64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub cost_per_request_usd: Option<f64>,
    pub pass_rate: Option<f64>,
    pub error_rate: Option<f64>,
    pub feedback_mean: Option<f64>,
    pub regeneration_rate: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Comparison {
    pub variant: String,
    pub metric: &'static str,
    pub test: &'static str,
    pub control: Option<f64>,
    pub value: Option<f64>,
    pub difference: Option<f64>,
    pub ci_low: Option<f64>,
    pub ci_high: Option<f64>,
    pub p_value: Option<f64>,
    /// Holm-adjusted over the report's comparisons; what `significant` is judged on.
    pub p_adjusted: Option<f64>,
    pub significant: bool,
}

/// One variant's raw material.
#[derive(Default)]
struct Tally {
    requests: u64,
    users: HashSet<String>,
    /// Requests without an end user (each its own unit under user assignment).
    anonymous: u64,
    latencies: Vec<f64>,
    costs_usd: Vec<f64>,
    checked: u64,
    passed: u64,
    errors: u64,
    regenerations: u64,
    scores: Vec<f64>,
}

/// Whether the first checked answer passed: the first of `output_checks`, else the
/// final `output_check`; `None` when nothing was checked.
fn first_check(row: &ExperimentRow) -> Option<bool> {
    if let Some(first) = row
        .output_checks
        .as_deref()
        .and_then(|c| c.split(',').next())
        .and_then(|c| c.rsplit_once(':'))
    {
        return Some(first.1 == "pass");
    }
    row.output_check.as_deref().map(|c| c == "pass")
}

impl Tally {
    fn add(&mut self, row: &ExperimentRow) {
        self.requests += 1;
        match &row.user {
            Some(u) => {
                self.users.insert(u.clone());
            }
            None => self.anonymous += 1,
        }
        if row.outcome == "ok" || row.outcome == "bad_output" {
            self.latencies.push(row.latency_ms);
            if let Some(c) = row.cost_nanos {
                self.costs_usd.push(c as f64 / 1e9);
            }
        }
        if let Some(passed) = first_check(row) {
            self.checked += 1;
            self.passed += u64::from(passed);
        }
        self.errors += u64::from(row.outcome == "api_error");
        self.regenerations += u64::from(row.regeneration);
    }

    fn stats(&mut self, name: &str, weight: u32) -> VariantStats {
        self.latencies.sort_by(f64::total_cmp);
        let rate = |x: u64, n: u64| (n > 0).then(|| x as f64 / n as f64);
        VariantStats {
            name: name.to_string(),
            weight,
            requests: self.requests,
            users: self.users.len() as u64,
            latency_p50_ms: crate::stats::percentile(&self.latencies, 50.0),
            latency_p95_ms: crate::stats::percentile(&self.latencies, 95.0),
            cost_per_request_usd: Sample::of(&self.costs_usd).map(|s| s.mean),
            pass_rate: rate(self.passed, self.checked),
            error_rate: rate(self.errors, self.requests),
            feedback_mean: Sample::of(&self.scores).map(|s| s.mean),
            regeneration_rate: rate(self.regenerations, self.requests),
        }
    }

    fn units(&self, unit: Unit) -> u64 {
        match unit {
            Unit::User => self.users.len() as u64 + self.anonymous,
            Unit::Request => self.requests,
        }
    }
}

/// Which way is better for a metric.
fn higher_is_better(metric: &str) -> bool {
    matches!(metric, "pass_rate" | "feedback_mean")
}

/// Build the report from the experiment's rows and the feedback on them.
pub fn compute(
    experiment: &Experiment,
    rows: &[ExperimentRow],
    feedback: &[(String, f64)],
    (since_ms, until_ms): (i64, i64),
) -> Report {
    let mut tallies: HashMap<&str, Tally> = HashMap::new();
    for row in rows {
        if row.variant == HOLDOUT || experiment.variant(&row.variant).is_some() {
            tallies.entry(row.variant.as_str()).or_default().add(row);
        }
    }
    for (variant, score) in feedback {
        if let Some(t) = tallies.get_mut(variant.as_str()) {
            t.scores.push(*score);
        }
    }
    let empty = Tally::default();
    let tally = |name: &str| tallies.get(name).unwrap_or(&empty);

    let mut comparisons = Vec::new();
    let control = tally(&experiment.control);
    for v in experiment
        .variants
        .iter()
        .filter(|v| v.name != experiment.control)
    {
        let t = tally(&v.name);
        let rate = |metric: &'static str, (xa, na): (u64, u64), (xb, nb): (u64, u64)| {
            let r = |x: u64, n: u64| (n > 0).then(|| x as f64 / n as f64);
            comparison(
                &v.name,
                metric,
                "two_proportion",
                (r(xa, na), r(xb, nb)),
                stats::two_proportion(xa, na, xb, nb),
            )
        };
        comparisons.push(rate(
            "pass_rate",
            (control.passed, control.checked),
            (t.passed, t.checked),
        ));
        comparisons.push(rate(
            "error_rate",
            (control.errors, control.requests),
            (t.errors, t.requests),
        ));
        comparisons.push(rate(
            "regeneration_rate",
            (control.regenerations, control.requests),
            (t.regenerations, t.requests),
        ));
        for (metric, a, b) in [
            ("latency_mean_ms", &control.latencies, &t.latencies),
            ("cost_per_request_usd", &control.costs_usd, &t.costs_usd),
            ("feedback_mean", &control.scores, &t.scores),
        ] {
            let (sa, sb) = (Sample::of(a), Sample::of(b));
            let diff = sa.zip(sb).and_then(|(sa, sb)| stats::welch_t(&sa, &sb));
            comparisons.push(comparison(
                &v.name,
                metric,
                "welch_t",
                (sa.map(|s| s.mean), sb.map(|s| s.mean)),
                diff,
            ));
        }
    }
    let tested: Vec<usize> = (0..comparisons.len())
        .filter(|i| comparisons[*i].p_value.is_some())
        .collect();
    let p: Vec<f64> = tested
        .iter()
        .filter_map(|i| comparisons[*i].p_value)
        .collect();
    for (i, adjusted) in tested.into_iter().zip(stats::holm(&p)) {
        comparisons[i].p_adjusted = Some(adjusted);
        comparisons[i].significant = adjusted < stats::ALPHA;
    }

    let total = experiment.total_weight() as f64;
    let expected: Vec<f64> = experiment
        .variants
        .iter()
        .map(|v| f64::from(v.weight) / total)
        .collect();
    let observed: Vec<u64> = experiment
        .variants
        .iter()
        .map(|v| tally(&v.name).units(experiment.assignment))
        .collect();
    let test = stats::chi_square(&observed, &expected);
    let srm = Srm {
        expected: experiment
            .variants
            .iter()
            .zip(&expected)
            .map(|(v, e)| (v.name.clone(), *e))
            .collect(),
        observed: experiment
            .variants
            .iter()
            .zip(&observed)
            .map(|(v, o)| (v.name.clone(), *o))
            .collect(),
        chi_square: test.map(|t| t.0),
        p_value: test.map(|t| t.1),
        warning: test.is_some_and(|t| t.1 < stats::SRM_ALPHA),
    };

    let mut variants: Vec<VariantStats> = experiment
        .variants
        .iter()
        .map(|v| {
            let mut t = tallies.remove(v.name.as_str()).unwrap_or_default();
            t.stats(&v.name, v.weight)
        })
        .collect();
    let holdout = (experiment.holdout > 0.0).then(|| {
        let mut t = tallies.remove(HOLDOUT).unwrap_or_default();
        t.stats(HOLDOUT, 0)
    });
    let requests: u64 = variants.iter().map(|v| v.requests).sum();
    let verdict = verdict(experiment, requests, &srm, &comparisons);
    // Stable order for readers: the configured one.
    variants.sort_by_key(|v| {
        experiment
            .variants
            .iter()
            .position(|c| c.name == v.name)
            .unwrap_or(usize::MAX)
    });
    Report {
        name: experiment.name.clone(),
        active: experiment.active_at(until_ms),
        target: experiment.target.as_str(),
        assignment: experiment.assignment.as_str(),
        control: experiment.control.clone(),
        since_ms,
        until_ms,
        verdict,
        srm,
        variants,
        comparisons,
        holdout,
    }
}

fn comparison(
    variant: &str,
    metric: &'static str,
    test: &'static str,
    (control, value): (Option<f64>, Option<f64>),
    diff: Option<Difference>,
) -> Comparison {
    Comparison {
        variant: variant.to_string(),
        metric,
        test,
        control,
        value,
        difference: diff.map(|d| d.difference),
        ci_low: diff.map(|d| d.ci_low),
        ci_high: diff.map(|d| d.ci_high),
        p_value: diff.map(|d| d.p_value),
        p_adjusted: None,
        significant: false,
    }
}

fn format_p(p: f64) -> String {
    if p < 0.001 {
        "p<0.001".into()
    } else {
        format!("p={p:.3}")
    }
}

/// One sentence a person can act on.
fn verdict(
    experiment: &Experiment,
    requests: u64,
    srm: &Srm,
    comparisons: &[Comparison],
) -> String {
    if requests == 0 {
        return "no data yet".into();
    }
    let findings: Vec<String> = comparisons
        .iter()
        .filter(|c| c.significant)
        .filter_map(|c| {
            let d = c.difference?;
            let better = (d > 0.0) == higher_is_better(c.metric);
            // Quote the p-value the verdict was judged on.
            Some(format!(
                "{} is {} than {} on {} (Holm-adjusted {})",
                c.variant,
                if better { "better" } else { "worse" },
                experiment.control,
                c.metric,
                format_p(c.p_adjusted?)
            ))
        })
        .collect();
    let findings = if findings.is_empty() {
        "no significant difference yet".to_string()
    } else {
        findings.join("; ")
    };
    if srm.warning {
        format!(
            "sample ratio mismatch ({}): the observed split departs from the weights, so the results cannot be trusted until the assignment is fixed; {findings}",
            srm.p_value.map(format_p).unwrap_or_default()
        )
    } else {
        findings
    }
}

/// The report as a plain table.
pub fn render_table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "experiment {} ({}; target {}, assigned per {}; control {})",
        report.name,
        if report.active { "active" } else { "inactive" },
        report.target,
        report.assignment,
        report.control
    );
    let _ = writeln!(out, "verdict: {}\n", report.verdict);
    let f = |v: Option<f64>, digits: usize| {
        v.map(|x| format!("{x:.digits$}"))
            .unwrap_or_else(|| "-".into())
    };
    let pct = |v: Option<f64>| {
        v.map(|x| format!("{:.1}%", x * 100.0))
            .unwrap_or_else(|| "-".into())
    };
    let _ = writeln!(
        out,
        "{:<16} {:>6} {:>9} {:>7} {:>9} {:>9} {:>11} {:>7} {:>7} {:>8} {:>7}",
        "variant",
        "weight",
        "requests",
        "users",
        "p50 ms",
        "p95 ms",
        "cost/req $",
        "pass",
        "errors",
        "feedback",
        "regen"
    );
    for v in report.variants.iter().chain(&report.holdout) {
        let _ = writeln!(
            out,
            "{:<16} {:>6} {:>9} {:>7} {:>9} {:>9} {:>11} {:>7} {:>7} {:>8} {:>7}",
            v.name,
            v.weight,
            v.requests,
            v.users,
            f(v.latency_p50_ms, 1),
            f(v.latency_p95_ms, 1),
            f(v.cost_per_request_usd, 6),
            pct(v.pass_rate),
            pct(v.error_rate),
            f(v.feedback_mean, 2),
            pct(v.regeneration_rate),
        );
    }
    let _ = writeln!(
        out,
        "\n{:<16} {:<22} {:>12} {:>12} {:>12} {:>26} {:>9} {:>9} {:>5}",
        "variant",
        "metric",
        "control",
        "value",
        "difference",
        "95% interval",
        "p",
        "p (Holm)",
        "sig"
    );
    for c in &report.comparisons {
        let digits = if c.metric == "cost_per_request_usd" {
            6
        } else {
            4
        };
        let interval = match (c.ci_low, c.ci_high) {
            (Some(lo), Some(hi)) => format!("[{lo:.digits$}, {hi:.digits$}]"),
            _ => "-".into(),
        };
        let _ = writeln!(
            out,
            "{:<16} {:<22} {:>12} {:>12} {:>12} {:>26} {:>9} {:>9} {:>5}",
            c.variant,
            c.metric,
            f(c.control, digits),
            f(c.value, digits),
            f(c.difference, digits),
            interval,
            c.p_value.map(format_p).unwrap_or_else(|| "-".into()),
            c.p_adjusted.map(format_p).unwrap_or_else(|| "-".into()),
            if c.significant { "yes" } else { "no" }
        );
    }
    let observed: Vec<String> = report
        .srm
        .observed
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let _ = writeln!(
        out,
        "\nsplit: {} (chi-square {}, {}){}",
        observed.join(" "),
        f(report.srm.chi_square, 2),
        report
            .srm
            .p_value
            .map(format_p)
            .unwrap_or_else(|| "p=-".into()),
        if report.srm.warning {
            " WARNING: sample ratio mismatch"
        } else {
            ""
        }
    );
    out
}
