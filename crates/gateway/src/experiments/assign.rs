//! Sticky assignment: which variant a request gets. A unit (the end user, or the
//! request) is hashed with the experiment's name by XXH3, a hash with a fixed
//! specification and no random seed, so every instance, every restart and every version
//! of the gateway puts the same user in the same variant.

use xxhash_rust::xxh3::Xxh3;

use super::config::{Experiment, Target, Unit};
use crate::error::ApiError;

/// The variant name recorded for units kept out of an experiment.
pub const HOLDOUT: &str = "holdout";

/// The request facts an experiment is matched and assigned on.
#[derive(Debug, Clone, Copy, Default)]
pub struct Subject<'a> {
    /// `x-sluice-experiment` (or `sluice.experiment`): `NAME` takes part only in NAME,
    /// `none` in none.
    pub asked: Option<&'a str>,
    pub owner: Option<&'a str>,
    pub user: Option<&'a str>,
    pub request_id: &'a str,
    /// The model the client asked for.
    pub model: &'a str,
    pub feature: Option<&'a str>,
    pub tier: Option<&'a str>,
    /// The prompt the client named (`id`, `id@label`, `id@version`).
    pub prompt: Option<&'a str>,
}

/// What a request was assigned.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub experiment: String,
    pub variant: String,
    pub treatment: Treatment,
}

impl Assignment {
    /// `NAME=VARIANT`, as `x-sluice-experiment` echoes it.
    pub fn header(&self) -> String {
        format!("{}={}", self.experiment, self.variant)
    }
}

/// What the variant changes in the request.
#[derive(Debug, Clone, PartialEq)]
pub enum Treatment {
    /// Answer with this model.
    Model(String),
    /// Render this prompt version (`id@version`).
    Prompt(String),
    /// Holdout: the request runs as the client sent it.
    Unchanged,
}

/// A uniform draw in [0, 1) that depends only on its inputs.
pub fn draw(experiment: &str, salt: &str, owner: Option<&str>, unit: &str) -> f64 {
    let mut h = Xxh3::new();
    for part in [experiment, salt, owner.unwrap_or(""), unit] {
        h.update(part.as_bytes());
        // A separator no name contains, so ("ab","c") and ("a","bc") differ.
        h.update(&[0]);
    }
    // The top 53 bits: exactly representable in an f64.
    (h.digest() >> 11) as f64 / (1u64 << 53) as f64
}

/// The variant (or [`HOLDOUT`]) of `unit` in `experiment`: holdout first, with a draw
/// of its own so the split among variants does not depend on the holdout share, then
/// the variants by weight, in the order configured.
pub fn variant_for<'e>(experiment: &'e Experiment, owner: Option<&str>, unit: &str) -> &'e str {
    if experiment.holdout > 0.0
        && draw(&experiment.name, "holdout", owner, unit) < experiment.holdout
    {
        return HOLDOUT;
    }
    let total = experiment.total_weight() as f64;
    let point = draw(&experiment.name, "variant", owner, unit) * total;
    let mut upto = 0.0;
    for v in &experiment.variants {
        upto += f64::from(v.weight);
        if point < upto {
            return &v.name;
        }
    }
    experiment
        .variants
        .last()
        .map(|v| v.name.as_str())
        .unwrap_or(HOLDOUT)
}

/// The prompt id of `id`, `id@label` or `id@version`, and whether it pins a version
/// (`v3`, `3`): a pinned version is the client's explicit choice and is left alone.
fn prompt_id(named: &str) -> (&str, bool) {
    match named.split_once('@') {
        None => (named, false),
        Some((id, suffix)) => {
            let digits = suffix.strip_prefix('v').unwrap_or(suffix);
            let pinned = !digits.is_empty() && digits.chars().all(|c| c.is_ascii_digit());
            (id, pinned)
        }
    }
}

/// Whether `experiment` applies to this request: active now, its `match`, and its
/// target (the named prompt; for models, every variant's model allowed to the caller,
/// so no variant is starved of the callers another may serve).
fn applies(
    experiment: &Experiment,
    subject: &Subject<'_>,
    now_ms: i64,
    allowed: &dyn Fn(&str) -> bool,
) -> bool {
    if !experiment.active_at(now_ms)
        || !experiment
            .when
            .matches(subject.model, subject.feature, subject.tier)
    {
        return false;
    }
    match experiment.target {
        Target::Prompt => subject.prompt.is_some_and(|p| {
            let (id, pinned) = prompt_id(p);
            !pinned && experiment.prompt.as_deref() == Some(id)
        }),
        Target::Model => experiment
            .variants
            .iter()
            .filter_map(|v| v.model.as_deref())
            .all(allowed),
    }
}

/// Assign the request to the first configured experiment that applies (one experiment
/// per request). An `asked` name that is not configured is a client error.
pub fn assign(
    experiments: &[Experiment],
    subject: &Subject<'_>,
    now_ms: i64,
    allowed: &dyn Fn(&str) -> bool,
) -> Result<Option<Assignment>, ApiError> {
    let asked = subject.asked.map(str::trim).filter(|a| !a.is_empty());
    if asked == Some("none") {
        return Ok(None);
    }
    if let Some(name) = asked
        && !experiments.iter().any(|e| e.name == name)
    {
        return Err(ApiError::UnknownExperiment {
            name: name.to_string(),
        });
    }
    let Some(experiment) = experiments
        .iter()
        .filter(|e| asked.is_none_or(|a| a == e.name))
        .find(|e| applies(e, subject, now_ms, allowed))
    else {
        return Ok(None);
    };
    let unit = match (experiment.assignment, subject.user) {
        (Unit::User, Some(user)) => user,
        // Without an end user there is nothing to be sticky to.
        (Unit::User, None) | (Unit::Request, _) => subject.request_id,
    };
    let name = variant_for(experiment, subject.owner, unit);
    let treatment = match experiment.variant(name) {
        None => Treatment::Unchanged,
        Some(v) => match experiment.target {
            Target::Model => v
                .model
                .clone()
                .map_or(Treatment::Unchanged, Treatment::Model),
            Target::Prompt => v
                .prompt
                .clone()
                .map_or(Treatment::Unchanged, Treatment::Prompt),
        },
    };
    Ok(Some(Assignment {
        experiment: experiment.name.clone(),
        variant: name.to_string(),
        treatment,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiments::config::Variant;
    use crate::guard::config::Match;

    fn experiment(weights: &[u32], holdout: f64) -> Experiment {
        Experiment {
            name: "exp".into(),
            target: Target::Model,
            prompt: None,
            when: Match::default(),
            assignment: Unit::User,
            control: "v0".into(),
            holdout,
            start_ms: None,
            stop_ms: None,
            enabled: true,
            variants: weights
                .iter()
                .enumerate()
                .map(|(i, w)| Variant {
                    name: format!("v{i}"),
                    weight: *w,
                    prompt: None,
                    model: Some(format!("m{i}")),
                })
                .collect(),
        }
    }

    #[test]
    fn draws_are_fixed_by_their_inputs() {
        // Pinned: a change to the hash or its framing would move every user.
        assert_eq!(
            draw("exp", "variant", None, "user-1"),
            draw("exp", "variant", None, "user-1")
        );
        assert_ne!(
            draw("exp", "variant", None, "user-1"),
            draw("exp", "variant", None, "user-2")
        );
        assert_ne!(
            draw("ab", "variant", None, "c"),
            draw("a", "variant", None, "bc")
        );
        assert_ne!(
            draw("exp", "variant", Some("app1"), "u"),
            draw("exp", "variant", Some("app2"), "u")
        );
        let d = draw("checkout-copy", "variant", None, "user-42");
        assert!((0.0..1.0).contains(&d));
        assert_eq!(
            format!("{d:.12}"),
            format!(
                "{:.12}",
                (xxhash_rust::xxh3::xxh3_64(b"checkout-copy\0variant\0\0user-42\0") >> 11) as f64
                    / (1u64 << 53) as f64
            )
        );
    }

    #[test]
    fn ten_thousand_users_split_within_two_points_of_the_weights() {
        for weights in [&[50u32, 50][..], &[80, 20], &[10, 30, 60]] {
            let e = experiment(weights, 0.0);
            let mut counts = vec![0u32; weights.len()];
            for u in 0..10_000 {
                let v = variant_for(&e, None, &format!("user-{u}"));
                let i: usize = v[1..].parse().unwrap();
                counts[i] += 1;
            }
            let total: u32 = weights.iter().sum();
            for (c, w) in counts.iter().zip(weights) {
                let share = f64::from(*c) / 10_000.0;
                let expected = f64::from(*w) / f64::from(total);
                assert!((share - expected).abs() <= 0.02, "{weights:?}: {counts:?}");
            }
        }
    }

    #[test]
    fn holdout_takes_its_share_and_leaves_the_split_alone() {
        let with = experiment(&[50, 50], 0.1);
        let without = experiment(&[50, 50], 0.0);
        let mut held = 0;
        for u in 0..10_000 {
            let unit = format!("user-{u}");
            let v = variant_for(&with, None, &unit);
            if v == HOLDOUT {
                held += 1;
            } else {
                assert_eq!(
                    v,
                    variant_for(&without, None, &unit),
                    "holdout reshuffled {unit}"
                );
            }
        }
        assert!((800..1200).contains(&held), "{held}");
    }

    #[test]
    fn selection_windows_and_opt_out() {
        let mut e = experiment(&[1, 1], 0.0);
        let subject = Subject {
            user: Some("u1"),
            request_id: "r1",
            model: "auto",
            ..Subject::default()
        };
        let yes = |_: &str| true;
        let got = assign(std::slice::from_ref(&e), &subject, 0, &yes)
            .unwrap()
            .unwrap();
        assert_eq!(got.experiment, "exp");
        assert_eq!(
            got.treatment,
            Treatment::Model(format!("m{}", &got.variant[1..]))
        );
        let opted_out = Subject {
            asked: Some("none"),
            ..subject
        };
        assert_eq!(
            assign(std::slice::from_ref(&e), &opted_out, 0, &yes).unwrap(),
            None
        );
        let unknown = Subject {
            asked: Some("nope"),
            ..subject
        };
        assert!(matches!(
            assign(std::slice::from_ref(&e), &unknown, 0, &yes),
            Err(ApiError::UnknownExperiment { .. })
        ));
        // A variant model the caller may not use: the experiment skips the caller.
        assert_eq!(
            assign(std::slice::from_ref(&e), &subject, 0, &|m| m != "m1").unwrap(),
            None
        );
        e.start_ms = Some(100);
        e.stop_ms = Some(200);
        let at = |ms| {
            assign(std::slice::from_ref(&e), &subject, ms, &yes)
                .unwrap()
                .is_some()
        };
        assert_eq!(
            (at(99), at(100), at(199), at(200)),
            (false, true, true, false)
        );
    }

    #[test]
    fn prompt_experiments_take_ids_and_labels_not_pinned_versions() {
        let mut e = experiment(&[1, 1], 0.0);
        e.target = Target::Prompt;
        e.prompt = Some("greet".into());
        for v in &mut e.variants {
            v.model = None;
            v.prompt = Some(format!("greet@{}", v.name));
        }
        let yes = |_: &str| true;
        let with = |p: &'static str| Subject {
            prompt: Some(p),
            request_id: "r",
            model: "m",
            ..Subject::default()
        };
        let one = std::slice::from_ref(&e);
        let got = assign(one, &with("greet"), 0, &yes).unwrap().unwrap();
        assert_eq!(
            got.treatment,
            Treatment::Prompt(format!("greet@{}", got.variant))
        );
        assert!(assign(one, &with("greet@prod"), 0, &yes).unwrap().is_some());
        assert!(assign(one, &with("greet@v3"), 0, &yes).unwrap().is_none());
        assert!(assign(one, &with("greet@3"), 0, &yes).unwrap().is_none());
        assert!(assign(one, &with("other"), 0, &yes).unwrap().is_none());
    }
}
