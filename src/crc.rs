//! crc32c of a few whole words, for checksums on the write path.
//!
//! Every write stages a key whose crc covers seven words. The general
//! crc32c routine spends more on dispatch and unaligned edges than on so
//! few bytes; with SSE4.2 this is one `crc32` instruction per word.
#![allow(unsafe_code)]

/// crc32c (Castagnoli, as [`crc32c::crc32c`]) of `words` laid out little
/// endian.
pub fn crc32c_words(words: &[u64]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("sse4.2") {
        // SAFETY: the CPU has SSE4.2 (checked just above).
        return unsafe { crc32c_words_sse42(words) };
    }
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    crc32c::crc32c(&bytes)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
fn crc32c_words_sse42(words: &[u64]) -> u32 {
    use std::arch::x86_64::_mm_crc32_u64;
    let mut crc = u64::from(u32::MAX);
    for &w in words {
        crc = _mm_crc32_u64(crc, w);
    }
    !(crc as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_crc32c_crate() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for n in 0..40 {
            let words: Vec<u64> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                })
                .collect();
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
            assert_eq!(crc32c_words(&words), crc32c::crc32c(&bytes), "{n} words");
        }
    }
}
