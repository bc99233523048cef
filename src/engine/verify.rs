//! Offline verification of dirty data (`pcache check --data`): every key
//! not yet written back, in the log from dirty_tail to key_head and in the
//! kset slots, is checked against its data CRC. Dirty data is the only copy
//! of what the guest wrote, so a mismatch there is data loss waiting for
//! writeback; clean data that fails is refetched from the backing store at
//! run time and is not checked here.

use super::cache::Engine;
use super::error::{Error, Result};
use crate::format::{self, data_off, KeyOnMedia, KSET_MAX_BYTES};

/// A dirty extent whose data fails its CRC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BadData {
    /// Guest byte offset.
    pub off: u64,
    /// Bytes.
    pub len: u64,
    /// Where its data lives on the medium (byte offset).
    pub at: u64,
}

/// What `verify_dirty_data` found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DataCheck {
    /// Dirty keys checked.
    pub keys: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Keys whose data fails its CRC, in log order.
    pub bad: Vec<BadData>,
    /// Ranges already marked bad (writeback found their data failing its
    /// CRC): reads of them fail until the guest writes them again.
    pub marked_bad: Vec<(u64, u64)>,
}

impl Engine {
    /// See [`Engine::verify_dirty_data`].
    pub(super) fn check_dirty_data(&self) -> Result<DataCheck> {
        if !self.data_crc {
            return Err(Error::NoDataCrc);
        }
        let mut check = DataCheck::default();
        let head = self.key_head();
        let mut pos = self.dirty_tail();
        let mut buf = [0u8; KSET_MAX_BYTES];
        while pos.lsn < head.lsn {
            let view = self.read_kset(pos, &mut buf).map_err(|end| {
                Error::Format(format::Error::Corrupt {
                    what: "key log",
                    offset: data_off(pos.seg, pos.off),
                    detail: format!("found {end:?} before key_head"),
                })
            })?;
            let h = view.header;
            if h.is_last() {
                pos = pos.in_next_segment(h.next_seg);
                continue;
            }
            for (i, key) in view.iter().enumerate() {
                let at = pos.key_at(i);
                key.validate(self.n_segs, self.size(), at)?;
                self.verify_key(&key, &mut check);
            }
            pos.off += h.bytes() as u32;
            pos.lsn += 1;
        }
        for key in self.staged_dirty.get().into_iter().flatten() {
            self.verify_key(key, &mut check);
        }
        check.marked_bad = self.bad_ranges(usize::MAX);
        Ok(check)
    }

    fn verify_key(&self, key: &KeyOnMedia, check: &mut DataCheck) {
        // Replay validated every key it kept; a stale one's data was
        // reclaimed, so it was written back before.
        if key.is_clean() || key.is_dataless() || key.gen != self.segs.gen(key.seg) {
            return;
        }
        check.keys += 1;
        check.bytes += key.len as u64;
        let at = data_off(key.seg, key.seg_off);
        if self.region.crc32c(at, key.len as usize) != key.data_crc {
            check.bad.push(BadData {
                off: key.off,
                len: key.len as u64,
                at,
            });
        }
    }
}
