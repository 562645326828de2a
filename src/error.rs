//! The one error type: every failure is a value with a message naming the thing at fault.

use std::path::{Path, PathBuf};

/// Errors returned by lorafuse. User input never panics; it ends up here.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its content is wrong (bad JSON, missing field, corrupt tensor...).
    /// `what` names the file and, where known, the field or tensor.
    #[error("{what}: {msg}")]
    Format { what: String, msg: String },
    /// Tensor shapes or dtypes that do not fit the operation.
    #[error("shape error in {op}: {msg}")]
    Shape { op: String, msg: String },
    /// Invalid configuration value (CLI flag, config file, LoRA config...).
    #[error("invalid {field}: {msg}")]
    Config { field: String, msg: String },
    /// No usable device, driver or kernel module.
    #[error("device: {0}")]
    Device(String),
    /// A kernel launch failed (refused launch, simulator-detected error, CUDA error).
    #[error("kernel {kernel}: {msg}")]
    Kernel { kernel: String, msg: String },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }
    pub fn format(what: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Format { what: what.into(), msg: msg.into() }
    }
    pub fn shape(op: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Shape { op: op.into(), msg: msg.into() }
    }
    pub fn config(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { field: field.into(), msg: msg.into() }
    }
    pub fn kernel(kernel: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Kernel { kernel: kernel.into(), msg: msg.into() }
    }
}
