//! Input token counts for caps: exact (tiktoken) for OpenAI-family models, a documented
//! estimate for the rest.

/// Tokens in `text` as `model` would count them. OpenAI-family names (`gpt-`, `o1`,
/// `o3`, `o4`, `chatgpt-`, `text-embedding-`) use their real encoding: o200k for gpt-4o
/// and later, cl100k for gpt-4, gpt-3.5 and the embedding models. Other models (Claude,
/// Llama, ...) get ceil(chars / 4): their tokenizers are not public or differ, and four
/// characters a token is the usual English average (code and non-Latin text run denser).
///
/// Exact counting runs over pieces of at most [`PIECE`] bytes, cut at whitespace when
/// there is some: BPE merging is quadratic in the length of one unbroken run ("aaaa…"),
/// so a hostile 400 KB word would otherwise cost seconds of CPU. A cut can split a token
/// in two, so the count may run a token high per piece: harmless for a cap.
pub fn count(model: &str, text: &str) -> usize {
    match encoding(model) {
        Some(bpe) => pieces(text).map(|p| bpe.encode_ordinary(p).len()).sum(),
        None => estimate(text),
    }
}

/// Largest piece handed to the tokenizer at once.
const PIECE: usize = 2048;

fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        if rest.len() <= PIECE {
            return Some(std::mem::take(&mut rest));
        }
        let mut cut = PIECE;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        // Prefer the last whitespace in the piece, so words stay whole.
        if let Some(ws) = rest[..cut]
            .rfind(char::is_whitespace)
            .filter(|&i| i > PIECE / 2)
        {
            cut = ws;
        }
        let (head, tail) = rest.split_at(cut);
        rest = tail;
        Some(head)
    })
}

/// The cheap upper bound used to skip exact counting: no encoding makes more tokens
/// than the text has bytes.
pub fn upper_bound(text_bytes: usize) -> usize {
    text_bytes
}

pub fn estimate(text: &str) -> usize {
    text.chars().count().div_ceil(4)
}

fn encoding(model: &str) -> Option<&'static tiktoken_rs::CoreBPE> {
    let m = model.to_ascii_lowercase();
    let cl100k = m.starts_with("gpt-4-")
        || m == "gpt-4"
        || m.starts_with("gpt-3.5")
        || m.starts_with("text-embedding-");
    let o200k = m.starts_with("gpt-")
        || m.starts_with("o1")
        || m.starts_with("o3")
        || m.starts_with("o4")
        || m.starts_with("chatgpt-");
    if cl100k && !m.starts_with("gpt-4o") && !m.starts_with("gpt-4.") {
        Some(tiktoken_rs::cl100k_base_singleton())
    } else if o200k {
        Some(tiktoken_rs::o200k_base_singleton())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_unbroken_runs_are_counted_in_pieces() {
        let hostile = "a".repeat(400_000);
        let n = count("gpt-4o-mini", &hostile);
        assert!(n > 0 && n <= 400_000, "{n}");
        let accents = "é".repeat(3000);
        assert!(
            pieces(&accents).all(|p| p.len() <= PIECE),
            "cuts fall on char boundaries"
        );
        assert_eq!(pieces(&accents).collect::<String>(), accents);
        let text = "word ".repeat(2000);
        assert_eq!(
            super::pieces(&text).collect::<String>(),
            text,
            "pieces cover the text exactly"
        );
    }

    #[test]
    fn openai_models_count_exactly_and_others_estimate() {
        // "hello world" is two tokens in both OpenAI encodings.
        assert_eq!(count("gpt-4o-mini", "hello world"), 2);
        assert_eq!(count("gpt-3.5-turbo", "hello world"), 2);
        assert_eq!(count("claude-3-5-haiku", "hello world"), 3);
        assert!(count("gpt-4o", &"word ".repeat(1000)) <= upper_bound(5000));
        assert_eq!(estimate(""), 0);
    }
}
