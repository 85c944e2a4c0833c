//! The post-link step of `make wasm`: the filter module keeps only the exports it needs.
//!
//! The Rust proxy-wasm SDK exports every `proxy_on_*` callback of the ABI, and Envoy's wasm
//! host calls each one a module exports: `proxy_on_response_body`, `proxy_on_log`,
//! `proxy_on_done` and the rest cost a VM entry per request on every route (a few thousand
//! instructions each), even where the filter does nothing there. When an export is absent,
//! the host does what the SDK's default would have done (continue, or nothing), so removing
//! the ones the filter does not implement changes no behaviour.
//!
//! Every export of the SDK's module is either in [`KEEP`] (must be there, or the step fails)
//! or in [`DROP`] (removed); anything else fails the step, so an SDK upgrade that adds a
//! callback is looked at, not stripped blindly. Only the export section changes: function
//! indices, code and every other section are copied as they are.

use std::collections::BTreeSet;

use wasm_encoder::{ExportKind, ExportSection, Module, RawSection};
use wasmparser::{ExternalKind, Parser, Payload, Validator};

/// The exports the filter needs, and why. Each must be in the module.
pub const KEEP: &[(&str, &str)] = &[
    ("memory", "the host reads and writes the module's linear memory"),
    (
        "_initialize",
        "WASI reactor start: runs the constructors and registers the root context",
    ),
    (
        "proxy_abi_version_0_2_1",
        "tells the host which proxy-wasm ABI the module speaks",
    ),
    (
        "proxy_on_memory_allocate",
        "every buffer the host returns (headers, properties, bodies, the gRPC answer) is allocated through it",
    ),
    (
        "proxy_on_context_create",
        "creates the root context and each request's filter",
    ),
    (
        "proxy_on_configure",
        "parses the plugin configuration; an invalid one is refused",
    ),
    (
        "proxy_on_request_headers",
        "strips forged markers and credentials, resolves the route, starts the check",
    ),
    (
        "proxy_on_request_body",
        "body routes buffer the body for policy; the body is held while a check is in flight",
    ),
    (
        "proxy_on_request_trailers",
        "trailers end the request: held while the check is in flight (absent, the host continues and releases a paused request undecided)",
    ),
    (
        "proxy_on_response_headers",
        "adds the response headers an allow decision asks for",
    ),
    ("proxy_on_grpc_receive", "the policy server's answer"),
    (
        "proxy_on_grpc_close",
        "a policy call that failed or timed out: the route's fail mode",
    ),
    (
        "proxy_on_delete",
        "ends the request's context: the SDK drops the filter, whose drop releases a breaker probe slot and counts a request cancelled before its decision",
    ),
];

/// The SDK's exports the filter does not need, and why removing each changes nothing.
pub const DROP: &[(&str, &str)] = &[
    (
        "proxy_on_done",
        "the request-end work runs when the context is dropped on `proxy_on_delete`, which Envoy calls right after `proxy_on_done`; absent, the host takes the context as done, as the SDK's default does",
    ),
    (
        "proxy_on_log",
        "the filter's access-log fields are set before the log is written; the SDK's default does nothing",
    ),
    (
        "proxy_on_response_body",
        "the filter does not read the response body; absent, the host continues, as the SDK's default does",
    ),
    (
        "proxy_on_response_trailers",
        "the filter does not read response trailers; absent, the host continues, as the SDK's default does",
    ),
    (
        "proxy_on_vm_start",
        "the root context has no VM start work; absent, the host takes the start as successful, as the SDK's default does",
    ),
    ("proxy_on_tick", "the filter sets no timer"),
    ("proxy_on_queue_ready", "the filter uses no shared queue"),
    ("proxy_on_http_call_response", "the filter makes no HTTP callouts"),
    (
        "proxy_on_grpc_receive_initial_metadata",
        "the policy call is unary: Envoy delivers metadata callbacks to gRPC streams only",
    ),
    (
        "proxy_on_grpc_receive_trailing_metadata",
        "the policy call is unary: Envoy delivers metadata callbacks to gRPC streams only",
    ),
    ("proxy_on_foreign_function", "the filter calls no foreign function"),
    ("proxy_on_new_connection", "an HTTP filter: network filter callback"),
    ("proxy_on_downstream_data", "an HTTP filter: network filter callback"),
    (
        "proxy_on_downstream_connection_close",
        "an HTTP filter: network filter callback",
    ),
    ("proxy_on_upstream_data", "an HTTP filter: network filter callback"),
    (
        "proxy_on_upstream_connection_close",
        "an HTTP filter: network filter callback",
    ),
];

/// The SDK trait methods (and `drop`) the glue may implement, with the exports through
/// which the host reaches them: a callback the glue implements must keep its exports.
pub const CALLBACKS: &[(&str, &[&str])] = &[
    ("on_vm_start", &["proxy_on_vm_start"]),
    ("on_configure", &["proxy_on_configure"]),
    ("create_http_context", &["proxy_on_context_create"]),
    ("on_tick", &["proxy_on_tick"]),
    ("on_queue_ready", &["proxy_on_queue_ready"]),
    ("on_http_request_headers", &["proxy_on_request_headers"]),
    ("on_http_request_body", &["proxy_on_request_body"]),
    ("on_http_request_trailers", &["proxy_on_request_trailers"]),
    ("on_http_response_headers", &["proxy_on_response_headers"]),
    ("on_http_response_body", &["proxy_on_response_body"]),
    ("on_http_response_trailers", &["proxy_on_response_trailers"]),
    ("on_http_call_response", &["proxy_on_http_call_response"]),
    (
        "on_grpc_call_response",
        &["proxy_on_grpc_receive", "proxy_on_grpc_close"],
    ),
    (
        "on_grpc_stream_initial_metadata",
        &["proxy_on_grpc_receive_initial_metadata"],
    ),
    (
        "on_grpc_stream_trailing_metadata",
        &["proxy_on_grpc_receive_trailing_metadata"],
    ),
    ("on_log", &["proxy_on_log"]),
    ("on_done", &["proxy_on_done"]),
    ("drop", &["proxy_on_delete"]),
];

/// Why a module cannot be stripped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn parse_error(e: wasmparser::BinaryReaderError) -> Error {
    Error(format!("not a valid wasm module: {e}"))
}

/// The module's export names, in order.
pub fn exports(module: &[u8]) -> Result<Vec<String>, Error> {
    let mut names = Vec::new();
    for payload in Parser::new(0).parse_all(module) {
        if let Payload::ExportSection(reader) = payload.map_err(parse_error)? {
            for export in reader {
                names.push(export.map_err(parse_error)?.name.to_owned());
            }
        }
    }
    Ok(names)
}

/// The module with only the [`KEEP`] exports, and the names removed. Fails when a [`KEEP`]
/// export is missing, an export is in neither list, or either module does not validate.
pub fn strip(module: &[u8]) -> Result<(Vec<u8>, Vec<String>), Error> {
    Validator::new().validate_all(module).map_err(parse_error)?;
    let keep: BTreeSet<&str> = KEEP.iter().map(|(name, _)| *name).collect();
    let drop: BTreeSet<&str> = DROP.iter().map(|(name, _)| *name).collect();
    let mut out = Module::new();
    let mut found = BTreeSet::new();
    let mut removed = Vec::new();
    let mut unknown = Vec::new();
    for payload in Parser::new(0).parse_all(module) {
        let payload = payload.map_err(parse_error)?;
        match &payload {
            Payload::ExportSection(reader) => {
                let mut section = ExportSection::new();
                for export in reader.clone() {
                    let export = export.map_err(parse_error)?;
                    if keep.contains(export.name) {
                        found.insert(export.name.to_owned());
                        section.export(export.name, export_kind(export.kind)?, export.index);
                    } else if drop.contains(export.name) {
                        removed.push(export.name.to_owned());
                    } else {
                        unknown.push(export.name.to_owned());
                    }
                }
                out.section(&section);
            }
            Payload::Version { encoding, .. } => {
                if *encoding != wasmparser::Encoding::Module {
                    return Err(Error("a component, not a core wasm module".to_owned()));
                }
            }
            _ => {
                if let Some((id, range)) = payload.as_section() {
                    let data = usize::try_from(range.start)
                        .ok()
                        .zip(usize::try_from(range.end).ok())
                        .and_then(|(start, end)| module.get(start..end))
                        .ok_or_else(|| Error("section out of the module's bounds".to_owned()))?;
                    out.section(&RawSection { id, data });
                }
            }
        }
    }
    if !unknown.is_empty() {
        return Err(Error(format!(
            "exports in neither list: {} (an SDK upgrade? decide whether the filter needs each and add it to KEEP or DROP in wasm-exports/src/lib.rs)",
            unknown.join(", ")
        )));
    }
    let missing: Vec<&str> = keep
        .iter()
        .copied()
        .filter(|name| !found.contains(*name))
        .collect();
    if !missing.is_empty() {
        return Err(Error(format!(
            "the module lacks exports the filter needs: {} (the glue or the SDK changed)",
            missing.join(", ")
        )));
    }
    let bytes = out.finish();
    Validator::new()
        .validate_all(&bytes)
        .map_err(|e| Error(format!("the stripped module does not validate: {e}")))?;
    Ok((bytes, removed))
}

fn export_kind(kind: ExternalKind) -> Result<ExportKind, Error> {
    Ok(match kind {
        ExternalKind::Func => ExportKind::Func,
        ExternalKind::Table => ExportKind::Table,
        ExternalKind::Memory => ExportKind::Memory,
        ExternalKind::Global => ExportKind::Global,
        ExternalKind::Tag => ExportKind::Tag,
        other => return Err(Error(format!("unexpected export kind {other:?}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasm_encoder::{CodeSection, Function, FunctionSection, Instruction, TypeSection};

    /// A module exporting `names`, each a distinct function (memory for `memory`), with a
    /// custom section after the code.
    fn module(names: &[&str]) -> Vec<u8> {
        let mut m = Module::new();
        let mut types = TypeSection::new();
        types.ty().function([], [wasm_encoder::ValType::I32]);
        m.section(&types);
        let funcs: Vec<&str> = names.iter().copied().filter(|n| *n != "memory").collect();
        let mut fs = FunctionSection::new();
        for _ in &funcs {
            fs.function(0);
        }
        m.section(&fs);
        let mut mem = wasm_encoder::MemorySection::new();
        mem.memory(wasm_encoder::MemoryType {
            minimum: 1,
            maximum: None,
            memory64: false,
            shared: false,
            page_size_log2: None,
        });
        m.section(&mem);
        let mut ex = ExportSection::new();
        let mut index = 0;
        for name in names {
            if *name == "memory" {
                ex.export(name, ExportKind::Memory, 0);
            } else {
                ex.export(name, ExportKind::Func, index);
                index += 1;
            }
        }
        m.section(&ex);
        let mut code = CodeSection::new();
        for (i, _) in funcs.iter().enumerate() {
            let mut f = Function::new([]);
            f.instruction(&Instruction::I32Const(i32::try_from(i).unwrap_or(0)));
            f.instruction(&Instruction::End);
            code.function(&f);
        }
        m.section(&code);
        m.section(&wasm_encoder::CustomSection {
            name: "producers".into(),
            data: b"kept".as_slice().into(),
        });
        m.finish()
    }

    fn all_sdk_exports() -> Vec<&'static str> {
        KEEP.iter().chain(DROP).map(|(name, _)| *name).collect()
    }

    #[test]
    fn keeps_exactly_the_allow_list_and_everything_else_of_the_module() {
        let names = all_sdk_exports();
        let input = module(&names);
        let (out, removed) = strip(&input).unwrap();
        let kept: Vec<&str> = KEEP.iter().map(|(n, _)| *n).collect();
        assert_eq!(exports(&out).unwrap(), kept);
        let dropped: Vec<&str> = DROP.iter().map(|(n, _)| *n).collect();
        assert_eq!(removed, dropped);
        // Each kept export still points at the same function: indices are unchanged.
        let index_of = |bytes: &[u8], wanted: &str| {
            Parser::new(0)
                .parse_all(bytes)
                .find_map(|p| match p.unwrap() {
                    Payload::ExportSection(r) => r
                        .into_iter()
                        .map(|e| e.unwrap())
                        .find(|e| e.name == wanted)
                        .map(|e| e.index),
                    _ => None,
                })
                .unwrap()
        };
        for name in &kept {
            assert_eq!(index_of(&input, name), index_of(&out, name), "{name}");
        }
        // Code and custom sections are carried over byte for byte.
        let custom = |bytes: &[u8]| {
            Parser::new(0)
                .parse_all(bytes)
                .find_map(|p| match p.unwrap() {
                    Payload::CustomSection(c) => Some(c.data().to_vec()),
                    _ => None,
                })
        };
        assert_eq!(custom(&out), Some(b"kept".to_vec()));
        // Stripping again changes nothing.
        let (again, removed_again) = strip(&out).unwrap();
        assert_eq!(again, out);
        assert!(removed_again.is_empty());
    }

    #[test]
    fn a_missing_needed_export_fails_loudly() {
        for (missing, _) in KEEP {
            let names: Vec<&str> = all_sdk_exports()
                .into_iter()
                .filter(|n| n != missing)
                .collect();
            let err = strip(&module(&names)).unwrap_err();
            assert!(
                err.0.contains("lacks exports") && err.0.contains(missing),
                "{err}"
            );
        }
    }

    #[test]
    fn an_export_in_neither_list_fails_loudly() {
        let mut names = all_sdk_exports();
        names.push("proxy_on_request_metadata");
        let err = strip(&module(&names)).unwrap_err();
        assert!(err.0.contains("proxy_on_request_metadata"), "{err}");
    }

    #[test]
    fn garbage_is_refused() {
        assert!(strip(b"\0asm\x01\0\0\0\x07\x05garbage").is_err());
        assert!(strip(b"not wasm").is_err());
    }

    #[test]
    fn the_lists_are_disjoint_and_cover_every_callback() {
        let keep: BTreeSet<&str> = KEEP.iter().map(|(n, _)| *n).collect();
        let drop: BTreeSet<&str> = DROP.iter().map(|(n, _)| *n).collect();
        assert!(keep.is_disjoint(&drop));
        for (_, exports) in CALLBACKS {
            for e in *exports {
                assert!(keep.contains(e) || drop.contains(e), "{e}");
            }
        }
    }

    /// Every callback the filter's glue implements keeps the exports the host calls it
    /// through: implementing `on_log` (say) in `filter/src/wasm.rs` while its export is
    /// dropped would be a callback Envoy never calls.
    #[test]
    fn every_callback_the_glue_implements_keeps_its_exports() {
        let glue = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../filter/src/wasm.rs"),
        )
        .unwrap();
        let keep: BTreeSet<&str> = KEEP.iter().map(|(n, _)| *n).collect();
        let known: BTreeSet<&str> = CALLBACKS.iter().map(|(m, _)| *m).collect();
        // The trait methods implemented in the glue's `impl … for Root/Http` blocks.
        let mut implemented = Vec::new();
        let mut in_sdk_impl = false;
        for line in glue.lines() {
            if line.starts_with("impl ") {
                in_sdk_impl = [
                    "Context for",
                    "RootContext for",
                    "HttpContext for",
                    "Drop for",
                ]
                .iter()
                .any(|t| line.contains(t));
            }
            let trimmed = line.trim_start();
            if in_sdk_impl && line.starts_with("    fn ") {
                let name = trimmed["fn ".len()..]
                    .split(['(', '<'])
                    .next()
                    .unwrap()
                    .to_owned();
                implemented.push(name);
            }
        }
        assert!(
            implemented.iter().any(|m| m == "on_http_request_headers"),
            "the scan found no callbacks in wasm.rs: {implemented:?}"
        );
        for method in &implemented {
            if method == "get_type" {
                continue; // not a callback: tells the SDK which context the root creates
            }
            assert!(
                known.contains(method.as_str()),
                "wasm.rs implements `{method}`: add it to CALLBACKS with its exports"
            );
            let (_, exports) = CALLBACKS.iter().find(|(m, _)| m == method).unwrap();
            for e in *exports {
                assert!(
                    keep.contains(e),
                    "wasm.rs implements `{method}` but `{e}` is dropped"
                );
            }
        }
    }
}
