//! The `arbiter` command line: library side of each subcommand (the binary only parses
//! flags and dispatches).

pub mod policy;
