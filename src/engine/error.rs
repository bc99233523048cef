//! What can go wrong in the engine, and the two errors that only ask the
//! caller to wait and retry.

use std::io;

use crate::format;

/// Errors from the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The cache medium could not be mapped.
    #[error(transparent)]
    Pmem(#[from] crate::pmem::Error),
    /// A record on the cache medium is invalid.
    #[error(transparent)]
    Format(#[from] format::Error),
    /// Persisting to the cache medium failed.
    #[error("Persisting to the cache medium failed")]
    Persist(#[source] io::Error),
    /// No free segment: retry after GC frees one. `done` bytes of the
    /// request were cached before space ran out.
    #[error("Cache is full ({done} bytes of the request were cached)")]
    CacheFull {
        /// Bytes already handled.
        done: u64,
    },
    /// The key log cannot take the request's keys until a full kset is
    /// closed, which would wait for I/O on this thread (see
    /// [`Engine::defer_log_closes`]): retry on the next space signal.
    /// `done` bytes of the request were handled.
    #[error("The key log is being closed ({done} bytes of the request were handled)")]
    LogBusy {
        /// Bytes already handled.
        done: u64,
    },
    /// The request conflicts with one in progress, or could not finish.
    #[error("{0}")]
    Busy(&'static str),
    /// Data verification asked of a cache that keeps no data CRCs.
    #[error("The cache was formatted without data CRCs (--data-crc): there is nothing to verify its data against")]
    NoDataCrc,
    /// The request reaches past the end of the device or overflows.
    #[error("Request {off:#x}+{len:#x} is outside the {size:#x}-byte device")]
    OutOfRange {
        /// Offset asked for.
        off: u64,
        /// Length asked for.
        len: u64,
        /// Device size.
        size: u64,
    },
    /// Offset or length is not a multiple of 512.
    #[error("Request {off:#x}+{len:#x} is not aligned to 512-byte sectors")]
    Unaligned {
        /// Offset asked for.
        off: u64,
        /// Length asked for.
        len: u64,
    },
    /// Cached dirty data failed its data CRC; it cannot be served.
    #[error("Cached data at {off:#x}+{len:#x} failed its CRC check")]
    DataCorrupt {
        /// Logical offset.
        off: u64,
        /// Length.
        len: u64,
    },
    /// The request's buffers are in memory that faulted (a frontend's file
    /// shrank under its mapping): nothing of it was cached.
    #[error("The request's buffers faulted (the frontend's memory shrank); nothing was cached")]
    SourceFaulted,
    /// The backing store failed.
    #[error("Backing store I/O failed")]
    Backing(#[source] io::Error),
    /// An earlier persist failed; the engine refuses writes until restart.
    #[error("The cache failed earlier (a persist to the medium did not complete); restart pcache")]
    Failed,
    /// The cache was opened read-only.
    #[error("The cache is open read-only")]
    ReadOnly,
    /// A background pass was cut short because the process is stopping;
    /// nothing moved (the dirty data stays cached).
    #[error("Stopped before the pass finished")]
    Stopping,
    /// The medium already holds pcache metadata and `force` was not given,
    /// or an option conflicts with what the medium records.
    #[error("{0}")]
    Refused(String),
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A wait-and-retry error (`CacheFull`, `LogBusy`) for a request of
    /// which `done` bytes were handled before it; any other error as is.
    pub(crate) fn with_done(self, done: u64) -> Error {
        match self {
            Error::CacheFull { .. } => Error::CacheFull { done },
            Error::LogBusy { .. } => Error::LogBusy { done },
            e => e,
        }
    }

    /// Bytes handled before a wait-and-retry error; None for the others.
    pub fn retry_from(&self) -> Option<u64> {
        match self {
            Error::CacheFull { done } | Error::LogBusy { done } => Some(*done),
            _ => None,
        }
    }
}
