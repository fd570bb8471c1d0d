//! One prompt version file (`prompts/ID/vN.toml`): its raw TOML shape, and the validated
//! [`PromptVersion`] with its compiled templates and content hash.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::assert::Assertion;
use crate::guard::OnFail;
use crate::guard::output::Validator;
use crate::wire::ChatRequest;

/// The largest template output, in characters: a prompt that renders more than this is
/// refused (a loop over a client's list cannot blow up the upstream request).
pub const MAX_RENDERED_CHARS: usize = 200_000;
/// minijinja fuel per render: bounds the work a template may do.
const RENDER_FUEL: u64 = 200_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    description: Option<String>,
    #[serde(default)]
    labels: Vec<String>,
    model: Option<String>,
    #[serde(default)]
    params: Map<String, Value>,
    system: Option<String>,
    user: Option<String>,
    #[serde(default)]
    variables: BTreeMap<String, RawVariable>,
    #[serde(default)]
    validators: Vec<toml::Value>,
    on_fail: Option<OnFail>,
    retries: Option<u32>,
    fallback: Option<String>,
    #[serde(default)]
    tests: Vec<RawCase>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawVariable {
    #[serde(rename = "type")]
    kind: VarType,
    required: Option<bool>,
    max_length: Option<usize>,
    default: Option<Value>,
    /// Documentation only: left out of the content hash (serialized only for it), so
    /// rewording it needs no new version.
    #[serde(skip_serializing)]
    #[expect(dead_code, reason = "read by people, not by the gateway")]
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    name: String,
    #[serde(default)]
    variables: Map<String, Value>,
    #[serde(default, rename = "assert")]
    assertions: Vec<toml::Value>,
}

/// A variable's type, checked against what the client sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VarType {
    String,
    Integer,
    Number,
    Boolean,
    Array,
    Object,
}

impl VarType {
    pub fn as_str(self) -> &'static str {
        match self {
            VarType::String => "string",
            VarType::Integer => "integer",
            VarType::Number => "number",
            VarType::Boolean => "boolean",
            VarType::Array => "array",
            VarType::Object => "object",
        }
    }

    pub fn accepts(self, v: &Value) -> bool {
        match self {
            VarType::String => v.is_string(),
            VarType::Integer => v.is_i64() || v.is_u64(),
            VarType::Number => v.is_number(),
            VarType::Boolean => v.is_boolean(),
            VarType::Array => v.is_array(),
            VarType::Object => v.is_object(),
        }
    }
}

/// One declared variable.
#[derive(Debug, Clone)]
pub struct Variable {
    pub kind: VarType,
    pub required: bool,
    /// Characters for a string, items for an array.
    pub max_length: Option<usize>,
    pub default: Option<Value>,
}

/// One test case: variables in, assertions on the answer.
#[derive(Debug, Clone)]
pub struct TestCase {
    pub name: String,
    pub variables: Map<String, Value>,
    pub assertions: Vec<Assertion>,
}

/// One prompt version, validated and ready to render.
pub struct PromptVersion {
    pub id: String,
    pub version: u32,
    /// 16 hex digits of the SHA-256 of what shapes an answer (see [`PromptVersion::hash`]).
    pub hash: String,
    pub file: PathBuf,
    pub description: Option<String>,
    /// Labels this file claims (config labels win over them).
    pub labels: Vec<String>,
    pub model: Option<String>,
    /// Request parameters the prompt sets when the request does not.
    pub params: ChatRequest,
    pub variables: BTreeMap<String, Variable>,
    pub validators: Vec<Validator>,
    pub on_fail: OnFail,
    pub retries: u32,
    pub has_system: bool,
    pub has_user: bool,
    pub has_fallback: bool,
    pub tests: Vec<TestCase>,
    /// The compiled templates: `system`, `user`, `fallback`.
    env: minijinja::Environment<'static>,
}

impl std::fmt::Debug for PromptVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptVersion")
            .field("id", &self.id)
            .field("version", &self.version)
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

/// A problem in a prompt file: where (line when the TOML parser knows it, and the
/// field), and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProblem {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for FileProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.path.is_empty() {
            write!(f, ": {}", self.path)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Prompt ids are folder names: letters, digits, `-`, `_`, `.`.
pub fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{id}` is not a prompt id: use letters, digits, `-`, `_` and `.`"
        ))
    }
}

/// `2` or `v2`.
pub fn is_version_text(s: &str) -> bool {
    parse_version(s).is_some()
}

/// `2` or `v2` -> 2 (0 is not a version).
pub fn parse_version(s: &str) -> Option<u32> {
    let digits = s.strip_prefix('v').unwrap_or(s);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|v| *v > 0)
}

/// The version a file name stands for: `v2.toml` -> 2.
pub fn version_of_file(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".toml")?;
    stem.strip_prefix('v').and_then(parse_version)
}

impl PromptVersion {
    /// Parse and validate `text` (the contents of `file`), the version `version` of `id`.
    /// Every problem is returned, not just the first.
    pub fn parse(
        id: &str,
        version: u32,
        file: &Path,
        text: &str,
    ) -> Result<PromptVersion, Vec<FileProblem>> {
        let problem = |line: Option<usize>, path: &str, message: String| FileProblem {
            file: file.to_path_buf(),
            line,
            path: path.to_string(),
            message,
        };
        let raw: RawFile = match toml::from_str(text) {
            Ok(r) => r,
            Err(e) => {
                let line = e
                    .span()
                    .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
                return Err(vec![problem(line, "", e.message().trim_end().to_string())]);
            }
        };
        let mut problems = Vec::new();
        let line_of = |key: &str| {
            text.lines()
                .position(|l| l.trim_start().starts_with(key))
                .map(|i| i + 1)
        };
        let hash = content_hash(&raw);

        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.set_fuel(Some(RENDER_FUEL));
        env.set_keep_trailing_newline(false);
        let declared: Vec<&String> = raw.variables.keys().collect();
        for (name, source) in [
            ("system", &raw.system),
            ("user", &raw.user),
            ("fallback", &raw.fallback),
        ] {
            let Some(source) = source else { continue };
            match env.add_template_owned(name.to_string(), source.clone()) {
                Err(e) => problems.push(problem(
                    line_of(name),
                    name,
                    format!("invalid template: {e}"),
                )),
                Ok(()) => {
                    if let Ok(t) = env.get_template(name) {
                        let mut unknown: Vec<String> = t
                            .undeclared_variables(false)
                            .into_iter()
                            .filter(|v| {
                                !declared.contains(&v) && !BUILTIN_NAMES.contains(&v.as_str())
                            })
                            .collect();
                        unknown.sort();
                        if !unknown.is_empty() {
                            problems.push(problem(
                                line_of(name),
                                name,
                                format!(
                                    "uses undeclared variable(s) {}: declare them under [variables]",
                                    unknown.join(", ")
                                ),
                            ));
                        }
                    }
                }
            }
        }
        if raw.system.is_none() && raw.user.is_none() {
            problems.push(problem(
                None,
                "",
                "a prompt needs a `system` or a `user` template".into(),
            ));
        }

        let mut variables = BTreeMap::new();
        for (name, v) in &raw.variables {
            let path = format!("variables.{name}");
            if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                || name.starts_with(|c: char| c.is_ascii_digit())
            {
                problems.push(problem(
                    line_of(&format!("[variables.{name}]")),
                    &path,
                    "a variable name is letters, digits and `_`, not starting with a digit".into(),
                ));
            }
            if v.max_length.is_some() && !matches!(v.kind, VarType::String | VarType::Array) {
                problems.push(problem(
                    None,
                    &format!("{path}.max_length"),
                    "only applies to strings (characters) and arrays (items)".into(),
                ));
            }
            if let Some(d) = &v.default
                && !v.kind.accepts(d)
            {
                problems.push(problem(
                    None,
                    &format!("{path}.default"),
                    format!("is not of type {}", v.kind.as_str()),
                ));
            }
            variables.insert(
                name.clone(),
                Variable {
                    kind: v.kind,
                    required: v.required.unwrap_or(v.default.is_none()),
                    max_length: v.max_length,
                    default: v.default.clone(),
                },
            );
        }

        for label in &raw.labels {
            if let Err(e) = super::config::check_label(label) {
                problems.push(problem(line_of("labels"), "labels", e));
            }
        }

        let params = match build_params(&raw.params) {
            Ok(p) => p,
            Err(e) => {
                problems.push(problem(line_of("[params]"), "params", e));
                empty_params()
            }
        };

        let mut validators = Vec::new();
        for (i, v) in raw.validators.iter().enumerate() {
            match Validator::from_toml(v.clone()) {
                Ok(v) => validators.push(v),
                Err(e) => problems.push(problem(
                    line_of("validators"),
                    &format!("validators[{i}]"),
                    e,
                )),
            }
        }
        let on_fail = raw.on_fail.unwrap_or_default();
        if raw.retries.is_some() && on_fail != OnFail::Retry {
            problems.push(problem(
                line_of("retries"),
                "retries",
                "only applies to on_fail = \"retry\"".into(),
            ));
        }
        if on_fail == OnFail::Fallback && raw.fallback.is_none() {
            problems.push(problem(
                line_of("on_fail"),
                "on_fail",
                "\"fallback\" needs a `fallback` template".into(),
            ));
        }

        let mut tests = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, case) in raw.tests.iter().enumerate() {
            let path = format!("tests[{i}]");
            if !names.insert(case.name.clone()) {
                problems.push(problem(
                    None,
                    &format!("{path}.name"),
                    format!("duplicate test name `{}`", case.name),
                ));
            }
            let mut assertions = Vec::new();
            for (j, a) in case.assertions.iter().enumerate() {
                match Assertion::from_toml(a.clone()) {
                    Ok(a) => assertions.push(a),
                    Err(e) => problems.push(problem(None, &format!("{path}.assert[{j}]"), e)),
                }
            }
            if case.assertions.is_empty() {
                problems.push(problem(
                    None,
                    &format!("{path}.assert"),
                    "a test case needs at least one assertion".into(),
                ));
            }
            if let Err(e) = super::render::bind(&variables, &case.variables) {
                problems.push(problem(None, &format!("{path}.variables"), e.to_string()));
            }
            tests.push(TestCase {
                name: case.name.clone(),
                variables: case.variables.clone(),
                assertions,
            });
        }

        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(PromptVersion {
            id: id.to_string(),
            version,
            hash,
            file: file.to_path_buf(),
            description: raw.description,
            labels: raw.labels,
            model: raw.model,
            params,
            variables,
            validators,
            on_fail,
            retries: raw.retries.unwrap_or(1),
            has_system: raw.system.is_some(),
            has_user: raw.user.is_some(),
            has_fallback: raw.fallback.is_some(),
            tests,
            env,
        })
    }

    /// `id@version`.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.id, self.version)
    }

    /// Render one of the templates (`system`, `user`, `fallback`) with bound variables.
    /// The output cap stops the render as it is crossed, so a runaway template never
    /// holds more than the cap in memory.
    pub fn render(&self, name: &str, vars: &Map<String, Value>) -> Result<Option<String>, String> {
        let Ok(t) = self.env.get_template(name) else {
            return Ok(None);
        };
        let mut out = CappedOutput::default();
        if let Err(e) = t.render_captured_to(vars, &mut out) {
            if out.over {
                return Err(format!(
                    "the `{name}` template rendered more than {MAX_RENDERED_CHARS} characters"
                ));
            }
            if e.kind() == minijinja::ErrorKind::OutOfFuel {
                return Err(format!(
                    "the `{name}` template did too much work (a render may take {RENDER_FUEL} steps): is a loop running away?"
                ));
            }
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            return Err(msg);
        }
        String::from_utf8(out.text)
            .map(Some)
            .map_err(|e| format!("the `{name}` template rendered invalid UTF-8: {e}"))
    }
}

/// Where a render writes: refuses the write that would pass [`MAX_RENDERED_CHARS`].
#[derive(Default)]
struct CappedOutput {
    text: Vec<u8>,
    chars: usize,
    over: bool,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // UTF-8 continuation bytes are 0b10xx_xxxx: every other byte starts a character.
        let chars = buf.iter().filter(|b| (**b & 0xC0) != 0x80).count();
        if self.chars + chars > MAX_RENDERED_CHARS {
            self.over = true;
            return Err(std::io::Error::other("rendered output too large"));
        }
        self.chars += chars;
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Names a template may use without declaring them (minijinja's globals).
const BUILTIN_NAMES: &[&str] = &["range", "dict", "namespace", "loop", "debug"];

/// The content hash: SHA-256 over the canonical JSON (sorted keys) of everything that
/// shapes an answer: model, parameters, templates, variables, validators, on-fail action
/// and the fallback. Not hashed: `description` (the file's and each variable's),
/// `labels` and `tests`, so a label can move, a case can be added and the docs reworded
/// without a new version; formatting and comments do not count either.
fn content_hash(raw: &RawFile) -> String {
    let validators: Vec<Value> = raw
        .validators
        .iter()
        .map(|v| serde_json::to_value(v).unwrap_or(Value::Null))
        .collect();
    let canonical = json!({
        "model": raw.model,
        "params": raw.params,
        "system": raw.system,
        "user": raw.user,
        "variables": raw.variables,
        "validators": validators,
        "on_fail": raw.on_fail.map(OnFail::as_str),
        "retries": raw.retries,
        "fallback": raw.fallback,
    });
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    hex::encode(&digest[..8])
}

fn empty_params() -> ChatRequest {
    ChatRequest {
        model: String::new(),
        messages: Vec::new(),
        stream: None,
        stream_options: None,
        max_tokens: None,
        max_completion_tokens: None,
        temperature: None,
        top_p: None,
        n: None,
        stop: None,
        user: None,
        tools: None,
        tool_choice: None,
        sluice: None,
        extra: Map::new(),
    }
}

/// `[params]`, read as the request fields they are (so a wrong type is caught here).
fn build_params(params: &Map<String, Value>) -> Result<ChatRequest, String> {
    const NOT_PARAMS: [&str; 6] = [
        "model",
        "messages",
        "stream",
        "stream_options",
        "sluice",
        "user",
    ];
    if let Some(k) = params.keys().find(|k| NOT_PARAMS.contains(&k.as_str())) {
        return Err(format!(
            "`{k}` is not a parameter a prompt sets (model is `model`; the rest come from the request)"
        ));
    }
    let mut body = params.clone();
    body.insert("model".into(), Value::String(String::new()));
    body.insert("messages".into(), Value::Array(Vec::new()));
    serde_path_to_error::deserialize::<_, ChatRequest>(Value::Object(body))
        .map_err(|e| format!("`{}`: {}", e.path(), e.inner()))
}

/// The shared handle the registry keeps.
pub type Version = Arc<PromptVersion>;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PromptVersion, Vec<FileProblem>> {
        PromptVersion::parse("p", 1, Path::new("p/v1.toml"), text)
    }

    fn problems(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("parsed, but should not have:\n{text}"),
            Err(p) => p.iter().map(|p| format!("{p}\n")).collect(),
        }
    }

    fn vars(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn descriptions_are_not_part_of_the_content_hash() {
        let file = |description: &str, max_length: u32| {
            format!(
                "description = \"{description}\"\nuser = \"Hi {{{{ name }}}}\"\n\
                 [variables.name]\ntype = \"string\"\nmax_length = {max_length}\n\
                 description = \"{description}\"\n"
            )
        };
        let hash = |text: &str| parse(text).unwrap().hash;
        let before = hash(&file("The recipient's name.", 80));
        assert_eq!(hash(&file("Full name; greeted by first name.", 80)), before);
        // What shapes an answer still counts, in the variable's own table too.
        assert_ne!(hash(&file("The recipient's name.", 40)), before);
    }

    #[test]
    fn includes_imports_and_extends_are_refused() {
        // `system` exists in the same environment: only the template language itself
        // can keep `user` from reading it (or a file).
        for statement in [
            r#"{% include "system" %}"#,
            r#"{% import "system" as s %}"#,
            r#"{% from "system" import x %}"#,
            r#"{% extends "system" %}"#,
        ] {
            let text = format!("system = \"secret\"\nuser = '{statement}'\n");
            let found = problems(&text);
            assert!(
                found.contains("user: invalid template") && found.contains("unknown statement"),
                "{statement}: {found}"
            );
        }
    }

    #[test]
    fn a_runaway_loop_runs_out_of_fuel_with_a_clear_error() {
        let v = parse(
            "user = \"{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}\"\n",
        )
        .unwrap();
        let e = v.render("user", &Map::new()).unwrap_err();
        assert!(
            e.contains("the `user` template did too much work") && e.contains("loop"),
            "{e}"
        );
    }

    #[test]
    fn output_past_the_cap_is_refused() {
        let text = "user = \"{% for item in items %}{{ item }}{% endfor %}\"\n\
                    [variables.items]\ntype = \"array\"\n";
        let v = parse(text).unwrap();
        let item = "x".repeat(10_000);
        // 20 items: exactly the cap, rendered in full.
        let at_cap = vec![Value::String(item.clone()); MAX_RENDERED_CHARS / item.len()];
        let out = v
            .render("user", &vars(json!({"items": at_cap})))
            .unwrap()
            .unwrap();
        assert_eq!(out.chars().count(), MAX_RENDERED_CHARS);
        // One more character (a multi-byte one, counted once) is refused.
        let mut over = at_cap.clone();
        over.push(Value::String("é".into()));
        let e = v.render("user", &vars(json!({"items": over}))).unwrap_err();
        assert_eq!(
            e,
            format!("the `user` template rendered more than {MAX_RENDERED_CHARS} characters")
        );
    }

    #[test]
    fn undeclared_variables_are_errors() {
        // Caught when the file loads: a typo never reaches traffic.
        let found = problems(
            "user = \"Hi {{ name }} from {{ compnay }}\"\n[variables.name]\ntype = \"string\"\n",
        );
        assert!(
            found.contains("user: uses undeclared variable(s) compnay"),
            "{found}"
        );
        // A declared optional variable left unset is undefined at render: strict, so an
        // error rather than an empty string in the prompt.
        let v = parse(
            "user = \"Hi {{ name.first }}\"\n[variables.name]\ntype = \"object\"\nrequired = false\n",
        )
        .unwrap();
        let e = v.render("user", &Map::new()).unwrap_err();
        assert!(e.contains("undefined"), "{e}");
    }
}
