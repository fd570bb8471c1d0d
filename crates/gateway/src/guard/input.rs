//! The input guard: checks, sanitizes, caps and scans a parsed request in place, and
//! reports what it changed and flagged. Checks on the raw body (encoding, nesting)
//! run before parsing, in [`precheck`].

use std::borrow::Cow;

use serde_json::Value;

use super::config::{BidiMode, DetectMode, InputPolicy, KeepPart, TooLong};
use super::detect::{Detection, Detector};
use super::text::{self, Keep, Sanitize};
use super::tokens;
use crate::error::ApiError;
use crate::wire::{ChatRequest, Content, EmbeddingInput, EmbeddingsRequest};

/// What the guard did to a request: changes (`input_truncated`, `max_tokens_clamped`,
/// ...) and flags (detections, `bidi`). Reported in `x-sluice-guard` and the record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub changes: Vec<&'static str>,
    pub flags: Vec<&'static str>,
}

impl Report {
    fn change(&mut self, c: &'static str) {
        if !self.changes.contains(&c) {
            self.changes.push(c);
        }
    }

    fn flag(&mut self, f: &'static str) {
        if !self.flags.contains(&f) {
            self.flags.push(f);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.flags.is_empty()
    }

    /// `changes=a,b; flags=c`: the `x-sluice-guard` header value.
    pub fn header(&self) -> String {
        let mut parts = Vec::new();
        if !self.changes.is_empty() {
            parts.push(format!("changes={}", self.changes.join(",")));
        }
        if !self.flags.is_empty() {
            parts.push(format!("flags={}", self.flags.join(",")));
        }
        parts.join("; ")
    }
}

const ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

/// Checks on the raw body, before JSON parsing: valid UTF-8, and nesting no deeper than
/// `max_depth` (scanned here so a hostile body never reaches a recursive parser).
pub fn precheck(body: &[u8], max_depth: usize) -> Result<(), ApiError> {
    if let Err(e) = std::str::from_utf8(body) {
        return Err(ApiError::InvalidEncoding {
            message: format!(
                "request body is not valid UTF-8 (invalid byte at offset {})",
                e.valid_up_to()
            ),
        });
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    // A high surrogate escape waiting for its low half.
    let mut pending_high = false;
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        i += 1;
        if in_string {
            if escaped {
                escaped = false;
                if b == b'u' {
                    let unit = body
                        .get(i..i + 4)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u16::from_str_radix(h, 16).ok());
                    if let Some(unit) = unit {
                        i += 4;
                        match unit {
                            0xD800..=0xDBFF if !pending_high => {
                                pending_high = true;
                                continue;
                            }
                            0xDC00..=0xDFFF if pending_high => {
                                pending_high = false;
                                continue;
                            }
                            0xD800..=0xDFFF => return Err(lone_surrogate()),
                            _ => {}
                        }
                    }
                }
                if pending_high {
                    return Err(lone_surrogate());
                }
                continue;
            }
            if pending_high && b != b'\\' {
                return Err(lone_surrogate());
            }
            match b {
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(ApiError::NestingTooDeep { limit: max_depth });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn lone_surrogate() -> ApiError {
    ApiError::InvalidEncoding {
        message:
            "request body has a lone UTF-16 surrogate escape (\\uD800-\\uDFFF without its pair)"
                .into(),
    }
}

/// The text fields of a message's content, for reading and rewriting in place.
fn for_each_text(content: &mut Option<Content>, mut f: impl FnMut(&mut String)) {
    match content {
        None => {}
        Some(Content::Text(s)) => f(s),
        Some(Content::Parts(parts)) => {
            for p in parts.iter_mut() {
                if p.get("type").and_then(Value::as_str) == Some("text")
                    && let Some(Value::String(s)) = p.get_mut("text")
                {
                    f(s);
                }
            }
        }
    }
}

/// The new text when a cleaning step changed it (ending the borrow of the old one).
fn changed(new: Cow<'_, str>) -> Option<String> {
    match new {
        Cow::Borrowed(_) => None,
        Cow::Owned(o) => Some(o),
    }
}

fn number(extra: &serde_json::Map<String, Value>, key: &str) -> Option<f64> {
    extra.get(key).and_then(Value::as_f64)
}

fn out_of_range(param: &str, value: f64, lo: f64, hi: f64) -> ApiError {
    ApiError::invalid(
        format!("`{param}` must be between {lo} and {hi}; got {value}"),
        Some(param.to_string()),
    )
}

/// Check and clean a chat request in place. `model` is the upstream model, for exact
/// token counts.
pub fn check_chat(
    req: &mut ChatRequest,
    policy: &InputPolicy,
    detector: &Detector,
    model: &str,
) -> Result<Report, ApiError> {
    let mut report = Report::default();
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must contain at least one message",
            Some("messages".to_string()),
        ));
    }
    if req.messages.len() > policy.max_messages {
        return Err(ApiError::TooManyMessages {
            count: req.messages.len(),
            limit: policy.max_messages,
        });
    }
    for (i, m) in req.messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::invalid(
                format!(
                    "unknown role `{}` (expected one of {})",
                    m.role,
                    ROLES.join(", ")
                ),
                Some(format!("messages[{i}].role")),
            ));
        }
    }
    check_parameters(req)?;

    // Sanitize every text, then judge emptiness on what is left.
    let opts = Sanitize {
        strip_control: policy.strip_control,
        nfc: policy.nfc,
        strip_bidi: policy.bidi == BidiMode::Strip,
        collapse_whitespace: policy.collapse_whitespace,
    };
    let mut changes = text::Changes::default();
    let mut bidi_seen = false;
    for m in req.messages.iter_mut() {
        for_each_text(&mut m.content, |s| {
            if policy.bidi == BidiMode::Flag && text::has_bidi_controls(s) {
                bidi_seen = true;
            }
            if let Some(new) = changed(text::sanitize(s, opts, &mut changes)) {
                *s = new;
            }
        });
    }
    note_sanitized(&mut report, changes, bidi_seen);
    check_not_empty(req)?;

    cap_chat(req, policy, model, &mut report)?;
    cap_max_tokens(req, policy, &mut report);
    scan_chat(req, policy, detector, &mut report)?;
    Ok(report)
}

fn note_sanitized(report: &mut Report, changes: text::Changes, bidi_seen: bool) {
    if changes.control {
        report.change("control_stripped");
    }
    if changes.bidi {
        report.change("bidi_stripped");
    }
    if changes.nfc {
        report.change("nfc_normalized");
    }
    if changes.whitespace {
        report.change("whitespace_collapsed");
    }
    if bidi_seen {
        report.flag("bidi");
    }
}

fn check_parameters(req: &ChatRequest) -> Result<(), ApiError> {
    if let Some(t) = req.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(out_of_range("temperature", t, 0.0, 2.0));
    }
    if let Some(p) = req.top_p
        && !(0.0..=1.0).contains(&p)
    {
        return Err(out_of_range("top_p", p, 0.0, 1.0));
    }
    if let Some(n) = req.n
        && !(1..=128).contains(&n)
    {
        return Err(out_of_range("n", f64::from(n), 1.0, 128.0));
    }
    for (name, v) in [
        ("max_tokens", req.max_tokens),
        ("max_completion_tokens", req.max_completion_tokens),
    ] {
        if v == Some(0) {
            return Err(ApiError::invalid(
                format!("`{name}` must be at least 1"),
                Some(name.to_string()),
            ));
        }
    }
    for name in ["presence_penalty", "frequency_penalty"] {
        if let Some(v) = number(&req.extra, name)
            && !(-2.0..=2.0).contains(&v)
        {
            return Err(out_of_range(name, v, -2.0, 2.0));
        }
    }
    Ok(())
}

/// The last user message must say something; a request of nothing but blank messages
/// is empty too.
fn check_not_empty(req: &mut ChatRequest) -> Result<(), ApiError> {
    let blank = |m: &mut crate::wire::ChatMessage| {
        let mut all_blank = true;
        for_each_text(&mut m.content, |s| all_blank &= text::is_blank(s));
        // A part that is not text (an image) is content too.
        let non_text = matches!(&m.content, Some(Content::Parts(p)) if p.iter().any(|x| x.get("type").and_then(Value::as_str) != Some("text")));
        all_blank && !non_text && m.tool_calls.is_none()
    };
    if let Some(i) = req.messages.iter().rposition(|m| m.role == "user") {
        if blank(&mut req.messages[i]) {
            return Err(ApiError::EmptyInput {
                param: format!("messages[{i}].content"),
            });
        }
    } else if req.messages.iter_mut().all(blank) {
        return Err(ApiError::EmptyInput {
            param: "messages".into(),
        });
    }
    Ok(())
}

fn total_text(req: &ChatRequest) -> (usize, usize) {
    let (mut chars, mut bytes) = (0, 0);
    for m in &req.messages {
        let t = m.text();
        chars += t.chars().count();
        bytes += t.len();
    }
    (chars, bytes)
}

fn count_tokens(req: &ChatRequest, model: &str) -> usize {
    req.messages
        .iter()
        .map(|m| tokens::count(model, &m.text()))
        .sum()
}

/// Input caps: characters, then tokens (counted exactly only when the byte length says
/// the cap could be reached). `truncate` shortens the longest user message.
fn cap_chat(
    req: &mut ChatRequest,
    policy: &InputPolicy,
    model: &str,
    report: &mut Report,
) -> Result<(), ApiError> {
    for _ in 0..6 {
        let (chars, bytes) = total_text(req);
        let char_excess = chars.saturating_sub(policy.max_chars);
        if char_excess > 0 && policy.on_too_long == TooLong::Reject {
            // Over the character cap already: no need to spend CPU counting tokens.
            return Err(ApiError::InputTooLong {
                message: format!(
                    "input is {chars} characters; the limit is {}",
                    policy.max_chars
                ),
                param: "messages".into(),
            });
        }
        let token_excess = if tokens::upper_bound(bytes) > policy.max_tokens {
            count_tokens(req, model).saturating_sub(policy.max_tokens)
        } else {
            0
        };
        if char_excess == 0 && token_excess == 0 {
            return Ok(());
        }
        let too_long = || ApiError::InputTooLong {
            message: if char_excess > 0 {
                format!(
                    "input is {chars} characters; the limit is {}",
                    policy.max_chars
                )
            } else {
                format!(
                    "input is over the limit of {} tokens by {token_excess}",
                    policy.max_tokens
                )
            },
            param: "messages".into(),
        };
        if policy.on_too_long == TooLong::Reject {
            return Err(too_long());
        }
        // Cut the longest user message by the excess (tokens converted at this text's
        // own characters-per-token), plus a little so the loop converges quickly.
        let Some(target) = longest_user_message(req) else {
            return Err(too_long());
        };
        let text_len = req.messages[target].text().chars().count();
        let per_token = if bytes > 0 {
            chars as f64 / count_tokens(req, model).max(1) as f64
        } else {
            4.0
        };
        let cut = char_excess.max((token_excess as f64 * per_token * 1.1).ceil() as usize) + 16;
        let keep_chars = text_len.saturating_sub(cut);
        if keep_chars <= policy.truncation_marker.chars().count() {
            return Err(too_long());
        }
        let keep = match policy.keep {
            KeepPart::Head => Keep::Head,
            KeepPart::HeadAndTail => Keep::HeadAndTail,
        };
        let shortened = text::truncate_chars(
            &req.messages[target].text(),
            keep_chars,
            keep,
            &policy.truncation_marker,
        );
        req.messages[target].content = Some(Content::Text(shortened));
        report.change("input_truncated");
    }
    let (chars, _) = total_text(req);
    Err(ApiError::InputTooLong {
        message: format!("input of {chars} characters could not be shortened under the limits"),
        param: "messages".into(),
    })
}

fn longest_user_message(req: &ChatRequest) -> Option<usize> {
    req.messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == "user")
        .max_by_key(|(_, m)| m.text().len())
        .map(|(i, _)| i)
}

fn cap_max_tokens(req: &mut ChatRequest, policy: &InputPolicy, report: &mut Report) {
    match (
        req.max_output_tokens(),
        policy.max_output_tokens,
        policy.default_max_tokens,
    ) {
        (Some(asked), Some(cap), _) if asked > cap => {
            if req.max_completion_tokens.is_some() {
                req.max_completion_tokens = Some(cap);
            }
            if req.max_tokens.is_some() {
                req.max_tokens = Some(cap);
            }
            report.change("max_tokens_clamped");
        }
        (None, _, Some(default)) => {
            req.max_tokens = Some(default);
            report.change("max_tokens_defaulted");
        }
        _ => {}
    }
}

fn mode_for(policy: &InputPolicy, d: Detection) -> DetectMode {
    match d {
        Detection::PromptInjection => policy.injection,
        Detection::SqlInjection => policy.sql,
        Detection::CodeBlock => policy.code,
        Detection::Email | Detection::Phone | Detection::CardNumber => policy.pii,
    }
}

/// Scan what the end user wrote (user and tool messages; system prompts are the
/// operator's own) and flag, block or redact.
fn scan_chat(
    req: &mut ChatRequest,
    policy: &InputPolicy,
    detector: &Detector,
    report: &mut Report,
) -> Result<(), ApiError> {
    if [policy.injection, policy.sql, policy.code, policy.pii]
        .iter()
        .all(|m| *m == DetectMode::Off)
    {
        return Ok(());
    }
    let mut redact = false;
    for m in req
        .messages
        .iter_mut()
        .filter(|m| m.role == "user" || m.role == "tool")
    {
        let mut found = Vec::new();
        for_each_text(&mut m.content, |s| found.extend(detector.scan(s)));
        for d in found {
            match mode_for(policy, d) {
                DetectMode::Off => {}
                DetectMode::Flag => report.flag(d.as_str()),
                DetectMode::Block => {
                    return Err(ApiError::InputBlocked {
                        detection: d.as_str(),
                    });
                }
                DetectMode::Redact => {
                    report.flag(d.as_str());
                    redact = true;
                }
            }
        }
        if redact {
            for_each_text(&mut m.content, |s| {
                if let Some(new) = changed(detector.redact_pii(s)) {
                    *s = new;
                    report.change("pii_redacted");
                }
            });
        }
    }
    Ok(())
}

/// Check and clean an embeddings request in place.
pub fn check_embeddings(
    req: &mut EmbeddingsRequest,
    policy: &InputPolicy,
    model: &str,
) -> Result<Report, ApiError> {
    let mut report = Report::default();
    if req.input.is_empty() {
        return Err(ApiError::EmptyInput {
            param: "input".into(),
        });
    }
    // OpenAI's own limit on inputs per request.
    if req.input.len() > 2048 {
        return Err(ApiError::invalid(
            format!("{} inputs; the limit is 2048 per request", req.input.len()),
            Some("input".to_string()),
        ));
    }
    let opts = Sanitize {
        strip_control: policy.strip_control,
        nfc: policy.nfc,
        strip_bidi: policy.bidi == BidiMode::Strip,
        collapse_whitespace: false,
    };
    let mut changes = text::Changes::default();
    let single = matches!(req.input, EmbeddingInput::Text(_));
    // The character cap holds for all inputs together (by bytes, cheap and an upper
    // bound), so many items each under it cannot add up to an unbounded request.
    let total_bytes: usize = match &req.input {
        EmbeddingInput::Text(s) => s.len(),
        EmbeddingInput::Texts(v) => v.iter().map(String::len).sum(),
        EmbeddingInput::Tokens(_) | EmbeddingInput::TokenLists(_) => 0,
    };
    if total_bytes > policy.max_chars.saturating_mul(4) {
        return Err(ApiError::InputTooLong {
            message: format!(
                "inputs total {total_bytes} bytes; the limit is {} characters",
                policy.max_chars
            ),
            param: "input".into(),
        });
    }
    let texts: Vec<&mut String> = match &mut req.input {
        EmbeddingInput::Text(s) => vec![s],
        EmbeddingInput::Texts(v) => v.iter_mut().collect(),
        EmbeddingInput::Tokens(t) => {
            return if t.is_empty() {
                Err(ApiError::EmptyInput {
                    param: "input".into(),
                })
            } else {
                Ok(report)
            };
        }
        EmbeddingInput::TokenLists(lists) => {
            return match lists.iter().position(Vec::is_empty) {
                Some(i) => Err(ApiError::EmptyInput {
                    param: format!("input[{i}]"),
                }),
                None => Ok(report),
            };
        }
    };
    for (i, s) in texts.into_iter().enumerate() {
        if let Some(new) = changed(text::sanitize(s, opts, &mut changes)) {
            *s = new;
        }
        if text::is_blank(s) {
            return Err(ApiError::EmptyInput {
                param: if single {
                    "input".into()
                } else {
                    format!("input[{i}]")
                },
            });
        }
        let chars = s.chars().count();
        let too_many_tokens =
            s.len() > policy.max_tokens && tokens::count(model, s) > policy.max_tokens;
        if chars > policy.max_chars || too_many_tokens {
            if policy.on_too_long == TooLong::Reject {
                return Err(ApiError::InputTooLong {
                    message: format!(
                        "input[{i}] is over the limit of {} characters or {} tokens",
                        policy.max_chars, policy.max_tokens
                    ),
                    param: if single {
                        "input".into()
                    } else {
                        format!("input[{i}]")
                    },
                });
            }
            let keep = policy.max_chars.min(policy.max_tokens.saturating_mul(3));
            *s = text::truncate_chars(s, keep, Keep::Head, "");
            report.change("input_truncated");
        }
    }
    note_sanitized(&mut report, changes, false);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precheck_finds_bad_encoding_and_deep_nesting() {
        assert!(precheck(br#"{"a": "ok \ud83d\ude00 pair"}"#, 8).is_ok());
        assert!(
            precheck(br#"{"a": "\\ud800 is text"}"#, 8).is_ok(),
            "an escaped backslash is not an escape"
        );
        for bad in [
            &br#"{"a": "\ud800"}"#[..],
            br#"{"a": "\ud800x"}"#,
            br#"{"a": "\udc00"}"#,
            br#"{"a": "\ud800\u0041"}"#,
        ] {
            assert!(
                matches!(precheck(bad, 8), Err(ApiError::InvalidEncoding { .. })),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(matches!(
            precheck(b"{\"a\": \"\xff\"}", 8),
            Err(ApiError::InvalidEncoding { .. })
        ));
        assert!(precheck(b"[[[[]]]]", 4).is_ok());
        assert!(matches!(
            precheck(b"[[[[[]]]]]", 4),
            Err(ApiError::NestingTooDeep { limit: 4 })
        ));
        assert!(
            precheck(br#"{"a": "[[[[[[[[[["}"#, 4).is_ok(),
            "brackets in strings do not nest"
        );
    }
}
