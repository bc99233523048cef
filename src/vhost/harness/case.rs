//! Arbitrary bytes turned into one hostile request, run through the
//! harness and checked against a model of the device written apart from
//! `request::parse` (and a shadow copy of the disk for data).

use super::*;

impl Harness {
    /// Build one request from `data` (any bytes), run it, check the answer
    /// against the model, and finish it. Panics on any disagreement.
    pub fn run_case(&mut self, data: &[u8]) -> CaseReport {
        let mut inp = Input { b: data, i: 0 };
        let mode = inp.u8();
        let kicked = mode & 1 != 0;
        let event_idx = mode & 2 != 0;
        // Rewriting the chain while a request is pending is only done on
        // the submit path, where the harness controls when it finishes.
        let mutate = mode & 4 != 0 && !kicked;
        let indirect = mode & 0x38 == 0x38;
        let chaos = mode & 0x40 != 0;
        self.set_event_idx(event_idx);

        // A clean slate: no descriptors from the last case, zeroed buffers.
        let zeros = vec![0u8; (self.guest_bytes - DATA_START) as usize];
        self.write_mem(DESC_TABLE, &[0u8; 16 * QUEUE_SIZE as usize]);
        self.write_mem(DATA_START, &zeros);

        let hdr = self.gen_header(&mut inp);
        let mut descs = if chaos {
            self.gen_chaos(&mut inp)
        } else {
            self.gen_shaped(&mut inp, &hdr)
        };
        if kicked {
            // Through handle_event, a buffer over the rings could make the
            // device pop chains this case did not offer; keep writable
            // buffers off them (submit pops exactly one chain).
            for d in &mut descs {
                if d.is_write() && d.addr < DATA_START {
                    d.addr += DATA_START;
                }
            }
        }
        if indirect {
            let table = DATA_START + (u64::from(inp.u32()) % (self.data_bytes() - 16)) / 16 * 16;
            for (i, d) in descs.iter().enumerate() {
                self.write_desc_at(table + 16 * i as u64, *d);
            }
            let len = if inp.u8().is_multiple_of(8) {
                inp.u32()
            } else {
                16 * descs.len() as u32
            };
            self.set_desc(
                0,
                Desc {
                    addr: table,
                    len,
                    flags: F_INDIRECT,
                    next: 0,
                },
            );
        } else {
            for (i, d) in descs.iter().enumerate() {
                self.set_desc(i as u16, *d);
            }
        }
        let head = if inp.u8().is_multiple_of(32) {
            inp.u16() % (QUEUE_SIZE + 16)
        } else {
            0
        };
        self.publish(head);

        // Header, then data, through the readable buffers in chain order;
        // garbage in the writable ones (the device must overwrite it).
        let walk = self.peek_chain();
        let seed = inp.u64();
        let mut stream = hdr.to_vec();
        let readable: u64 = walk
            .iter()
            .filter(|d| !d.is_write())
            .map(|d| u64::from(d.len))
            .sum();
        let mut x = seed | 1;
        while (stream.len() as u64) < readable.min(1 << 24) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            stream.extend_from_slice(&x.to_le_bytes());
        }
        let ty = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        if (ty == types::DISCARD || ty == types::WRITE_ZEROES)
            && stream.len() >= HEADER_BYTES + 16
            && !inp.u8().is_multiple_of(4)
        {
            // A plausible range now and then: inside the disk, small, with
            // flags 0 or UNMAP.
            let sectors = self.backing_bytes / 512;
            let sector = u64::from(inp.u16()) % sectors;
            let n = u32::from(inp.u8()) % 64;
            let flags = u32::from(inp.u8().is_multiple_of(3));
            stream[16..24].copy_from_slice(&sector.to_le_bytes());
            stream[24..28].copy_from_slice(&n.to_le_bytes());
            stream[28..32].copy_from_slice(&flags.to_le_bytes());
        }
        let mut at = 0usize;
        for d in &walk {
            if d.is_write() {
                let n = u64::from(d.len).min(self.guest_bytes) as usize;
                self.fill_off_rings(d.addr, &vec![0xA5; n]);
            } else {
                let n = (d.len as usize).min(stream.len().saturating_sub(at));
                self.fill_off_rings(d.addr, &stream[at..at + n]);
                at += n;
            }
        }

        // The model looks at the final state, as the device will.
        let walk = self.peek_chain();
        // Device-readable buffers clear of every writable one: the device
        // must leave them as they are.
        let untouchable: Vec<(Desc, Vec<u8>)> = walk
            .iter()
            .filter(|d| !d.is_write() && d.len > 0 && d.addr >= DATA_START)
            .filter(|d| {
                let (a, b) = (d.addr, d.addr.saturating_add(u64::from(d.len)));
                walk.iter().filter(|w| w.is_write()).all(|w| {
                    let (c, e) = (w.addr, w.addr.saturating_add(u64::from(w.len)));
                    b <= c || e <= a
                })
            })
            .filter_map(|d| Some((*d, self.read_mem(d.addr, d.len as usize)?)))
            .collect();
        let expect = self.model(head, &walk);
        let relaxed = walk
            .iter()
            .any(|d| d.is_write() && d.len > 0 && d.addr < DATA_START);

        let outcome = if kicked {
            self.kick().expect("handle_event never fails on a chain");
            let used = self.take_used();
            match used.as_slice() {
                [] => {
                    let (r, d) = self.pending();
                    if r + d > 0 {
                        Outcome::Pending
                    } else {
                        Outcome::Dropped
                    }
                }
                [(id, len)] => {
                    assert_eq!(*id, u32::from(head), "used ring names another chain");
                    Outcome::Used(*len)
                }
                more => panic!("one chain offered, {} returned: {more:?}", more.len()),
            }
        } else {
            self.submit_with(!mutate)
        };

        let describe = || format!("head {head} chain {walk:?} header {hdr:02x?} expect {expect:?}");
        let mut mutated = false;
        let len = match outcome {
            Outcome::Used(len) => len,
            Outcome::Dropped => {
                assert_eq!(expect, Expect::Dropped, "dropped: {}", describe());
                assert_eq!(self.pending(), (0, 0));
                return CaseReport {
                    class: Class::Dropped,
                    mutated,
                    kicked,
                };
            }
            Outcome::Pending => {
                // What was pending when it was accepted: on the submit
                // path, end_batch may have finished it since.
                let (r, d) = if kicked {
                    self.pending()
                } else {
                    self.last_pending
                };
                match expect {
                    Expect::Read { .. } => assert_eq!((r, d), (1, 0), "{}", describe()),
                    Expect::Write { .. } | Expect::Zero { .. } | Expect::Flush => {
                        assert_eq!((r, d), (0, 1), "{}", describe())
                    }
                    _ => panic!("pending, but not a valid read or write: {}", describe()),
                }
                if mutate {
                    // A hostile guest rewrites the chain under the device.
                    mutated = true;
                    let n = 1 + inp.u8() % 4;
                    for i in 0..u16::from(n) {
                        let d = self.gen_desc(&mut inp, i, n.into(), 0);
                        self.set_desc(i, d);
                        if indirect {
                            self.set_desc(0, d);
                        }
                    }
                }
                let used = self.settle().expect("stop_vring");
                assert_eq!(self.pending(), (0, 0), "settle left requests pending");
                match used.as_slice() {
                    [(id, len)] => {
                        assert_eq!(*id, u32::from(head));
                        *len
                    }
                    other => panic!("pending request finished as {other:?}: {}", describe()),
                }
            }
        };

        if mutated {
            // The request was mapped when it was taken (as a device does
            // DMA to the buffers it was given): its answer fits the chain
            // as it was then, whatever the guest rewrote since.
            let w: u64 = walk
                .iter()
                .filter(|d| d.is_write())
                .map(|d| u64::from(d.len))
                .sum();
            assert!(
                u64::from(len) <= w,
                "used len {len} > {w} writable bytes of the chain as taken"
            );
            // The write itself went through (its data was copied at start).
            if let Expect::Write { off, ref data } = expect {
                self.shadow[off as usize..off as usize + data.len()].copy_from_slice(data);
            }
            if let Expect::Zero { off, len } = expect {
                self.shadow[off as usize..(off + len) as usize].fill(0);
            }
            return CaseReport {
                class: expect.class(outcome),
                mutated,
                kicked,
            };
        }

        assert_eq!(self.pending(), (0, 0), "requests left pending");
        for (d, before) in &untouchable {
            let now = self
                .read_mem(d.addr, d.len as usize)
                .expect("was in memory");
            assert!(
                now == *before,
                "the device wrote into readable buffer {d:?}: {}",
                describe()
            );
        }
        let w: u64 = walk
            .iter()
            .filter(|d| d.is_write())
            .map(|d| u64::from(d.len))
            .sum();
        assert!(u64::from(len) <= w, "used len {len} > {w} writable bytes");
        assert_eq!(len, expect.used_len(), "used length: {}", describe());
        if len == 0 {
            return CaseReport {
                class: expect.class(outcome),
                mutated,
                kicked,
            };
        }
        let wdescs: Vec<Desc> = walk
            .iter()
            .filter(|d| d.is_write() && d.len > 0)
            .copied()
            .collect();
        let last = wdescs.last().expect("a writable byte");
        let st = self
            .read_mem(last.addr + u64::from(last.len) - 1, 1)
            .expect("in memory")[0];
        if !relaxed {
            assert_eq!(st, expect.status(), "status byte: {}", describe());
        }
        let overlap = {
            let mut r: Vec<(u64, u64)> = wdescs
                .iter()
                .map(|d| (d.addr, d.addr + u64::from(d.len)))
                .collect();
            r.sort();
            r.windows(2).any(|p| p[1].0 < p[0].1)
        };
        let checkable = !relaxed && !overlap;
        match &expect {
            Expect::Read { off, len } if checkable => {
                let got = self.gather(&wdescs, *len as usize);
                let want = &self.shadow[*off as usize..(*off + *len) as usize];
                if got != want {
                    let at = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
                    panic!(
                        "read of {len} bytes at {off} differs from the disk at byte {at}: {}",
                        describe()
                    );
                }
            }
            Expect::GetId { n } if checkable => {
                let got = self.gather(&wdescs, *n);
                assert_eq!(got, &self.serial[..*n], "GET_ID data: {}", describe());
            }
            Expect::Write { off, data } if st == status::OK || relaxed => {
                self.shadow[*off as usize..*off as usize + data.len()].copy_from_slice(data);
            }
            Expect::Zero { off, len } if st == status::OK || relaxed => {
                self.shadow[*off as usize..(*off + *len) as usize].fill(0);
            }
            _ => {}
        }
        CaseReport {
            class: expect.class(outcome),
            mutated,
            kicked,
        }
    }

    fn data_bytes(&self) -> u64 {
        self.guest_bytes - DATA_START
    }

    /// Write what falls inside guest memory and outside the rings.
    fn fill_off_rings(&self, addr: u64, data: &[u8]) {
        let start = addr.max(DATA_START);
        let end = addr.saturating_add(data.len() as u64).min(self.guest_bytes);
        if start < end {
            let from = (start - addr) as usize;
            self.write_mem(start, &data[from..from + (end - start) as usize]);
        }
    }

    /// The first `n` bytes of the buffers `ds`, in order.
    fn gather(&self, ds: &[Desc], n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n);
        for d in ds {
            let k = (d.len as usize).min(n - v.len());
            v.extend(self.read_mem(d.addr, k).expect("in memory"));
            if v.len() == n {
                break;
            }
        }
        v
    }

    fn gen_header(&self, inp: &mut Input) -> [u8; HEADER_BYTES] {
        let ty = match inp.u8() % 10 {
            0..=2 => types::IN,
            3..=5 => types::OUT,
            6 => types::FLUSH,
            7 => types::GET_ID,
            8 => [2, 3, 5, 11, 13, 0xffff_ffff][inp.u8() as usize % 6],
            _ => inp.u32(),
        };
        let sectors = self.backing_bytes / 512;
        let sector = match inp.u8() % 8 {
            0..=4 => u64::from(inp.u16()) % (sectors + 8),
            5 => sectors.saturating_sub(u64::from(inp.u8() % 16)),
            6 => u64::MAX / 512 + u64::from(inp.u8()),
            _ => inp.u64(),
        };
        let mut h = [0u8; HEADER_BYTES];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[4..8].copy_from_slice(&inp.u32().to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    /// A well-formed layout with random splits: header pieces, data pieces
    /// (readable for a write, writable otherwise), a status byte of its own
    /// or at the end of the last data piece.
    fn gen_shaped(&self, inp: &mut Input, hdr: &[u8; HEADER_BYTES]) -> Vec<Desc> {
        let ty = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let ranged = ty == types::DISCARD || ty == types::WRITE_ZEROES;
        let data_len = match inp.u8() % 8 {
            // One DISCARD / WRITE_ZEROES range, mostly.
            _ if ranged && !inp.u8().is_multiple_of(4) => 16,
            0 => 0,
            1..=5 => 512 * u32::from(1 + inp.u8() % 8),
            6 => 512 * u32::from(1 + inp.u8() % 128),
            _ => u32::from(inp.u16()) % 8192,
        };
        let mut cursor = DATA_START + u64::from(inp.u16()) % 4096;
        let mut place = |len: u32, inp: &mut Input| {
            let gap = match inp.u8() % 8 {
                0 => 0,
                1 => u64::from(inp.u8()),
                _ => 1 + u64::from(inp.u8() % 64),
            };
            let mut at = cursor;
            if at + u64::from(len) > self.guest_bytes {
                at = DATA_START + u64::from(inp.u16()) % 4096;
            }
            cursor = at + u64::from(len) + gap;
            at
        };
        let mut out = Vec::new();
        for p in split(16, 1 + inp.u8() % 3, inp) {
            out.push(Desc::r(place(p, inp), p));
        }
        // Now and then the data points the wrong way (a read's readable, a
        // write's writable): such a request moves no data, and the device
        // must neither store into nor take from those buffers.
        let data_write = (ty != types::OUT && !ranged) ^ inp.u8().is_multiple_of(16);
        let mut data = Vec::new();
        for p in split(data_len, 1 + inp.u8() % 6, inp) {
            let d = Desc {
                addr: 0,
                len: p,
                flags: if data_write { F_WRITE } else { 0 },
                next: 0,
            };
            data.push(d);
        }
        let merge = data_write && !data.is_empty() && inp.u8().is_multiple_of(3);
        if merge {
            data.last_mut().expect("not empty").len += 1;
        }
        for mut d in data {
            d.addr = place(d.len, inp);
            out.push(d);
        }
        if !merge {
            out.push(Desc::w(place(1, inp), 1));
        }
        // Now and then one buffer is moved somewhere hostile.
        if inp.u8().is_multiple_of(8) {
            let i = inp.u8() as usize % out.len();
            out[i].addr = self.hostile_addr(inp);
        }
        link(&mut out);
        out
    }

    /// Anything: counts, lengths, addresses, flags and links at random.
    fn gen_chaos(&self, inp: &mut Input) -> Vec<Desc> {
        let n = 1 + u16::from(inp.u8() % 10);
        let split = u16::from(inp.u8()) % (n + 1);
        (0..n).map(|i| self.gen_desc(inp, i, n, split)).collect()
    }

    fn gen_desc(&self, inp: &mut Input, i: u16, n: u16, split: u16) -> Desc {
        let addr = match inp.u8() % 16 {
            0..=10 => DATA_START + u64::from(inp.u32()) % self.data_bytes(),
            11 => u64::from(inp.u32()) % self.guest_bytes,
            _ => self.hostile_addr(inp),
        };
        let len = match inp.u8() % 16 {
            0..=4 => u32::from(inp.u8() % 24),
            5..=9 => 512 * u32::from(1 + inp.u8() % 8),
            10 | 11 => u32::from(inp.u16()) % 4096,
            12 => 1,
            13 => 0,
            14 => 16,
            _ => inp.u32(),
        };
        let f = inp.u8();
        let mut flags = if i < split { 0 } else { F_WRITE };
        match f % 16 {
            0 => flags ^= F_WRITE,
            1 => flags = u16::from(inp.u8()),
            _ => {}
        }
        if i + 1 < n {
            flags |= F_NEXT;
        } else if f % 16 != 1 {
            flags &= !F_NEXT;
        }
        let next = if f / 16 == 0 {
            inp.u16() % (QUEUE_SIZE + 8)
        } else {
            i + 1
        };
        Desc {
            addr,
            len,
            flags,
            next,
        }
    }

    fn hostile_addr(&self, inp: &mut Input) -> u64 {
        match inp.u8() % 4 {
            0 => self.guest_bytes - u64::from(inp.u8() % 32),
            1 => self.guest_bytes + u64::from(inp.u16()),
            2 => u64::MAX - u64::from(inp.u16()),
            _ => inp.u64(),
        }
    }

    /// What the device must answer for `walk`, from the virtio-blk spec
    /// (header = first 16 readable bytes, status = last writable byte,
    /// data in between, any layout), not from `request::parse`.
    fn model(&self, head: u16, walk: &[Desc]) -> Expect {
        if head >= QUEUE_SIZE {
            return Expect::Dropped;
        }
        if walk.iter().any(|d| !self.in_guest(d.addr, d.len.into())) {
            return Expect::NoStatus;
        }
        let readable: Vec<Desc> = walk.iter().filter(|d| !d.is_write()).copied().collect();
        let r: u64 = readable.iter().map(|d| u64::from(d.len)).sum();
        let w: u64 = walk
            .iter()
            .filter(|d| d.is_write())
            .map(|d| u64::from(d.len))
            .sum();
        if w == 0 {
            return Expect::NoStatus;
        }
        if r < HEADER_BYTES as u64 {
            return Expect::Status(status::IOERR);
        }
        let h = self.gather(&readable, HEADER_BYTES);
        let ty = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
        let range = |len: u64| -> Option<u64> {
            // At most seg_max x size_max (128 x 128 KiB) of data.
            if !len.is_multiple_of(512) || len > 16 << 20 {
                return None;
            }
            let off = sector.checked_mul(512)?;
            (off.checked_add(len)? <= self.backing_bytes).then_some(off)
        };
        match ty {
            types::IN => match range(w - 1) {
                Some(off) => Expect::Read { off, len: w - 1 },
                None => Expect::Status(status::IOERR),
            },
            types::OUT if self.read_only => Expect::Status(status::IOERR),
            types::OUT => match range(r - HEADER_BYTES as u64) {
                Some(off) => {
                    let all = self.gather(&readable, r as usize);
                    Expect::Write {
                        off,
                        data: all[HEADER_BYTES..].to_vec(),
                    }
                }
                None => Expect::Status(status::IOERR),
            },
            types::FLUSH => Expect::Flush,
            types::GET_ID => Expect::GetId {
                n: (w - 1).min(ID_BYTES as u64) as usize,
            },
            // One 16-byte range (max_*_seg is 1) of at most 1 GiB.
            types::DISCARD | types::WRITE_ZEROES if self.read_only => Expect::Status(status::IOERR),
            types::DISCARD | types::WRITE_ZEROES if r != HEADER_BYTES as u64 + 16 => {
                Expect::Status(status::IOERR)
            }
            types::DISCARD | types::WRITE_ZEROES => {
                let all = self.gather(&readable, r as usize);
                let b = &all[HEADER_BYTES..];
                let sector = u64::from_le_bytes(b[0..8].try_into().expect("8 bytes"));
                let n = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
                let flags = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
                let allowed = if ty == types::DISCARD { 0 } else { 1 };
                if flags & !allowed != 0 {
                    return Expect::Status(status::UNSUPP);
                }
                let len = u64::from(n) * 512;
                match sector.checked_mul(512) {
                    Some(off) if n <= 1 << 21 && off.saturating_add(len) <= self.backing_bytes => {
                        Expect::Zero { off, len }
                    }
                    _ => Expect::Status(status::IOERR),
                }
            }
            _ => Expect::Status(status::UNSUPP),
        }
    }
}

/// The model's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Dropped,
    NoStatus,
    Status(u8),
    Read { off: u64, len: u64 },
    Write { off: u64, data: Vec<u8> },
    Zero { off: u64, len: u64 },
    Flush,
    GetId { n: usize },
}

impl Expect {
    fn used_len(&self) -> u32 {
        match self {
            Expect::Dropped | Expect::NoStatus => 0,
            Expect::Status(_) | Expect::Write { .. } | Expect::Zero { .. } | Expect::Flush => 1,
            Expect::Read { len, .. } => *len as u32 + 1,
            Expect::GetId { n } => *n as u32 + 1,
        }
    }

    fn status(&self) -> u8 {
        match self {
            Expect::Status(s) => *s,
            _ => status::OK,
        }
    }

    fn class(&self, o: Outcome) -> Class {
        match self {
            Expect::Dropped => Class::Dropped,
            Expect::NoStatus => Class::NoStatus,
            Expect::Status(s) => Class::Rejected(*s),
            Expect::Read { .. } if o == Outcome::Pending => Class::ReadMiss,
            Expect::Read { .. } => Class::ReadHit,
            Expect::Write { .. } => Class::Write,
            Expect::Zero { .. } => Class::Zeroes,
            Expect::Flush => Class::Flush,
            Expect::GetId { .. } => Class::GetId,
        }
    }
}

/// Set NEXT on all but the last descriptor, linking entry i to i + 1.
fn link(ds: &mut [Desc]) {
    let n = ds.len();
    for (i, d) in ds.iter_mut().enumerate() {
        if i + 1 < n {
            d.flags |= F_NEXT;
            d.next = i as u16 + 1;
        } else {
            d.flags &= !F_NEXT;
            d.next = 0;
        }
    }
}

/// `total` cut into at most `pieces` random, possibly odd-sized, non-empty
/// lengths (none if `total` is 0).
fn split(total: u32, pieces: u8, inp: &mut Input) -> Vec<u32> {
    let mut cuts: Vec<u32> = (1..pieces)
        .filter(|_| total > 1)
        .map(|_| 1 + inp.u32() % (total - 1))
        .collect();
    cuts.push(0);
    cuts.push(total);
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2)
        .map(|w| w[1] - w[0])
        .filter(|&l| l > 0)
        .collect()
}

/// Bytes read as numbers; zeros once they run out.
struct Input<'a> {
    b: &'a [u8],
    i: usize,
}

impl Input<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for o in &mut out {
            *o = self.b.get(self.i).copied().unwrap_or(0);
            self.i += 1;
        }
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}
