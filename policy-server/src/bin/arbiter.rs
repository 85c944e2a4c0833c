//! `arbiter`: the operator CLI. Parses flags and dispatches; the logic lives in
//! `arbiter_policy_server::cli`.

use std::process::ExitCode;

use arbiter_policy_server::cli::{self, Cli, Command};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = std::io::stdout();
    let code = match cli.command {
        Command::Audit(command) => cli::audit::run(command, &mut stdout.lock()),
    };
    ExitCode::from(code)
}
