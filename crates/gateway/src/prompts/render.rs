//! Binding a request's variables to a prompt version (type, required, max length,
//! defaults) and rendering its messages into the request.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::PromptError;
use super::file::{PromptVersion, Variable};
use crate::wire::{ChatMessage, ChatRequest, Content};

/// Check `given` against the declared variables: every required one present and not
/// null, each of its type and within its max length; absent optional ones take their
/// default. Variables the prompt does not declare are left out (an experiment may send
/// one request shape to versions that declare different variables).
pub fn bind(
    declared: &BTreeMap<String, Variable>,
    given: &Map<String, Value>,
) -> Result<Map<String, Value>, PromptError> {
    let mut bound = Map::new();
    for (name, var) in declared {
        let value = match given.get(name).filter(|v| !v.is_null()) {
            Some(v) => v,
            None => match &var.default {
                Some(d) => {
                    bound.insert(name.clone(), d.clone());
                    continue;
                }
                None if var.required => {
                    return Err(PromptError::MissingVariable {
                        name: name.clone(),
                        kind: var.kind.as_str(),
                    });
                }
                None => continue,
            },
        };
        if !var.kind.accepts(value) {
            return Err(PromptError::InvalidVariable {
                name: name.clone(),
                message: format!(
                    "variable `{name}` must be {} {}, not {}",
                    article(var.kind.as_str()),
                    var.kind.as_str(),
                    type_name(value)
                ),
            });
        }
        if let Some(max) = var.max_length {
            let (len, unit) = match value {
                Value::String(s) => (s.chars().count(), "characters"),
                Value::Array(a) => (a.len(), "items"),
                _ => (0, ""),
            };
            if len > max {
                return Err(PromptError::InvalidVariable {
                    name: name.clone(),
                    message: format!("variable `{name}` is too long: {len} {unit}, at most {max}"),
                });
            }
        }
        bound.insert(name.clone(), value.clone());
    }
    Ok(bound)
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number with a fraction",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Render `version` into `request`: its system and user messages go first, then the
/// client's own `messages` (a conversation that continues the prompt). The prompt's
/// parameters fill what the request did not set; the request's explicit values win.
pub fn apply(
    version: &PromptVersion,
    vars: &Map<String, Value>,
    request: &mut ChatRequest,
) -> Result<(), PromptError> {
    let render = |name: &str| {
        version
            .render(name, vars)
            .map_err(|message| PromptError::RenderFailed {
                reference: version.reference(),
                message,
            })
    };
    let mut messages = Vec::with_capacity(2 + request.messages.len());
    if let Some(text) = render("system")? {
        messages.push(message("system", text));
    }
    if let Some(text) = render("user")? {
        messages.push(message("user", text));
    }
    messages.append(&mut request.messages);
    request.messages = messages;

    let p = &version.params;
    request.max_tokens = request.max_tokens.or(p.max_tokens);
    request.max_completion_tokens = request.max_completion_tokens.or(p.max_completion_tokens);
    request.temperature = request.temperature.or(p.temperature);
    request.top_p = request.top_p.or(p.top_p);
    request.n = request.n.or(p.n);
    if request.stop.is_none() {
        request.stop = p.stop.clone();
    }
    if request.tools.is_none() {
        request.tools = p.tools.clone();
    }
    if request.tool_choice.is_none() {
        request.tool_choice = p.tool_choice.clone();
    }
    for (k, v) in &p.extra {
        request.extra.entry(k.clone()).or_insert_with(|| v.clone());
    }
    Ok(())
}

fn message(role: &str, text: String) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: Some(Content::Text(text)),
        name: None,
        tool_calls: None,
        tool_call_id: None,
        extra: Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::prompts::file::VarType;

    fn vars() -> BTreeMap<String, Variable> {
        let mut m = BTreeMap::new();
        m.insert(
            "name".into(),
            Variable {
                kind: VarType::String,
                required: true,
                max_length: Some(5),
                default: None,
            },
        );
        m.insert(
            "count".into(),
            Variable {
                kind: VarType::Integer,
                required: false,
                max_length: None,
                default: Some(json!(3)),
            },
        );
        m.insert(
            "tags".into(),
            Variable {
                kind: VarType::Array,
                required: false,
                max_length: Some(2),
                default: None,
            },
        );
        m
    }

    fn given(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn binds_defaults_and_ignores_unknown() {
        let b = bind(&vars(), &given(json!({"name": "Dana", "other": 1}))).unwrap();
        assert_eq!(Value::Object(b), json!({"name": "Dana", "count": 3}));
    }

    #[test]
    fn missing_wrong_type_and_too_long_name_the_variable() {
        let e = bind(&vars(), &given(json!({"name": null}))).unwrap_err();
        assert!(matches!(&e, PromptError::MissingVariable { name, .. } if name == "name"));
        let e = bind(&vars(), &given(json!({"name": 7}))).unwrap_err();
        assert!(
            e.to_string().contains("must be a string, not a number"),
            "{e}"
        );
        let e = bind(&vars(), &given(json!({"name": "Dana", "count": 1.5}))).unwrap_err();
        assert!(e.to_string().contains("`count` must be an integer"), "{e}");
        let e = bind(&vars(), &given(json!({"name": "Danaëlle"}))).unwrap_err();
        assert!(e.to_string().contains("8 characters, at most 5"), "{e}");
        let e = bind(&vars(), &given(json!({"name": "D", "tags": [1, 2, 3]}))).unwrap_err();
        assert!(e.to_string().contains("3 items, at most 2"), "{e}");
    }
}
