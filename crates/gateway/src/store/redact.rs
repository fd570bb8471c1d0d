//! Secret redaction for the opt-in stored bodies: provider keys, bearer tokens, cloud
//! credentials, and JSON fields whose names say they hold a secret.

use std::sync::LazyLock;

use regex::Regex;

const MASK: &str = "[REDACTED]";

static PATTERNS: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    [
        // OpenAI / Anthropic / generic "sk-" keys.
        r"sk-[A-Za-z0-9_\-]{16,}",
        // Bearer tokens in pasted headers.
        r"(?i)bearer\s+[A-Za-z0-9_\-\.=]{16,}",
        // AWS access key ids.
        r"\bAKIA[0-9A-Z]{16}\b",
        // GitHub tokens.
        r"\bgh[pousr]_[A-Za-z0-9]{20,}\b",
        // JSON fields named like secrets: keep the name, mask the value.
        r#"(?i)"(api[_-]?key|secret|password|passwd|token|access[_-]?token|authorization)"\s*:\s*"[^"]*""#,
    ]
    .iter()
    .filter_map(|p| Regex::new(p).ok())
    .collect()
});

/// `text` with every secret-looking span replaced by `[REDACTED]`.
pub fn redact_secrets(text: &str) -> String {
    let mut out = text.to_string();
    for (i, re) in PATTERNS.iter().enumerate() {
        let replaced = if i == PATTERNS.len() - 1 {
            re.replace_all(&out, |c: &regex::Captures<'_>| {
                format!(r#""{}": "{MASK}""#, &c[1])
            })
        } else {
            re.replace_all(&out, MASK)
        };
        out = replaced.into_owned();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_and_the_rest_kept() {
        let text = r#"{"content": "my key is sk-proj-abcdefghijklmnop1234 ok", "api_key": "hunter2", "note": "Bearer abcdefghijklmnopqrstu and AKIAABCDEFGHIJKLMNOP"}"#;
        let out = redact_secrets(text);
        assert!(!out.contains("sk-proj-abcdefghijklmnop1234"), "{out}");
        assert!(!out.contains("hunter2"), "{out}");
        assert!(!out.contains("abcdefghijklmnopqrstu"), "{out}");
        assert!(!out.contains("AKIAABCDEFGHIJKLMNOP"), "{out}");
        assert!(out.contains(r#""api_key": "[REDACTED]""#), "{out}");
        assert!(out.contains("my key is [REDACTED] ok"), "{out}");
        assert_eq!(redact_secrets("nothing secret here"), "nothing secret here");
    }
}
