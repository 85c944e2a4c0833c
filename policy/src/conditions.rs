//! Condition index: within one scope bucket, policies filed under a conjunct of their `when`
//! conditions that a request's context can be checked against with one lookup, in the way OPA
//! indexes rules by their conditions.
//!
//! A policy's conditions are read from Cedar's JSON policy form (the EST of
//! [`cedar_policy::Policy::to_json`]). Cedar evaluates a policy as one conjunction, left to
//! right, short-circuiting: its scope (which cannot error), then each `when` (each `&&` of
//! it in turn), then each `!unless`. Of that chain the indexer understands the leading
//! conjuncts of these forms on a context attribute path (`context.a`, `context.a.b`, …):
//!
//! | conjunct | request value it needs |
//! |---|---|
//! | `P == literal` (string, long or bool; either side) | `P` |
//! | `[literal, …].contains(P)` | `P` |
//! | `P like "prefix*…"` | `P`, a string starting with the literal prefix |
//! | `P has a` (`P` may be `context` itself) | `P`, a record |
//!
//! It files the policy under the most selective of them (the *key*); the understood conjuncts
//! before the key are its *guards*. For a request, a conjunct is *false* only when Cedar
//! would certainly evaluate it to `false` without an error; *error* when its path is missing,
//! has the wrong type, or cannot be read here (an entity); *true* otherwise. A policy is left
//! out only if, reading its guards and then its key in order, one is false before any is an
//! error: then Cedar reaches that conjunct (everything before it evaluated without error) and
//! the policy is not satisfied and reports no error, so leaving it out changes neither the
//! decision nor its reasons nor its errors. Everything else is evaluated by Cedar, as is every
//! policy the indexer does not understand.

use std::collections::HashMap;

use cedar_policy::{Context, EvalResult, Policy, PolicySet};
use serde_json::Value;

/// A literal the index compares with.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Lit {
    Str(String),
    Long(i64),
    Bool(bool),
}

impl Lit {
    fn from_est(value: &Value) -> Option<Self> {
        match value {
            Value::String(s) => Some(Self::Str(s.clone())),
            Value::Bool(b) => Some(Self::Bool(*b)),
            Value::Number(n) => n.as_i64().map(Self::Long),
            _ => None,
        }
    }

    /// The literal equal to `value`, if `value` is a string, long or bool. Cedar's `==` is
    /// false between values of different types.
    fn of(value: &EvalResult) -> Option<Self> {
        match value {
            EvalResult::String(s) => Some(Self::Str(s.clone())),
            EvalResult::Long(n) => Some(Self::Long(*n)),
            EvalResult::Bool(b) => Some(Self::Bool(*b)),
            _ => None,
        }
    }
}

/// An attribute path from `context` (empty: `context` itself), as an index into the
/// index's table of paths.
type PathId = usize;

/// A conjunct the index understands.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Conjunct {
    /// `P == lit`.
    Eq(PathId, Lit),
    /// `[lits].contains(P)` (sorted, no duplicates).
    OneOf(PathId, Vec<Lit>),
    /// `P has attr`, `P` an attribute of `context`.
    Has(PathId, String),
    /// `context has a`: whether path `[a]` is present.
    Present(PathId),
    /// `P like pattern`, reduced to the literal prefix of the pattern.
    Prefix(PathId, String),
}

/// What a conjunct evaluates to for a request, as far as the index can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// Certainly `false`, without an error.
    False,
    /// A boolean without an error (`true`, or for a prefix, possibly `false`).
    True,
    /// Possibly an error.
    Error,
}

impl Conjunct {
    fn path(&self) -> PathId {
        match self {
            Self::Eq(p, _)
            | Self::OneOf(p, _)
            | Self::Has(p, _)
            | Self::Present(p)
            | Self::Prefix(p, _) => *p,
        }
    }

    /// How selective it is as a key (0: not worth a key).
    fn rank(&self) -> u8 {
        match self {
            Self::Prefix(_, prefix) if !prefix.is_empty() => 4,
            Self::Prefix(..) => 0,
            Self::Eq(..) => 3,
            Self::OneOf(..) => 2,
            Self::Has(..) | Self::Present(..) => 1,
        }
    }

    fn status(&self, values: &Values<'_>) -> Status {
        let truth = |b: bool| if b { Status::True } else { Status::False };
        if let Self::Present(p) = self {
            // `context` is a record: `has` on it cannot error.
            return match values.present(*p) {
                Some(present) => truth(present),
                None => Status::Error,
            };
        }
        let Some(value) = values.get(self.path()) else {
            return Status::Error;
        };
        match self {
            Self::Present(_) => Status::Error,
            Self::Eq(_, lit) => truth(Lit::of(&value).as_ref() == Some(lit)),
            Self::OneOf(_, lits) => truth(Lit::of(&value).is_some_and(|v| lits.contains(&v))),
            Self::Has(_, attr) => match value {
                EvalResult::Record(record) => truth(record.contains_attribute(attr)),
                _ => Status::Error,
            },
            Self::Prefix(_, prefix) => match value {
                EvalResult::String(s) => truth(s.starts_with(prefix.as_str())),
                _ => Status::Error,
            },
        }
    }
}

/// The request's values of the index's paths, looked up once each.
struct Values<'a> {
    context: Option<&'a Context>,
    paths: &'a [Vec<String>],
    /// Per path: not looked up yet, or its value (`None`: missing or unreadable).
    cache: std::cell::RefCell<Vec<Option<Option<EvalResult>>>>,
    /// Whether the context can be read at all (a context that is not a plain record, e.g.
    /// a partial one, answers no lookups: everything is then evaluated).
    readable: bool,
}

impl<'a> Values<'a> {
    fn new(context: Option<&'a Context>, paths: &'a [Vec<String>]) -> Self {
        // The engine always sets `method`; a context that does not show it is not readable.
        let readable = context.is_some_and(|c| c.get("method").is_some());
        Self {
            context,
            paths,
            cache: std::cell::RefCell::new(vec![None; paths.len()]),
            readable,
        }
    }

    /// Whether the one-attribute path `id` is present in the context (`None`: the context
    /// cannot be read).
    fn present(&self, id: PathId) -> Option<bool> {
        self.readable.then(|| self.get(id).is_some())
    }

    /// The value of path `id`: `None` when missing or not readable here.
    fn get(&self, id: PathId) -> Option<EvalResult> {
        if !self.readable {
            return None;
        }
        if let Some(Some(known)) = self.cache.borrow().get(id) {
            return known.clone();
        }
        let value = self.lookup(self.paths.get(id)?);
        if let Some(slot) = self.cache.borrow_mut().get_mut(id) {
            *slot = Some(value.clone());
        }
        value
    }

    fn lookup(&self, path: &[String]) -> Option<EvalResult> {
        let (first, rest) = path.split_first()?;
        let mut value = self.context?.get(first)?;
        for attr in rest {
            value = match value {
                EvalResult::Record(record) => record.get(attr)?.clone(),
                // An entity's attributes are not read here; anything else is a type error.
                _ => return None,
            };
        }
        Some(value)
    }
}

/// How a key is looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum KeyKind {
    /// `==` and `.contains`: by the value.
    Value,
    /// `has`: by the attribute.
    Has,
    /// `context has`: by the attribute.
    Present,
    /// `like`: by the literal prefix.
    Prefix,
}

/// Policies with the same guards and the same kind of key on the same path.
#[derive(Debug)]
struct Group {
    guards: Vec<Conjunct>,
    kind: KeyKind,
    path: PathId,
    /// Every policy of the group: evaluated when the key's path is an error.
    all: PolicySet,
    by_value: HashMap<Lit, PolicySet>,
    by_text: HashMap<String, PolicySet>,
    /// For [`KeyKind::Present`]: per attribute path, its policies.
    by_present: Vec<(PathId, PolicySet)>,
    /// Lengths of the prefixes in `by_text` (for [`KeyKind::Prefix`]), ascending.
    prefix_lens: Vec<usize>,
}

/// The policies of one scope bucket: those always evaluated, and those filed by condition.
#[derive(Debug, Default)]
pub struct Bucket {
    always: PolicySet,
    groups: Vec<Group>,
    group_of: HashMap<(Vec<Conjunct>, KeyKind, PathId), usize>,
    indexed: usize,
}

/// The attribute paths the conditions of a bundle use, shared by its buckets.
#[derive(Debug, Default)]
pub struct Paths {
    paths: Vec<Vec<String>>,
    ids: HashMap<Vec<String>, PathId>,
}

impl Paths {
    fn intern(&mut self, path: Vec<String>) -> PathId {
        if let Some(id) = self.ids.get(&path) {
            return *id;
        }
        let id = self.paths.len();
        self.paths.push(path.clone());
        self.ids.insert(path, id);
        id
    }
}

/// The understood leading conjuncts of `policy`'s conditions (empty if none, or if the
/// policy has no JSON form).
fn conjuncts(policy: &Policy, paths: &mut Paths) -> Vec<Conjunct> {
    let Ok(est) = policy.to_json() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let Some(conditions) = est.get("conditions").and_then(Value::as_array) else {
        return out;
    };
    for condition in conditions {
        if condition.get("kind").and_then(Value::as_str) != Some("when") {
            break;
        }
        let Some(body) = condition.get("body") else {
            break;
        };
        let mut flat = Vec::new();
        flatten(body, &mut flat);
        for expr in flat {
            match conjunct(expr, paths) {
                Some(c) => out.push(c),
                None => return out,
            }
        }
    }
    out
}

/// The operands of a chain of `&&`, in evaluation order.
fn flatten<'a>(expr: &'a Value, out: &mut Vec<&'a Value>) {
    if let Some(and) = expr.get("&&") {
        if let (Some(left), Some(right)) = (and.get("left"), and.get("right")) {
            flatten(left, out);
            flatten(right, out);
            return;
        }
    }
    out.push(expr);
}

/// The attribute path of `expr`, if it is `context` or an attribute access chain on it.
fn path(expr: &Value) -> Option<Vec<String>> {
    if expr.get("Var").and_then(Value::as_str) == Some("context") {
        return Some(Vec::new());
    }
    let access = expr.get(".")?;
    let mut path = path(access.get("left")?)?;
    path.push(access.get("attr")?.as_str()?.to_owned());
    Some(path)
}

/// A one-key JSON object's key and value.
fn single(expr: &Value) -> Option<(&str, &Value)> {
    let object = expr.as_object()?;
    if object.len() != 1 {
        return None;
    }
    object.iter().next().map(|(k, v)| (k.as_str(), v))
}

/// The value of a literal expression.
fn literal(expr: &Value) -> Option<&Value> {
    single(expr).filter(|(k, _)| *k == "Value").map(|(_, v)| v)
}

fn conjunct(expr: &Value, paths: &mut Paths) -> Option<Conjunct> {
    let (op, args) = single(expr)?;
    match op {
        "==" => {
            let (left, right) = (args.get("left")?, args.get("right")?);
            let (p, lit) = match (path(left), path(right)) {
                (Some(p), None) => (p, literal(right)?),
                (None, Some(p)) => (p, literal(left)?),
                _ => return None,
            };
            if p.is_empty() {
                return None;
            }
            Some(Conjunct::Eq(paths.intern(p), Lit::from_est(lit)?))
        }
        "contains" => {
            let set = single(args.get("left")?).filter(|(k, _)| *k == "Set")?.1;
            let mut lits = set
                .as_array()?
                .iter()
                .map(|e| {
                    let (k, v) = single(e)?;
                    (k == "Value").then(|| Lit::from_est(v)).flatten()
                })
                .collect::<Option<Vec<Lit>>>()?;
            lits.sort();
            lits.dedup();
            let p = path(args.get("right")?).filter(|p| !p.is_empty())?;
            Some(Conjunct::OneOf(paths.intern(p), lits))
        }
        "has" => {
            let p = path(args.get("left")?)?;
            let attr = args.get("attr")?.as_str()?.to_owned();
            if p.is_empty() {
                return Some(Conjunct::Present(paths.intern(vec![attr])));
            }
            Some(Conjunct::Has(paths.intern(p), attr))
        }
        "like" => {
            let p = path(args.get("left")?).filter(|p| !p.is_empty())?;
            let mut prefix = String::new();
            for element in args.get("pattern")?.as_array()? {
                match element.get("Literal").and_then(Value::as_str) {
                    Some(text) => prefix.push_str(text),
                    None if element.as_str() == Some("Wildcard") => break,
                    None => return None,
                }
            }
            Some(Conjunct::Prefix(paths.intern(p), prefix))
        }
        _ => None,
    }
}

impl Bucket {
    /// Files `policy`: under its most selective understood conjunct, or as always evaluated.
    pub fn add(&mut self, policy: Policy, paths: &mut Paths) -> Result<(), String> {
        let conjuncts = conjuncts(&policy, paths);
        let key = conjuncts
            .iter()
            .enumerate()
            .filter(|(_, c)| c.rank() > 0)
            // Most selective; of equals, the first (fewest guards).
            .min_by_key(|(i, c)| (std::cmp::Reverse(c.rank()), *i));
        let Some((at, key)) = key else {
            return self.always.add(policy).map_err(|e| e.to_string());
        };
        let guards = conjuncts[..at].to_vec();
        let (kind, path) = match key {
            Conjunct::Eq(p, _) | Conjunct::OneOf(p, _) => (KeyKind::Value, *p),
            Conjunct::Has(p, _) => (KeyKind::Has, *p),
            // One group for every `context has`.
            Conjunct::Present(_) => (KeyKind::Present, 0),
            Conjunct::Prefix(p, _) => (KeyKind::Prefix, *p),
        };
        let groups = &mut self.groups;
        let slot = *self
            .group_of
            .entry((guards.clone(), kind, path))
            .or_insert_with(|| {
                groups.push(Group {
                    guards,
                    kind,
                    path,
                    all: PolicySet::new(),
                    by_value: HashMap::new(),
                    by_text: HashMap::new(),
                    by_present: Vec::new(),
                    prefix_lens: Vec::new(),
                });
                groups.len() - 1
            });
        let Some(group) = self.groups.get_mut(slot) else {
            return Err("condition index: group out of range".to_owned());
        };
        let err = |e: cedar_policy::PolicySetError| e.to_string();
        group.all.add(policy.clone()).map_err(err)?;
        match key {
            Conjunct::Eq(_, lit) => group
                .by_value
                .entry(lit.clone())
                .or_default()
                .add(policy)
                .map_err(err)?,
            Conjunct::OneOf(_, lits) => {
                for lit in lits {
                    group
                        .by_value
                        .entry(lit.clone())
                        .or_default()
                        .add(policy.clone())
                        .map_err(err)?;
                }
            }
            Conjunct::Present(p) => match group.by_present.iter_mut().find(|(q, _)| q == p) {
                Some((_, set)) => set.add(policy).map_err(err)?,
                None => {
                    let mut set = PolicySet::new();
                    set.add(policy).map_err(err)?;
                    group.by_present.push((*p, set));
                }
            },
            Conjunct::Has(_, text) | Conjunct::Prefix(_, text) => {
                group
                    .by_text
                    .entry(text.clone())
                    .or_default()
                    .add(policy)
                    .map_err(err)?;
                if !group.prefix_lens.contains(&text.len()) {
                    group.prefix_lens.push(text.len());
                    group.prefix_lens.sort_unstable();
                }
            }
        }
        self.indexed += 1;
        Ok(())
    }

    /// Number of policies filed by condition.
    pub fn indexed(&self) -> usize {
        self.indexed
    }

    /// Whether the bucket holds no policy.
    pub fn is_empty(&self) -> bool {
        self.always.is_empty() && self.groups.is_empty()
    }

    /// Every policy set a request with `context` must evaluate.
    pub fn candidates<'s>(
        &'s self,
        context: Option<&Context>,
        paths: &Paths,
        out: &mut Vec<&'s PolicySet>,
    ) {
        if !self.always.is_empty() {
            out.push(&self.always);
        }
        if self.groups.is_empty() {
            return;
        }
        let values = Values::new(context, &paths.paths);
        'groups: for group in &self.groups {
            for guard in &group.guards {
                match guard.status(&values) {
                    Status::True => {}
                    Status::False => continue 'groups,
                    Status::Error => {
                        out.push(&group.all);
                        continue 'groups;
                    }
                }
            }
            if group.kind == KeyKind::Present {
                for (p, set) in &group.by_present {
                    if values.present(*p) != Some(false) {
                        out.push(set);
                    }
                }
                continue;
            }
            let Some(value) = values.get(group.path) else {
                out.push(&group.all);
                continue;
            };
            match (group.kind, &value) {
                (KeyKind::Value, value) => {
                    if let Some(set) = Lit::of(value).and_then(|v| group.by_value.get(&v)) {
                        out.push(set);
                    }
                }
                (KeyKind::Has, EvalResult::Record(record)) => {
                    if record.len() < group.by_text.len() {
                        out.extend(record.iter().filter_map(|(k, _)| group.by_text.get(k)));
                    } else {
                        out.extend(
                            group
                                .by_text
                                .iter()
                                .filter(|(k, _)| record.contains_attribute(k))
                                .map(|(_, set)| set),
                        );
                    }
                }
                (KeyKind::Prefix, EvalResult::String(text)) => {
                    for len in &group.prefix_lens {
                        match text.get(..*len) {
                            Some(prefix) => out.extend(group.by_text.get(prefix)),
                            None if *len > text.len() => break,
                            None => {}
                        }
                    }
                }
                // A type error: Cedar reports it.
                _ => out.push(&group.all),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The differential property: decisions with the index (scope and condition) equal
    //! Cedar's over the whole policy set, reasons and errors included.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::BTreeMap;
    use std::time::{Duration, SystemTime};

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestCaseError, TestRunner};

    use super::*;

    use crate::ai::BodyAttributes;
    use crate::engine::{Decision, UNINDEXED};
    use crate::identity::Identity;
    use crate::request::{AuthzRequest, TimeSource};
    use crate::Bundle;

    const EXAMPLE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/ai-gateway/policies"
    );
    const EXAMPLE_POLICIES: [&str; 5] = [
        "limits.cedar",
        "models.cedar",
        "regulated.cedar",
        "routine.cedar",
        "tenants.cedar",
    ];

    /// Conditions over the context and the principal, each well-typed under the example
    /// bundle's schema (bundles are validated). Some the index understands, some it must
    /// refuse (disjunctions, negations, comparisons, extension types, entity attributes,
    /// arithmetic that overflows into an evaluation error).
    const ATOMS: &[&str] = &[
        r#"context.method == "POST""#,
        r#""GET" == context.method"#,
        r#"context.path like "/v1/*""#,
        r#"context.path like "/tenant-3/*""#,
        r#"context.path like "/v1/chat/completions""#,
        r#"context.path like "*""#,
        r#"context.path like "/v1/\*x*""#,
        r#"context.path like "/v1/ch*ons""#,
        r#"context.host like "*.local""#,
        r#"context.route == "r1""#,
        r#"["r1", "r2", "r3"].contains(context.route)"#,
        r#"context has model"#,
        r#"context has model && context.model == "m-1""#,
        r#"context has model && ["m-1", "m-2"].contains(context.model)"#,
        r#"context has model && context.model like "m-*""#,
        r#"context.route_context has classification"#,
        r#"context.route_context has classification && context.route_context.classification == "regulated""#,
        r#"context.route_context has size_policy && context.route_context.size_policy == "bounded""#,
        r#"context has max_tokens && context.max_tokens > 100"#,
        r#"context has max_tokens && context.max_tokens == 100"#,
        r#"context.body_bytes == 5"#,
        r#"context.body_truncated == true"#,
        r#"context.body_parse_error"#,
        r#"context.body_bytes * 4611686018427387904 > 1"#,
        r#"context has stream && context.stream == false"#,
        r#"context has source_ip && context.source_ip.isInRange(ip("10.0.0.0/8"))"#,
        r#"context.time > datetime("2023-01-01")"#,
        r#"context.identity_source == "mtls""#,
        r#"context has requested_tenant"#,
        r#"!(context.method == "GET")"#,
        r#"context.method == "GET" || context.path like "/tenant-3/*""#,
        r#"(context.method == "POST" && context.path like "/v1/*")"#,
        r#"principal is Arbiter::Caller && principal has tenant && principal.tenant == "acme""#,
        r#"principal in Arbiter::Group::"premium-models""#,
        r#"resource == Arbiter::Route::"r1""#,
    ];

    const PRINCIPALS: &[&str] = &[
        "principal",
        "principal",
        r#"principal == Arbiter::Caller::"spiffe://arbiter.test/ns/apps/sa/billing""#,
        r#"principal in Arbiter::Group::"premium-models""#,
        "principal is Arbiter::Anonymous",
    ];
    const ACTIONS: &[&str] = &[
        "action",
        "action",
        r#"action == Arbiter::Action::"chat.completions""#,
        r#"action in [Arbiter::Action::"chat.completions", Arbiter::Action::"embeddings"]"#,
    ];
    const RESOURCES: &[&str] = &[
        "resource",
        "resource",
        r#"resource == Arbiter::Route::"r1""#,
    ];

    /// The four shapes of the benchmark's generated bundle (bench/src/policies.rs).
    fn bench_shape(i: usize) -> String {
        match i % 4 {
            0 => format!("permit (principal == Arbiter::Caller::\"spiffe://bench.local/ns/tenant-{i}/sa/app\", action == Arbiter::Action::\"chat.completions\", resource == Arbiter::Route::\"tenant-{i}-chat\");"),
            1 => format!("forbid (principal, action, resource == Arbiter::Route::\"tenant-{i}-chat\") when {{ context.route_context has classification && context.route_context.classification == \"restricted-{i}\" }};"),
            2 => format!("permit (principal, action in [Arbiter::Action::\"chat.completions\", Arbiter::Action::\"embeddings\"], resource) when {{ context.method == \"POST\" && context.path like \"/tenant-{i}/*\" }};"),
            _ => format!("forbid (principal == Arbiter::Caller::\"spiffe://bench.local/ns/tenant-{i}/sa/blocked\", action, resource);"),
        }
    }

    #[derive(Debug, Clone)]
    struct Spec {
        forbid: bool,
        principal: usize,
        action: usize,
        resource: usize,
        when: Vec<Vec<usize>>,
        unless: Option<usize>,
    }

    fn spec() -> impl Strategy<Value = Spec> {
        let atom = 0..ATOMS.len();
        (
            any::<bool>(),
            0..PRINCIPALS.len(),
            0..ACTIONS.len(),
            0..RESOURCES.len(),
            prop::collection::vec(prop::collection::vec(atom.clone(), 1..4), 0..3),
            prop::option::of(atom),
        )
            .prop_map(|(forbid, principal, action, resource, when, unless)| Spec {
                forbid,
                principal,
                action,
                resource,
                when,
                unless,
            })
    }

    fn policy(id: &str, spec: &Spec) -> String {
        let mut text = format!(
            "@id(\"{id}\")\n{} ({}, {}, {})",
            if spec.forbid { "forbid" } else { "permit" },
            PRINCIPALS[spec.principal],
            ACTIONS[spec.action],
            RESOURCES[spec.resource]
        );
        for clause in &spec.when {
            let atoms: Vec<&str> = clause.iter().map(|a| ATOMS[*a]).collect();
            text.push_str(&format!("\nwhen {{ {} }}", atoms.join(" && ")));
        }
        if let Some(a) = spec.unless {
            text.push_str(&format!("\nunless {{ {} }}", ATOMS[a]));
        }
        text.push_str(";\n");
        text
    }

    #[derive(Debug, Clone)]
    struct Req {
        caller: usize,
        action: usize,
        route: usize,
        method: usize,
        path: usize,
        classification: usize,
        model: usize,
        bytes: usize,
        tenant: bool,
        ipv4: bool,
    }

    fn req() -> impl Strategy<Value = Req> {
        (
            (0..4usize, 0..3usize, 0..4usize, 0..2usize, 0..6usize),
            (
                0..4usize,
                0..4usize,
                0..4usize,
                any::<bool>(),
                any::<bool>(),
            ),
        )
            .prop_map(
                |(
                    (caller, action, route, method, path),
                    (classification, model, bytes, tenant, ipv4),
                )| Req {
                    caller,
                    action,
                    route,
                    method,
                    path,
                    classification,
                    model,
                    bytes,
                    tenant,
                    ipv4,
                },
            )
    }

    fn request(r: &Req) -> AuthzRequest {
        let mtls = match r.caller {
            0 => None,
            1 => Some("spiffe://arbiter.test/ns/apps/sa/billing"),
            2 => Some("spiffe://arbiter.test/ns/apps/sa/chatbot"),
            _ => Some("spiffe://bench.local/ns/tenant-0/sa/app"),
        };
        let mut route_context = BTreeMap::new();
        match r.classification {
            1 => {
                route_context.insert("classification".to_owned(), "regulated".to_owned());
            }
            2 => {
                route_context.insert("classification".to_owned(), "restricted-1".to_owned());
                route_context.insert("size_policy".to_owned(), "bounded".to_owned());
            }
            3 => {
                route_context.insert("other".to_owned(), "x".to_owned());
            }
            _ => {}
        }
        let body = BodyAttributes {
            bytes: [0, 5, 2_000_000, 1 << 40][r.bytes],
            size_known: r.bytes != 3,
            truncated: r.bytes == 2,
            parse_error: r.bytes == 3,
            model: ["", "m-1", "m-3", "gpt-4o"]
                .get(r.model)
                .filter(|m| !m.is_empty())
                .map(|m| (*m).to_owned()),
            stream: (r.model == 2).then_some(false),
            max_tokens: (r.model != 0).then_some(100),
            message_count: None,
            sha256: None,
        };
        AuthzRequest {
            principal: mtls.unwrap_or("anonymous").to_owned(),
            identity: Identity {
                mtls: mtls.map(str::to_owned),
                ..Identity::default()
            },
            action: ["chat.completions", "embeddings", "models.list"][r.action].to_owned(),
            route: ["r1", "r2", "tenant-1-chat", "unknown"][r.route].to_owned(),
            method: ["POST", "GET"][r.method].to_owned(),
            path: [
                "/v1/chat/completions",
                "/v1/*xy",
                "/tenant-3/a",
                "/tenant-30/a",
                "",
                "/v1/ch\u{e9}ons",
            ][r.path]
                .to_owned(),
            host: "llm.local".into(),
            scheme: "http".into(),
            source: if r.ipv4 { "10.1.2.3:5000" } else { "" }.into(),
            request_id: "r".into(),
            route_context,
            requested_tenant: r.tenant.then(|| "acme".to_owned()),
            body,
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            time_source: TimeSource::Request,
        }
    }

    fn decide(bundle: &Bundle, req: &AuthzRequest, unindexed: bool) -> Decision {
        UNINDEXED.with(|u| u.set(unindexed));
        let decision = bundle.decide(&cedar_policy::Authorizer::new(), req);
        UNINDEXED.with(|u| u.set(false));
        decision.unwrap()
    }

    fn cases() -> u32 {
        std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(256)
    }

    /// Indexed and unindexed decisions agree (outcome, determining policies, errors) on
    /// bundles of random policies, the benchmark's shapes and the example bundle's policies.
    #[test]
    fn prop_condition_index_decides_like_cedar() {
        let strategy = (
            prop::collection::vec(spec(), 0..12),
            prop::collection::vec(0..40usize, 0..6),
            prop::collection::vec(any::<bool>(), EXAMPLE_POLICIES.len()),
            prop::collection::vec(req(), 1..8),
        );
        let mut runner = TestRunner::new(Config {
            cases: cases(),
            failure_persistence: None,
            ..Config::default()
        });
        let (compared, indexed) = (std::cell::Cell::new(0usize), std::cell::Cell::new(0usize));
        let result = runner.run(&strategy, |(specs, shapes, examples, reqs)| {
            let dir = tempfile::tempdir().unwrap();
            for file in ["schema.cedarschema", "entities.json", "bundle.toml"] {
                std::fs::copy(format!("{EXAMPLE}/{file}"), dir.path().join(file)).unwrap();
            }
            for (file, keep) in EXAMPLE_POLICIES.iter().zip(&examples) {
                if *keep {
                    std::fs::copy(format!("{EXAMPLE}/{file}"), dir.path().join(file)).unwrap();
                }
            }
            // Random combinations can be impossible (e.g. `principal is Arbiter::Anonymous`
            // with a condition on a caller's tenant): validation refuses those, so they are
            // left out and the rest is loaded.
            let mut refused: Vec<String> = Vec::new();
            let (bundle, text) = loop {
                let mut text =
                    String::from("@id(\"base\") permit (principal, action, resource);\n");
                for (i, s) in specs.iter().enumerate() {
                    let id = format!("g{i}");
                    if !refused.contains(&id) {
                        text.push_str(&policy(&id, s));
                    }
                }
                for (n, i) in shapes.iter().enumerate() {
                    text.push_str(&format!("@id(\"b{n}\")\n{}\n", bench_shape(*i)));
                }
                std::fs::write(dir.path().join("generated.cedar"), &text).unwrap();
                match Bundle::load(dir.path()) {
                    Ok(bundle) => break (bundle, text),
                    Err(e) => {
                        let before = refused.len();
                        for problem in e.problems() {
                            if let Some(id) = problem
                                .split("for policy `")
                                .nth(1)
                                .and_then(|rest| rest.split('`').next())
                                .filter(|id| id.starts_with('g'))
                            {
                                refused.push(id.to_owned());
                            }
                        }
                        if refused.len() == before {
                            return Err(TestCaseError::fail(format!("{text}\n{:?}", e.problems())));
                        }
                    }
                }
            };
            indexed.set(indexed.get() + bundle.policy_index().indexed().1);
            for r in &reqs {
                let req = request(r);
                let fast = decide(&bundle, &req, false);
                let whole = decide(&bundle, &req, true);
                prop_assert_eq!(&fast, &whole, "{}\n{:?}", text, req);
                compared.set(compared.get() + 1);
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        assert!(indexed.get() > 0, "no policy was indexed by condition");
        eprintln!(
            "property arbiter-policy::prop_condition_index_decides_like_cedar: {} cases passed ({} decisions compared)",
            cases(),
            compared.get()
        );
    }

    /// A conjunct Cedar evaluates before the key can error: the policy must be evaluated
    /// even when its key is false, so that the error is reported.
    #[test]
    fn errors_before_the_key_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("p.cedar"),
            r#"@id("overflow") permit (principal, action, resource) when { context.body_bytes * 4611686018427387904 > 1 && context.method == "GET" };
               @id("keyed") permit (principal, action, resource) when { context.method == "GET" && context.body_bytes * 4611686018427387904 > 1 };"#,
        )
        .unwrap();
        let bundle = Bundle::load(dir.path()).unwrap();
        assert_eq!(bundle.policy_index().indexed(), (1, 1));
        let mut r = request(&req_of(1));
        r.method = "POST".into();
        let fast = decide(&bundle, &r, false);
        assert_eq!(fast, decide(&bundle, &r, true));
        assert_eq!(fast.errors.len(), 1, "{fast:?}");
        assert!(fast.errors[0].contains("overflow"), "{fast:?}");
    }

    fn req_of(bytes: usize) -> Req {
        Req {
            caller: 0,
            action: 0,
            route: 0,
            method: 0,
            path: 0,
            classification: 0,
            model: 0,
            bytes,
            tenant: false,
            ipv4: true,
        }
    }

    #[test]
    fn understood_conjuncts() {
        let set: cedar_policy::PolicySet = r#"
            permit (principal, action, resource) when { context.method == "POST" && context.path like "/t\*x/*" && ["a", 1, true].contains(context.model) && context has a && context.route_context has c && context.x > 1 && context.method == "GET" };
        "#
        .parse()
        .unwrap();
        let mut paths = Paths::default();
        let policy = set.policies().next().unwrap();
        let got = conjuncts(policy, &mut paths);
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(got[1], Conjunct::Prefix(1, "/t*x/".into()));
        assert_eq!(
            got[2],
            Conjunct::OneOf(2, vec![Lit::Str("a".into()), Lit::Long(1), Lit::Bool(true)])
        );
        assert_eq!(paths.paths[3], ["a"]);
    }
}
