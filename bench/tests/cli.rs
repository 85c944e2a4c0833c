//! The `arbiter-bench` binary starts and lists its commands. (Also makes `cargo test
//! --workspace` build the binary that `make test` then runs as the benchmark smoke test.)

use std::process::Command;

#[test]
fn lists_its_commands() {
    let output = Command::new(env!("CARGO_BIN_EXE_arbiter-bench"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for command in ["run", "soak", "profile", "readme"] {
        assert!(help.contains(command), "`{command}` missing from:\n{help}");
    }
}
