//! The Arbiter Cedar schema: the request model built into the server, and the rules for the
//! fragments a bundle may add to it.
//!
//! The server decides what a request looks like to Cedar (principal, action, resource,
//! context), so the schema describing it ships with the server rather than with each bundle:
//! a bundle cannot drift from what the server sends. A bundle's own `*.cedarschema` files may
//! only add what the server cannot know — the keys of its routes' `context` metadata (`type
//! RouteContext`) and the actions its routes declare — and are checked to do nothing else.

use std::collections::BTreeSet;

use cedar_policy::{Schema, SchemaFragment};
use serde_json::Value;

use crate::bundle::{BundleError, Problem};

/// The base schema (`namespace Arbiter`), printed by `arbiter schema`.
pub const BASE_SCHEMA: &str = include_str!("schema/arbiter.cedarschema");
/// The Cedar namespace of the request model.
pub const NAMESPACE: &str = "Arbiter";
/// The common type a bundle declares for its routes' `context` keys.
pub const ROUTE_CONTEXT_TYPE: &str = "RouteContext";
/// The common type every action's context must be.
pub const REQUEST_CONTEXT_TYPE: &str = "RequestContext";
/// Used when a bundle does not declare `RouteContext`: no route context key is readable.
const DEFAULT_ROUTE_CONTEXT: &str = "namespace Arbiter { type RouteContext = {}; }";

/// A bundle schema file, parsed.
pub struct BundleFragment<'a> {
    /// File name, for error messages.
    pub file: &'a str,
    /// File text, to locate errors.
    pub text: &'a str,
    /// The parsed fragment.
    pub fragment: SchemaFragment,
}

/// Parses the base schema. It is a constant of the build, so an error here is a bug that the
/// unit tests catch; callers still get an error rather than a panic.
fn base_fragment() -> Result<SchemaFragment, BundleError> {
    SchemaFragment::from_cedarschema_str(BASE_SCHEMA)
        .map(|(fragment, _warnings)| fragment)
        .map_err(|e| {
            BundleError::Schema(vec![Problem {
                location: "built-in arbiter.cedarschema".to_owned(),
                message: e.to_string(),
            }])
        })
}

/// Parses one bundle schema file.
pub fn parse_fragment(file: &str, text: &str) -> Result<SchemaFragment, Problem> {
    match SchemaFragment::from_cedarschema_str(text) {
        Ok((fragment, warnings)) => {
            for warning in warnings {
                tracing::warn!(file, "schema warning: {warning}");
            }
            Ok(fragment)
        }
        Err(e) => Err(Problem::new(file, text, &e)),
    }
}

/// The base schema extended by the bundle's fragments, after checking that each fragment
/// only adds route context keys, common types and actions shaped like the built-in ones.
pub fn build(fragments: Vec<BundleFragment<'_>>) -> Result<Schema, BundleError> {
    let mut problems = Vec::new();
    let mut declares_route_context = false;
    for fragment in &fragments {
        match check_fragment(&fragment.fragment) {
            Ok(route_context) => declares_route_context |= route_context,
            Err(messages) => problems.extend(messages.into_iter().map(|message| Problem {
                location: fragment.file.to_owned(),
                message,
            })),
        }
    }
    if !problems.is_empty() {
        return Err(BundleError::Schema(problems));
    }
    let mut all = vec![base_fragment()?];
    if !declares_route_context {
        all.push(
            SchemaFragment::from_cedarschema_str(DEFAULT_ROUTE_CONTEXT)
                .map(|(fragment, _)| fragment)
                .map_err(|e| {
                    BundleError::Schema(vec![Problem {
                        location: String::new(),
                        message: e.to_string(),
                    }])
                })?,
        );
    }
    let files: Vec<&str> = fragments.iter().map(|f| f.file).collect();
    all.extend(fragments.into_iter().map(|f| f.fragment));
    Schema::from_schema_fragments(all).map_err(|e| {
        BundleError::Schema(vec![Problem {
            location: files.join(", "),
            message: error_chain(&e),
        }])
    })
}

/// Checks one bundle fragment; returns whether it declares `RouteContext`, or what is wrong.
fn check_fragment(fragment: &SchemaFragment) -> Result<bool, Vec<String>> {
    let json: Value = fragment
        .to_json_string()
        .map_err(|e| e.to_string())
        .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()))
        .map_err(|e| vec![format!("cannot inspect schema: {e}")])?;
    let Value::Object(namespaces) = json else {
        return Err(vec!["schema is not a set of namespaces".to_owned()]);
    };
    let mut errors = Vec::new();
    let mut route_context = false;
    for (namespace, body) in &namespaces {
        if namespace != NAMESPACE {
            errors.push(format!(
                "bundle schemas may only extend `namespace {NAMESPACE}`, not `{}`",
                if namespace.is_empty() {
                    "<empty namespace>"
                } else {
                    namespace
                }
            ));
            continue;
        }
        let entity_types = object_keys(body.get("entityTypes"));
        if !entity_types.is_empty() {
            errors.push(format!(
                "bundle schemas may not declare entity types ({}): the server builds every entity, so only the built-in ones exist",
                backticked(&entity_types)
            ));
        }
        route_context |= object_keys(body.get("commonTypes")).contains(ROUTE_CONTEXT_TYPE);
        if let Some(Value::Object(actions)) = body.get("actions") {
            for (name, action) in actions {
                if let Some(applies_to) = action.get("appliesTo") {
                    if let Err(e) = check_applies_to(applies_to) {
                        errors.push(format!("action `{name}`: {e}"));
                    }
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(route_context)
    } else {
        Err(errors)
    }
}

/// A declared action must look like the built-in ones, since the server sends every action
/// the same principal types, resource type and context.
fn check_applies_to(applies_to: &Value) -> Result<(), String> {
    let names = |key: &str| -> BTreeSet<String> {
        applies_to
            .get(key)
            .and_then(Value::as_array)
            .map(|items| {
                items
                    .iter()
                    .filter_map(Value::as_str)
                    .map(unqualified)
                    .collect()
            })
            .unwrap_or_default()
    };
    let principals = names("principalTypes");
    let allowed: BTreeSet<String> = ["Caller", "Anonymous"].map(String::from).into();
    if principals.is_empty() || !principals.is_subset(&allowed) {
        return Err("`principal` must be `[Caller, Anonymous]` (or one of them)".to_owned());
    }
    if names("resourceTypes") != BTreeSet::from(["Route".to_owned()]) {
        return Err("`resource` must be `[Route]`".to_owned());
    }
    let context = applies_to
        .get("context")
        .and_then(|c| c.get("type"))
        .and_then(Value::as_str)
        .map(unqualified);
    if context.as_deref() != Some(REQUEST_CONTEXT_TYPE) {
        return Err(format!("`context` must be `{REQUEST_CONTEXT_TYPE}`"));
    }
    Ok(())
}

fn unqualified(name: &str) -> String {
    name.strip_prefix("Arbiter::").unwrap_or(name).to_owned()
}

fn object_keys(value: Option<&Value>) -> BTreeSet<String> {
    match value {
        Some(Value::Object(map)) => map.keys().cloned().collect(),
        _ => BTreeSet::new(),
    }
}

fn backticked(names: &BTreeSet<String>) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// An error and its causes on one line: Cedar's top-level messages are often generic
/// ("error during entity deserialization") with the useful part in the sources.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fragment(text: &str) -> BundleFragment<'_> {
        BundleFragment {
            file: "x.cedarschema",
            text,
            fragment: parse_fragment("x.cedarschema", text).unwrap(),
        }
    }

    #[test]
    fn base_schema_builds_alone() {
        let schema = build(Vec::new()).unwrap();
        assert_eq!(schema.actions().count(), 5);
    }

    #[test]
    fn bundles_add_route_context_and_actions() {
        let schema = build(vec![fragment(
            "namespace Arbiter { type RouteContext = { classification?: String };
             action \"batch.create\" appliesTo { principal: [Caller], resource: [Route], context: RequestContext }; }",
        )])
        .unwrap();
        assert_eq!(schema.actions().count(), 6);
    }

    #[test]
    fn bundles_may_not_redefine_the_model() {
        let err = build(vec![fragment("namespace Arbiter { entity Team; }")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("may not declare entity types (`Team`)"),
            "{err}"
        );
        let err = build(vec![fragment("entity Team;")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("only extend `namespace Arbiter`"), "{err}");
        let err = build(vec![fragment(
            "namespace Arbiter { action \"x\" appliesTo { principal: [Caller], resource: [Route], context: {} }; }",
        )])
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("action `x`: `context` must be `RequestContext`"),
            "{err}"
        );
        let err = build(vec![fragment(
            "namespace Arbiter { action \"x\" appliesTo { principal: [Route], resource: [Route], context: RequestContext }; }",
        )])
        .unwrap_err()
        .to_string();
        assert!(err.contains("`principal` must be"), "{err}");
        let err = build(vec![fragment(
            "namespace Arbiter { type RequestContext = {}; }",
        )])
        .unwrap_err()
        .to_string();
        assert!(err.contains("RequestContext"), "{err}");
    }
}
