//! The one error type of every `gradsift` command.

use super::npy::LoadError;
use std::path::PathBuf;

/// What can go wrong in a command: the message says what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// A bad option or an input that does not make a run (too few workers, missing files, ...).
    #[error("{0}")]
    Usage(String),
    /// The embedded MNIST data is malformed.
    #[error("MNIST data: {0}")]
    Data(String),
    /// A gradient file is unreadable, malformed, or does not fit the others.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A gradsift operation failed.
    #[error("{0}")]
    Gradsift(#[from] gradsift::Error),
    /// A compressor or bound failed on one method's step of an analysis.
    #[error("method {method}, step {step}: {source}")]
    Compute {
        /// The method's name.
        method: String,
        /// The step.
        step: u64,
        /// What the library said.
        source: gradsift::Error,
    },
    /// candle (the model and autograd) failed.
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    /// An output file could not be written.
    #[error("{}: {message}", path.display())]
    Output {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// Result of the CLI's functions.
pub type Result<T, E = CliError> = std::result::Result<T, E>;
