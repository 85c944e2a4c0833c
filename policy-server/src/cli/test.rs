//! `arbiter test DIR --policies BUNDLE`: a directory of policy test cases run against a
//! bundle, for CI.
//!
//! Every `*.json` file in `DIR` (not recursive, in name order) is one suite:
//!
//! ```json
//! { "description": "regulated routes",
//!   "cases": [
//!     { "name": "an approved caller may use a regulated route",
//!       "request": { "api_key": "…", "method": "POST", "path": "/v1/chat/completions",
//!                    "context": { "classification": "regulated" } },
//!       "expect": { "decision": "allow", "policy_ids": ["routine-chat"] } } ] }
//! ```
//!
//! `request` is what `arbiter check --request FILE` reads ([`RequestSpec`]: identity
//! included), decided through the same `CheckRequest` boundary and engine as the server.
//! `expect.decision` is required; `policy_ids` (compared as a set), `principal` and
//! `identity_source` are checked when given. Unknown fields are refused, so a typo is an
//! error rather than an expectation silently not checked.
//!
//! Coverage: a policy is *exercised* when it is among the determining policies (Cedar's
//! `reason`, the audit record's `policy_ids`) of the decision of at least one case, passed
//! or failed. A permit that a forbid overrode is not determining, nor is a forbid whose
//! condition was false: those cases do not exercise them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use quick_xml::events::{BytesDecl, BytesEnd, BytesStart, BytesText, Event};
use quick_xml::Writer;
use serde::Deserialize;

use super::policy::{check_with, CliError, RequestSpec};
use crate::bundle::Bundle;

/// One suite file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteFile {
    /// What the suite is about.
    #[serde(default)]
    pub description: Option<String>,
    /// Its cases, run in order.
    pub cases: Vec<Case>,
}

/// One test case: a request and what the bundle must decide.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// Name, unique within its file.
    pub name: String,
    /// The request, as `arbiter check --request` reads it.
    pub request: RequestSpec,
    /// The expected decision.
    pub expect: Expected,
}

/// What a case expects.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expected {
    /// `allow` or `deny`.
    pub decision: ExpectedDecision,
    /// The determining policies (any order); not checked when absent.
    #[serde(default)]
    pub policy_ids: Option<Vec<String>>,
    /// The principal (`arbiter check` prints it); not checked when absent.
    #[serde(default)]
    pub principal: Option<String>,
    /// `mtls`, `jwt`, `api_key` or `none`; not checked when absent.
    #[serde(default)]
    pub identity_source: Option<String>,
}

/// `allow` or `deny`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpectedDecision {
    /// Allowed.
    Allow,
    /// Denied.
    Deny,
}

impl ExpectedDecision {
    fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

/// The result of one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// Suite file name.
    pub suite: String,
    /// Case name.
    pub name: String,
    /// What did not match (empty: passed).
    pub problems: Vec<String>,
    /// The determining policies of the actual decision.
    pub policy_ids: Vec<String>,
    /// How long the decision took.
    pub took: Duration,
}

impl CaseResult {
    /// Whether the case passed.
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What `arbiter test` found.
#[derive(Debug, Clone)]
pub struct TestReport {
    /// The bundle version tested.
    pub version: String,
    /// Every case, in file and case order.
    pub results: Vec<CaseResult>,
    /// Every policy of the bundle, sorted.
    pub policies: Vec<String>,
    /// Policies no case exercised, sorted.
    pub unexercised: Vec<String>,
}

impl TestReport {
    /// Number of failed cases.
    pub fn failed(&self) -> usize {
        self.results.iter().filter(|r| !r.passed()).count()
    }

    /// Human-readable summary: each failure with its problems, then the counts and the
    /// coverage.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for result in &self.results {
            let mark = if result.passed() { "ok  " } else { "FAIL" };
            out.push_str(&format!("{mark} {}: {}\n", result.suite, result.name));
            for problem in &result.problems {
                out.push_str(&format!("       {problem}\n"));
            }
        }
        let exercised = self.policies.len() - self.unexercised.len();
        out.push_str(&format!(
            "\n{} cases, bundle {}\n",
            self.results.len(),
            self.version
        ));
        out.push_str(&format!(
            "coverage: {exercised} of {} policies exercised\n",
            self.policies.len()
        ));
        for id in &self.unexercised {
            out.push_str(&format!("  not exercised: {id}\n"));
        }
        // Last, alone on its line: the plain closing line CI systems read.
        out.push_str(&format!(
            "{} passed, {} failed\n",
            self.results.len() - self.failed(),
            self.failed()
        ));
        out
    }

    /// JUnit XML (the `testsuites` form Jenkins, GitLab and GitHub reporters read): one
    /// `testsuite` per file, one `testcase` per case, a `failure` per failed case, and the
    /// coverage as `properties` of the whole run.
    pub fn to_junit(&self) -> Result<String, std::io::Error> {
        let mut writer = Writer::new_with_indent(Vec::new(), b' ', 2);
        writer.write_event(Event::Decl(BytesDecl::new("1.0", Some("UTF-8"), None)))?;
        let total: Duration = self.results.iter().map(|r| r.took).sum();
        let mut root = BytesStart::new("testsuites");
        root.push_attribute(("name", "arbiter test"));
        root.push_attribute(("tests", self.results.len().to_string().as_str()));
        root.push_attribute(("failures", self.failed().to_string().as_str()));
        root.push_attribute(("errors", "0"));
        root.push_attribute(("time", seconds(total).as_str()));
        writer.write_event(Event::Start(root))?;

        let mut suites: Vec<&str> = self.results.iter().map(|r| r.suite.as_str()).collect();
        suites.dedup();
        for suite in suites {
            let cases: Vec<&CaseResult> =
                self.results.iter().filter(|r| r.suite == suite).collect();
            let failures = cases.iter().filter(|r| !r.passed()).count();
            let time: Duration = cases.iter().map(|r| r.took).sum();
            let mut start = BytesStart::new("testsuite");
            start.push_attribute(("name", xml_text(suite).as_str()));
            start.push_attribute(("tests", cases.len().to_string().as_str()));
            start.push_attribute(("failures", failures.to_string().as_str()));
            start.push_attribute(("errors", "0"));
            start.push_attribute(("skipped", "0"));
            start.push_attribute(("time", seconds(time).as_str()));
            writer.write_event(Event::Start(start))?;
            if suite == self.results.first().map_or("", |r| r.suite.as_str()) {
                self.write_properties(&mut writer)?;
            }
            for case in cases {
                let mut start = BytesStart::new("testcase");
                start.push_attribute(("name", xml_text(&case.name).as_str()));
                start.push_attribute(("classname", xml_text(suite).as_str()));
                start.push_attribute(("time", seconds(case.took).as_str()));
                if case.passed() {
                    writer.write_event(Event::Empty(start))?;
                    continue;
                }
                writer.write_event(Event::Start(start))?;
                let mut failure = BytesStart::new("failure");
                let message = xml_text(&case.problems.join("; "));
                failure.push_attribute(("message", message.as_str()));
                failure.push_attribute(("type", "decision"));
                writer.write_event(Event::Start(failure))?;
                writer.write_event(Event::Text(BytesText::new(&xml_text(
                    &case.problems.join("\n"),
                ))))?;
                writer.write_event(Event::End(BytesEnd::new("failure")))?;
                writer.write_event(Event::End(BytesEnd::new("testcase")))?;
            }
            writer.write_event(Event::End(BytesEnd::new("testsuite")))?;
        }
        writer.write_event(Event::End(BytesEnd::new("testsuites")))?;
        let mut xml = writer.into_inner();
        xml.push(b'\n');
        String::from_utf8(xml).map_err(std::io::Error::other)
    }

    fn write_properties(&self, writer: &mut Writer<Vec<u8>>) -> Result<(), std::io::Error> {
        writer.write_event(Event::Start(BytesStart::new("properties")))?;
        let mut properties = vec![
            ("bundle_version".to_owned(), self.version.clone()),
            (
                "policies_exercised".to_owned(),
                (self.policies.len() - self.unexercised.len()).to_string(),
            ),
            ("policies".to_owned(), self.policies.len().to_string()),
        ];
        properties.extend(
            self.unexercised
                .iter()
                .map(|id| ("not_exercised".to_owned(), id.clone())),
        );
        for (name, value) in properties {
            let mut property = BytesStart::new("property");
            property.push_attribute(("name", name.as_str()));
            property.push_attribute(("value", xml_text(&value).as_str()));
            writer.write_event(Event::Empty(property))?;
        }
        writer.write_event(Event::End(BytesEnd::new("properties")))?;
        Ok(())
    }
}

/// Seconds with millisecond precision, as JUnit's `time` attribute.
fn seconds(took: Duration) -> String {
    format!("{:.3}", took.as_secs_f64())
}

/// `text` without the characters XML 1.0 cannot carry even escaped (control characters
/// other than tab and newlines), so a case name from a file cannot break the report.
fn xml_text(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\t' | '\n' | '\r' => c,
            c if c.is_control() => '\u{FFFD}',
            c => c,
        })
        .collect()
}

/// Why the test cases could not be run (exit 2, as for every command's unusable input).
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// The bundle cannot be loaded or a request cannot be decided.
    #[error(transparent)]
    Cli(#[from] CliError),
    /// The test directory cannot be read.
    #[error("cannot read test directory `{dir}`")]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A suite file cannot be read.
    #[error("cannot read `{path}`")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A suite file is not valid.
    #[error("`{path}`: {message}")]
    Suite {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The directory holds no case at all: a CI step that runs nothing must not pass.
    #[error("no test cases in `{0}` (expected `*.json` files with a non-empty `cases` list)")]
    Empty(PathBuf),
}

/// Reads every suite file of `dir`, in name order, refusing any invalid one.
pub fn read_suites(dir: &Path) -> Result<Vec<(String, SuiteFile)>, TestError> {
    let read_dir_error = |source| TestError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_error)? {
        let path = entry.map_err(read_dir_error)?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "json") {
            paths.push(path);
        }
    }
    paths.sort();
    let mut suites = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|source| TestError::Read {
            path: path.clone(),
            source,
        })?;
        let suite: SuiteFile = serde_json::from_str(&text).map_err(|e| TestError::Suite {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let mut names = BTreeSet::new();
        for case in &suite.cases {
            if !names.insert(case.name.as_str()) {
                return Err(TestError::Suite {
                    path,
                    message: format!("two cases are named `{}`", case.name),
                });
            }
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        suites.push((name, suite));
    }
    if suites.iter().all(|(_, s)| s.cases.is_empty()) {
        return Err(TestError::Empty(dir.to_owned()));
    }
    Ok(suites)
}

/// `arbiter test DIR --policies BUNDLE`.
pub fn run(tests: &Path, policies: &Path) -> Result<TestReport, TestError> {
    let bundle = Bundle::load(policies).map_err(CliError::from)?;
    let suites = read_suites(tests)?;
    run_with(&bundle, &suites)
}

/// Runs `suites` against `bundle`.
pub fn run_with(bundle: &Bundle, suites: &[(String, SuiteFile)]) -> Result<TestReport, TestError> {
    let policies = bundle.policy_ids();
    let mut exercised = BTreeSet::new();
    let mut results = Vec::new();
    for (suite, file) in suites {
        for case in &file.cases {
            let started = Instant::now();
            // A request that cannot be built or decided (a bad `time`, claims Cedar cannot
            // hold) is a failed case, not the end of the run: its file is still valid JSON.
            let report = check_with(bundle, &case.request);
            let took = started.elapsed();
            let result = match report {
                Ok(report) => {
                    exercised.extend(report.decision.policy_ids.iter().cloned());
                    CaseResult {
                        suite: suite.clone(),
                        name: case.name.clone(),
                        problems: compare(&case.expect, &report, &policies),
                        policy_ids: report.decision.policy_ids.clone(),
                        took,
                    }
                }
                Err(e) => CaseResult {
                    suite: suite.clone(),
                    name: case.name.clone(),
                    problems: vec![format!("not decided: {}", crate::schema::error_chain(&e))],
                    policy_ids: Vec::new(),
                    took,
                },
            };
            results.push(result);
        }
    }
    let unexercised = policies
        .iter()
        .filter(|id| !exercised.contains(*id))
        .cloned()
        .collect();
    Ok(TestReport {
        version: bundle.version().to_owned(),
        results,
        policies,
        unexercised,
    })
}

fn compare(
    expect: &Expected,
    report: &super::policy::CheckReport,
    policies: &[String],
) -> Vec<String> {
    let d = &report.decision;
    let mut problems = Vec::new();
    let actual = if d.allowed { "allow" } else { "deny" };
    if actual != expect.decision.as_str() {
        problems.push(format!(
            "decision: expected {}, got {actual} ({})",
            expect.decision.as_str(),
            report.reason()
        ));
    }
    if let Some(ids) = &expect.policy_ids {
        for id in ids.iter().filter(|id| !policies.contains(id)) {
            problems.push(format!(
                "policy_ids: expects `{id}`, which the bundle does not have"
            ));
        }
        let expected: BTreeSet<&String> = ids.iter().collect();
        let got: BTreeSet<&String> = d.policy_ids.iter().collect();
        if expected != got {
            problems.push(format!(
                "policy_ids: expected {}, got {}",
                list(&expected),
                list(&got)
            ));
        }
    }
    if let Some(principal) = &expect.principal {
        if *principal != d.principal {
            problems.push(format!(
                "principal: expected `{principal}`, got `{}`",
                d.principal
            ));
        }
    }
    if let Some(source) = &expect.identity_source {
        if source != d.identity_source.as_str() {
            problems.push(format!(
                "identity_source: expected `{source}`, got `{}`",
                d.identity_source.as_str()
            ));
        }
    }
    if !problems.is_empty() {
        for error in &d.errors {
            problems.push(format!("policy skipped on error: {error}"));
        }
    }
    problems
}

fn list(ids: &BTreeSet<&String>) -> String {
    let quoted: Vec<String> = ids.iter().map(|id| format!("`{id}`")).collect();
    format!("[{}]", quoted.join(", "))
}
