//! Every on-media decoder of `pcache::format` on arbitrary bytes: none may
//! panic, whatever a corrupt or hostile cache device holds.
//!
//! CRCs make random bytes fail at the first check, so each decoder also gets
//! a copy with its magic, kind, format id, LSN and CRC patched to pass,
//! which sends the fuzzer into the field validation behind them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pcache::format::{
    pick_latest, record_crc, CacheInfo, KeyOnMedia, KsetView, MetaRecord, PosOnMedia, SegGen,
    SegInfo, Superblock, KEY_BYTES, KSET_HEADER_BYTES, KSET_MAGIC, SB_BYTES, SB_MAGIC,
};

/// Header bytes of a two-replica record (crc, kind, seq).
const META_HEADER: usize = 16;

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes(s.try_into().unwrap()))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap()))
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(s) = b.get_mut(at..at + v.len()) {
        s.copy_from_slice(v);
    }
}

/// Store the record CRC of `b[..len]` in its first 4 bytes.
fn fix_crc(b: &mut [u8], len: usize) {
    if len >= 4 && len <= b.len() {
        let crc = record_crc(&b[..len]);
        put(b, 0, &crc.to_le_bytes());
    }
}

fn meta<R: MetaRecord>(raw: &[u8], other: &[u8], offset: u64) {
    let _ = R::decode(raw, offset);
    let _ = R::decode_body(raw, offset);
    let _ = pick_latest::<R>([raw, other], [offset, offset ^ 0x1000]);
    let mut fixed = raw.to_vec();
    put(&mut fixed, 4, &R::KIND.to_le_bytes());
    fix_crc(&mut fixed, R::BYTES);
    let _ = R::decode(&fixed, offset);
    let _ = pick_latest::<R>([&fixed, raw], [offset, offset ^ 0x1000]);
    let _ = pick_latest::<R>([raw, &fixed], [offset, offset ^ 0x1000]);
    if let Some(body) = fixed.get(META_HEADER..) {
        let _ = R::decode_body(body, offset);
    }
}

fn kset(buf: &[u8], format_id: u64, lsn: u64, n_segs: u32, backing: u64) {
    if let Ok(v) = KsetView::parse(buf, format_id, lsn, n_segs) {
        let _ = v.header.is_last();
        let _ = v.header.bytes();
        for (i, k) in v.iter().enumerate() {
            assert_eq!(k, v.key(i));
            let _ = k.validate(n_segs, backing, i as u64);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Geometry from the first bytes, the record from the rest.
    let n_segs = u32_at(data, 0) % 4096;
    let backing = u64_at(data, 4);
    let medium = u64_at(data, 12);
    let buf = data.get(20..).unwrap_or(&[]);
    let half = buf.len() / 2;
    let (a, b) = buf.split_at(half);

    // Superblock, raw and with magic + CRC fixed.
    let _ = Superblock::decode(buf, medium);
    let mut sb = buf.to_vec();
    put(&mut sb, 8, &SB_MAGIC.to_le_bytes());
    fix_crc(&mut sb, SB_BYTES);
    if let Ok(s) = Superblock::decode(&sb, medium) {
        let _ = s.format_id();
        assert_eq!(Superblock::decode(&s.encode(), medium), Ok(s));
    }

    // Every two-replica record type.
    meta::<CacheInfo>(buf, a, 0x2000);
    meta::<PosOnMedia>(buf, b, 0x3000);
    meta::<SegInfo>(a, buf, 0x4000);
    meta::<SegGen>(b, buf, 0x5000);

    // Ksets: raw, then with magic, format id, LSN and CRC made to match.
    let format_id = u64_at(buf, 16);
    let lsn = u64_at(buf, 24);
    kset(buf, format_id, lsn, n_segs, backing);
    kset(buf, format_id ^ 1, lsn, n_segs, backing);
    let mut ks = buf.to_vec();
    put(&mut ks, 8, &KSET_MAGIC.to_le_bytes());
    let key_num = u32_at(&ks, 4) as usize;
    let fits = ks.len().saturating_sub(KSET_HEADER_BYTES) / KEY_BYTES;
    let key_num = if key_num > fits {
        key_num % (fits + 1)
    } else {
        key_num
    };
    put(&mut ks, 4, &(key_num as u32).to_le_bytes());
    fix_crc(&mut ks, KSET_HEADER_BYTES + KEY_BYTES * key_num);
    kset(&ks, format_id, lsn, n_segs, backing);

    // Single keys, from every offset of the first few.
    for at in 0..buf.len().min(KEY_BYTES) {
        let k = KeyOnMedia::decode(&buf[at..]);
        let _ = k.validate(n_segs, backing, at as u64);
        let mut out = [0u8; KEY_BYTES];
        k.encode(&mut out);
        assert_eq!(KeyOnMedia::decode(&out), k);
    }
});
