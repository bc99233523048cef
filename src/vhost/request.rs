//! Parsing a virtio-blk request out of a descriptor chain.
//!
//! The chain is read by byte offsets, not by descriptor: the 16-byte header
//! is the first 16 device-readable bytes, the status byte is the last
//! device-writable byte, and data is whatever lies between (VERSION_1
//! implies any layout). Every length and sector is checked with overflow-safe
//! arithmetic before the engine sees the request.

/// Request types (virtio 1.2, 5.2.6).
pub mod types {
    use virtio_bindings::virtio_blk as blk;

    /// Read.
    pub const IN: u32 = blk::VIRTIO_BLK_T_IN;
    /// Write.
    pub const OUT: u32 = blk::VIRTIO_BLK_T_OUT;
    /// Flush the volatile write cache.
    pub const FLUSH: u32 = blk::VIRTIO_BLK_T_FLUSH;
    /// Read the device serial (20 bytes).
    pub const GET_ID: u32 = blk::VIRTIO_BLK_T_GET_ID;
    /// Discard ranges.
    pub const DISCARD: u32 = blk::VIRTIO_BLK_T_DISCARD;
    /// Zero ranges.
    pub const WRITE_ZEROES: u32 = blk::VIRTIO_BLK_T_WRITE_ZEROES;
}

/// Status byte values.
pub mod status {
    use virtio_bindings::virtio_blk as blk;

    /// Success.
    pub const OK: u8 = blk::VIRTIO_BLK_S_OK as u8;
    /// The request failed.
    pub const IOERR: u8 = blk::VIRTIO_BLK_S_IOERR as u8;
    /// Unsupported request type.
    pub const UNSUPP: u8 = blk::VIRTIO_BLK_S_UNSUPP as u8;
}

/// Bytes of the request header: type u32, reserved u32, sector u64.
pub const HEADER_BYTES: usize =
    std::mem::size_of::<virtio_bindings::virtio_blk::virtio_blk_outhdr>();
/// Most data bytes in one request: the seg_max x size_max we advertise.
pub const MAX_DATA_BYTES: u64 =
    super::config::SEG_MAX as u64 * super::config::SIZE_MAX_BYTES as u64;

/// Bytes of one DISCARD / WRITE_ZEROES range: sector u64, num_sectors
/// u32, flags u32.
pub const RANGE_BYTES: usize =
    std::mem::size_of::<virtio_bindings::virtio_blk::virtio_blk_discard_write_zeroes>();
/// Range flag: the device may deallocate (WRITE_ZEROES only).
const RANGE_FLAG_UNMAP: u32 = virtio_bindings::virtio_blk::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;

/// Bytes of the serial returned by GET_ID.
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// What a request asks for, checked against the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// Read `len` bytes at byte offset `off`.
    Read {
        /// Byte offset.
        off: u64,
        /// Bytes.
        len: u64,
    },
    /// Write `len` bytes at byte offset `off`.
    Write {
        /// Byte offset.
        off: u64,
        /// Bytes.
        len: u64,
    },
    /// Flush.
    Flush,
    /// Return the serial.
    GetId,
    /// Make `len` bytes at `off` read zeros (DISCARD, or WRITE_ZEROES);
    /// `unmap`: the backing store may deallocate them.
    Zeroes {
        /// Byte offset.
        off: u64,
        /// Bytes (0 for an empty range).
        len: u64,
        /// May deallocate.
        unmap: bool,
    },
}

/// Does a request with this header carry a DISCARD / WRITE_ZEROES range,
/// which the caller passes to [`parse`]?
pub fn needs_range(header: &[u8; HEADER_BYTES]) -> bool {
    let ty = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    ty == types::DISCARD || ty == types::WRITE_ZEROES
}

/// Why a request is rejected, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// Header shorter than 16 bytes.
    ShortHeader,
    /// Data length not a multiple of 512.
    Unaligned,
    /// Sector range past the capacity, or overflowing.
    OutOfRange,
    /// A write to a read-only disk.
    ReadOnly,
    /// More data than `seg_max * size_max` (each pending request holds a
    /// buffer of its size, so this bounds what a guest can make us allocate).
    TooLarge,
    /// A request type we do not implement.
    Unsupported(u32),
    /// A DISCARD / WRITE_ZEROES range with flags we do not know (or UNMAP
    /// on a DISCARD, which the specification forbids).
    RangeFlags(u32),
    /// A DISCARD / WRITE_ZEROES without exactly one range.
    RangeCount,
}

impl Reject {
    /// The status the guest sees; one exhaustive mapping.
    pub fn status(self) -> u8 {
        match self {
            Reject::ShortHeader => status::IOERR,
            Reject::Unaligned => status::IOERR,
            Reject::OutOfRange => status::IOERR,
            Reject::ReadOnly => status::IOERR,
            Reject::TooLarge => status::IOERR,
            Reject::Unsupported(_) => status::UNSUPP,
            Reject::RangeFlags(_) => status::UNSUPP,
            Reject::RangeCount => status::IOERR,
        }
    }
}

/// Parse a request from its header bytes and the data lengths available:
/// `readable` device-readable bytes after the header, `writable`
/// device-writable bytes before the status byte; `range` is the first
/// [`RANGE_BYTES`] readable bytes, for a request that [`needs_range`].
pub fn parse(
    header: Option<[u8; HEADER_BYTES]>,
    zero_range: Option<[u8; RANGE_BYTES]>,
    readable: usize,
    writable: usize,
    capacity_bytes: u64,
    read_only: bool,
) -> Result<RequestKind, Reject> {
    let h = header.ok_or(Reject::ShortHeader)?;
    let ty = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let range = |len: usize| -> Result<(u64, u64), Reject> {
        let len = len as u64;
        if len > MAX_DATA_BYTES {
            return Err(Reject::TooLarge);
        }
        if !len.is_multiple_of(512) {
            return Err(Reject::Unaligned);
        }
        let off = sector.checked_mul(512).ok_or(Reject::OutOfRange)?;
        match off.checked_add(len) {
            Some(end) if end <= capacity_bytes => Ok((off, len)),
            _ => Err(Reject::OutOfRange),
        }
    };
    match ty {
        types::IN => {
            let (off, len) = range(writable)?;
            Ok(RequestKind::Read { off, len })
        }
        types::OUT => {
            if read_only {
                return Err(Reject::ReadOnly);
            }
            let (off, len) = range(readable)?;
            Ok(RequestKind::Write { off, len })
        }
        types::FLUSH => Ok(RequestKind::Flush),
        types::GET_ID => Ok(RequestKind::GetId),
        types::DISCARD | types::WRITE_ZEROES => {
            if read_only {
                return Err(Reject::ReadOnly);
            }
            // We advertise one range per request (max_*_seg).
            let (true, Some(r)) = (readable == RANGE_BYTES, zero_range) else {
                return Err(Reject::RangeCount);
            };
            parse_range(&r, ty == types::DISCARD, capacity_bytes)
        }
        other => Err(Reject::Unsupported(other)),
    }
}

/// One DISCARD / WRITE_ZEROES range, checked against the limits we
/// advertise and the capacity. A discard may unmap, so it is one too.
fn parse_range(
    r: &[u8; RANGE_BYTES],
    discard: bool,
    capacity_bytes: u64,
) -> Result<RequestKind, Reject> {
    let sector = u64::from_le_bytes(r[0..8].try_into().expect("8 bytes"));
    let sectors = u32::from_le_bytes(r[8..12].try_into().expect("4 bytes"));
    let flags = u32::from_le_bytes(r[12..16].try_into().expect("4 bytes"));
    if flags & !RANGE_FLAG_UNMAP != 0 || (discard && flags != 0) {
        return Err(Reject::RangeFlags(flags));
    }
    if sectors > super::config::MAX_ZERO_SECTORS {
        return Err(Reject::TooLarge);
    }
    let off = sector.checked_mul(512).ok_or(Reject::OutOfRange)?;
    let len = u64::from(sectors) * 512;
    match off.checked_add(len) {
        Some(end) if end <= capacity_bytes => Ok(RequestKind::Zeroes {
            off,
            len,
            unmap: discard || flags & RANGE_FLAG_UNMAP != 0,
        }),
        _ => Err(Reject::OutOfRange),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(ty: u32, sector: u64) -> Option<[u8; 16]> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        Some(h)
    }

    const CAP: u64 = 1 << 30;

    fn range(sector: u64, sectors: u32, flags: u32) -> Option<[u8; RANGE_BYTES]> {
        let mut r = [0u8; RANGE_BYTES];
        r[0..8].copy_from_slice(&sector.to_le_bytes());
        r[8..12].copy_from_slice(&sectors.to_le_bytes());
        r[12..16].copy_from_slice(&flags.to_le_bytes());
        Some(r)
    }

    fn zeroes(ty: u32, r: Option<[u8; RANGE_BYTES]>, ro: bool) -> Result<RequestKind, Reject> {
        parse(hdr(ty, 0), r, RANGE_BYTES, 0, CAP, ro)
    }

    #[test]
    fn discard_and_write_zeroes_ranges_parse_and_are_checked() {
        use RequestKind::Zeroes;
        assert_eq!(
            zeroes(types::WRITE_ZEROES, range(8, 16, 0), false),
            Ok(Zeroes {
                off: 4096,
                len: 8192,
                unmap: false
            })
        );
        assert_eq!(
            zeroes(types::WRITE_ZEROES, range(8, 16, 1), false),
            Ok(Zeroes {
                off: 4096,
                len: 8192,
                unmap: true
            })
        );
        assert_eq!(
            zeroes(types::DISCARD, range(0, 8, 0), false),
            Ok(Zeroes {
                off: 0,
                len: 4096,
                unmap: true
            })
        );
        let last = (CAP / 512) as u32;
        assert!(zeroes(types::DISCARD, range(0, last, 0), false).is_ok());
        assert_eq!(
            zeroes(types::DISCARD, range(0, 8, 1), false),
            Err(Reject::RangeFlags(1))
        );
        assert_eq!(
            zeroes(types::WRITE_ZEROES, range(0, 8, 2), false),
            Err(Reject::RangeFlags(2))
        );
        assert_eq!(
            zeroes(types::WRITE_ZEROES, range(1, last, 0), false),
            Err(Reject::OutOfRange)
        );
        assert_eq!(
            zeroes(types::WRITE_ZEROES, range(u64::MAX, 1, 0), false),
            Err(Reject::OutOfRange)
        );
        assert_eq!(
            parse(
                hdr(types::DISCARD, 0),
                range(0, super::super::config::MAX_ZERO_SECTORS + 1, 0),
                RANGE_BYTES,
                0,
                u64::MAX,
                false
            ),
            Err(Reject::TooLarge)
        );
        assert_eq!(
            zeroes(types::DISCARD, range(0, 8, 0), true),
            Err(Reject::ReadOnly)
        );
        assert_eq!(zeroes(types::DISCARD, None, false), Err(Reject::RangeCount));
        assert_eq!(
            parse(hdr(types::DISCARD, 0), range(0, 8, 0), 32, 0, CAP, false),
            Err(Reject::RangeCount)
        );
        assert_eq!(Reject::RangeFlags(1).status(), status::UNSUPP);
        assert!(needs_range(&hdr(types::WRITE_ZEROES, 0).unwrap()));
        assert!(!needs_range(&hdr(types::OUT, 0).unwrap()));
    }

    #[test]
    fn valid_requests_parse() {
        assert_eq!(
            parse(hdr(types::IN, 8), None, 0, 4096, CAP, false),
            Ok(RequestKind::Read {
                off: 4096,
                len: 4096
            })
        );
        assert_eq!(
            parse(hdr(types::OUT, 0), None, 512, 0, CAP, false),
            Ok(RequestKind::Write { off: 0, len: 512 })
        );
        assert_eq!(
            parse(hdr(types::FLUSH, 0), None, 0, 0, CAP, false),
            Ok(RequestKind::Flush)
        );
        assert_eq!(
            parse(hdr(types::GET_ID, 0), None, 0, 20, CAP, false),
            Ok(RequestKind::GetId)
        );
        let last = CAP / 512 - 8;
        assert!(parse(hdr(types::IN, last), None, 0, 4096, CAP, false).is_ok());
    }

    #[test]
    fn bad_requests_are_rejected_with_the_right_status() {
        assert_eq!(
            parse(None, None, 0, 0, CAP, false),
            Err(Reject::ShortHeader)
        );
        assert_eq!(
            parse(hdr(types::IN, CAP / 512), None, 0, 512, CAP, false),
            Err(Reject::OutOfRange)
        );
        assert_eq!(
            parse(hdr(types::IN, CAP / 512 - 1), None, 0, 1024, CAP, false),
            Err(Reject::OutOfRange)
        );
        assert_eq!(
            parse(hdr(types::IN, u64::MAX), None, 0, 512, CAP, false),
            Err(Reject::OutOfRange)
        );
        assert_eq!(
            parse(
                hdr(types::IN, u64::MAX / 512),
                None,
                0,
                1024,
                u64::MAX,
                false
            ),
            Err(Reject::OutOfRange)
        );
        assert_eq!(
            parse(hdr(types::OUT, 0), None, 100, 0, CAP, false),
            Err(Reject::Unaligned)
        );
        assert_eq!(
            parse(hdr(types::OUT, 0), None, 512, 0, CAP, true),
            Err(Reject::ReadOnly)
        );
        assert_eq!(
            parse(hdr(99, 0), None, 0, 0, CAP, false),
            Err(Reject::Unsupported(99))
        );
        let big = (MAX_DATA_BYTES + 512) as usize;
        assert_eq!(
            parse(hdr(types::IN, 0), None, 0, big, u64::MAX, false),
            Err(Reject::TooLarge)
        );
        assert_eq!(
            parse(hdr(types::OUT, 0), None, big, 0, u64::MAX, false),
            Err(Reject::TooLarge)
        );
        assert!(parse(
            hdr(types::IN, 0),
            None,
            0,
            MAX_DATA_BYTES as usize,
            u64::MAX,
            false
        )
        .is_ok());
        assert_eq!(Reject::Unsupported(11).status(), status::UNSUPP);
        assert_eq!(Reject::OutOfRange.status(), status::IOERR);
    }

    #[test]
    fn random_headers_never_panic_and_accepted_ranges_fit() {
        let mut x = 0x1234_5678_9abc_def0u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut h = [0u8; 16];
            h[0..8].copy_from_slice(&(x % 16).to_le_bytes());
            h[8..16].copy_from_slice(&x.rotate_left(17).to_le_bytes());
            let r = if x & 2 == 0 {
                RANGE_BYTES
            } else {
                (x >> 3) as usize % (1 << 22)
            };
            let w = (x >> 29) as usize % (1 << 22);
            let mut range = [0u8; RANGE_BYTES];
            range[0..8].copy_from_slice(&(x.rotate_left(23) >> (x % 40)).to_le_bytes());
            range[8..16].copy_from_slice(&x.rotate_left(5).to_le_bytes());
            if let Ok(
                RequestKind::Read { off, len }
                | RequestKind::Write { off, len }
                | RequestKind::Zeroes { off, len, .. },
            ) = parse(Some(h), Some(range), r, w, CAP, x & 1 == 0)
            {
                assert!(off + len <= CAP && off % 512 == 0 && len % 512 == 0);
            }
        }
    }
}
