//! Every way drover can fail, and the one place that turns a failure into an
//! exit code (sysexits(3) numbering, like linkerd2-proxy and ripgrep).
//!
//! | code | meaning |
//! |---|---|
//! | 0 | clean run and clean drain; `drover stop` got its 202 |
//! | 1 | the drain had to SIGKILL a worker (or abort in-process connections) |
//! | 64 | usage: the command line does not parse |
//! | 69 | `drover stop`: the admin server could not be reached or answered oddly |
//! | 70 | internal error (a bug or an OS failure after start) |
//! | 73 | `drover install DIR`: DIR is missing, not a directory, or not writable |
//! | 77 | `drover stop`: refused (401/403) |
//! | 78 | configuration: bad option value, contexts, listener or command |

use std::path::PathBuf;

/// Exit codes, named after sysexits(3).
pub mod exit {
    /// Clean drain.
    pub const OK: u8 = 0;
    /// A drain had to kill something.
    pub const KILLED: u8 = 1;
    /// Command line did not parse.
    pub const USAGE: u8 = 64;
    /// A service (the admin server, for `drover stop`) was unavailable.
    pub const UNAVAILABLE: u8 = 69;
    /// Internal software error.
    pub const SOFTWARE: u8 = 70;
    /// `drover install`: the output file cannot be created.
    pub const CANTCREAT: u8 = 73;
    /// Permission denied (`drover stop` got 401/403).
    pub const NOPERM: u8 = 77;
    /// Configuration error: nothing was started.
    pub const CONFIG: u8 = 78;
}

/// The crate's error type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An option value that parses but cannot be used.
    #[error("{0}")]
    Config(String),

    /// Worker contexts that cannot be loaded or do not fit the workers.
    #[error("{0}")]
    Contexts(String),

    /// The listening socket could not be created.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address as the user would write it.
        addr: String,
        /// What went wrong, in words.
        reason: String,
        /// The OS error behind it, when there is one.
        #[source]
        source: Option<std::io::Error>,
    },

    /// The external command cannot be executed at all.
    #[error("cannot run command {program:?}: {reason}")]
    Command {
        /// The program as given on the command line.
        program: String,
        /// Why (not found, not executable, ...).
        reason: String,
    },

    /// A file named by an option could not be read.
    #[error("cannot read {what} {path}: {source}")]
    ReadFile {
        /// Which option it was for.
        what: &'static str,
        /// The path given.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// `drover stop` could not deliver the request.
    #[error("{0}")]
    StopUnavailable(String),

    /// `drover stop` was refused.
    #[error("{0}")]
    StopRefused(String),

    /// `drover install DIR` cannot create `DIR/drover`.
    #[error("cannot install drover into {dir}: {reason}")]
    Install {
        /// The directory given.
        dir: PathBuf,
        /// Why, in words.
        reason: String,
    },

    /// An OS call failed after start.
    #[error("{what}: {source}")]
    Io {
        /// What drover was doing.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// Shorthand for an [`Error::Io`].
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_)
            | Error::Contexts(_)
            | Error::Listen { .. }
            | Error::Command { .. }
            | Error::ReadFile { .. } => exit::CONFIG,
            Error::StopUnavailable(_) => exit::UNAVAILABLE,
            Error::StopRefused(_) => exit::NOPERM,
            Error::Install { .. } => exit::CANTCREAT,
            Error::Io { .. } => exit::SOFTWARE,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
