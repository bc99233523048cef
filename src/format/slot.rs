//! Kset slots: the open ksets, mirrored on the medium key by key.
//!
//! A write completes once its data and its key are stored in the mapped
//! medium, so that the death of the process at any instant loses nothing
//! it acknowledged. Keys collect in one of [`KSET_SLOTS`] open ksets before
//! they are appended to the log; each open kset stores every key it takes
//! into its slot as it takes it. Replay reads the slots after the log.
//!
//! Slot `i` sits at `KSET_SLOTS_OFF + i * KSET_SLOT_BYTES`:
//!
//! ```text
//! off  size  field
//! 0    8     seq      the slot's era: bumped each time the slot is emptied
//! 8    8     closing  LSN the slot's keys are being appended to the log as
//!                     (0: none)
//! 16   48    reserved, 0
//! 64   40*n  keys     staged keys, in the order they were taken; bytes 36..40
//!                     of each hold its crc (see [`staged_key_crc`])
//! ```
//!
//! Each field that changes is one aligned 8-byte word, so a process dying
//! between two stores leaves each word old or new, never torn. A staged key
//! is valid only under the slot's current `seq`, the medium's format id and
//! the slot's index (its crc covers all three): keys of earlier eras, of an
//! earlier format, or bytes that were never a key all fail it, and a slot is
//! read up to its first key that fails.
//!
//! Differs from dm-pcache: the kernel keeps open ksets in DRAM only.

use super::kset::KeyOnMedia;
use super::layout::{KEY_BYTES, KSET_KEYS_MAX, SLOT_HEADER_BYTES};
use super::meta::{le_u64, put_u32};

/// A slot's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotHeader {
    /// The era of the keys in the slot (0: never used).
    pub seq: u64,
    /// LSN the keys are being appended as, or 0.
    pub closing: u64,
}

impl SlotHeader {
    /// Decode the first 16 bytes of a slot. Any bytes are a header: what
    /// makes keys valid is their crc.
    pub fn decode(buf: &[u8; SLOT_HEADER_BYTES]) -> SlotHeader {
        SlotHeader {
            seq: le_u64(buf, 0),
            closing: le_u64(buf, 8),
        }
    }

    /// Are the keys of this slot already in a log that ends before
    /// `log_end_lsn` (the LSN replay expected next)?
    pub fn logged_before(&self, log_end_lsn: u64) -> bool {
        self.closing != 0 && self.closing < log_end_lsn
    }
}

/// crc32c binding a staged key to its medium, slot and era: over
/// format_id (8 bytes), slot index (4), seq (8) and the key's bytes 0..36.
pub fn staged_key_crc(format_id: u64, slot: usize, seq: u64, key: &[u8]) -> u32 {
    let mut b = [0u8; 56];
    b[..8].copy_from_slice(&format_id.to_le_bytes());
    b[8..12].copy_from_slice(&(slot as u32).to_le_bytes());
    b[12..20].copy_from_slice(&seq.to_le_bytes());
    b[20..].copy_from_slice(&key[..KEY_BYTES - 4]);
    let mut words = [0u64; 7];
    for (w, c) in words.iter_mut().zip(b.chunks_exact(8)) {
        *w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
    }
    crate::crc::crc32c_words(&words)
}

/// A key as staged in slot `slot` of era `seq`.
pub fn encode_staged(key: &KeyOnMedia, format_id: u64, slot: usize, seq: u64) -> [u8; KEY_BYTES] {
    let mut b = [0u8; KEY_BYTES];
    key.encode(&mut b);
    seal_staged(&mut b, format_id, slot, seq);
    b
}

/// Store the crc of the encoded key `b` (bytes 36..40) for slot `slot` of
/// era `seq`.
pub fn seal_staged(b: &mut [u8; KEY_BYTES], format_id: u64, slot: usize, seq: u64) {
    let crc = staged_key_crc(format_id, slot, seq, b);
    put_u32(b, KEY_BYTES - 4, crc);
}

/// The staged key in `buf` if its crc holds for this medium, slot and era
/// (its fields are not validated: see [`KeyOnMedia::validate`]).
pub fn decode_staged(
    buf: &[u8; KEY_BYTES],
    format_id: u64,
    slot: usize,
    seq: u64,
) -> Option<KeyOnMedia> {
    let crc = super::meta::le_u32(buf, KEY_BYTES - 4);
    (crc == staged_key_crc(format_id, slot, seq, buf)).then(|| KeyOnMedia::decode(buf))
}

/// Keys a slot holds at most.
pub const SLOT_KEYS_MAX: usize = KSET_KEYS_MAX;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::layout::{slot_off, staged_key_off, KSET_SLOTS, KSET_SLOTS_OFF};

    const FID: u64 = 0xfeed_f00d_1234_5678;

    fn key() -> KeyOnMedia {
        KeyOnMedia {
            off: 8 << 20,
            len: 4096,
            flags: 0,
            seg: 7,
            seg_off: 81920,
            gen: 3,
            data_crc: 0xdead_beef,
        }
    }

    #[test]
    fn slots_fit_between_the_ctrl_block_and_the_segments() {
        assert!(super::super::DIRTY_TAIL_OFF[1] + 32 <= KSET_SLOTS_OFF);
        assert_eq!(slot_off(KSET_SLOTS), super::super::SEGMENTS_OFF);
        assert!(staged_key_off(0, SLOT_KEYS_MAX) <= slot_off(1));
        assert_eq!(KSET_SLOTS_OFF % 4096, 0);
    }

    #[test]
    fn staged_key_round_trips_only_under_its_own_medium_slot_and_era() {
        let k = key();
        let b = encode_staged(&k, FID, 3, 42);
        assert_eq!(decode_staged(&b, FID, 3, 42), Some(k));
        assert_eq!(decode_staged(&b, FID, 3, 43), None, "another era");
        assert_eq!(decode_staged(&b, FID, 4, 42), None, "another slot");
        assert_eq!(decode_staged(&b, FID ^ 1, 3, 42), None, "another format");
        for i in 0..KEY_BYTES {
            let mut t = b;
            t[i] ^= 0x10;
            assert_eq!(decode_staged(&t, FID, 3, 42), None, "byte {i} flipped");
        }
        assert_eq!(decode_staged(&[0; KEY_BYTES], FID, 3, 0), None);
    }

    #[test]
    fn a_staged_key_is_the_logged_key_plus_its_crc() {
        let k = key();
        let b = encode_staged(&k, FID, 0, 1);
        let mut logged = [0u8; KEY_BYTES];
        k.encode(&mut logged);
        assert_eq!(b[..KEY_BYTES - 4], logged[..KEY_BYTES - 4]);
        assert_eq!(logged[KEY_BYTES - 4..], [0; 4], "logged keys keep it 0");
    }

    #[test]
    fn staged_key_matches_the_golden_bytes_in_format_md() {
        let k = KeyOnMedia {
            off: 0x10000,
            len: 4096,
            flags: 0,
            seg: 1,
            seg_off: 0,
            gen: 0,
            data_crc: 0,
        };
        let golden: Vec<u8> = "00 00 01 00 00 00 00 00 00 10 00 00 00 00 00 00
             01 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00
             00 00 00 00 91 1d ba 44"
            .split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect();
        let b = encode_staged(&k, 0xefcd_ab89_6745_2301, 1, 3);
        assert_eq!(b[..], golden[..]);
        let doc = include_str!("../../docs/format.md");
        assert!(
            doc.contains("0020: 00 00 00 00 91 1d ba 44"),
            "format.md shows it"
        );
    }

    #[test]
    fn closing_marks_a_slot_logged_only_once_the_log_passed_it() {
        let h = SlotHeader {
            seq: 5,
            closing: 10,
        };
        assert!(!h.logged_before(10), "kset 10 not in the log");
        assert!(h.logged_before(11));
        assert!(!SlotHeader { seq: 5, closing: 0 }.logged_before(u64::MAX));
    }
}
