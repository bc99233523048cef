//! The CPU side of persistence on DAX media: which cache-line write-back
//! instruction this processor has, writing one back, and copies into the
//! medium with non-temporal stores.
#![allow(unsafe_code)]

/// The instruction used to write back a cache line on DAX media.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushInsn {
    /// clwb: writes back and keeps the line cached.
    Clwb,
    /// clflushopt: writes back and evicts, weakly ordered.
    Clflushopt,
    /// clflush: writes back and evicts, strongly ordered (slowest).
    Clflush,
}

impl FlushInsn {
    /// The best instruction this CPU has.
    pub fn detect() -> FlushInsn {
        let (clwb, clflushopt) = cpu_flush_features();
        if clwb {
            FlushInsn::Clwb
        } else if clflushopt {
            FlushInsn::Clflushopt
        } else {
            FlushInsn::Clflush
        }
    }
}

/// Smallest [`Region::write`] done with non-temporal stores.
pub const NT_MIN_BYTES: usize = 512;

/// Copy `len` bytes with non-temporal stores for the 16-byte-aligned middle
/// of the destination and plain stores for the ends, then `sfence`.
///
/// # Safety
/// `dst..dst+len` must be writable, `src..src+len` readable, and the two
/// must not overlap.
#[inline]
pub(super) unsafe fn copy_nt(dst: *mut u8, src: *const u8, len: usize) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    let head = ((16 - (dst as usize & 15)) & 15).min(len);
    let body = (len - head) & !15;
    // SAFETY: every pointer below stays inside dst..dst+len and
    // src..src+len (head + body <= len); the stream stores' destinations are
    // 16-byte aligned (dst + head is); unaligned loads need no alignment;
    // sse2 (the stream and fence instructions) is part of x86_64.
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, head);
        let (d, s) = (dst.add(head), src.add(head));
        let mut i = 0;
        while i < body {
            let v = _mm_loadu_si128(s.add(i).cast::<__m128i>());
            _mm_stream_si128(d.add(i).cast::<__m128i>(), v);
            i += 16;
        }
        std::ptr::copy_nonoverlapping(s.add(body), d.add(body), len - head - body);
        _mm_sfence();
    }
}

/// Write back the cache line holding `p`.
///
/// # Safety
/// `p` must point into mapped memory.
#[inline(always)]
pub(super) unsafe fn flush_line(insn: FlushInsn, p: *mut u8) {
    // SAFETY: the caller guarantees `p` is mapped; these instructions only
    // write back a cache line and have no other effect on memory.
    unsafe {
        match insn {
            FlushInsn::Clwb => {
                std::arch::asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags))
            }
            FlushInsn::Clflushopt => {
                std::arch::asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags))
            }
            FlushInsn::Clflush => std::arch::x86_64::_mm_clflush(p),
        }
    }
}

/// (clwb, clflushopt) support, from CPUID leaf 7 (EBX bits 24 and 23).
pub(super) fn cpu_flush_features() -> (bool, bool) {
    #[allow(unused_unsafe)]
    // SAFETY: cpuid is available on every x86_64 CPU and only reads
    // processor identification registers.
    let max = unsafe { std::arch::x86_64::__cpuid(0) }.eax;
    if max < 7 {
        return (false, false);
    }
    #[allow(unused_unsafe)]
    // SAFETY: as above; leaf 7 exists since max >= 7.
    let ebx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.ebx;
    (ebx & (1 << 24) != 0, ebx & (1 << 23) != 0)
}
