//! The `arbiter` command line: library side of each subcommand (the binary only parses
//! flags and dispatches).

pub mod audit;
pub mod bundle;
pub mod fmt;
pub mod policy;
pub mod test;

/// Exit code: success (chain intact, no difference).
pub const EXIT_OK: u8 = 0;
/// Exit code: the check found something (a broken chain, a difference).
pub const EXIT_FOUND: u8 = 1;
/// Exit code: the command could not run (unreadable file, invalid bundle).
pub const EXIT_ERROR: u8 = 2;
