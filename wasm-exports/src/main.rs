//! `arbiter-wasm-exports strip IN OUT`: writes IN with only the exports the filter needs to
//! OUT (replaced atomically; OUT may be IN). `arbiter-wasm-exports list FILE`: prints a
//! module's exports. See the library for the lists and why.

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["strip", input, output] => strip(Path::new(input), Path::new(output)),
        ["list", input] => list(Path::new(input)),
        _ => Err("usage: arbiter-wasm-exports strip IN.wasm OUT.wasm | list FILE.wasm".to_owned()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("arbiter-wasm-exports: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn strip(input: &Path, output: &Path) -> Result<(), String> {
    let module = read(input)?;
    let (stripped, removed) =
        arbiter_wasm_exports::strip(&module).map_err(|e| format!("{}: {e}", input.display()))?;
    // A new file renamed over the old one: `cargo` hard-links its artifact, and writing
    // through the link would change its copy under `deps/` too.
    let tmp = output.with_extension("wasm.tmp");
    std::fs::write(&tmp, &stripped).map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, output)
        .map_err(|e| format!("cannot replace {}: {e}", output.display()))?;
    println!(
        "wasm exports: kept {}, removed {}{}",
        arbiter_wasm_exports::KEEP.len(),
        removed.len(),
        if removed.is_empty() {
            String::new()
        } else {
            format!(" ({})", removed.join(", "))
        }
    );
    Ok(())
}

fn list(input: &Path) -> Result<(), String> {
    let names = arbiter_wasm_exports::exports(&read(input)?)
        .map_err(|e| format!("{}: {e}", input.display()))?;
    for name in names {
        println!("{name}");
    }
    Ok(())
}
