//! Feature bits and the virtio-blk configuration space.

use std::mem::offset_of;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::virtio_blk_config;

/// Device feature bits (virtio 1.2, 5.2.3), as masks of the bit numbers
/// in `virtio-bindings`.
pub mod bits {
    use virtio_bindings::virtio_blk as blk;
    use virtio_bindings::virtio_config as config;
    use virtio_bindings::virtio_ring as ring;

    /// Maximum size of one segment is in `size_max`.
    pub const SIZE_MAX: u64 = 1 << blk::VIRTIO_BLK_F_SIZE_MAX;
    /// Maximum segments per request is in `seg_max`.
    pub const SEG_MAX: u64 = 1 << blk::VIRTIO_BLK_F_SEG_MAX;
    /// The device is read-only.
    pub const RO: u64 = 1 << blk::VIRTIO_BLK_F_RO;
    /// Logical block size is in `blk_size`.
    pub const BLK_SIZE: u64 = 1 << blk::VIRTIO_BLK_F_BLK_SIZE;
    /// The device has a volatile write cache and understands FLUSH.
    pub const FLUSH: u64 = 1 << blk::VIRTIO_BLK_F_FLUSH;
    /// Topology fields are valid.
    pub const TOPOLOGY: u64 = 1 << blk::VIRTIO_BLK_F_TOPOLOGY;
    /// The guest may switch the cache between writeback and writethrough.
    pub const CONFIG_WCE: u64 = 1 << blk::VIRTIO_BLK_F_CONFIG_WCE;
    /// More than one queue.
    pub const MQ: u64 = 1 << blk::VIRTIO_BLK_F_MQ;
    /// DISCARD requests; limits in the config space.
    pub const DISCARD: u64 = 1 << blk::VIRTIO_BLK_F_DISCARD;
    /// WRITE_ZEROES requests; limits in the config space.
    pub const WRITE_ZEROES: u64 = 1 << blk::VIRTIO_BLK_F_WRITE_ZEROES;
    /// Indirect descriptor tables.
    pub const INDIRECT_DESC: u64 = 1 << ring::VIRTIO_RING_F_INDIRECT_DESC;
    /// used_event / avail_event notification suppression.
    pub const EVENT_IDX: u64 = 1 << ring::VIRTIO_RING_F_EVENT_IDX;
    /// Virtio 1.0 or later.
    pub const VERSION_1: u64 = 1 << config::VIRTIO_F_VERSION_1;
    /// vhost: the frontend logs the guest pages the backend writes (set
    /// while it migrates the guest; `dirty.rs`).
    pub const LOG_ALL: u64 = 1 << 26;
}

/// Features offered to every frontend (a read-only disk gets RO instead
/// of DISCARD and WRITE_ZEROES).
pub const VIRTIO_FEATURES: u64 = bits::SIZE_MAX
    | bits::SEG_MAX
    | bits::BLK_SIZE
    | bits::FLUSH
    | bits::TOPOLOGY
    | bits::CONFIG_WCE
    | bits::MQ
    | bits::DISCARD
    | bits::WRITE_ZEROES
    | bits::INDIRECT_DESC
    | bits::EVENT_IDX
    | bits::VERSION_1
    | bits::LOG_ALL;

/// The vhost-user bit that asks for protocol feature negotiation.
pub const PROTOCOL_FEATURES_BIT: u64 = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// vhost-user protocol features: CONFIG (config space), MQ, REPLY_ACK and
/// CONFIGURE_MEM_SLOTS (libblkio requires the last three), INFLIGHT_SHMFD
/// (requests in flight survive a restart of pcache), BACKEND_REQ (a
/// grown disk is announced to the guest) and LOG_SHMFD (live migration:
/// the dirty log is shared memory).
pub const PROTOCOL_FEATURES: VhostUserProtocolFeatures = VhostUserProtocolFeatures::CONFIG
    .union(VhostUserProtocolFeatures::MQ)
    .union(VhostUserProtocolFeatures::BACKEND_REQ)
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .union(VhostUserProtocolFeatures::INFLIGHT_SHMFD)
    .union(VhostUserProtocolFeatures::LOG_SHMFD);

/// Largest data segment we advertise (128 KiB). SeaBIOS computes
/// `(u16)(size_max * seg_max / 512)` blocks per request: at 1 MiB x 128 that
/// wraps to 0 and it loops forever on zero-length reads of the MBR.
pub const SIZE_MAX_BYTES: u32 = 1 << 17;
/// Most data segments in one request.
pub const SEG_MAX: u32 = 128;
/// Most sectors one DISCARD or WRITE_ZEROES range may cover (1 GiB: 256
/// dataless keys, one per 4 MiB region).
pub const MAX_ZERO_SECTORS: u32 = 1 << 21;
/// Ranges in one DISCARD or WRITE_ZEROES request.
pub const MAX_ZERO_SEGS: u32 = 1;
/// Discard granularity we suggest, in sectors (4 KiB, the cache's unit).
pub const DISCARD_ALIGN_SECTORS: u32 = 8;

/// The virtio-blk config space (`struct virtio_blk_config`, little-endian;
/// field offsets from `virtio-bindings`). Geometry is left zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkConfig {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Logical block size (512 or 4096).
    pub blk_size: u32,
    /// Number of request queues.
    pub num_queues: u16,
    /// 1 = writeback cache (FLUSH needed), 0 = writethrough.
    pub writeback: u8,
}

/// Bytes of config space we expose: up to the write-zeroes fields.
pub const CONFIG_BYTES: usize = offset_of!(virtio_blk_config, unused1) + 3;

impl BlkConfig {
    /// Encode the config space.
    pub fn encode(&self) -> [u8; CONFIG_BYTES] {
        let mut b = [0u8; CONFIG_BYTES];
        let mut put = |at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);
        put(
            offset_of!(virtio_blk_config, capacity),
            &self.capacity.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, size_max),
            &SIZE_MAX_BYTES.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &SEG_MAX.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &self.blk_size.to_le_bytes(),
        );
        // Topology: one logical block per physical block (exponent and
        // alignment offset 0), 4 KiB minimum I/O (the cache's natural
        // unit), no optimal size.
        let min_io = (4096 / self.blk_size.max(512)) as u16;
        put(
            offset_of!(virtio_blk_config, min_io_size),
            &min_io.to_le_bytes(),
        );
        put(offset_of!(virtio_blk_config, wce), &[self.writeback]);
        put(
            offset_of!(virtio_blk_config, num_queues),
            &self.num_queues.to_le_bytes(),
        );
        let u32s = [
            (
                offset_of!(virtio_blk_config, max_discard_sectors),
                MAX_ZERO_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_discard_seg),
                MAX_ZERO_SEGS,
            ),
            (
                offset_of!(virtio_blk_config, discard_sector_alignment),
                DISCARD_ALIGN_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_sectors),
                MAX_ZERO_SECTORS,
            ),
            (
                offset_of!(virtio_blk_config, max_write_zeroes_seg),
                MAX_ZERO_SEGS,
            ),
        ];
        for (at, v) in u32s {
            put(at, &v.to_le_bytes());
        }
        put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
        b
    }

    /// The bytes `offset..offset+size` of the config space (zeros past its
    /// end, as the frontend may read the whole struct).
    pub fn read(&self, offset: u32, size: u32) -> Vec<u8> {
        let all = self.encode();
        (offset as usize..offset as usize + size as usize)
            .map(|i| all.get(i).copied().unwrap_or(0))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_has_the_virtio_layout() {
        let c = BlkConfig {
            capacity: 0x1122_3344,
            blk_size: 4096,
            num_queues: 3,
            writeback: 1,
        };
        let b = c.encode();
        assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap()), 0x1122_3344);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
        assert_eq!(b[32], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 3);
        assert_eq!(c.read(32, 4), vec![1, 0, 3, 0]);
        // max_discard_sectors, max_discard_seg, discard_sector_alignment,
        // max_write_zeroes_sectors, max_write_zeroes_seg at 36..56, then
        // write_zeroes_may_unmap.
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        assert_eq!(u32_at(36), MAX_ZERO_SECTORS);
        assert_eq!(u32_at(40), 1);
        assert_eq!(u32_at(44), 8);
        assert_eq!(u32_at(48), MAX_ZERO_SECTORS);
        assert_eq!(u32_at(52), 1);
        assert_eq!(b[56], 1);
        assert_eq!(CONFIG_BYTES, 60);
        assert_eq!(c.read(60, 4), vec![0; 4], "past the end reads as zero");
    }
}
