//! The `arbiter` operator CLI: flags and the logic of each subcommand. The binary
//! (`src/bin/arbiter.rs`) only parses and dispatches.

pub mod audit;

/// `arbiter`: operator tools for Arbiter.
#[derive(Debug, clap::Parser)]
#[command(name = "arbiter", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Audit log tools: verify the hash chain, replay records against a bundle.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
}

/// Exit code: success (chain intact, no difference).
pub const EXIT_OK: u8 = 0;
/// Exit code: the check found something (a broken chain, a difference).
pub const EXIT_FOUND: u8 = 1;
/// Exit code: the command could not run (unreadable file, invalid bundle).
pub const EXIT_ERROR: u8 = 2;
