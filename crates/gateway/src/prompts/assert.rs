//! Test-case assertions: the output guard's validators (`max_words`, `contains`,
//! `json_schema`, ... share its implementation, one home per check) plus two that only
//! make sense for a test with a known answer: `starts_with` and `equals`.

use crate::guard::output::Validator;

/// One assertion on an answer.
#[derive(Debug, Clone)]
pub enum Assertion {
    /// Any output-guard validator.
    Check(Validator),
    /// The answer (leading whitespace ignored) starts with this text.
    StartsWith(String),
    /// The answer equals this text (surrounding whitespace ignored).
    Equals(String),
}

pub const NAMES: &str = "max_words, min_words, max_chars, contains, not_contains, regex, starts_with, json, json_schema, equals";

impl Assertion {
    /// Read one assertion from its TOML form, a table with one key, e.g.
    /// `{ max_words = 150 }` or `{ starts_with = "Hi" }`.
    pub fn from_toml(value: toml::Value) -> Result<Assertion, String> {
        if let toml::Value::Table(t) = &value
            && t.len() == 1
            && let Some((name, v)) = t.iter().next()
        {
            let text = || {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("`{name}` takes a string"))
            };
            match name.as_str() {
                "starts_with" => return Ok(Assertion::StartsWith(text()?)),
                "equals" => return Ok(Assertion::Equals(text()?)),
                _ => {}
            }
        }
        Validator::from_toml(value)
            .map(Assertion::Check)
            .map_err(|e| {
                if e.starts_with("unknown validator") {
                    format!("{e}; assertions: {NAMES}")
                } else {
                    e
                }
            })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Assertion::Check(v) => v.name(),
            Assertion::StartsWith(_) => "starts_with",
            Assertion::Equals(_) => "equals",
        }
    }

    /// `Err` says why the answer fails.
    pub fn check(&self, text: &str) -> Result<(), String> {
        match self {
            Assertion::Check(v) => v.check(text),
            Assertion::StartsWith(prefix) => {
                if text.trim_start().starts_with(prefix.as_str()) {
                    Ok(())
                } else {
                    Err(format!("does not start with \"{prefix}\""))
                }
            }
            Assertion::Equals(expected) => {
                if text.trim() == expected.trim() {
                    Ok(())
                } else {
                    Err(format!("is not \"{expected}\""))
                }
            }
        }
    }
}

/// Every failed assertion, named: `max_words: 160 words, more than 150`.
pub fn failures(assertions: &[Assertion], text: &str) -> Vec<String> {
    assertions
        .iter()
        .filter_map(|a| {
            a.check(text)
                .err()
                .map(|why| format!("{}: {why}", a.name()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(toml_text: &str) -> Result<Assertion, String> {
        let value: toml::Table = toml::from_str(&format!("v = {toml_text}")).unwrap();
        Assertion::from_toml(value["v"].clone())
    }

    #[test]
    fn every_assertion_passes_and_fails() {
        let cases = [
            ("{ max_words = 3 }", "a b c", "a b c d"),
            ("{ min_words = 2 }", "a b", "a"),
            ("{ max_chars = 3 }", "abc", "abcd"),
            (r#"{ contains = "book" }"#, "Book a call", "hello"),
            (
                r#"{ not_contains = "statistics show" }"#,
                "hi",
                "Statistics show x",
            ),
            (r#"{ regex = "\\?$" }"#, "Free Tuesday?", "Free Tuesday."),
            (r#"{ starts_with = "Hi" }"#, "  Hi Dana", "Hello Dana"),
            ("{ json = true }", "{\"a\": 1}", "{a}"),
            (
                r#"{ json_schema = { type = "object", required = ["a"] } }"#,
                "{\"a\": 1}",
                "{}",
            ),
            (r#"{ equals = "yes" }"#, " yes\n", "yes!"),
        ];
        for (assertion, pass, fail) in cases {
            let a = a(assertion).unwrap();
            assert!(a.check(pass).is_ok(), "{assertion} on {pass:?}");
            assert!(a.check(fail).is_err(), "{assertion} on {fail:?}");
        }
    }

    #[test]
    fn unknown_assertions_list_the_vocabulary() {
        let e = a("{ shorter_than = 3 }").unwrap_err();
        assert!(e.contains("starts_with") && e.contains("equals"), "{e}");
        assert!(a("{ starts_with = 3 }").unwrap_err().contains("string"));
    }

    #[test]
    fn failures_name_the_assertion() {
        let list = [
            a("{ max_words = 1 }").unwrap(),
            a(r#"{ equals = "x" }"#).unwrap(),
        ];
        let f = failures(&list, "two words");
        assert_eq!(f.len(), 2);
        assert!(
            f[0].starts_with("max_words:") && f[1].starts_with("equals:"),
            "{f:?}"
        );
    }
}
