//! The statistics behind a report: a two-proportion z-test for rates, Welch's t-test for
//! means, a chi-square goodness-of-fit test for sample-ratio mismatch, and Holm's
//! correction across a report's comparisons. Distributions come from `statrs`.

use statrs::distribution::{ChiSquared, ContinuousCDF, Normal, StudentsT};

/// Two-sided 95 % intervals.
pub const CONFIDENCE: f64 = 0.95;
/// The family-wise error rate a report's comparisons are held to.
pub const ALPHA: f64 = 0.05;
/// Below this, observed splits are said to depart from the weights. Stricter than
/// `ALPHA`: a mismatch invalidates the whole experiment, so it must not cry wolf.
pub const SRM_ALPHA: f64 = 0.001;

/// A difference (variant minus control), its interval and its p-value. `None` where
/// the data cannot give a number.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Difference {
    pub difference: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub p_value: f64,
}

fn standard_normal() -> Option<Normal> {
    Normal::new(0.0, 1.0).ok()
}

/// Rates `x_a / n_a` (control) and `x_b / n_b`: the difference with an unpooled (Wald)
/// interval, and the p-value of the pooled z-test. `None` without observations on
/// either side.
pub fn two_proportion(x_a: u64, n_a: u64, x_b: u64, n_b: u64) -> Option<Difference> {
    if n_a == 0 || n_b == 0 {
        return None;
    }
    let (na, nb) = (n_a as f64, n_b as f64);
    let (pa, pb) = (x_a as f64 / na, x_b as f64 / nb);
    let difference = pb - pa;
    let normal = standard_normal()?;
    let z_crit = normal.inverse_cdf(1.0 - (1.0 - CONFIDENCE) / 2.0);
    let se = (pa * (1.0 - pa) / na + pb * (1.0 - pb) / nb).sqrt();
    let pooled = (x_a + x_b) as f64 / (na + nb);
    let se_pooled = (pooled * (1.0 - pooled) * (1.0 / na + 1.0 / nb)).sqrt();
    let p_value = if se_pooled > 0.0 {
        2.0 * normal.sf((difference / se_pooled).abs())
    } else {
        // Both sides all 0 or all 1: identical, no evidence of a difference.
        1.0
    };
    Some(Difference {
        difference,
        ci_low: difference - z_crit * se,
        ci_high: difference + z_crit * se,
        p_value: p_value.clamp(0.0, 1.0),
    })
}

/// Mean, sample variance and count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub mean: f64,
    pub variance: f64,
    pub n: u64,
}

impl Sample {
    /// `None` for no values; a variance needs two (`0` for one).
    pub fn of(values: &[f64]) -> Option<Sample> {
        if values.is_empty() {
            return None;
        }
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let variance = if values.len() > 1 {
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        Some(Sample {
            mean,
            variance,
            n: values.len() as u64,
        })
    }
}

/// Welch's t-test of `b` against the control `a`: the difference in means with its
/// interval (Welch–Satterthwaite degrees of freedom). `None` with fewer than two values
/// on either side.
pub fn welch_t(a: &Sample, b: &Sample) -> Option<Difference> {
    if a.n < 2 || b.n < 2 {
        return None;
    }
    let (va, vb) = (a.variance / a.n as f64, b.variance / b.n as f64);
    let difference = b.mean - a.mean;
    let se = (va + vb).sqrt();
    if se == 0.0 {
        // No spread on either side: the difference is exact.
        return Some(Difference {
            difference,
            ci_low: difference,
            ci_high: difference,
            p_value: if difference == 0.0 { 1.0 } else { 0.0 },
        });
    }
    let df =
        (va + vb).powi(2) / (va.powi(2) / (a.n as f64 - 1.0) + vb.powi(2) / (b.n as f64 - 1.0));
    let t = StudentsT::new(0.0, 1.0, df).ok()?;
    let t_crit = t.inverse_cdf(1.0 - (1.0 - CONFIDENCE) / 2.0);
    let p_value = 2.0 * t.sf((difference / se).abs());
    Some(Difference {
        difference,
        ci_low: difference - t_crit * se,
        ci_high: difference + t_crit * se,
        p_value: p_value.clamp(0.0, 1.0),
    })
}

/// Chi-square goodness of fit of `observed` counts to `expected` shares (summing to 1):
/// the statistic and its p-value. `None` without observations or categories.
pub fn chi_square(observed: &[u64], expected: &[f64]) -> Option<(f64, f64)> {
    let total: u64 = observed.iter().sum();
    if total == 0 || observed.len() < 2 || observed.len() != expected.len() {
        return None;
    }
    let statistic: f64 = observed
        .iter()
        .zip(expected)
        .map(|(o, e)| {
            let e = e * total as f64;
            (*o as f64 - e).powi(2) / e
        })
        .sum();
    let dist = ChiSquared::new((observed.len() - 1) as f64).ok()?;
    Some((statistic, dist.sf(statistic).clamp(0.0, 1.0)))
}

/// Holm–Bonferroni adjusted p-values, in the input's order: a report compares several
/// metrics at once, and without this an A/A test would "find" a difference in about one
/// report out of four.
pub fn holm(p_values: &[f64]) -> Vec<f64> {
    let m = p_values.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|a, b| p_values[*a].total_cmp(&p_values[*b]));
    let mut adjusted = vec![1.0; m];
    let mut running = 0.0f64;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max(((m - rank) as f64 * p_values[i]).min(1.0));
        adjusted[i] = running;
    }
    adjusted
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn two_proportion_matches_the_textbook() {
        // 600/1000 vs 550/1000: pooled p = 0.575, z = -2.26166, two-sided p = 0.023719.
        let d = two_proportion(600, 1000, 550, 1000).unwrap();
        assert!(close(d.difference, -0.05, 1e-12));
        assert!(close(d.p_value, 0.023719, 1e-6), "{d:?}");
        // Wald interval: se = sqrt(.24/1000 + .2475/1000) = 0.022079; 1.95996 * se.
        assert!(close(d.ci_low, -0.05 - 0.043274, 1e-4), "{d:?}");
        assert!(close(d.ci_high, -0.05 + 0.043274, 1e-4), "{d:?}");
        assert_eq!(two_proportion(0, 10, 0, 10).unwrap().p_value, 1.0);
        assert_eq!(two_proportion(1, 0, 1, 10), None);
    }

    #[test]
    fn welch_matches_the_textbook() {
        // Equal variances and sizes: t = 2 / sqrt(2 * 4 / 10) = 2.2361, df = 18,
        // two-sided p = 0.03818; t(0.975, 18) = 2.1009.
        let a = Sample {
            mean: 10.0,
            variance: 4.0,
            n: 10,
        };
        let b = Sample {
            mean: 12.0,
            variance: 4.0,
            n: 10,
        };
        let d = welch_t(&a, &b).unwrap();
        assert!(close(d.p_value, 0.03818, 2e-4), "{d:?}");
        assert!(
            close(d.ci_high - d.difference, 2.1009 * (0.8f64).sqrt(), 1e-3),
            "{d:?}"
        );
        assert_eq!(welch_t(&a, &Sample { n: 1, ..b }), None);
        let s = Sample::of(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert!(close(s.variance, 5.0 / 3.0, 1e-12));
    }

    #[test]
    fn chi_square_flags_a_sixty_forty_split_of_fifty_fifty() {
        let (x, p) = chi_square(&[600, 400], &[0.5, 0.5]).unwrap();
        assert!(close(x, 40.0, 1e-9));
        assert!(p < 1e-9, "{p}");
        let (_, p) = chi_square(&[505, 495], &[0.5, 0.5]).unwrap();
        assert!(p > 0.5, "{p}");
        assert_eq!(chi_square(&[0, 0], &[0.5, 0.5]), None);
    }

    #[test]
    fn holm_adjusts_in_order() {
        let adj = holm(&[0.01, 0.04, 0.03, 0.5]);
        assert_eq!(adj, vec![0.04, 0.09, 0.09, 0.5]);
    }

    #[test]
    fn a_a_tests_reject_about_five_percent() {
        // Calibration: under the null the z-test must reject near its nominal rate.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let runs = 2000;
        let mut rejected = 0;
        for _ in 0..runs {
            let mut count = |n| (0..n).filter(|_| rng.random_bool(0.3)).count() as u64;
            let (a, b) = (count(500), count(500));
            if two_proportion(a, 500, b, 500).unwrap().p_value < ALPHA {
                rejected += 1;
            }
        }
        let rate = f64::from(rejected) / f64::from(runs);
        assert!((0.03..0.07).contains(&rate), "{rate}");
    }
}
