//! Pure text helpers for the input guard: blank detection, sanitising (control chars, bidi
//! controls, NFC, runaway whitespace) and char-safe truncation.
//!
//! Everything here runs on every request, so each step first checks cheaply whether it has
//! anything to do and hands back the borrowed input when it has not: ordinary text costs a
//! few linear byte scans and no allocation.

use std::borrow::Cow;
use std::sync::LazyLock;

use unicode_normalization::char::is_combining_mark;
use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfc_quick};

/// Characters that render as nothing: the Unicode `Default_Ignorable_Code_Point` set.
///
/// That is the soft hyphen U+00AD, combining grapheme joiner U+034F, Arabic letter mark
/// U+061C, Hangul fillers U+115F, U+1160, U+3164, U+FFA0, Khmer inherent vowels
/// U+17B4..U+17B5, Mongolian variation selectors and vowel separator U+180B..U+180F,
/// zero-width space/non-joiner/joiner and the LRM/RLM marks U+200B..U+200F, the bidi
/// embeddings and overrides U+202A..U+202E, word joiner, invisible operators, bidi isolates
/// and deprecated format controls U+2060..U+206F, variation selectors U+FE00..U+FE0F, the
/// BOM U+FEFF, U+FFF0..U+FFF8, shorthand format controls U+1BCA0..U+1BCA3, musical
/// formatting U+1D173..U+1D17A, and tags plus variation selectors supplement
/// U+E0000..U+E0FFF.
///
/// Using the standard property rather than a hand-picked list means the set has a spec to
/// point to. It includes the ZWJ and variation selectors, which are legitimate inside emoji
/// sequences; that is fine for blank detection, but it is why [`sanitize`] does not strip
/// them.
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFF8}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// True when the text has no visible content: empty, or made only of Unicode `White_Space`,
/// [invisible](is_invisible) characters, control characters (C0/C1, which render as
/// nothing), and the braille blank U+2800 (not default-ignorable, but it draws an empty
/// cell and is the usual trick for "blank" text that survives trimming).
///
/// Stops at the first visible character, so ordinary text costs a char or two.
pub fn is_blank(s: &str) -> bool {
    s.chars()
        .all(|c| c.is_whitespace() || c.is_control() || is_invisible(c) || c == '\u{2800}')
}

/// Bidi embedding, override and isolate controls: U+202A..U+202E and U+2066..U+2069.
///
/// These open a run that reorders the text after them, so the text a reviewer sees differs
/// from the order the model reads ("Trojan Source", CVE-2021-42574). The implicit marks
/// LRM U+200E, RLM U+200F and ALM U+061C are deliberately excluded: they cannot open a run,
/// and keyboards and editors insert them routinely in Hebrew, Arabic and Persian text, so
/// stripping them would damage legitimate input for no gain.
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// True when `s` contains any [bidi control](is_bidi_control).
pub fn has_bidi_controls(s: &str) -> bool {
    // All the controls are three-byte sequences starting 0xE2 0x80 / 0xE2 0x81, so a memchr
    // for the lead byte skips ASCII and most other scripts at memory speed.
    let b = s.as_bytes();
    memchr::memchr_iter(0xE2, b).any(|i| {
        matches!(
            (b.get(i + 1), b.get(i + 2)),
            (Some(0x80), Some(0xAA..=0xAE)) | (Some(0x81), Some(0xA6..=0xA9))
        )
    })
}

/// Which sanitizing steps to run. See [`sanitize`] for what each does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sanitize {
    pub strip_control: bool,
    pub nfc: bool,
    pub strip_bidi: bool,
    pub collapse_whitespace: bool,
}

impl Sanitize {
    /// Every step on.
    pub const ALL: Self = Self {
        strip_control: true,
        nfc: true,
        strip_bidi: true,
        collapse_whitespace: true,
    };
    /// Every step off: [`sanitize`] returns its input.
    pub const NONE: Self = Self {
        strip_control: false,
        nfc: false,
        strip_bidi: false,
        collapse_whitespace: false,
    };
}

/// What sanitizing changed (for the response header / record).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    pub control: bool,
    pub nfc: bool,
    pub bidi: bool,
    pub whitespace: bool,
}

impl Changes {
    /// True when any step changed the text.
    pub fn any(self) -> bool {
        self.control || self.nfc || self.bidi || self.whitespace
    }
}

/// A run of more than this many spaces/tabs inside a line collapses to one space.
const MAX_HORIZONTAL_RUN: usize = 4;
/// A run of more than this many newlines collapses to exactly this many (one blank line).
const MAX_NEWLINES: usize = 2;

/// Apply the switched-on steps, in this order:
///
/// 1. `strip_control`: remove NUL and every other C0/C1 control character (`Cc`, including
///    DEL, VT, FF and NEL) except `\n` and `\t`. Line endings are normalised to `\n`:
///    `\r\n` becomes `\n` and a lone `\r` becomes `\n` (rather than being dropped, which
///    would glue two lines together). Normalising also keeps the detectors' `(?m)^`/`$`
///    anchors, which only know `\n`, honest. Format characters (`Cf`: ZWJ, variation
///    selectors) are not controls and are kept, since emoji sequences need them.
/// 2. `strip_bidi`: remove [bidi controls](is_bidi_control) (not the LRM/RLM marks).
/// 3. `nfc`: Unicode NFC normalisation, so "e\u{301}" and "é" compare and match alike.
///    Pure ASCII, runs of common scripts that cannot change, and text the quick check
///    proves normalised skip the work.
/// 4. `collapse_whitespace`: only ASCII space, tab and `\n` are considered (other Unicode
///    spaces are left alone, which keeps the rule predictable):
///    - a run of more than 2 newlines (blank lines may contain spaces/tabs, which go with
///      them) becomes exactly 2 newlines, i.e. at most one blank line;
///    - a run of more than 4 spaces/tabs that is not at the start of a line becomes one
///      space (this includes trailing whitespace before a newline);
///    - leading indentation (whitespace at the start of a line or of the text) is kept as
///      is, because it carries meaning in code, YAML and Python. A runaway indent is
///      therefore bounded only by the request length limit, not by this step.
///
/// Steps that change the text set their flag in `changes`; flags are only ever set, never
/// cleared, so one `Changes` can accumulate over all the messages of a request.
///
/// Returns `Cow::Borrowed` when nothing changed (the common case), without allocating.
pub fn sanitize<'a>(s: &'a str, opts: Sanitize, changes: &mut Changes) -> Cow<'a, str> {
    let mut cur = Cow::Borrowed(s);
    if opts.strip_control
        && let Some(out) = strip_control(&cur)
    {
        cur = Cow::Owned(out);
        changes.control = true;
    }
    if opts.strip_bidi && has_bidi_controls(&cur) {
        cur = Cow::Owned(cur.chars().filter(|&c| !is_bidi_control(c)).collect());
        changes.bidi = true;
    }
    if opts.nfc
        && let Some(out) = nfc(&cur)
    {
        cur = Cow::Owned(out);
        changes.nfc = true;
    }
    if opts.collapse_whitespace
        && let Some(out) = collapse_whitespace(&cur)
    {
        cur = Cow::Owned(out);
        changes.whitespace = true;
    }
    cur
}

/// Byte index of the first control character [`strip_control`] acts on.
fn first_control(b: &[u8]) -> Option<usize> {
    let c0 = |x: u8| ((x < 0x20) & (x != b'\t') & (x != b'\n')) | (x == 0x7F);
    // Branch-free within each 64-byte chunk so the usual "none" answer vectorises; a
    // per-byte early-exit loop measured several times slower on 1 KB.
    let c0_at = b
        .chunks(64)
        .position(|chunk| chunk.iter().fold(false, |acc, &x| acc | c0(x)))
        .and_then(|k| {
            let from = k * 64;
            b.get(from..)?.iter().position(|&x| c0(x)).map(|p| from + p)
        });
    // C1 controls U+0080..U+009F are encoded 0xC2 0x80..=0x9F.
    let c1_at = memchr::memchr_iter(0xC2, b).find(|&i| matches!(b.get(i + 1), Some(0x80..=0x9F)));
    c0_at.into_iter().chain(c1_at).min()
}

fn strip_control(s: &str) -> Option<String> {
    let (clean, rest) = s.split_at_checked(first_control(s.as_bytes())?)?;
    let mut out = String::with_capacity(s.len());
    out.push_str(clean);
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() != Some(&'\n') {
                    out.push('\n');
                }
            }
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    Some(out)
}

/// Defines [`NFC_STABLE`] (for the tests) and [`is_nfc_stable`] (a `matches!`, which
/// compiles to a compare tree several times faster than searching the table) from one list.
macro_rules! nfc_stable {
    ($($lo:literal ..= $hi:literal),* $(,)?) => {
        /// Code points that are NFC_Quick_Check=Yes with combining class 0: no neighbour
        /// can change their normalisation, so a run of them needs no table lookups.
        /// Covers Latin, Cyrillic, Hebrew and Arabic letters, CJK, kana, Hangul syllables,
        /// fullwidth forms and emoji; a test checks every code point against the tables.
        #[cfg(test)]
        const NFC_STABLE: &[(char, char)] = &[$(($lo, $hi)),*];

        fn is_nfc_stable(c: char) -> bool {
            matches!(c, $($lo..=$hi)|*)
        }
    };
}

nfc_stable! {
    '\u{0000}'..='\u{02FF}',
    '\u{0400}'..='\u{0482}',
    '\u{048A}'..='\u{052F}',
    '\u{05D0}'..='\u{05F4}',
    '\u{0620}'..='\u{064A}',
    '\u{2010}'..='\u{2029}',
    '\u{2030}'..='\u{205F}',
    '\u{3000}'..='\u{3029}',
    '\u{3030}'..='\u{3098}',
    '\u{309B}'..='\u{30FF}',
    '\u{4E00}'..='\u{9FFF}',
    '\u{AC00}'..='\u{D7A3}',
    '\u{FF01}'..='\u{FFEF}',
    '\u{1F300}'..='\u{1FAFF}',
}

fn nfc(s: &str) -> Option<String> {
    if s.is_ascii() {
        return None;
    }
    // The quick check keeps state only across non-starters, so after a stable starter it
    // can begin afresh: skip the stable prefix (often all of it) and check the rest.
    let rest = s
        .char_indices()
        .find(|&(_, c)| !is_nfc_stable(c))
        .map(|(i, _)| &s[i..])?;
    if is_nfc_quick(rest.chars()) == IsNormalized::Yes {
        return None;
    }
    // "Maybe" from the quick check usually still means normalised; compare before claiming
    // a change so the flag stays truthful.
    let out: String = s.nfc().collect();
    (out != s).then_some(out)
}

fn is_horizontal(x: u8) -> bool {
    x == b' ' || x == b'\t'
}

/// Cheap check for anything [`collapse_whitespace`] would change. The full pass visits
/// every space between words; this one only looks where a change is possible, found with
/// SIMD searches: newlines (few), tabs (rare in prose), and two adjacent spaces (a run of
/// more than 4 spaces/tabs always contains a tab or two adjacent spaces).
fn needs_collapse(b: &[u8]) -> bool {
    too_many_newlines(b) || long_horizontal_run(b)
}

fn too_many_newlines(b: &[u8]) -> bool {
    let mut streak = 0;
    let mut prev: Option<usize> = None;
    for p in memchr::memchr_iter(b'\n', b) {
        let blank_line = prev.is_some_and(|q| {
            b.get(q + 1..p)
                .is_some_and(|between| between.iter().all(|&x| is_horizontal(x)))
        });
        streak = if blank_line { streak + 1 } else { 1 };
        if streak > MAX_NEWLINES {
            return true;
        }
        prev = Some(p);
    }
    false
}

static TWO_SPACES: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(b"  "));

fn long_horizontal_run(b: &[u8]) -> bool {
    let find_from =
        |i: usize, f: &dyn Fn(&[u8]) -> Option<usize>| b.get(i..).and_then(f).map(|k| k + i);
    let tab = |h: &[u8]| memchr::memchr(b'\t', h);
    let pair = |h: &[u8]| TWO_SPACES.find(h);
    let mut next_tab = find_from(0, &tab);
    let mut next_pair = find_from(0, &pair);
    while let Some(c) = next_tab.into_iter().chain(next_pair).min() {
        let before = b.get(..c).unwrap_or_default();
        let start = before
            .iter()
            .rposition(|&x| !is_horizontal(x))
            .map_or(0, |k| k + 1);
        let after = b.get(c..).unwrap_or_default();
        let end = after
            .iter()
            .position(|&x| !is_horizontal(x))
            .map_or(b.len(), |k| c + k);
        // The byte before a run is a newline or a visible char: same rule as collapse_span.
        let indentation = start == 0 || b.get(start - 1) == Some(&b'\n');
        if !indentation && end - start > MAX_HORIZONTAL_RUN {
            return true;
        }
        if next_tab.is_some_and(|t| t < end) {
            next_tab = find_from(end, &tab);
        }
        if next_pair.is_some_and(|t| t < end) {
            next_pair = find_from(end, &pair);
        }
    }
    false
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n')
}

fn collapse_whitespace(s: &str) -> Option<String> {
    if needs_collapse(s.as_bytes()) {
        collapse_runs(s)
    } else {
        None
    }
}

/// The full pass behind [`collapse_whitespace`], visiting every whitespace run.
fn collapse_runs(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out: Option<String> = None;
    // Bytes of `s` before this index are already in `out` (when it exists).
    let mut copied = 0;
    let mut i = 0;
    while i < b.len() {
        // Skip non-whitespace quickly; only ASCII bytes are examined, so every index where a
        // span starts or ends is a char boundary.
        match b[i..].iter().position(|&x| is_ws(x)) {
            Some(off) => i += off,
            None => break,
        }
        let start = i;
        while i < b.len() && is_ws(b[i]) {
            i += 1;
        }
        if let Some(parts) = collapse_span(&s[start..i], start == 0) {
            let o = out.get_or_insert_with(|| String::with_capacity(s.len()));
            o.push_str(&s[copied..start]);
            parts.iter().for_each(|p| o.push_str(p));
            copied = i;
        }
    }
    out.map(|mut o| {
        o.push_str(&s[copied..]);
        o
    })
}

/// The replacement for one maximal run of spaces/tabs/newlines, as up to three pieces, or
/// `None` when the run stays as it is.
fn collapse_span(span: &str, at_text_start: bool) -> Option<[&str; 3]> {
    let (Some(first), Some(last)) = (span.find('\n'), span.rfind('\n')) else {
        // Inside one line: leading indentation is kept, other long runs become one space.
        return (!at_text_start && span.len() > MAX_HORIZONTAL_RUN).then_some([" ", "", ""]);
    };
    let head = &span[..first];
    let middle = &span[first..=last];
    // Whitespace after the last newline is the next line's indentation: always kept.
    let tail = &span[last + 1..];
    let head_long = !at_text_start && head.len() > MAX_HORIZONTAL_RUN;
    let many_lines = middle.bytes().filter(|&x| x == b'\n').count() > MAX_NEWLINES;
    if !head_long && !many_lines {
        return None;
    }
    Some([
        if head_long { " " } else { head },
        if many_lines { "\n\n" } else { middle },
        tail,
    ])
}

/// Which part of an over-long text [`truncate_chars`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// The beginning, followed by the marker.
    Head,
    /// The beginning and the end, joined by the marker; the head gets the extra char when
    /// the budget is odd.
    HeadAndTail,
}

/// How far a cut may move to avoid splitting a combining sequence, in chars. Bounded so a
/// pathological run of combining marks cannot make truncation walk the whole text.
const MAX_CUT_SHIFT: usize = 32;

/// Truncate to at most `max_chars` characters (Unicode scalar values), marker included.
///
/// Text already within the limit comes back unchanged and without a marker. Otherwise
/// [`Keep::Head`] keeps the head followed by `marker`, and [`Keep::HeadAndTail`] keeps head
/// and tail joined by `marker` (pass `""` for no marker). When the marker leaves fewer than
/// two chars of budget, head-and-tail degrades to head-only; when the marker alone is longer
/// than `max_chars`, the result is the bare head without it.
///
/// Never splits a char. Cuts also avoid orphaning combining marks, variation selectors,
/// emoji modifiers and tags, and never leave a ZWJ dangling, by moving the cut (up to 32
/// chars) so the kept part shrinks. This is not full grapheme segmentation: a regional-
/// indicator flag pair, or a sequence longer than the shift bound, can still be split.
pub fn truncate_chars(s: &str, max_chars: usize, keep: Keep, marker: &str) -> String {
    // UTF-8 never has fewer bytes than chars, so this avoids counting short text.
    if s.len() <= max_chars {
        return s.to_owned();
    }
    let total = s.chars().count();
    if total <= max_chars {
        return s.to_owned();
    }
    let marker_chars = marker.chars().count();
    if marker_chars > max_chars {
        return s[..head_end(s, max_chars)].to_owned();
    }
    let budget = max_chars - marker_chars;
    let (head_n, tail_n) = match keep {
        Keep::HeadAndTail if budget >= 2 => (budget - budget / 2, budget / 2),
        Keep::Head | Keep::HeadAndTail => (budget, 0),
    };
    let head = &s[..head_end(s, head_n)];
    let tail = if tail_n == 0 {
        ""
    } else {
        &s[tail_start(s, total - tail_n)..]
    };
    let mut out = String::with_capacity(head.len() + marker.len() + tail.len());
    out.push_str(head);
    out.push_str(marker);
    out.push_str(tail);
    out
}

/// Chars that attach to the one before them and should not start a kept part.
fn is_extender(c: char) -> bool {
    is_combining_mark(c)
        || matches!(
            c,
            '\u{200D}'
                | '\u{FE00}'..='\u{FE0F}'
                | '\u{1F3FB}'..='\u{1F3FF}'
                | '\u{E0020}'..='\u{E007F}'
                | '\u{E0100}'..='\u{E01EF}'
        )
}

/// True when a cut at byte `i` would split a combining sequence.
fn splits_cluster(s: &str, i: usize) -> bool {
    let after = s[i..].chars().next();
    let before = s[..i].chars().next_back();
    after.is_some_and(is_extender) || before == Some('\u{200D}')
}

/// Byte index ending the first `n` chars, moved earlier to avoid splitting a sequence.
fn head_end(s: &str, n: usize) -> usize {
    let mut end = s.char_indices().nth(n).map_or(s.len(), |(i, _)| i);
    for _ in 0..MAX_CUT_SHIFT {
        if end == 0 || !splits_cluster(s, end) {
            break;
        }
        end = s[..end].char_indices().next_back().map_or(0, |(i, _)| i);
    }
    end
}

/// Byte index starting at char `n`, moved later to avoid splitting a sequence.
fn tail_start(s: &str, n: usize) -> usize {
    let mut start = s.char_indices().nth(n).map_or(s.len(), |(i, _)| i);
    for _ in 0..MAX_CUT_SHIFT {
        if start >= s.len() || !splits_cluster(s, start) {
            break;
        }
        start += s[start..].chars().next().map_or(0, char::len_utf8);
    }
    start
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(s: &str, opts: Sanitize) -> (String, Changes, bool) {
        let mut changes = Changes::default();
        let out = sanitize(s, opts, &mut changes);
        let borrowed = matches!(out, Cow::Borrowed(_));
        (out.into_owned(), changes, borrowed)
    }

    #[test]
    fn blank_text() {
        for s in [
            "",
            "   \n\t",
            "\u{200B}\u{200D}\u{FEFF}",
            " \u{200B} ",
            "\u{00A0}\u{3000}\u{2028}",
            "\u{202E}\u{2066}",
            "\0\u{7}",
            "\u{2800}\u{3164}",
        ] {
            assert!(is_blank(s), "{s:?} should be blank");
        }
    }

    #[test]
    fn visible_text_is_not_blank() {
        for s in [
            "a",
            "  .  ",
            "\u{200B}x",
            "👍",
            "👨\u{200D}👩\u{200D}👧",
            "中文",
            "\u{0301}",
        ] {
            assert!(!is_blank(s), "{s:?} should not be blank");
        }
    }

    #[test]
    fn invisible_and_bidi_sets() {
        for c in [
            '\u{200B}', '\u{200D}', '\u{2060}', '\u{FEFF}', '\u{00AD}', '\u{FE0F}',
        ] {
            assert!(is_invisible(c), "{c:?}");
        }
        for c in ['a', ' ', '\u{0301}', '中'] {
            assert!(!is_invisible(c), "{c:?}");
        }
        for c in ['\u{202A}', '\u{202E}', '\u{2066}', '\u{2069}'] {
            assert!(is_bidi_control(c), "{c:?}");
        }
        for c in ['\u{200E}', '\u{200F}', '\u{061C}', '\u{2065}', '\u{202F}'] {
            assert!(!is_bidi_control(c), "{c:?}");
        }
        assert!(has_bidi_controls("abc\u{202E}def"));
        assert!(has_bidi_controls("\u{2069}"));
        assert!(!has_bidi_controls("abc – “quoted” \u{200F}"));
        assert!(!has_bidi_controls(""));
    }

    #[test]
    fn strips_controls_keeps_newline_and_tab() {
        let (out, changes, borrowed) =
            run("a\0b\u{7}c\u{1B}[31m\u{7F}d\u{85}e\n\tf", Sanitize::ALL);
        assert_eq!(out, "abc[31mde\n\tf");
        assert!(changes.control && !borrowed);
        assert!(!changes.bidi && !changes.nfc && !changes.whitespace);
    }

    #[test]
    fn line_endings_become_newlines() {
        let (out, changes, _) = run("a\r\nb\rc\r\n", Sanitize::ALL);
        assert_eq!(out, "a\nb\nc\n");
        assert!(changes.control);
    }

    #[test]
    fn switched_off_steps_do_nothing() {
        let input = "a\0\u{202E}e\u{301}          b\n\n\n\nc";
        let (out, changes, borrowed) = run(input, Sanitize::NONE);
        assert_eq!(out, input);
        assert!(borrowed && !changes.any());
    }

    #[test]
    fn nfc_composes() {
        let (out, changes, borrowed) = run("caf\u{65}\u{301}", Sanitize::ALL);
        assert_eq!(out, "café");
        assert!(changes.nfc && !borrowed);
        assert!(!changes.control);
    }

    #[test]
    fn strips_bidi_controls() {
        let (out, changes, _) = run("\u{202E}abc\u{2066}d\u{2069}", Sanitize::ALL);
        assert_eq!(out, "abcd");
        assert!(changes.bidi);
        // Marks survive.
        let (out, changes, borrowed) = run("שלום\u{200F} abc", Sanitize::ALL);
        assert_eq!(out, "שלום\u{200F} abc");
        assert!(!changes.any() && borrowed);
    }

    #[test]
    fn collapses_runaway_whitespace() {
        let cases = [
            ("a\n\n\nb", "a\n\nb"),
            ("a\n \n\t\n  \nb", "a\n\nb"),
            ("a      b", "a b"),
            ("a \t \t \t b", "a b"),
            ("a    b", "a    b"),
            (
                "end.          \n\n\n\n    indented",
                "end. \n\n    indented",
            ),
            (
                "fn f() {\n        body();\n}",
                "fn f() {\n        body();\n}",
            ),
            ("        leading", "        leading"),
            ("x\n\ny", "x\n\ny"),
        ];
        for (input, want) in cases {
            let (out, changes, borrowed) = run(input, Sanitize::ALL);
            assert_eq!(out, want, "input {input:?}");
            assert_eq!(changes.whitespace, input != want, "input {input:?}");
            assert_eq!(borrowed, input == want, "input {input:?}");
        }
    }

    #[test]
    fn quick_check_agrees_with_full_pass() {
        // Every string up to 8 chars over the alphabet that matters.
        let alphabet = ['a', ' ', '\t', '\n'];
        let mut checked = 0;
        for len in 0..=8u32 {
            for mut n in 0..4usize.pow(len) {
                let s: String = (0..len)
                    .map(|_| {
                        let c = alphabet[n % 4];
                        n /= 4;
                        c
                    })
                    .collect();
                assert_eq!(
                    needs_collapse(s.as_bytes()),
                    collapse_runs(&s).is_some(),
                    "{s:?}"
                );
                checked += 1;
            }
        }
        assert!(checked > 80_000);
    }

    #[test]
    fn nfc_stable_ranges_are_stable() {
        use unicode_normalization::char::canonical_combining_class;
        for &(lo, hi) in NFC_STABLE {
            for c in lo..=hi {
                assert_eq!(
                    is_nfc_quick(std::iter::once(c)),
                    IsNormalized::Yes,
                    "{c:?} U+{:04X}",
                    u32::from(c)
                );
                assert_eq!(canonical_combining_class(c), 0, "U+{:04X}", u32::from(c));
            }
        }
    }

    #[test]
    fn nfc_stable_lookup() {
        let in_table = |c: char| NFC_STABLE.iter().any(|&(lo, hi)| (lo..=hi).contains(&c));
        for c in (0..=0x10FFFF).filter_map(char::from_u32) {
            assert_eq!(is_nfc_stable(c), in_table(c), "U+{:04X}", u32::from(c));
        }
        for c in ['a', '\u{2FF}', '中', '\u{1F600}', '\u{AC00}'] {
            assert!(is_nfc_stable(c), "{c:?}");
        }
        for c in [
            '\u{300}',
            '\u{483}',
            '\u{3099}',
            '\u{2000}',
            '\u{D7A4}',
            '\u{10FFFF}',
        ] {
            assert!(!is_nfc_stable(c), "{c:?}");
        }
    }

    #[test]
    fn nfc_after_stable_prefix() {
        for (input, want) in [
            ("中文e\u{301}", "中文é"),
            ("ウ\u{3099}", "ヴ"),
            ("\u{1100}\u{1161}", "\u{AC00}"),
            ("Ω\u{2126}", "ΩΩ"),
        ] {
            let (out, changes, _) = run(input, Sanitize::ALL);
            assert_eq!(out, want, "{input:?}");
            assert!(changes.nfc);
        }
    }

    #[test]
    fn ordinary_text_is_borrowed() {
        for s in [
            "Hello, world! Please summarise this article.\n\nThanks.\tBye",
            "Ünïcödé, 中文, emoji 👨\u{200D}👩\u{200D}👧 and café are already NFC.",
            "שלום עולם",
            "",
        ] {
            let (out, changes, borrowed) = run(s, Sanitize::ALL);
            assert!(borrowed, "{s:?} was copied");
            assert_eq!(out, s);
            assert!(!changes.any());
        }
    }

    #[test]
    fn changes_accumulate() {
        let mut changes = Changes::default();
        let _ = sanitize("a\0", Sanitize::ALL, &mut changes);
        let _ = sanitize("plain", Sanitize::ALL, &mut changes);
        assert!(changes.control);
    }

    #[test]
    fn truncation_short_text_unchanged() {
        assert_eq!(truncate_chars("héllo", 5, Keep::Head, "…"), "héllo");
        assert_eq!(truncate_chars("", 0, Keep::HeadAndTail, "…"), "");
    }

    #[test]
    fn truncation_head() {
        let out = truncate_chars("héllo wörld", 6, Keep::Head, "…");
        assert_eq!(out, "héllo…");
        assert_eq!(truncate_chars("abcdef", 3, Keep::Head, ""), "abc");
    }

    #[test]
    fn truncation_head_and_tail() {
        let out = truncate_chars("0123456789abcdefghij", 11, Keep::HeadAndTail, "[...]");
        assert_eq!(out, "012[...]hij");
        assert_eq!(out.chars().count(), 11);
        // Odd budget: the head gets the extra char.
        let out = truncate_chars("0123456789", 6, Keep::HeadAndTail, "..");
        assert_eq!(out, "01..89");
        let out = truncate_chars("0123456789", 7, Keep::HeadAndTail, "..");
        assert_eq!(out, "012..89");
    }

    #[test]
    fn truncation_marker_does_not_fit() {
        assert_eq!(
            truncate_chars("abcdef", 3, Keep::HeadAndTail, "[cut]"),
            "abc"
        );
        assert_eq!(
            truncate_chars("abcdef", 4, Keep::HeadAndTail, "..."),
            "a..."
        );
    }

    #[test]
    fn truncation_never_exceeds_limit_or_splits_chars() {
        let text = "añ中👍é\u{301}x👨\u{200D}👩\u{200D}👧yz".repeat(5);
        let total = text.chars().count();
        for max in 0..=total + 1 {
            for keep in [Keep::Head, Keep::HeadAndTail] {
                for marker in ["", "…", " [truncated] "] {
                    let out = truncate_chars(&text, max, keep, marker);
                    assert!(
                        out.chars().count() <= max,
                        "{max} {keep:?} {marker:?}: {out:?}"
                    );
                    if max >= total {
                        assert_eq!(out, text);
                    } else if marker.chars().count() <= max {
                        assert!(out.contains(marker));
                    }
                }
            }
        }
    }

    #[test]
    fn truncation_keeps_combining_sequences_whole() {
        // Cutting after "e" would orphan the accent; the cut moves before the "e".
        assert_eq!(truncate_chars("abe\u{301}cd", 3, Keep::Head, ""), "ab");
        // Cutting inside the ZWJ family drops the whole family rather than leaving "👨\u{200D}".
        let family = "👨\u{200D}👩\u{200D}👧";
        assert_eq!(
            truncate_chars(&format!("a{family}b"), 3, Keep::Head, ""),
            "a"
        );
        assert_eq!(
            truncate_chars(&format!("a{family}b"), 4, Keep::Head, ""),
            "a"
        );
        // The tail does not start on a combining mark.
        assert_eq!(
            truncate_chars("abcde\u{301}f", 5, Keep::HeadAndTail, "|"),
            "ab|f"
        );
    }
}
