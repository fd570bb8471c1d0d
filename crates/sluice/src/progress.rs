//! Progress of `sluice prompts test`: a bar (indicatif) on a terminal, one plain line
//! per run otherwise (CI logs).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use sluice_gateway::prompts::runner::{Progress, RunOutcome};

pub fn for_terminal() -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Box::new(Bar(None))
    } else {
        Box::new(Lines)
    }
}

struct Bar(Option<ProgressBar>);

impl Progress for Bar {
    fn start(&mut self, total_runs: u64) {
        let bar = ProgressBar::new(total_runs);
        if let Ok(style) = ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}") {
            bar.set_style(style.progress_chars("=> "));
        }
        self.0 = Some(bar);
    }

    fn run_done(&mut self, prompt: &str, case: &str, outcome: &RunOutcome) {
        if let Some(bar) = &self.0 {
            if !outcome.passed() {
                bar.println(format!("FAIL {prompt} {case} (run {})", outcome.run + 1));
            }
            bar.set_message(format!("{prompt} {case}"));
            bar.inc(1);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.0.take() {
            bar.finish_and_clear();
        }
    }
}

struct Lines;

impl Progress for Lines {
    fn start(&mut self, total_runs: u64) {
        eprintln!("running {total_runs} prompt test run(s)");
    }

    fn run_done(&mut self, prompt: &str, case: &str, outcome: &RunOutcome) {
        let mark = if outcome.passed() { "pass" } else { "FAIL" };
        eprintln!(
            "{mark} {prompt} {case} run {} ({} ms)",
            outcome.run + 1,
            outcome.duration.as_millis()
        );
    }

    fn finish(&mut self) {}
}
