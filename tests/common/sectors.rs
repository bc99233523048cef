//! Self-describing sectors for model tests: each 512-byte sector holds 32
//! copies of (write id, sector number), so a torn, misplaced or invented
//! sector is caught on its own.

/// Every sector holds 32 copies of (write id, sector number).
pub fn fill_sector(buf: &mut [u8], id: u64, sector: u64) {
    for pair in buf.chunks_exact_mut(16) {
        pair[..8].copy_from_slice(&id.to_le_bytes());
        pair[8..].copy_from_slice(&sector.to_le_bytes());
    }
}

/// The write id a sector holds, or a description of why it holds garbage.
pub fn sector_id(buf: &[u8], sector: u64) -> Result<u64, String> {
    if buf.iter().all(|b| *b == 0) {
        return Ok(0);
    }
    let id = u64::from_le_bytes(buf[..8].try_into().unwrap());
    for pair in buf.chunks_exact(16) {
        let i = u64::from_le_bytes(pair[..8].try_into().unwrap());
        let s = u64::from_le_bytes(pair[8..].try_into().unwrap());
        if i != id || s != sector {
            return Err(format!(
                "torn or misplaced sector: ({i}, {s}) next to ({id}, {sector})"
            ));
        }
    }
    Ok(id)
}
