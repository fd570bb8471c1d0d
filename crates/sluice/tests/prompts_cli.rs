//! Black-box tests of `sluice prompts test` and `sluice check` on the shipped example
//! (`prompts/message-generator`, `examples/prompts.toml`) and on copies of it.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside #[test] fns fail loudly by design"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fresh_dir;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sluice(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env_remove("SLUICE_CONFIG")
        .env_remove("OPENAI_API_KEY")
        .env_remove("SLUICE_MASTER_KEY")
        .current_dir(fresh_dir())
        .output()
        .expect("run sluice")
}

/// `sluice prompts test --config CONFIG --replay` and `extra` (`--prompt`, `--junit`, ...).
fn replay(config: &str, extra: &[&str]) -> Output {
    let mut args = vec!["prompts", "test", "--config", config, "--replay"];
    args.extend_from_slice(extra);
    sluice(&args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn both(o: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A copy of the shipped prompts (files, cassettes, lock) with a config pointing at it.
fn copy_example() -> (PathBuf, String) {
    let dir = fresh_dir();
    let from = repo().join("prompts/message-generator");
    let to = dir.join("prompts/message-generator");
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::copy(
        repo().join("prompts/prompts.lock"),
        dir.join("prompts/prompts.lock"),
    )
    .unwrap();
    let config = dir.join("sluice.toml");
    std::fs::copy(repo().join("examples/prompts.toml"), &config).unwrap();
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("dir = \"../prompts\"", "dir = \"prompts\"");
    std::fs::write(&config, text).unwrap();
    (dir, config.display().to_string())
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{from} not in {}", path.display());
    std::fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn the_shipped_example_passes_from_its_cassettes_and_its_lock_is_current() {
    let config = repo().join("examples/prompts.toml");
    let config = config.to_str().unwrap();
    let junit = fresh_dir().join("junit.xml");
    let out = replay(config, &["--junit", junit.to_str().unwrap()]);
    assert!(out.status.success(), "{}", both(&out));
    let text = stdout(&out);
    assert!(
        text.contains("ok   message-generator@2 platform-lead"),
        "{text}"
    );
    assert!(
        text.contains("4 cases, 0 failed; 4/4 runs passed"),
        "{text}"
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains(r#"tests="4""#) && xml.contains(r#"failures="0""#),
        "{xml}"
    );

    let out = sluice(&["check", "--config", config]);
    assert!(out.status.success(), "{}", both(&out));
    assert!(
        stdout(&out).contains("ok: 0 error(s), 0 warning(s)"),
        "{}",
        both(&out)
    );
}

#[test]
fn a_broken_assertion_fails_with_a_readable_report_and_junit() {
    let (dir, config) = copy_example();
    // Test cases are not part of the content hash: the recording still replays.
    edit(
        &dir.join("prompts/message-generator/v2.toml"),
        r#"{ starts_with = "Hi Dana" }"#,
        r#"{ starts_with = "Dear Dana" }"#,
    );
    let junit = dir.join("junit.xml");
    let out = replay(
        &config,
        &[
            "--prompt",
            "message-generator",
            "--junit",
            junit.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success(), "{}", both(&out));
    let text = stdout(&out);
    assert!(
        text.contains("FAIL message-generator@2 platform-lead"),
        "{text}"
    );
    assert!(
        text.contains(r#"run 1: starts_with: does not start with "Dear Dana""#),
        "{text}"
    );
    assert!(text.contains("answer: Hi Dana,"), "{text}");
    assert!(text.contains("ok   message-generator@2 one-fact"), "{text}");
    assert!(text.contains("4 cases, 1 failed"), "{text}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains(r#"failures="1""#) && xml.contains("Dear Dana"),
        "{xml}"
    );
}

#[test]
fn repeat_reports_the_pass_rate_and_record_then_replay_round_trips() {
    let (dir, config) = copy_example();
    let v3 = dir.join("prompts/message-generator/v3.toml");
    std::fs::copy(dir.join("prompts/message-generator/v2.toml"), &v3).unwrap();
    edit(&v3, "labels = [\"staging\"]\n", "");
    edit(&v3, "- Under 150 words, plain", "- Under 120 words, plain");
    let only_v3 = ["--prompt", "message-generator@3"];
    let run = |extra: &[&str]| {
        let mut args = vec!["prompts", "test", "--config", config.as_str()];
        args.extend_from_slice(&only_v3);
        args.extend_from_slice(extra);
        sluice(&args)
    };
    // No recording yet: a clear error naming the missing cassette.
    let out = run(&["--replay"]);
    assert!(!out.status.success());
    assert!(
        stdout(&out).contains("no cassette for message-generator@3"),
        "{}",
        both(&out)
    );
    let out = run(&["--record", "--repeat", "2"]);
    assert!(out.status.success(), "{}", both(&out));
    let cassette = std::fs::read_to_string(v3.with_file_name("v3.cassette.json")).unwrap();
    assert!(cassette.contains("\"platform-lead#1\""), "{cassette}");
    let out = run(&["--replay", "--repeat", "2"]);
    assert!(out.status.success(), "{}", both(&out));
    assert!(stdout(&out).contains("6/6 runs passed"), "{}", both(&out));
    // A third run was never recorded: it fails, and the pass rate shows it.
    let out = run(&["--replay", "--repeat", "3"]);
    assert!(!out.status.success());
    let text = stdout(&out);
    assert!(text.contains("(2/3 runs passed, 67%)"), "{text}");
    assert!(
        text.contains("no recorded answer for case `one-fact` run 3"),
        "{text}"
    );
}

/// `path` without its `[[tests]]` (not part of the content hash: still locked, still
/// replayable).
fn drop_tests(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let at = text.find("[[tests]]").expect("the file has tests");
    std::fs::write(path, &text[..at]).unwrap();
}

#[test]
fn a_selection_without_test_cases_fails_instead_of_passing_empty() {
    let (dir, config) = copy_example();
    let prompts = dir.join("prompts/message-generator");
    let v3 = prompts.join("v3.toml");
    std::fs::copy(prompts.join("v2.toml"), &v3).unwrap();
    edit(&v3, "labels = [\"staging\"]\n", "");
    drop_tests(&v3);
    let junit = dir.join("junit.xml");
    let out = replay(
        &config,
        &[
            "--prompt",
            "message-generator@3",
            "--junit",
            junit.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success(), "{}", both(&out));
    let text = stdout(&out);
    assert!(
        text.contains("error: nothing to test: `message-generator@3` has no test cases"),
        "{text}"
    );
    assert!(text.contains("0 cases, 0 failed"), "{text}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains("nothing to test") && xml.contains(r#"errors="1""#),
        "{xml}"
    );

    // No version anywhere with a test case: the same, for the whole config.
    drop_tests(&prompts.join("v1.toml"));
    drop_tests(&prompts.join("v2.toml"));
    let out = replay(&config, &[]);
    assert!(!out.status.success(), "{}", both(&out));
    assert!(
        stdout(&out).contains("error: nothing to test: no prompt version under"),
        "{}",
        both(&out)
    );
    let out = replay(&config, &["--prompt", "message-generator"]);
    assert!(!out.status.success(), "{}", both(&out));
    assert!(
        stdout(&out).contains("no version of prompt `message-generator` has test cases"),
        "{}",
        both(&out)
    );
}

/// A run that cannot start (here an unknown `--prompt`) still leaves a JUnit file that
/// says why, for the CI that reads it.
#[test]
fn a_run_that_cannot_start_still_writes_its_junit() {
    let (dir, config) = copy_example();
    let junit = dir.join("junit.xml");
    let out = replay(
        &config,
        &[
            "--prompt",
            "no-such-prompt",
            "--junit",
            junit.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success(), "{}", both(&out));
    assert!(both(&out).contains("no-such-prompt"), "{}", both(&out));
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains("no-such-prompt") && xml.contains(r#"errors="1""#),
        "{xml}"
    );
}

#[test]
fn a_new_version_is_a_warning_until_update_lock_adds_it() {
    let (dir, config) = copy_example();
    let v3 = dir.join("prompts/message-generator/v3.toml");
    std::fs::copy(dir.join("prompts/message-generator/v2.toml"), &v3).unwrap();
    edit(&v3, "labels = [\"staging\"]\n", "");
    edit(&v3, "- Under 150 words, plain", "- Under 120 words, plain");
    let lock_path = dir.join("prompts/prompts.lock");
    let shipped = std::fs::read_to_string(&lock_path).unwrap();

    // Not locked yet: a warning that says how, the exit still 0, the lock untouched.
    let out = sluice(&["check", "--config", &config]);
    assert!(out.status.success(), "{}", both(&out));
    let text = stdout(&out);
    assert!(
        text.contains("warning: message-generator@3 is not in")
            && text.contains("run `sluice check --update-lock` to lock it"),
        "{text}"
    );
    assert!(text.contains("0 error(s), 1 warning(s)"), "{text}");
    assert_eq!(std::fs::read_to_string(&lock_path).unwrap(), shipped);

    let out = sluice(&["check", "--config", &config, "--update-lock"]);
    assert!(out.status.success(), "{}", both(&out));
    let hash = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("message-generator@3 hash "))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("check names v3's hash")
        .to_string();
    assert!(
        stdout(&out).contains(&format!("locked message-generator@3 ({hash})")),
        "{}",
        both(&out)
    );
    // v3 added with the hash `check` reported; the locked versions kept as they were.
    let lock = std::fs::read_to_string(&lock_path).unwrap();
    assert_eq!(
        lock,
        format!("{shipped}\"message-generator@3\" = \"{hash}\"\n"),
        "{lock}"
    );
    let out = sluice(&["check", "--config", &config]);
    assert!(out.status.success(), "{}", both(&out));
    assert!(
        stdout(&out).contains("ok: 0 error(s), 0 warning(s)"),
        "{}",
        both(&out)
    );
}

#[test]
fn check_catches_an_edited_locked_version_and_reports_file_and_line() {
    let (dir, config) = copy_example();
    let out = sluice(&["check", "--config", &config]);
    assert!(out.status.success(), "{}", both(&out));

    edit(
        &dir.join("prompts/message-generator/v2.toml"),
        "- Under 150 words, plain",
        "- Under 100 words, plain",
    );
    std::fs::write(
        dir.join("prompts/message-generator/v3.toml"),
        "model = \"gpt-4o-mini\"\nsystem = [unclosed\n",
    )
    .unwrap();
    let out = sluice(&["check", "--config", &config]);
    assert!(!out.status.success(), "{}", both(&out));
    let text = stdout(&out);
    assert!(
        text.contains("message-generator@2 changed after it was locked"),
        "{text}"
    );
    assert!(text.contains("make a new version"), "{text}");
    assert!(text.contains("v3.toml:2"), "{text}");
    // The label pointing at it now points at nothing that loaded: said too.
    assert!(
        text.contains("production: points at message-generator@2"),
        "{text}"
    );
    assert!(
        text.contains("copy it to") && text.contains("v4.toml"),
        "{text}"
    );
    assert!(text.contains("FAILED: 3 error(s)"), "{text}");

    // --update-lock never re-locks a changed version.
    let out = sluice(&["check", "--config", &config, "--update-lock"]);
    assert!(!out.status.success());
    let lock = std::fs::read_to_string(dir.join("prompts/prompts.lock")).unwrap();
    let shipped = std::fs::read_to_string(repo().join("prompts/prompts.lock")).unwrap();
    assert_eq!(lock, shipped);
}

#[cfg(unix)]
#[test]
fn sighup_reloads_the_labels_of_a_running_gateway() {
    let (dir, config) = copy_example();
    let config_path = PathBuf::from(&config);
    // No file watcher: only the signal can pick the change up.
    edit(
        &config_path,
        "dir = \"prompts\"",
        "dir = \"prompts\"\nwatch = false",
    );
    let gw = common::spawn(
        &["serve", "--config", &config, "--listen", "127.0.0.1:0"],
        &[],
    );
    let ask = || {
        let body = r#"{"model": "prompt", "sluice": {"prompt": "message-generator@production", "variables": {"recipient_name": "Dana Ruiz", "company": "Acme"}}}"#;
        let (status, text) = common::http(&gw.addr, "POST", "/v1/chat/completions", body);
        assert_eq!(status, 200, "{text}");
        text
    };
    // v2 signs with its default sender, v1 (no sender variable) with "The team".
    assert!(ask().contains("Best,\\nSam"));
    edit(&config_path, "production = 2", "production = 1");
    let status = Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let text = ask();
        if text.contains("Best,\\nThe team") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not move the label within 15 s; last answer: {text}"
        );
        #[expect(
            clippy::disallowed_methods,
            reason = "a blocking test, no runtime here"
        )]
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(dir);
}
