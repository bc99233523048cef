//! Recognising sequential streams on a queue (bcache's sequential cutoff):
//! a long sequential write goes around the cache, and the misses of a long
//! sequential read are not filled in, so a backup or a copy does not push
//! the hot set out of the cache.

/// The read and the write stream of one queue.
#[derive(Debug, Default)]
pub(crate) struct Streams {
    pub(crate) read: Stream,
    pub(crate) write: Stream,
}

/// One stream: where the last request ended, and how long the run of
/// requests each starting where the previous one ended has grown.
#[derive(Debug, Default)]
pub(crate) struct Stream {
    next: u64,
    run: u64,
}

impl Stream {
    /// Note a request of `len` bytes at `off`: is it past `cutoff` bytes
    /// into a sequential run? (Never with `cutoff` 0.)
    pub(crate) fn note(&mut self, off: u64, len: u64, cutoff: u64) -> bool {
        self.run = if off == self.next {
            self.run.saturating_add(len)
        } else {
            len
        };
        self.next = off.saturating_add(len);
        cutoff > 0 && self.run > cutoff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_crosses_the_cutoff_and_a_jump_starts_over() {
        let mut s = Stream::default();
        let cut = 4 << 20;
        let mut off = 1 << 30;
        let mut past = 0;
        for _ in 0..16 {
            past += s.note(off, 512 << 10, cut) as u32;
            off += 512 << 10;
        }
        assert_eq!(past, 8, "the 9th 512 KiB request is past 4 MiB");
        assert!(!s.note(7 << 20, 4096, cut), "a jump starts a new run");
        assert!(!s.note(7 << 20, 4096, 0), "0 turns it off");
        let mut r = Stream::default();
        assert!(!r.note(0, 4 << 20, cut));
        assert!(r.note(4 << 20, 4096, cut));
    }
}
