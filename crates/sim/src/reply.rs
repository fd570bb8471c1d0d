//! Deterministic content: chat replies, embeddings and the token estimate they are measured with.
//!
//! Everything here is a pure function of its input. The hash is written here (FNV-1a to
//! absorb bytes, splitmix64 to stretch) rather than taken from `std`, because
//! `DefaultHasher` is explicitly unstable across Rust releases and the outputs of the
//! simulator must never change between builds: fixtures and benchmarks compare them.

/// FNV-1a 64-bit offset basis.
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64-bit prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Words the replies are drawn from. Fixed forever: changing it changes every reply.
const WORDS: &[&str] = &[
    "the",
    "gateway",
    "routes",
    "each",
    "request",
    "to",
    "a",
    "simulated",
    "model",
    "that",
    "answers",
    "with",
    "stable",
    "text",
    "so",
    "tests",
    "can",
    "compare",
    "bytes",
    "across",
    "runs",
    "and",
    "machines",
    "while",
    "latency",
    "stays",
    "low",
    "under",
    "load",
    "every",
    "token",
    "is",
    "counted",
    "once",
    "budget",
    "limits",
    "hold",
    "retries",
    "back",
    "off",
    "when",
    "upstream",
    "fails",
    "streams",
    "arrive",
    "in",
    "small",
    "pieces",
    "clients",
    "read",
    "them",
    "as",
    "they",
    "come",
    "cache",
    "hits",
    "skip",
    "work",
    "keys",
    "stay",
    "secret",
    "metrics",
    "show",
    "what",
    "happened",
];

/// Shortest and longest reply body, in words after the "Simulated reply:" prefix.
const MIN_WORDS: u64 = 12;
const MAX_WORDS: u64 = 40;

/// Default embedding width for models that do not name one.
pub const DEFAULT_EMBEDDING_DIMS: usize = 1536;

/// A generated chat reply, with the pieces a stream would send it in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub text: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Streaming deltas: one per word, each after the first carrying its leading space.
    /// Their concatenation is exactly `text`.
    pub pieces: Vec<String>,
    /// `"stop"` when the reply ended by itself, `"length"` when `max_tokens` cut it.
    pub finish_reason: &'static str,
}

/// Absorbs bytes into an FNV-1a state.
pub fn fnv1a(state: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(state, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// FNV-1a of `bytes` from the standard offset basis.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    fnv1a(FNV_OFFSET, bytes)
}

/// The splitmix64 finaliser: spreads a counter or a weak hash over all 64 bits.
pub fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Maps a hash to a float in `[0, 1)` using its top 53 bits.
pub fn unit_f64(h: u64) -> f64 {
    // 53 bits fit an f64 mantissa exactly, so the result is uniform and never reaches 1.
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// A splitmix64 sequence: tiny, stable, and good enough for picking words.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        // mix64 adds the golden-ratio increment itself, so this is standard splitmix64.
        let z = self.0;
        self.0 = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(z)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Estimated token count of `text`.
///
/// The estimate: each run of letters or digits costs one token per started four
/// characters (so "the" is 1 and "simulated" is 3), and every other non-space character
/// (punctuation, symbols) costs one. It is additive over pieces split at whitespace,
/// which is what lets a stream's deltas sum to the completion token count.
pub fn count_tokens(text: &str) -> u32 {
    let mut tokens: u32 = 0;
    let mut run: u32 = 0;
    for c in text.chars() {
        if c.is_alphanumeric() {
            run += 1;
            continue;
        }
        tokens = tokens.saturating_add(run.div_ceil(4));
        run = 0;
        if !c.is_whitespace() {
            tokens = tokens.saturating_add(1);
        }
    }
    tokens.saturating_add(run.div_ceil(4))
}

/// Deterministic reply for a chat request: same input text (+ same model) gives the same
/// reply. `max_tokens` caps completion tokens (finish_reason `"length"` when capped).
pub fn chat_reply(model: &str, prompt_text: &str, max_tokens: Option<u32>) -> Reply {
    chat_reply_variant(model, prompt_text, max_tokens, 0)
}

/// Like [`chat_reply`] but for choice `variant` of a request asking for several (`n`).
/// Variant 0 is exactly [`chat_reply`]; others differ so the choices are not copies.
pub fn chat_reply_variant(
    model: &str,
    prompt_text: &str,
    max_tokens: Option<u32>,
    variant: u32,
) -> Reply {
    // A separator byte that cannot occur in UTF-8 keeps ("ab","c") apart from ("a","bc").
    let mut seed = fnv1a(FNV_OFFSET, model.as_bytes());
    seed = fnv1a(seed, &[0xff]);
    seed = fnv1a(seed, prompt_text.as_bytes());
    if variant > 0 {
        seed = fnv1a(seed, &[0xfe]);
        seed = fnv1a(seed, &variant.to_le_bytes());
    }
    let mut rng = SplitMix(seed);
    let words = MIN_WORDS + rng.below(MAX_WORDS - MIN_WORDS + 1);

    let mut pieces: Vec<String> = Vec::with_capacity(words as usize + 2);
    pieces.push("Simulated".to_owned());
    pieces.push(" reply:".to_owned());
    // Sentences of 5 to 12 words, each capitalised and ended with a full stop.
    let mut sentence_left = 5 + rng.below(8);
    let mut capital = true;
    for i in 0..words {
        let word = WORDS[rng.below(WORDS.len() as u64) as usize];
        let mut piece = String::with_capacity(word.len() + 2);
        piece.push(' ');
        if capital {
            let mut chars = word.chars();
            if let Some(first) = chars.next() {
                piece.extend(first.to_uppercase());
                piece.push_str(chars.as_str());
            }
        } else {
            piece.push_str(word);
        }
        sentence_left -= 1;
        capital = sentence_left == 0;
        if capital || i + 1 == words {
            piece.push('.');
            sentence_left = 5 + rng.below(8);
        }
        pieces.push(piece);
    }

    // A prompt asking for an outreach message gets a plausible one instead of word salad.
    if let Some(text) = outreach::message(prompt_text, seed) {
        pieces = split_pieces(&text);
    }

    let mut completion_tokens: u32 = 0;
    let mut finish_reason = "stop";
    if let Some(cap) = max_tokens {
        let mut kept = 0;
        for piece in &pieces {
            let cost = count_tokens(piece);
            if completion_tokens + cost > cap {
                finish_reason = "length";
                break;
            }
            completion_tokens += cost;
            kept += 1;
        }
        pieces.truncate(kept);
    } else {
        completion_tokens = pieces.iter().map(|p| count_tokens(p)).sum();
    }

    Reply {
        text: pieces.concat(),
        prompt_tokens: count_tokens(prompt_text),
        completion_tokens,
        pieces,
        finish_reason,
    }
}

/// `text` as stream deltas: each word with the whitespace before it, so they concatenate
/// back to `text`.
fn split_pieces(text: &str) -> Vec<String> {
    let mut pieces: Vec<String> = Vec::new();
    let mut current = String::new();
    let mut in_word = false;
    for c in text.chars() {
        if c.is_whitespace() && in_word {
            pieces.push(std::mem::take(&mut current));
            in_word = false;
        } else if !c.is_whitespace() {
            in_word = true;
        }
        current.push(c);
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

/// Sales outreach messages, for prompts that ask for one.
mod outreach {
    /// The marker a prompt carries when it wants an outreach message.
    const ASKS: &str = "outreach message";

    /// A short outreach email built only from what the prompt states: `Recipient name:`,
    /// `Company:`, `Product:`, `Fact:` lines (two facts at most) and `Sender:`. One call
    /// to action, never a claim the prompt did not make. `None` when the prompt does not
    /// ask for an outreach message.
    pub fn message(prompt: &str, seed: u64) -> Option<String> {
        if !prompt.to_lowercase().contains(ASKS) {
            return None;
        }
        let field = |key: &str| {
            prompt.lines().find_map(|l| {
                let l = l.trim().trim_start_matches("- ");
                let (k, v) = l.split_once(':')?;
                (k.trim().eq_ignore_ascii_case(key) && !v.trim().is_empty())
                    .then(|| v.trim().to_string())
            })
        };
        let facts: Vec<String> = prompt
            .lines()
            .filter_map(|l| {
                let (k, v) = l.trim().trim_start_matches("- ").split_once(':')?;
                (k.trim().eq_ignore_ascii_case("fact") && !v.trim().is_empty())
                    .then(|| v.trim().trim_end_matches('.').to_string())
            })
            .take(2)
            .collect();
        let name = field("recipient name").unwrap_or_else(|| "there".into());
        let first = name
            .split_whitespace()
            .next()
            .unwrap_or("there")
            .to_string();
        let company = field("company").unwrap_or_else(|| "your team".into());
        let product = field("product").unwrap_or_else(|| "our product".into());
        let sender = field("sender").unwrap_or_else(|| "The team".into());
        let pick = |options: &[&'static str], salt: u64| {
            options[(super::mix64(seed ^ salt) % options.len() as u64) as usize]
        };
        let opener = pick(
            &[
                "I noticed {company} is growing its engineering team",
                "Teams like {company} often tell us the same thing",
                "I have been following what {company} is building",
            ],
            1,
        );
        let ask = pick(
            &[
                "Would you be open to a 15-minute call next week?",
                "Could we find 15 minutes next week to see if it fits?",
                "Are you free for a short call next Tuesday or Wednesday?",
            ],
            2,
        );
        let mut body = format!("Hi {first},\n\n{}.", opener.replace("{company}", &company));
        match facts.as_slice() {
            [] => body.push_str(&format!(" {product} might help.")),
            [one] => body.push_str(&format!(" With {product} you get {one}.")),
            [one, two, ..] => body.push_str(&format!(" With {product} you get {one}, and {two}.")),
        }
        body.push_str(&format!("\n\n{ask}\n\nBest,\n{sender}"));
        Some(body)
    }
}

/// Embedding width a model answers with when the request names no `dimensions`.
pub fn default_dims(model: &str) -> usize {
    match model {
        "text-embedding-3-large" => 3072,
        _ => DEFAULT_EMBEDDING_DIMS,
    }
}

/// Deterministic unit-length embedding of `input`, `dims` wide.
pub fn embedding(input: &str, dims: usize) -> Vec<f32> {
    embedding_from_hash(hash_bytes(input.as_bytes()), dims)
}

/// Deterministic unit-length embedding of a pre-tokenised input.
pub fn embedding_of_tokens(tokens: &[u32], dims: usize) -> Vec<f32> {
    // A different basis from text so a token array never collides with its own digits.
    let h = tokens
        .iter()
        .fold(mix64(FNV_OFFSET), |h, t| fnv1a(h, &t.to_le_bytes()));
    embedding_from_hash(h, dims)
}

fn embedding_from_hash(seed: u64, dims: usize) -> Vec<f32> {
    let mut rng = SplitMix(seed);
    let mut v: Vec<f32> = (0..dims)
        .map(|_| (unit_f64(rng.next()) * 2.0 - 1.0) as f32)
        .collect();
    let norm = v
        .iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        let inv = (1.0 / norm) as f32;
        v.iter_mut().for_each(|x| *x *= inv);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_input_same_reply_and_different_input_differs() {
        let a = chat_reply("gpt-4o-mini", "hello there", None);
        let b = chat_reply("gpt-4o-mini", "hello there", None);
        assert_eq!(a, b);
        let c = chat_reply("gpt-4o-mini", "hello there!", None);
        assert_ne!(a.text, c.text);
        let d = chat_reply("gpt-4o", "hello there", None);
        assert_ne!(a.text, d.text);
    }

    #[test]
    fn reply_shape_and_pieces() {
        for prompt in ["a", "hello", "tell me a story", "ünïcödé ✓", ""] {
            let r = chat_reply("m", prompt, None);
            assert!(r.text.starts_with("Simulated reply: "), "{}", r.text);
            assert!(r.text.ends_with('.'), "{}", r.text);
            assert_eq!(r.pieces.concat(), r.text);
            let words = r.pieces.len() as u64 - 2;
            assert!((MIN_WORDS..=MAX_WORDS).contains(&words), "{words}");
            assert!(r.pieces[1..].iter().all(|p| p.starts_with(' ')));
            assert_eq!(r.completion_tokens, count_tokens(&r.text));
            assert_eq!(r.prompt_tokens, count_tokens(prompt));
            assert_eq!(r.finish_reason, "stop");
        }
    }

    #[test]
    fn variants_differ_but_zero_is_the_plain_reply() {
        let plain = chat_reply("m", "p", None);
        assert_eq!(chat_reply_variant("m", "p", None, 0), plain);
        assert_ne!(chat_reply_variant("m", "p", None, 1).text, plain.text);
    }

    #[test]
    fn max_tokens_caps_with_length() {
        let full = chat_reply("m", "cap me", None);
        assert!(full.completion_tokens > 5);
        let capped = chat_reply("m", "cap me", Some(5));
        assert_eq!(capped.finish_reason, "length");
        assert!(capped.completion_tokens <= 5);
        assert_eq!(capped.completion_tokens, count_tokens(&capped.text));
        assert_eq!(capped.pieces.concat(), capped.text);
        assert!(full.text.starts_with(&capped.text));
        let zero = chat_reply("m", "cap me", Some(0));
        assert_eq!(zero.text, "");
        assert_eq!(zero.finish_reason, "length");
        let roomy = chat_reply("m", "cap me", Some(full.completion_tokens));
        assert_eq!(roomy, full);
    }

    #[test]
    fn outreach_prompts_get_a_short_message_from_the_facts_given() {
        let prompt = "Write a short outreach message.\nRecipient name: Dana Ruiz\nCompany: Acme\nProduct: Sluice\nFact: one binary, no services to run\nFact: retries and fallbacks built in\nFact: a third fact\nSender: Sam";
        let r = chat_reply("gpt-4o-mini", prompt, None);
        assert!(r.text.starts_with("Hi Dana,"), "{}", r.text);
        assert!(
            r.text.contains(
                "With Sluice you get one binary, no services to run, and retries and fallbacks built in."
            ),
            "{}",
            r.text
        );
        assert!(!r.text.contains("third fact"), "{}", r.text);
        assert_eq!(r.text.matches('?').count(), 1, "{}", r.text);
        assert!(r.text.ends_with("Best,\nSam"), "{}", r.text);
        assert!(r.text.split_whitespace().count() < 150);
        assert_eq!(r.pieces.concat(), r.text);
        assert_eq!(r.completion_tokens, count_tokens(&r.text));
        assert_eq!(r, chat_reply("gpt-4o-mini", prompt, None));
        let capped = chat_reply("gpt-4o-mini", prompt, Some(5));
        assert_eq!(capped.finish_reason, "length");
        assert!(r.text.starts_with(&capped.text));
        // Other prompts keep their word-salad replies.
        assert!(
            chat_reply("m", "write a message", None)
                .text
                .starts_with("Simulated reply:")
        );
    }

    #[test]
    fn token_estimate() {
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens("the"), 1);
        assert_eq!(count_tokens("simulated"), 3);
        assert_eq!(count_tokens("Hello, world!"), 6);
        assert_eq!(count_tokens("  a  b  "), 2);
    }

    #[test]
    fn embeddings_are_stable_unit_vectors() {
        let a = embedding("hello", 1536);
        assert_eq!(a.len(), 1536);
        assert_eq!(a, embedding("hello", 1536));
        assert_ne!(a, embedding("hellp", 1536));
        let norm: f64 = a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        assert_eq!(embedding("x", 256).len(), 256);
        assert_ne!(
            embedding_of_tokens(&[1, 2], 8),
            embedding_of_tokens(&[2, 1], 8)
        );
        assert_eq!(default_dims("text-embedding-3-large"), 3072);
        assert_eq!(default_dims("text-embedding-3-small"), 1536);
    }

    #[test]
    fn outputs_never_change_between_builds() {
        // Pinned values: if this fails, every recorded fixture downstream is invalid.
        assert_eq!(hash_bytes(b""), FNV_OFFSET);
        assert_eq!(hash_bytes(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(mix64(0), 0xe220_a839_7b1d_cdaf);
        assert_eq!(
            chat_reply("gpt-4o-mini", "hi", None).text,
            "Simulated reply: Work that tests arrive with model. Fails upstream so answers \
             text simulated token. Once clients come arrive stay when stable hold stable \
             what fails. Token what keys under off tests counted bytes what. Retries they."
        );
    }
}
