//! Records of the control area as the engine holds them: a log position
//! or the settings, each with the replica that holds its newest copy.

use crate::format::{self, PosOnMedia};

/// A log position plus which replica of its record is newest.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tail {
    pub(super) pos: PosOnMedia,
    pub(super) slot: usize,
    pub(super) seq: u64,
}

/// Persistent settings and the replica that holds them.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    pub(super) info: format::CacheInfo,
    pub(super) slot: usize,
    pub(super) seq: u64,
}
