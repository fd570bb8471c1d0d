//! Output validators: checks an answer must pass (`max_words`, `not_contains`,
//! `json_schema`, ...). The same vocabulary serves the output guard and, later, prompt
//! files.

use std::sync::Arc;

use regex::Regex;

/// One check on an answer's text.
#[derive(Debug, Clone)]
pub enum Validator {
    MaxWords(usize),
    MinWords(usize),
    MaxChars(usize),
    /// Every phrase must appear (case-insensitive).
    Contains(Vec<String>),
    /// No phrase may appear (case-insensitive), e.g. "statistics show".
    NotContains(Vec<String>),
    Regex(Regex),
    /// The answer parses as JSON.
    Json,
    JsonSchema(Arc<jsonschema::Validator>),
}

impl Validator {
    /// Read one validator from its TOML form, a table with one key:
    /// `{ max_words = 150 }`, `{ not_contains = ["statistics show"] }`, `{ json = true }`,
    /// `{ json_schema = { type = "object", required = ["name"] } }`.
    pub fn from_toml(value: toml::Value) -> Result<Validator, String> {
        let toml::Value::Table(table) = value else {
            return Err("a validator is a table with one key, e.g. { max_words = 150 }".into());
        };
        let mut entries = table.into_iter();
        let (Some((name, v)), None) = (entries.next(), entries.next()) else {
            return Err("a validator is a table with exactly one key".into());
        };
        let count = |v: &toml::Value| {
            v.as_integer()
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| format!("`{name}` takes a non-negative integer"))
        };
        let phrases = |v: toml::Value| -> Result<Vec<String>, String> {
            match v {
                toml::Value::String(s) => Ok(vec![s.to_lowercase()]),
                toml::Value::Array(items) => items
                    .into_iter()
                    .map(|i| {
                        i.as_str()
                            .map(str::to_lowercase)
                            .ok_or_else(|| format!("`{name}` takes strings"))
                    })
                    .collect(),
                _ => Err(format!("`{name}` takes a string or an array of strings")),
            }
        };
        match name.as_str() {
            "max_words" => Ok(Validator::MaxWords(count(&v)?)),
            "min_words" => Ok(Validator::MinWords(count(&v)?)),
            "max_chars" => Ok(Validator::MaxChars(count(&v)?)),
            "contains" => Ok(Validator::Contains(phrases(v)?)),
            "not_contains" => Ok(Validator::NotContains(phrases(v)?)),
            "regex" => {
                let pattern = v.as_str().ok_or("`regex` takes a string")?;
                Regex::new(pattern)
                    .map(Validator::Regex)
                    .map_err(|e| format!("invalid regex: {e}"))
            }
            "json" => match v.as_bool() {
                Some(true) => Ok(Validator::Json),
                _ => Err("`json` takes `true`".into()),
            },
            "json_schema" => {
                let schema =
                    serde_json::to_value(&v).map_err(|e| format!("invalid schema: {e}"))?;
                jsonschema::validator_for(&schema)
                    .map(|v| Validator::JsonSchema(Arc::new(v)))
                    .map_err(|e| format!("invalid JSON schema: {e}"))
            }
            other => Err(format!(
                "unknown validator `{other}` (expected max_words, min_words, max_chars, contains, not_contains, regex, json, json_schema)"
            )),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Validator::MaxWords(_) => "max_words",
            Validator::MinWords(_) => "min_words",
            Validator::MaxChars(_) => "max_chars",
            Validator::Contains(_) => "contains",
            Validator::NotContains(_) => "not_contains",
            Validator::Regex(_) => "regex",
            Validator::Json => "json",
            Validator::JsonSchema(_) => "json_schema",
        }
    }

    /// `Err` says why the answer fails this check.
    pub fn check(&self, text: &str) -> Result<(), String> {
        match self {
            Validator::MaxWords(n) => {
                let words = text.split_whitespace().count();
                (words <= *n)
                    .then_some(())
                    .ok_or_else(|| format!("{words} words, more than {n}"))
            }
            Validator::MinWords(n) => {
                let words = text.split_whitespace().count();
                (words >= *n)
                    .then_some(())
                    .ok_or_else(|| format!("{words} words, fewer than {n}"))
            }
            Validator::MaxChars(n) => {
                let chars = text.chars().count();
                (chars <= *n)
                    .then_some(())
                    .ok_or_else(|| format!("{chars} characters, more than {n}"))
            }
            Validator::Contains(phrases) => {
                let lower = text.to_lowercase();
                match phrases.iter().find(|p| !lower.contains(p.as_str())) {
                    None => Ok(()),
                    Some(p) => Err(format!("does not contain \"{p}\"")),
                }
            }
            Validator::NotContains(phrases) => {
                let lower = text.to_lowercase();
                match phrases.iter().find(|p| lower.contains(p.as_str())) {
                    None => Ok(()),
                    Some(p) => Err(format!("contains \"{p}\"")),
                }
            }
            Validator::Regex(re) => re
                .is_match(text)
                .then_some(())
                .ok_or_else(|| format!("does not match /{}/", re.as_str())),
            Validator::Json => serde_json::from_str::<serde_json::Value>(strip_fence(text))
                .map(|_| ())
                .map_err(|e| format!("not JSON: {e}")),
            Validator::JsonSchema(schema) => {
                let value: serde_json::Value = serde_json::from_str(strip_fence(text))
                    .map_err(|e| format!("not JSON: {e}"))?;
                match schema.iter_errors(&value).next() {
                    None => Ok(()),
                    Some(e) => Err(format!("schema: {e} at {}", e.instance_path())),
                }
            }
        }
    }
}

/// Models often wrap JSON in a ```json fence; the JSON inside is what counts.
fn strip_fence(text: &str) -> &str {
    let t = text.trim();
    t.strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|r| r.strip_suffix("```"))
        .map(str::trim)
        .unwrap_or(t)
}

/// Run every validator; the failures, named.
pub fn failures(validators: &[Validator], text: &str) -> Vec<String> {
    validators
        .iter()
        .filter_map(|v| {
            v.check(text)
                .err()
                .map(|why| format!("{}: {why}", v.name()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(toml_text: &str) -> Validator {
        let value: toml::Table = toml::from_str(&format!("v = {toml_text}")).unwrap();
        Validator::from_toml(value["v"].clone()).unwrap()
    }

    #[test]
    fn each_validator_passes_and_fails() {
        assert!(v("{ max_words = 3 }").check("one two three").is_ok());
        assert!(v("{ max_words = 3 }").check("one two three four").is_err());
        assert!(v("{ min_words = 2 }").check("one").is_err());
        assert!(v("{ max_chars = 3 }").check("héé").is_ok());
        assert!(v("{ max_chars = 3 }").check("abcd").is_err());
        assert!(
            v(r#"{ contains = ["Hello"] }"#)
                .check("oh hello there")
                .is_ok()
        );
        assert!(v(r#"{ contains = "bye" }"#).check("hello").is_err());
        let not = v(r#"{ not_contains = ["statistics show"] }"#);
        assert!(not.check("Statistics show that...").is_err());
        assert!(not.check("The numbers say").is_ok());
        assert!(v(r#"{ regex = "^\\d+$" }"#).check("123").is_ok());
        assert!(v(r#"{ regex = "^\\d+$" }"#).check("12a").is_err());
        assert!(
            v("{ json = true }")
                .check("```json\n{\"a\": 1}\n```")
                .is_ok()
        );
        assert!(v("{ json = true }").check("{a: 1}").is_err());
        let schema = v(
            r#"{ json_schema = { type = "object", required = ["name"], properties = { name = { type = "string" } } } }"#,
        );
        assert!(schema.check(r#"{"name": "x"}"#).is_ok());
        let why = schema.check(r#"{"name": 3}"#).unwrap_err();
        assert!(why.contains("/name"), "{why}");
        assert!(schema.check("{}").is_err());
    }

    #[test]
    fn bad_validators_are_explained() {
        let bad = |t: &str| {
            let value: toml::Table = toml::from_str(&format!("v = {t}")).unwrap();
            Validator::from_toml(value["v"].clone()).unwrap_err()
        };
        assert!(bad("{ max_words = -1 }").contains("non-negative"));
        assert!(bad("{ regex = \"(\" }").contains("invalid regex"));
        assert!(bad("{ nonsense = 1 }").contains("unknown validator"));
        assert!(bad("{ max_words = 1, min_words = 2 }").contains("exactly one"));
        assert!(bad(r#"{ json_schema = { type = 12 } }"#).contains("invalid JSON schema"));
    }

    #[test]
    fn failures_name_the_validator() {
        let vs = [v("{ max_words = 2 }"), v(r#"{ not_contains = "x" }"#)];
        assert_eq!(failures(&vs, "a b"), Vec::<String>::new());
        let f = failures(&vs, "a b x");
        assert_eq!(f.len(), 2);
        assert!(f[0].starts_with("max_words:") && f[1].starts_with("not_contains:"));
    }
}
