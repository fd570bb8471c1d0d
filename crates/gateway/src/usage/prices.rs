//! Prices and costs, in integers only. A price is USD per 1M tokens held as integer
//! micro-dollars ($0.15 = `150_000`); a cost is integer nano-dollars, computed exactly.
//!
//! Why nano-dollars and not micro-dollars: a price of `p` micro-dollars per 1M tokens
//! makes one token cost `p` pico-dollars, so a request's exact cost is a whole number of
//! pico-dollars. Every shipped price is a multiple of $0.001 per 1M tokens (1,000
//! micro-dollars), so that cost is also a whole number of nano-dollars: nothing is
//! rounded, and sums of costs are exact sums. Rounding every request to micro-dollars
//! instead would drop up to half a micro-dollar per request, and small requests are
//! where that shows: 7 tokens at $0.15 per 1M cost 1.05 micro-dollars; a million of them
//! cost $1.05, and micro-dollar rounding would book $1.00. A configured price with
//! sub-milli-dollar digits (up to six decimals are accepted) is the one case that rounds:
//! half up to the nanodollar, at most half a nano-dollar per request. `i64` nano-dollars
//! hold $9.2 billion, far beyond any one request or budget period.
//!
//! The request record keeps both: `cost_micros` (rounded half up, what people read) and
//! `cost_nanos` (exact, what sums, stats and budgets use).
//!
//! Lookup: a `[[models]]` entry's `prices` first, then the shipped table by the
//! upstream's model name, then by the gateway's name. In the table, an exact name first,
//! then a dated snapshot of a listed name (`gpt-4o-2024-08-06` -> `gpt-4o`,
//! `claude-3-5-sonnet-20241022` -> `claude-3-5-sonnet`, `...-latest`), by the longest
//! listed prefix. Only a date (or `latest`) may follow the prefix: `o1-mini` is not
//! priced as `o1`, nor `claude-opus-4-5` as `claude-opus-4` (different models, different
//! prices); an unknown model has no cost rather than a wrong one.

use std::collections::HashSet;
use std::fmt;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::config::ModelConfig;

/// USD per 1M tokens, in integer micro-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Prices {
    pub input: u64,
    pub output: u64,
    /// Prompt tokens the upstream served from its prompt cache (OpenAI's
    /// `cached_tokens`, Anthropic's cache reads). Equal to `input` where there is no
    /// discount.
    pub cached_input: u64,
}

impl Prices {
    /// From USD per 1M tokens written as whole micro-dollars.
    pub const fn micros(input: u64, output: u64, cached_input: u64) -> Prices {
        Prices {
            input,
            output,
            cached_input,
        }
    }
}

/// Tokens of one request, as billed. `prompt` is the whole prompt, cached tokens
/// included (OpenAI's `prompt_tokens`; Anthropic's input, cache writes and cache reads
/// added up); `cached_prompt` is the part of it served from the upstream's prompt cache.
/// Anthropic's cache writes are billed here at the input price (Anthropic charges 1.25x
/// for them: an undercount of a quarter of those tokens, which the usage we get does not
/// separate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    pub prompt: u64,
    pub completion: u64,
    pub cached_prompt: u64,
}

/// A cost in integer nano-dollars (10^-9 USD).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Cost {
    pub nanos: i64,
}

pub const NANOS_PER_MICRO: i64 = 1_000;
pub const NANOS_PER_USD: i64 = 1_000_000_000;

impl Cost {
    pub const ZERO: Cost = Cost { nanos: 0 };

    pub const fn from_nanos(nanos: i64) -> Cost {
        Cost { nanos }
    }

    pub fn from_micros(micros: i64) -> Cost {
        Cost {
            nanos: micros.saturating_mul(NANOS_PER_MICRO),
        }
    }

    /// Whole micro-dollars, half rounded up (half away from zero for negatives), for the
    /// record's `cost_micros`.
    pub fn micros(self) -> i64 {
        let half = NANOS_PER_MICRO / 2;
        if self.nanos >= 0 {
            self.nanos.saturating_add(half) / NANOS_PER_MICRO
        } else {
            self.nanos.saturating_sub(half) / NANOS_PER_MICRO
        }
    }

    /// For display and JSON only; never summed.
    pub fn usd(self) -> f64 {
        self.nanos as f64 / NANOS_PER_USD as f64
    }
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, other: Cost) -> Cost {
        Cost {
            nanos: self.nanos.saturating_add(other.nanos),
        }
    }
}

impl std::iter::Sum for Cost {
    fn sum<I: Iterator<Item = Cost>>(iter: I) -> Cost {
        iter.fold(Cost::ZERO, |a, b| a + b)
    }
}

impl fmt::Display for Cost {
    /// `$1.050000000`: exact, nine decimals.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.nanos < 0 { "-" } else { "" };
        let n = self.nanos.unsigned_abs();
        let per = NANOS_PER_USD.unsigned_abs();
        write!(f, "{sign}${}.{:09}", n / per, n % per)
    }
}

/// The exact cost of `usage` at `prices`. Computed in 128-bit integers: the sum is in
/// pico-dollars (tokens x micro-dollars per 1M tokens), then halved up to nano-dollars
/// (a no-op for prices that are whole milli-dollars per 1M tokens; see the module notes).
pub fn cost(prices: &Prices, usage: TokenUsage) -> Cost {
    let cached = usage.cached_prompt.min(usage.prompt);
    let uncached = usage.prompt - cached;
    let picos = u128::from(uncached) * u128::from(prices.input)
        + u128::from(cached) * u128::from(prices.cached_input)
        + u128::from(usage.completion) * u128::from(prices.output);
    let nanos = (picos + 500) / 1000;
    Cost {
        nanos: i64::try_from(nanos).unwrap_or(i64::MAX),
    }
}

/// One shipped price.
struct Listed {
    name: &'static str,
    prices: Prices,
}

const fn usd(input: u64, output: u64, cached_input: u64) -> Prices {
    Prices::micros(input, output, cached_input)
}

/// The shipped table: USD per 1M tokens as micro-dollars (input, output, cached input).
///
/// Sources (looked up for this table; check them when a price changes). OpenAI's own
/// page is <https://platform.openai.com/docs/pricing>; the figures were read from pages
/// that reproduce it:
/// - gpt-4o, gpt-4o-mini, text-embedding-3-*: <https://chatgptpricing-akr.pages.dev/api-pricing>
/// - gpt-4.1, gpt-4.1-mini: <https://tokenmath.io/openai-api-pricing-explained>;
///   gpt-4.1-nano: <https://aumiqx.com/ai-tools/openai-api-pricing-gpt4-costs-guide-2026>
/// - cached input of the gpt-4.1 family, o1 (and its $15/$60), o4-mini:
///   github.com/domderen/openai-usage, `src/openai_usage/model_costs.py`
/// - o3-mini with its cached input: <https://llmcalc.app/models/o3-mini/>,
///   <https://modelpedia.dev/openai/o3-mini-2025-01-31>
/// - gpt-3.5-turbo (= gpt-3.5-turbo-0125): <https://www.burncloud.com/aiapi-detail/gpt-3-5-turbo.html>;
///   earlier 3.5 snapshots had other prices and are deliberately not matched
/// - text-embedding-ada-002: <https://embeddingcost.com/openai>,
///   <https://openai.com/index/new-embedding-models-and-api-updates/>
/// - gpt-4o-2024-05-13, the first gpt-4o snapshot, kept its launch price ($5/$15); seen
///   in public pricing tables found by code search, without a page to cite: verify.
///
/// Anthropic: <https://docs.anthropic.com/en/docs/about-claude/pricing> ("Base Input
/// Tokens", "Output Tokens", and "Cache Hits & Refreshes" as the cached input).
#[rustfmt::skip]
const SHIPPED: &[Listed] = &[
    // OpenAI chat
    Listed { name: "gpt-4o", prices: usd(2_500_000, 10_000_000, 1_250_000) },
    Listed { name: "gpt-4o-2024-05-13", prices: usd(5_000_000, 15_000_000, 5_000_000) },
    Listed { name: "gpt-4o-mini", prices: usd(150_000, 600_000, 75_000) },
    Listed { name: "gpt-4.1", prices: usd(2_000_000, 8_000_000, 500_000) },
    Listed { name: "gpt-4.1-mini", prices: usd(400_000, 1_600_000, 100_000) },
    Listed { name: "gpt-4.1-nano", prices: usd(100_000, 400_000, 25_000) },
    Listed { name: "o1", prices: usd(15_000_000, 60_000_000, 7_500_000) },
    Listed { name: "o3-mini", prices: usd(1_100_000, 4_400_000, 550_000) },
    Listed { name: "o4-mini", prices: usd(1_100_000, 4_400_000, 275_000) },
    Listed { name: "gpt-3.5-turbo", prices: usd(500_000, 1_500_000, 500_000) },
    Listed { name: "gpt-3.5-turbo-0125", prices: usd(500_000, 1_500_000, 500_000) },
    // OpenAI embeddings: input only.
    Listed { name: "text-embedding-3-small", prices: usd(20_000, 0, 20_000) },
    Listed { name: "text-embedding-3-large", prices: usd(130_000, 0, 130_000) },
    Listed { name: "text-embedding-ada-002", prices: usd(100_000, 0, 100_000) },
    // Anthropic
    Listed { name: "claude-opus-4", prices: usd(15_000_000, 75_000_000, 1_500_000) },
    Listed { name: "claude-opus-4-0", prices: usd(15_000_000, 75_000_000, 1_500_000) },
    Listed { name: "claude-sonnet-4", prices: usd(3_000_000, 15_000_000, 300_000) },
    Listed { name: "claude-sonnet-4-0", prices: usd(3_000_000, 15_000_000, 300_000) },
    Listed { name: "claude-3-7-sonnet", prices: usd(3_000_000, 15_000_000, 300_000) },
    Listed { name: "claude-3-5-sonnet", prices: usd(3_000_000, 15_000_000, 300_000) },
    Listed { name: "claude-3-5-haiku", prices: usd(800_000, 4_000_000, 80_000) },
    Listed { name: "claude-3-opus", prices: usd(15_000_000, 75_000_000, 1_500_000) },
    Listed { name: "claude-3-haiku", prices: usd(250_000, 1_250_000, 30_000) },
];

/// The shipped price of `model`: its exact name, else a dated snapshot of the longest
/// listed name it starts with.
pub fn shipped(model: &str) -> Option<Prices> {
    if let Some(l) = SHIPPED.iter().find(|l| l.name == model) {
        return Some(l.prices);
    }
    SHIPPED
        .iter()
        .filter(|l| {
            model
                .strip_prefix(l.name)
                .and_then(|rest| rest.strip_prefix('-'))
                .is_some_and(is_snapshot)
        })
        .max_by_key(|l| l.name.len())
        .map(|l| l.prices)
}

/// `2024-08-06`, `20241022` or `latest`.
fn is_snapshot(suffix: &str) -> bool {
    let b = suffix.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    suffix == "latest"
        || (b.len() == 8 && digits(0..8))
        || (b.len() == 10
            && digits(0..4)
            && b[4] == b'-'
            && digits(5..7)
            && b[7] == b'-'
            && digits(8..10))
}

/// Prices for the configured models: `[[models]] prices` overrides, then the shipped
/// table. Warns once per model it cannot price: at start for each named model entry,
/// and at first use for each name a pattern entry (`claude-*`) sends.
pub struct PriceBook {
    entries: Vec<Entry>,
    /// Names already warned about; bounded so clients inventing names cannot grow it.
    warned: Mutex<HashSet<String>>,
}

struct Entry {
    name: String,
    pattern: bool,
    prices: Option<Prices>,
}

const MAX_WARNED: usize = 1000;

impl PriceBook {
    pub fn new(models: &[ModelConfig]) -> PriceBook {
        let book = PriceBook {
            entries: models
                .iter()
                .map(|m| Entry {
                    name: m.name.clone(),
                    pattern: m.is_pattern(),
                    prices: m.prices,
                })
                .collect(),
            warned: Mutex::new(HashSet::new()),
        };
        for m in models.iter().filter(|m| !m.is_pattern()) {
            let upstream = m.upstream.as_deref().unwrap_or(&m.name);
            if book.prices(&m.name, upstream).is_none() {
                book.warn_once(&m.name, upstream);
            }
        }
        book
    }

    /// The prices of a request answered by the gateway model `model` (the route's name,
    /// what `x-sluice-model` says) through the upstream model `upstream`.
    pub fn prices(&self, model: &str, upstream: &str) -> Option<Prices> {
        let entry = self
            .entries
            .iter()
            .find(|e| !e.pattern && e.name == model)
            .or_else(|| {
                self.entries
                    .iter()
                    .filter(|e| e.pattern && model.starts_with(e.name.trim_end_matches('*')))
                    .max_by_key(|e| e.name.len())
            });
        entry
            .and_then(|e| e.prices)
            .or_else(|| shipped(upstream))
            .or_else(|| shipped(model))
    }

    /// The cost of `usage` on that route; `None` (with a warning, once per name) when the
    /// model has no known price.
    pub fn cost(&self, model: &str, upstream: &str, usage: TokenUsage) -> Option<Cost> {
        match self.prices(model, upstream) {
            Some(p) => Some(cost(&p, usage)),
            None => {
                self.warn_once(model, upstream);
                None
            }
        }
    }

    fn warn_once(&self, model: &str, upstream: &str) {
        let Ok(mut warned) = self.warned.lock() else {
            return;
        };
        if warned.len() >= MAX_WARNED || !warned.insert(model.to_string()) {
            return;
        }
        drop(warned);
        tracing::warn!(
            model,
            upstream,
            "no price known for this model: its requests are recorded without a cost and count nothing against budgets; set `prices = {{ input = ..., output = ... }}` on its [[models]] entry"
        );
    }
}

/// Micro-dollars from a USD amount as a person wrote it in TOML: an integer, a float or
/// a decimal string, at most six decimals, not negative. A float is read through its
/// shortest decimal form (`0.15`, never `0.1499999…`), so `0.15` is exactly `150_000`;
/// nothing is multiplied as a float.
pub fn usd_to_micros(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err(format!("`{t}` is negative"));
    }
    let t = t.strip_prefix('+').unwrap_or(t);
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !all_digits(whole) || !all_digits(frac) {
        return Err(format!("`{t}` is not a plain decimal amount of USD"));
    }
    let frac = frac.trim_end_matches('0');
    if frac.len() > 6 {
        return Err(format!(
            "`{t}` has more than six decimals (the smallest unit is one micro-dollar)"
        ));
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| format!("`{t}` is too large"))?
    };
    let frac_micros: u64 = format!("{frac:0<6}")
        .parse()
        .map_err(|_| format!("`{t}` is not a plain decimal amount of USD"))?;
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(frac_micros))
        .ok_or_else(|| format!("`{t}` is too large"))
}

/// A USD amount in config, held as integer micro-dollars (see [`usd_to_micros`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsdAmount(pub u64);

impl<'de> Deserialize<'de> for UsdAmount {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = UsdAmount;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an amount of USD such as 0.15")
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<UsdAmount, E> {
                if !v.is_finite() {
                    return Err(E::custom("an amount of USD must be a finite number"));
                }
                // `Display` for f64 is the shortest decimal that reads back as `v`, never
                // in exponent form: the digits the person wrote.
                usd_to_micros(&v.to_string())
                    .map(UsdAmount)
                    .map_err(E::custom)
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<UsdAmount, E> {
                usd_to_micros(&v.to_string())
                    .map(UsdAmount)
                    .map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<UsdAmount, E> {
                usd_to_micros(&v.to_string())
                    .map(UsdAmount)
                    .map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UsdAmount, E> {
                usd_to_micros(v).map(UsdAmount).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// `[[models]] prices = { input = 0.15, output = 0.60, cached_input = 0.075 }`: USD
/// per 1M tokens. `output` may be left out only on embedding models; `cached_input`
/// defaults to `input` (no discount).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrices {
    pub input: UsdAmount,
    pub output: Option<UsdAmount>,
    pub cached_input: Option<UsdAmount>,
}

impl RawPrices {
    /// The validated prices; `embeddings` says whether `output` may be missing.
    pub fn build(
        &self,
        embeddings: bool,
        path: &str,
        problems: &mut dyn FnMut(String, String),
    ) -> Prices {
        if self.output.is_none() && !embeddings {
            problems(
                format!("{path}.output"),
                "is required for a chat model (USD per 1M output tokens)".into(),
            );
        }
        Prices {
            input: self.input.0,
            output: self.output.map_or(0, |o| o.0),
            cached_input: self.cached_input.map_or(self.input.0, |c| c.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_and_dated_snapshots_find_their_price() {
        let p = |m: &str| shipped(m).map(|p| (p.input, p.output, p.cached_input));
        assert_eq!(p("gpt-4o-mini"), Some((150_000, 600_000, 75_000)));
        assert_eq!(p("gpt-4o-2024-08-06"), p("gpt-4o"));
        assert_eq!(p("gpt-4o-2024-11-20"), p("gpt-4o"));
        // The first gpt-4o snapshot is listed by its own name, with its own price.
        assert_eq!(
            p("gpt-4o-2024-05-13"),
            Some((5_000_000, 15_000_000, 5_000_000))
        );
        // Longest prefix: a gpt-4o-mini snapshot is not priced as gpt-4o.
        assert_eq!(p("gpt-4o-mini-2024-07-18"), p("gpt-4o-mini"));
        assert_eq!(
            p("gpt-4.1-mini-2025-04-14"),
            Some((400_000, 1_600_000, 100_000))
        );
        assert_eq!(
            p("gpt-4.1-2025-04-14"),
            Some((2_000_000, 8_000_000, 500_000))
        );
        assert_eq!(
            p("o4-mini-2025-04-16"),
            Some((1_100_000, 4_400_000, 275_000))
        );
        assert_eq!(p("claude-3-5-sonnet-20241022"), p("claude-3-5-sonnet"));
        assert_eq!(p("claude-3-5-sonnet-latest"), p("claude-3-5-sonnet"));
        assert_eq!(
            p("claude-3-5-haiku-20241022"),
            Some((800_000, 4_000_000, 80_000))
        );
        assert_eq!(
            p("claude-sonnet-4-20250514"),
            Some((3_000_000, 15_000_000, 300_000))
        );
        assert_eq!(
            p("claude-opus-4-20250514"),
            Some((15_000_000, 75_000_000, 1_500_000))
        );
        assert_eq!(
            p("claude-3-haiku-20240307"),
            Some((250_000, 1_250_000, 30_000))
        );
        assert_eq!(p("text-embedding-3-small"), Some((20_000, 0, 20_000)));
        assert_eq!(p("gpt-3.5-turbo-0125"), p("gpt-3.5-turbo"));
    }

    #[test]
    fn other_models_sharing_a_prefix_are_not_priced_wrongly() {
        for m in [
            "o1-mini",
            "o1-pro",
            "gpt-4o-audio-preview",
            "claude-opus-4-5",
            "claude-opus-4-5-20251101",
            "gpt-3.5-turbo-0613",
            "gpt-4o-2024-08",
            "gpt-4",
            "llama-3",
            "",
        ] {
            assert_eq!(shipped(m), None, "{m}");
        }
    }

    #[test]
    fn costs_are_exact_integers() {
        let mini = shipped("gpt-4o-mini").unwrap();
        // 1000 prompt (200 cached) + 500 completion:
        // 800 x 0.15 + 200 x 0.075 + 500 x 0.60 = 120 + 15 + 300 = 435 micro-dollars.
        let c = cost(
            &mini,
            TokenUsage {
                prompt: 1000,
                completion: 500,
                cached_prompt: 200,
            },
        );
        assert_eq!(c, Cost::from_nanos(435_000));
        assert_eq!(c.micros(), 435);
        // Cached tokens beyond the prompt are not believed.
        let odd = TokenUsage {
            prompt: 10,
            completion: 0,
            cached_prompt: 50,
        };
        assert_eq!(cost(&mini, odd), Cost::from_nanos(750));
        // The largest usage the record can hold stays exact.
        let opus = shipped("claude-opus-4").unwrap();
        let huge = TokenUsage {
            prompt: u64::from(u32::MAX),
            completion: u64::from(u32::MAX),
            cached_prompt: 0,
        };
        assert_eq!(
            cost(&opus, huge).nanos,
            (i64::from(u32::MAX) * 15_000 + i64::from(u32::MAX) * 75_000)
        );
    }

    #[test]
    fn a_million_small_requests_sum_exactly_where_floats_drift() {
        // 7 tokens at $0.15 per 1M: 1.05 micro-dollars each.
        let prices = Prices::micros(150_000, 0, 150_000);
        let one = cost(
            &prices,
            TokenUsage {
                prompt: 7,
                completion: 0,
                cached_prompt: 0,
            },
        );
        assert_eq!(one, Cost::from_nanos(1_050));
        let total: Cost = (0..1_000_000).map(|_| one).sum();
        assert_eq!(total, Cost::from_nanos(1_050_000_000));
        assert_eq!(total.to_string(), "$1.050000000");
        let mut float = 0.0f64;
        for _ in 0..1_000_000 {
            float += 7.0 * 0.15 / 1_000_000.0;
        }
        assert_ne!(float, 1.05, "f64 drifts: {float}");
        // Rounding each request to micro-dollars would have booked $1.00.
        assert_eq!(one.micros() * 1_000_000, 1_000_000);
    }

    #[test]
    fn micros_round_half_up() {
        assert_eq!(Cost::from_nanos(1_499).micros(), 1);
        assert_eq!(Cost::from_nanos(1_500).micros(), 2);
        assert_eq!(Cost::from_nanos(-1_500).micros(), -2);
        assert_eq!(Cost::from_nanos(0).micros(), 0);
        assert_eq!(Cost::from_micros(3).nanos, 3_000);
        assert_eq!(Cost::from_nanos(-5).to_string(), "-$0.000000005");
    }

    #[test]
    fn usd_amounts_parse_exactly_from_their_decimal_form() {
        assert_eq!(usd_to_micros("0.15"), Ok(150_000));
        assert_eq!(usd_to_micros("0.075"), Ok(75_000));
        assert_eq!(usd_to_micros("2.5"), Ok(2_500_000));
        assert_eq!(usd_to_micros("500"), Ok(500_000_000));
        assert_eq!(usd_to_micros("0.000001"), Ok(1));
        assert_eq!(usd_to_micros(".5"), Ok(500_000));
        assert_eq!(usd_to_micros("1.2300000"), Ok(1_230_000));
        assert!(usd_to_micros("0.0000001").is_err());
        assert!(usd_to_micros("-1").is_err());
        assert!(usd_to_micros("1e3").is_err());
        assert!(usd_to_micros("abc").is_err());
        assert!(usd_to_micros(".").is_err());
        assert!(usd_to_micros("99999999999999999999").is_err());
        // What TOML hands over as floats.
        for (f, micros) in [(0.15, 150_000), (0.6, 600_000), (0.075, 75_000), (1e-6, 1)] {
            assert_eq!(usd_to_micros(&f64::to_string(&f)), Ok(micros), "{f}");
        }
        assert!(usd_to_micros(&f64::to_string(&1e-7)).is_err());
    }

    #[test]
    fn prices_deserialize_from_toml_numbers_and_strings() {
        let raw: RawPrices =
            toml::from_str("input = 0.15\noutput = 1\ncached_input = \"0.075\"").unwrap();
        let mut problems = Vec::new();
        let p = raw.build(false, "models[0].prices", &mut |a, b| problems.push((a, b)));
        assert_eq!(p, Prices::micros(150_000, 1_000_000, 75_000));
        assert!(problems.is_empty());
        let raw: RawPrices = toml::from_str("input = 0.02").unwrap();
        let p = raw.build(true, "m", &mut |a, b| problems.push((a, b)));
        assert_eq!(p, Prices::micros(20_000, 0, 20_000));
        raw.build(false, "models[1].prices", &mut |a, b| problems.push((a, b)));
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "models[1].prices.output");
        assert!(toml::from_str::<RawPrices>("input = 0.0000001").is_err());
        assert!(toml::from_str::<RawPrices>("input = -1.0").is_err());
        assert!(toml::from_str::<RawPrices>("input = 1\nbogus = 2").is_err());
    }
}
