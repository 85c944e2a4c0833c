//! `arbiter test` and `arbiter fmt` as a security team's CI runs them: the real binary, its
//! exit codes, its summary, its JUnit report (read back with an independent XML parser) and
//! the files it leaves.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::example_bundle;

const ARBITER: &str = env!("CARGO_BIN_EXE_arbiter");

fn arbiter(args: &[&str]) -> Output {
    Command::new(ARBITER).args(args).output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn example_tests() -> PathBuf {
    example_bundle().join("../tests")
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A copy of the example bundle in a temporary directory.
fn bundle_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(example_bundle()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// One `testcase`: classname, name, failure message if it failed.
type JunitCase = (String, String, Option<String>);

/// The JUnit report at `path`, parsed by roxmltree (a strict, independent XML parser), with
/// the attributes JUnit consumers (Jenkins, GitLab, GitHub reporters) read checked.
fn junit(path: &Path) -> (usize, usize, Vec<JunitCase>) {
    let xml = std::fs::read_to_string(path).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}\n{xml}"));
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "testsuites");
    let count = |node: roxmltree::Node, attr: &str| -> usize {
        node.attribute(attr)
            .unwrap_or_else(|| panic!("no `{attr}` on {node:?}"))
            .parse()
            .unwrap()
    };
    let mut cases = Vec::new();
    for suite in root.children().filter(|n| n.is_element()) {
        assert_eq!(suite.tag_name().name(), "testsuite");
        let suite_cases: Vec<_> = suite
            .children()
            .filter(|n| n.has_tag_name("testcase"))
            .collect();
        assert_eq!(count(suite, "tests"), suite_cases.len());
        let failed = suite_cases
            .iter()
            .filter(|c| c.children().any(|n| n.has_tag_name("failure")))
            .count();
        assert_eq!(count(suite, "failures"), failed);
        suite.attribute("time").unwrap().parse::<f64>().unwrap();
        for case in suite_cases {
            case.attribute("time").unwrap().parse::<f64>().unwrap();
            let failure = case
                .children()
                .find(|n| n.has_tag_name("failure"))
                .map(|f| f.attribute("message").unwrap().to_owned());
            cases.push((
                case.attribute("classname").unwrap().to_owned(),
                case.attribute("name").unwrap().to_owned(),
                failure,
            ));
        }
    }
    assert_eq!(count(root, "tests"), cases.len());
    (count(root, "tests"), count(root, "failures"), cases)
}

/// The report at `path` as junitparser reads it (a JUnit consumer from PyPI that CI tools
/// build on; `make setup` installs it into `.venv`): per case `[classname, name, passed,
/// failure messages]`, and the totals.
fn junitparser(path: &Path) -> serde_json::Value {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let script = r#"
import json, sys
from junitparser import JUnitXml
xml = JUnitXml.fromfile(sys.argv[1])
cases = [[c.classname, c.name, c.is_passed, [r.message for r in c.result]]
         for suite in xml for c in suite]
print(json.dumps({"tests": xml.tests, "failures": xml.failures, "cases": cases}))
"#;
    let output = Command::new(&python)
        .args(["-c", script, s(path)])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run `make setup`)", python.display()));
    assert!(
        output.status.success(),
        "junitparser failed (run `make setup`): {}",
        text(&output)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn the_example_bundle_passes_its_own_tests_and_covers_every_policy() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("junit.xml");
    let output = arbiter(&[
        "test",
        s(&example_tests()),
        "--policies",
        s(&example_bundle()),
        "--junit",
        s(&report),
        "--require-coverage",
    ]);
    let out = text(&output);
    assert_eq!(output.status.code(), Some(0), "{out}");
    assert!(out.contains("coverage: 9 of 9 policies exercised"), "{out}");
    // The closing line, alone, as CI systems read it.
    let last = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .unwrap()
        .to_owned();
    assert!(last.ends_with(" passed, 0 failed"), "{out}");
    let (tests, failures, cases) = junit(&report);
    assert!(tests >= 15, "{tests}");
    assert_eq!(failures, 0);
    assert!(cases.contains(&(
        "regulated.json".to_owned(),
        "a caller outside regulated-approved is refused".to_owned(),
        None
    )));
}

#[test]
fn a_failing_case_fails_the_run_names_what_differs_and_lists_unexercised_policies() {
    let tests = tempfile::tempdir().unwrap();
    // Hostile names must not break the report: markup and a control character.
    std::fs::write(
        tests.path().join("a.json"),
        r#"{ "cases": [
          { "name": "intern on a regulated route <b>&amp;</b>\u0001",
            "request": { "method": "POST", "path": "/regulated/v1/chat/completions",
                         "route": "regulated_chat", "context": { "classification": "regulated" },
                         "api_key": "demo-key-globex-intern", "body": { "model": "gpt-4o-mini", "messages": [] } },
            "expect": { "decision": "allow" } },
          { "name": "right decision, wrong policy",
            "request": { "method": "GET", "path": "/v1/models", "route": "models" },
            "expect": { "decision": "allow", "policy_ids": ["routine-modles"] } },
          { "name": "passes",
            "request": { "method": "GET", "path": "/v1/models", "route": "models" },
            "expect": { "decision": "allow", "policy_ids": ["routine-models"], "principal": "anonymous" } }
        ] }"#,
    )
    .unwrap();
    let report = tests.path().join("out/junit.xml");
    std::fs::create_dir_all(report.parent().unwrap()).unwrap();
    let output = arbiter(&[
        "test",
        s(tests.path()),
        "--policies",
        s(&example_bundle()),
        "--junit",
        s(&report),
    ]);
    let out = text(&output);
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(
        out.contains(
            "decision: expected allow, got deny (denied by policy `regulated-requires-approval`)"
        ),
        "{out}"
    );
    assert!(
        out.contains("expects `routine-modles`, which the bundle does not have"),
        "{out}"
    );
    assert!(out.contains("1 passed, 2 failed"), "{out}");
    // Determining policies of the decisions: regulated-requires-approval, routine-models.
    assert!(out.contains("coverage: 2 of 9 policies exercised"), "{out}");
    assert!(out.contains("not exercised: tenant-isolation"), "{out}");
    assert!(!out.contains("not exercised: routine-models"), "{out}");

    let (tests_count, failures, cases) = junit(&report);
    assert_eq!((tests_count, failures), (3, 2));
    // A real consumer reads the same.
    let read = junitparser(&report);
    assert_eq!(
        (read["tests"].as_u64(), read["failures"].as_u64()),
        (Some(3), Some(2))
    );
    let read_cases = read["cases"].as_array().unwrap();
    assert_eq!(read_cases.len(), 3);
    for ((classname, name, failure), read) in cases.iter().zip(read_cases) {
        assert_eq!(read[0], classname.as_str());
        assert_eq!(read[1], name.as_str());
        assert_eq!(read[2], failure.is_none(), "{read}");
        if let Some(message) = failure {
            assert_eq!(read[3][0], message.as_str());
        }
    }
    let (_, name, failure) = &cases[0];
    assert_eq!(name, "intern on a regulated route <b>&amp;</b>\u{FFFD}");
    assert!(failure
        .as_deref()
        .unwrap()
        .contains("expected allow, got deny"));
    assert_eq!(cases[2].2, None);

    // --require-coverage fails a run whose cases all pass but leave policies untested.
    std::fs::write(
        tests.path().join("a.json"),
        r#"{ "cases": [ { "name": "models",
            "request": { "method": "GET", "path": "/v1/models", "route": "models" },
            "expect": { "decision": "allow" } } ] }"#,
    )
    .unwrap();
    let example = example_bundle();
    let args = ["test", s(tests.path()), "--policies", s(&example)];
    assert_eq!(arbiter(&args).status.code(), Some(0));
    let output = arbiter(&[&args[..], &["--require-coverage"]].concat());
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
}

#[test]
fn unusable_input_exits_2_with_the_file_named() {
    let tests = tempfile::tempdir().unwrap();
    let bundle = example_bundle();
    let run = |dir: &Path, policies: &Path| arbiter(&["test", s(dir), "--policies", s(policies)]);

    // No case at all: a CI step that tests nothing must not pass.
    let output = run(tests.path(), &bundle);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(text(&output).contains("no test cases"), "{}", text(&output));

    // A misspelt field is refused, not silently unchecked.
    std::fs::write(
        tests.path().join("typo.json"),
        r#"{ "cases": [ { "name": "x", "request": { "path": "/v1/models" },
             "expect": { "decision": "allow", "policy_id": ["routine-models"] } } ] }"#,
    )
    .unwrap();
    let output = run(tests.path(), &bundle);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(text(&output).contains("typo.json"), "{}", text(&output));
    assert!(text(&output).contains("policy_id"), "{}", text(&output));

    // Two cases of one name.
    std::fs::write(
        tests.path().join("typo.json"),
        r#"{ "cases": [
             { "name": "x", "request": { "path": "/v1/models" }, "expect": { "decision": "allow" } },
             { "name": "x", "request": { "path": "/v1/models" }, "expect": { "decision": "allow" } } ] }"#,
    )
    .unwrap();
    let output = run(tests.path(), &bundle);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("two cases are named `x`"),
        "{}",
        text(&output)
    );

    // An invalid bundle.
    let output = run(&example_tests(), tests.path());
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        text(&output).contains("is not a valid bundle"),
        "{}",
        text(&output)
    );
}

#[test]
fn fmt_check_names_unformatted_files_and_fmt_formats_them_without_changing_decisions() {
    let bundle = bundle_copy();
    let file = bundle.path().join("tenants.cedar");
    // The same policy on one line: valid Cedar, not formatted.
    let original = std::fs::read_to_string(&file).unwrap();
    let squashed: String = original
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(&file, &squashed).unwrap();

    let output = arbiter(&["fmt", "--check", s(bundle.path())]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        file.to_str().unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        squashed,
        "--check wrote"
    );

    let output = arbiter(&["fmt", s(bundle.path())]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let formatted = std::fs::read_to_string(&file).unwrap();
    assert_ne!(formatted, squashed);
    assert_eq!(
        arbiter(&["fmt", "--check", s(bundle.path())]).status.code(),
        Some(0)
    );
    // Same policies, and the bundle still passes its tests.
    use arbiter_policy_server::cli::fmt::policy_json;
    assert_eq!(
        policy_json(&formatted).unwrap(),
        policy_json(&original).unwrap()
    );
    let output = arbiter(&["test", s(&example_tests()), "--policies", s(bundle.path())]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    // No temporary file left in the bundle.
    let names: Vec<String> = std::fs::read_dir(bundle.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
}

#[test]
fn fmt_never_touches_a_file_it_cannot_parse() {
    let bundle = bundle_copy();
    let broken = bundle.path().join("broken.cedar");
    let cedar = "permit (principal, action, resource) when { context.x ==  };\n";
    std::fs::write(&broken, cedar).unwrap();
    for args in [vec!["fmt", s(&broken)], vec!["fmt", "--check", s(&broken)]] {
        let output = arbiter(&args);
        assert_eq!(output.status.code(), Some(2), "{}", text(&output));
        let out = text(&output);
        assert!(
            out.contains("broken.cedar` is not valid Cedar, left unchanged"),
            "{out}"
        );
        assert_eq!(std::fs::read_to_string(&broken).unwrap(), cedar);
    }
    let output = arbiter(&["fmt", s(&bundle.path().join("missing.cedar"))]);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(text(&output).contains("missing.cedar"), "{}", text(&output));
}
