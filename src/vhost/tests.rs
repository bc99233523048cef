//! Hostile guests: every chain gets a sane completion, none crashes the
//! backend. Each test runs chains through [`harness::Harness`].

use std::sync::atomic::{AtomicUsize, Ordering};

use rand::{Rng, RngCore, SeedableRng};

use super::harness::{
    Class, Desc, Harness, Options, Outcome, F_INDIRECT, F_NEXT, F_WRITE, QUEUE_SIZE,
};
use super::request::status;
use crate::vhost::request::types;
use crate::vhost::{Op, Outcome as Answer};

const SERIAL: &str = "pcache-hostile-0001";

pub(super) fn harness(o: Options) -> Harness {
    static N: AtomicUsize = AtomicUsize::new(0);
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let name = format!(
        "pcache-vhost-test-{}-{}.img",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    Harness::new(&dir.join(name), &o).expect("harness")
}

fn rw() -> Harness {
    harness(Options::default())
}

pub(super) fn hdr(ty: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Offer `descs` (table entries 0.., linked in order), run the chain,
/// finish it if it waits, and return the used length.
fn run(h: &mut Harness, descs: &[Desc]) -> u32 {
    h.offer_chain(descs);
    let len = match h.submit() {
        Outcome::Used(len) => len,
        Outcome::Pending => match h.settle().expect("settle").as_slice() {
            [(id, len)] => {
                assert_eq!(*id, 0);
                *len
            }
            other => panic!("pending chain finished as {other:?}"),
        },
        Outcome::Dropped => panic!("chain dropped"),
    };
    assert_eq!(h.pending(), (0, 0));
    len
}

fn byte(h: &Harness, addr: u64) -> u8 {
    h.read_mem(addr, 1).expect("in guest memory")[0]
}

/// A request with a one-descriptor header at 0x2000, data buffers as
/// given, and a status byte at 0x3000 (pre-set to 0xEE). Returns (used
/// len, status byte).
fn request(h: &mut Harness, header: [u8; 16], data: &[Desc]) -> (u32, u8) {
    assert!(h.write_mem(0x2000, &header));
    assert!(h.write_mem(0x3000, &[0xEE]));
    let mut descs = vec![Desc::r(0x2000, 16)];
    descs.extend_from_slice(data);
    descs.push(Desc::w(0x3000, 1));
    let len = run(h, &descs);
    (len, byte(h, 0x3000))
}

#[test]
fn out_of_range_sectors_get_ioerr() {
    let mut h = rw();
    let cap = h.capacity() / 512;
    for (ty, sector, n) in [
        (types::IN, cap, 512),
        (types::IN, cap - 1, 1024),
        (types::IN, cap + 1000, 4096),
        (types::OUT, cap, 512),
        (types::OUT, cap - 7, 4096),
    ] {
        let data = if ty == types::IN {
            Desc::w(0x4000, n)
        } else {
            Desc::r(0x4000, n)
        };
        let got = request(&mut h, hdr(ty, sector), &[data]);
        assert_eq!(got, (1, status::IOERR), "type {ty} sector {sector} len {n}");
    }
    // The last sector itself is fine.
    let got = request(&mut h, hdr(types::IN, cap - 1), &[Desc::w(0x4000, 512)]);
    assert_eq!(got, (513, status::OK));
}

#[test]
fn sector_times_512_overflow_gets_ioerr() {
    let mut h = rw();
    for sector in [u64::MAX / 512 + 1, u64::MAX, 1 << 55, u64::MAX / 512] {
        let got = request(&mut h, hdr(types::IN, sector), &[Desc::w(0x4000, 512)]);
        assert_eq!(got, (1, status::IOERR), "read at sector {sector:#x}");
        let got = request(&mut h, hdr(types::OUT, sector), &[Desc::r(0x4000, 512)]);
        assert_eq!(got, (1, status::IOERR), "write at sector {sector:#x}");
    }
}

#[test]
fn data_length_not_a_multiple_of_512_gets_ioerr() {
    let mut h = rw();
    for n in [1, 100, 511, 513, 1000, 4095] {
        let got = request(&mut h, hdr(types::OUT, 0), &[Desc::r(0x4000, n)]);
        assert_eq!(got, (1, status::IOERR), "write of {n} bytes");
        let got = request(&mut h, hdr(types::IN, 0), &[Desc::w(0x4000, n)]);
        assert_eq!(got, (1, status::IOERR), "read of {n} bytes");
    }
    // Two odd pieces that add up to 512 are one aligned request.
    let got = request(
        &mut h,
        hdr(types::OUT, 0),
        &[Desc::r(0x4000, 100), Desc::r(0x5000, 412)],
    );
    assert_eq!(got, (1, status::OK));
}

#[test]
fn write_on_a_read_only_disk_gets_ioerr() {
    let mut h = harness(Options {
        read_only: true,
        ..Options::default()
    });
    assert!(h.write_mem(0x4000, &[0x5A; 4096]));
    let got = request(&mut h, hdr(types::OUT, 8), &[Desc::r(0x4000, 4096)]);
    assert_eq!(got, (1, status::IOERR));
    // Reads and flushes still work, and the write left no trace.
    let got = request(&mut h, hdr(types::IN, 8), &[Desc::w(0x4000, 4096)]);
    assert_eq!(got, (4097, status::OK));
    assert_eq!(h.read_mem(0x4000, 4096).unwrap(), vec![0; 4096]);
    assert_eq!(request(&mut h, hdr(types::FLUSH, 0), &[]), (1, status::OK));
}

#[test]
fn unknown_type_gets_unsupp() {
    let mut h = rw();
    for ty in [2, 3, 5, 7, 9, 12, 14, 16, 0x8000_0000, u32::MAX] {
        let got = request(&mut h, hdr(ty, 0), &[Desc::w(0x4000, 512)]);
        assert_eq!(got, (1, status::UNSUPP), "type {ty}");
    }
}

#[test]
fn descriptors_outside_guest_memory_complete_with_used_len_0() {
    let mut h = rw();
    let end = h.guest_bytes();
    assert!(h.write_mem(0x2000, &hdr(types::IN, 0)));
    let status = Desc::w(0x3000, 1);
    let chains: Vec<Vec<Desc>> = vec![
        // Header past the end, straddling it, or wrapping the address space.
        vec![Desc::r(end, 16), status],
        vec![Desc::r(end - 8, 16), status],
        vec![Desc::r(u64::MAX - 7, 16), status],
        vec![Desc::r(u64::MAX, 1), status],
        // Data buffers outside.
        vec![Desc::r(0x2000, 16), Desc::w(end, 512), status],
        vec![Desc::r(0x2000, 16), Desc::w(end - 511, 512), status],
        vec![Desc::r(0x2000, 16), Desc::w(0x4000, u32::MAX), status],
        vec![Desc::r(0x2000, 16), Desc::r(1 << 40, 512), status],
        // The status byte outside.
        vec![Desc::r(0x2000, 16), Desc::w(0x4000, 512), Desc::w(end, 1)],
        vec![Desc::r(0x2000, 16), Desc::w(u64::MAX, 1)],
    ];
    for c in chains {
        assert!(h.write_mem(0x3000, &[0xEE]));
        assert_eq!(run(&mut h, &c), 0, "chain {c:?}");
        assert_eq!(byte(&h, 0x3000), 0xEE, "nothing written for {c:?}");
    }
    // An indirect table outside memory, or of a length that is not a
    // whole number of descriptors: the walk ends, leaving no status.
    for table in [
        Desc {
            addr: end,
            len: 64,
            flags: F_INDIRECT,
            next: 0,
        },
        Desc {
            addr: u64::MAX - 15,
            len: 32,
            flags: F_INDIRECT,
            next: 0,
        },
        Desc {
            addr: 0x8000,
            len: 40,
            flags: F_INDIRECT,
            next: 0,
        },
    ] {
        assert_eq!(run(&mut h, &[table]), 0, "indirect {table:?}");
    }
}

#[test]
fn data_pointing_the_wrong_way_is_neither_read_into_nor_written_from() {
    // Found by the fuzzer: a read whose only data is device-readable (or
    // a write whose only data is device-writable) is a zero-length
    // request; its buffer must be left alone and the disk unchanged.
    let mut h = rw();
    assert!(h.write_mem(0x4000, &[0x5A; 4096]));
    let got = request(&mut h, hdr(types::OUT, 8), &[Desc::r(0x4000, 4096)]);
    assert_eq!(got, (1, status::OK));
    let read_back = |h: &mut Harness| {
        assert!(h.write_mem(0x6000, &[0; 4096]));
        let got = request(h, hdr(types::IN, 8), &[Desc::w(0x6000, 4096)]);
        assert_eq!(got, (4097, status::OK));
        h.read_mem(0x6000, 4096).unwrap()
    };
    assert!(read_back(&mut h) == [0x5A; 4096]);
    // A read with its data in the header's readable descriptor...
    let mut one = hdr(types::IN, 8).to_vec();
    one.extend_from_slice(&[0xAB; 4096]);
    assert!(h.write_mem(0x8000, &one));
    assert!(h.write_mem(0x3000, &[0xEE]));
    let len = run(&mut h, &[Desc::r(0x8000, 16 + 4096), Desc::w(0x3000, 1)]);
    assert_eq!((len, byte(&h, 0x3000)), (1, status::OK));
    assert!(h.read_mem(0x8010, 4096).unwrap() == [0xAB; 4096]);
    // ... or in a readable descriptor of its own.
    assert!(h.write_mem(0x4000, &[0xAB; 4096]));
    let got = request(&mut h, hdr(types::IN, 8), &[Desc::r(0x4000, 4096)]);
    assert_eq!(got, (1, status::OK));
    assert!(h.read_mem(0x4000, 4096).unwrap() == [0xAB; 4096]);
    // A write whose data the device may only write: nothing is written.
    assert!(h.write_mem(0x4000, &[0xC3; 4096]));
    let got = request(&mut h, hdr(types::OUT, 8), &[Desc::w(0x4000, 4096)]);
    assert_eq!(got, (1, status::OK));
    assert!(h.read_mem(0x4000, 4096).unwrap() == [0xC3; 4096]);
    assert!(read_back(&mut h) == [0x5A; 4096]);
}

#[test]
fn chain_without_a_writable_byte_gets_used_len_0() {
    let mut h = rw();
    assert!(h.write_mem(0x2000, &hdr(types::IN, 0)));
    assert_eq!(run(&mut h, &[Desc::r(0x2000, 16)]), 0);
    assert_eq!(run(&mut h, &[Desc::r(0x2000, 16), Desc::w(0x3000, 0)]), 0);
    assert_eq!(run(&mut h, &[Desc::r(0x2000, 16), Desc::r(0x4000, 512)]), 0);
    assert_eq!(run(&mut h, &[Desc::r(0x2000, 0)]), 0);
    // A descriptor loop without a writable byte ends at the queue size.
    h.set_desc(
        0,
        Desc {
            addr: 0x2000,
            len: 16,
            flags: F_NEXT,
            next: 0,
        },
    );
    h.publish(0);
    assert_eq!(h.submit(), Outcome::Used(0));
    // A chain of nothing but empty descriptors.
    let empty: Vec<Desc> = (0..QUEUE_SIZE).map(|_| Desc::w(0, 0)).collect();
    assert_eq!(run(&mut h, &empty), 0);
}

/// `total` bytes at `addr` as descriptors of the given sizes (the last
/// one takes the rest), each followed by a gap.
fn pieces(addr: u64, sizes: &[u32], total: u32, flags: u16) -> Vec<Desc> {
    let mut out = Vec::new();
    let (mut at, mut left) = (addr, total);
    for (i, &s) in sizes.iter().enumerate() {
        let n = if i + 1 == sizes.len() {
            left
        } else {
            s.min(left)
        };
        if n == 0 {
            continue;
        }
        out.push(Desc {
            addr: at,
            len: n,
            flags,
            next: 0,
        });
        at += u64::from(n) + 3;
        left -= n;
    }
    out
}

/// Write `data` at `sector` through a header split as `hs` and data
/// split as `ds`; the status byte is its own descriptor, or comes first
/// in the chain when `status_first` (readable after writable).
fn write_split(
    h: &mut Harness,
    sector: u64,
    data: &[u8],
    hs: &[u32],
    ds: &[u32],
    status_first: bool,
) {
    let header = pieces(0x2000, hs, 16, 0);
    let body = pieces(0x3000, ds, data.len() as u32, 0);
    let mut hb = Vec::new();
    hb.extend_from_slice(&hdr(types::OUT, sector));
    hb.extend_from_slice(data);
    let mut at = 0;
    for d in header.iter().chain(&body) {
        assert!(h.write_mem(d.addr, &hb[at..at + d.len as usize]));
        at += d.len as usize;
    }
    let st = Desc::w(0x1_F000, 1);
    let mut chain = Vec::new();
    if status_first {
        chain.push(st);
    }
    chain.extend(header);
    chain.extend(body);
    if !status_first {
        chain.push(st);
    }
    assert!(h.write_mem(0x1_F000, &[0xEE]));
    assert_eq!(run(h, &chain), 1);
    assert_eq!(byte(h, 0x1_F000), status::OK);
}

/// Read `len` bytes at `sector` into buffers split as `ds`, the status
/// byte sharing the last data descriptor when `merge`.
fn read_split(
    h: &mut Harness,
    sector: u64,
    len: u32,
    hs: &[u32],
    ds: &[u32],
    merge: bool,
) -> Vec<u8> {
    let header = pieces(0x2000, hs, 16, 0);
    let h16 = hdr(types::IN, sector);
    let mut at = 0;
    for d in &header {
        assert!(h.write_mem(d.addr, &h16[at..at + d.len as usize]));
        at += d.len as usize;
    }
    let mut body = pieces(0x8000, ds, len + u32::from(merge), F_WRITE);
    for d in &body {
        assert!(h.write_mem(d.addr, &vec![0xA5; d.len as usize]));
    }
    if !merge {
        body.push(Desc::w(0x1_F000, 1));
    }
    let last = *body.last().unwrap();
    let st_addr = last.addr + u64::from(last.len) - 1;
    let mut chain = header;
    chain.extend(body.iter().copied());
    assert_eq!(run(h, &chain), len + 1);
    assert_eq!(byte(h, st_addr), status::OK);
    let mut got = Vec::new();
    for d in &body {
        got.extend(h.read_mem(d.addr, d.len as usize).unwrap());
    }
    got.truncate(len as usize);
    got
}

#[test]
fn header_and_data_split_across_odd_descriptors_round_trip() {
    let mut h = rw();
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + i / 509) as u8).collect();
    // Fixed awkward layouts first.
    write_split(
        &mut h,
        40,
        &data[..4096],
        &[3, 13],
        &[1, 511, 1000, 2584],
        false,
    );
    assert_eq!(
        read_split(&mut h, 40, 4096, &[1, 1, 14], &[7, 4089], true),
        &data[..4096]
    );
    write_split(&mut h, 100, &data, &[16], &[8191, 1], true);
    assert_eq!(
        read_split(&mut h, 100, 8192, &[15, 1], &[1; 1], false),
        data
    );
    // A read straddling written and never-written sectors (a partial
    // hit: the rest comes from the backing store).
    let mut want = vec![0u8; 2048];
    want[1024..].copy_from_slice(&data[..1024]);
    assert_eq!(
        read_split(&mut h, 98, 2048, &[5, 11], &[333, 1715], false),
        want
    );

    // Then random layouts, each write read back through another.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0001);
    let cuts = |rng: &mut rand::rngs::StdRng, total: u32, max: usize| -> Vec<u32> {
        let n = rng.gen_range(1..=max);
        (0..n).map(|_| rng.gen_range(1..=total)).collect()
    };
    for round in 0..40 {
        let sectors = rng.gen_range(1..=16u32);
        let len = sectors * 512;
        let sector = rng.gen_range(0..(h.capacity() / 512 - u64::from(sectors)));
        let mut buf = vec![0u8; len as usize];
        rng.fill_bytes(&mut buf);
        let (hs, ds) = (cuts(&mut rng, 16, 4), cuts(&mut rng, len, 8));
        write_split(&mut h, sector, &buf, &hs, &ds, rng.gen());
        let (hs, ds) = (cuts(&mut rng, 16, 4), cuts(&mut rng, len, 8));
        let got = read_split(&mut h, sector, len, &hs, &ds, rng.gen());
        assert!(
            got == buf,
            "round {round}: {len} bytes at sector {sector} differ"
        );
    }
}

#[test]
fn get_id_returns_the_serial() {
    let mut h = rw();
    let mut want = [0u8; 20];
    want[..SERIAL.len()].copy_from_slice(SERIAL.as_bytes());
    for (buf, used) in [(20u32, 21u32), (8, 9), (40, 21), (0, 1)] {
        assert!(h.write_mem(0x4000, &[0xA5; 40]));
        let data = if buf > 0 {
            vec![Desc::w(0x4000, buf)]
        } else {
            vec![]
        };
        let got = request(&mut h, hdr(types::GET_ID, 0), &data);
        assert_eq!(got, (used, status::OK), "buffer of {buf}");
        let n = (used - 1) as usize;
        assert_eq!(h.read_mem(0x4000, n).unwrap(), &want[..n]);
    }
    // Split over odd buffers, the status byte sharing the last.
    assert!(h.write_mem(0x2000, &hdr(types::GET_ID, 0)));
    let chain = [
        Desc::r(0x2000, 16),
        Desc::w(0x4000, 3),
        Desc::w(0x5000, 17),
        Desc::w(0x6000, 1),
    ];
    assert_eq!(run(&mut h, &chain), 21);
    let mut got = h.read_mem(0x4000, 3).unwrap();
    got.extend(h.read_mem(0x5000, 17).unwrap());
    assert_eq!(got, want);
    assert_eq!(byte(&h, 0x6000), status::OK);
}

#[test]
fn head_index_past_the_queue_is_dropped_and_the_queue_keeps_working() {
    let mut h = rw();
    assert!(h.write_mem(0x2000, &hdr(types::FLUSH, 0)));
    h.set_desc(
        0,
        Desc {
            addr: 0x2000,
            len: 16,
            flags: F_NEXT,
            next: 1,
        },
    );
    h.set_desc(1, Desc::w(0x3000, 1));
    // Through the worker's own path: a bad head, then a good chain.
    h.publish_many(&[QUEUE_SIZE, u16::MAX, 0]);
    h.kick().expect("a bad head must not end the worker");
    assert_eq!(h.take_used(), vec![(0, 1)]);
    assert_eq!(byte(&h, 0x3000), status::OK);
    // And through submit.
    h.publish(QUEUE_SIZE + 3);
    assert_eq!(h.submit(), Outcome::Dropped);
    h.publish(0);
    assert_eq!(h.submit(), Outcome::Used(1));
}

#[test]
fn guest_rewriting_a_pending_read_changes_nothing_of_its_answer() {
    // A request's buffers are mapped when it is taken, as a device is given
    // them for DMA: whatever the guest writes into its descriptor table
    // while the read waits, the answer goes where the request said, and
    // nowhere else.
    let mut h = rw();
    let mut sector = 1000;
    let mut read = |h: &mut Harness| {
        sector += 8;
        assert!(h.write_mem(0x2000, &hdr(types::IN, sector)));
        h.offer_chain(&[
            Desc::r(0x2000, 16),
            Desc::w(0x4000, 4096),
            Desc::w(0x3000, 1),
        ]);
        // Nothing is cached there: the read waits for the backing store.
        assert_eq!(h.submit_with(false), Outcome::Pending);
        assert_eq!(h.pending(), (1, 0));
        sector
    };
    let linked = |d: Desc| Desc {
        flags: d.flags | F_NEXT,
        next: 2,
        ..d
    };
    let rewrites: [&dyn Fn(&Harness); 4] = [
        // Every writable descriptor turned readable.
        &|h| {
            h.set_desc(1, linked(Desc::r(0x4000, 4096)));
            h.set_desc(2, Desc::r(0x3000, 1));
        },
        // The data moved elsewhere, or outside guest memory.
        &|h| h.set_desc(1, linked(Desc::w(0x8000, 512))),
        &|h| h.set_desc(1, linked(Desc::w(h.guest_bytes(), 4096))),
        // The chain cut short: the header alone.
        &|h| h.set_desc(0, Desc::r(0x2000, 16)),
    ];
    for rewrite in rewrites {
        assert!(h.write_mem(0x4000, &[0xA5; 4096]));
        assert!(h.write_mem(0x8000, &[0x5A; 512]));
        let s = read(&mut h) as usize;
        rewrite(&h);
        assert_eq!(h.settle().unwrap(), vec![(0, 4097)]);
        assert_eq!(byte(&h, 0x3000), status::OK);
        let want = h.shadow()[s * 512..s * 512 + 4096].to_vec();
        assert_eq!(h.read_mem(0x4000, 4096).unwrap(), want);
        assert_eq!(h.read_mem(0x8000, 512).unwrap(), vec![0x5A; 512]);
    }
}

/// Runs `cases` random chains through `Harness::run_case` (which checks
/// each answer against its model and a shadow of the disk) and returns
/// how many fell in each class.
fn random_chains(
    h: &mut Harness,
    seed: u64,
    cases: usize,
) -> std::collections::BTreeMap<Class, usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seen = std::collections::BTreeMap::new();
    let mut buf = Vec::new();
    for i in 0..cases {
        let n = rng.gen_range(0..256);
        buf.resize(n, 0);
        rng.fill_bytes(&mut buf);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.run_case(&buf)));
        match r {
            Ok(rep) => *seen.entry(rep.class).or_insert(0) += 1,
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!("case {i} (seed {seed:#x}) input {buf:02x?}: {msg}");
            }
        }
    }
    // Every chain answered is counted once, whichever path answered it.
    let q = &h.counters().queues()[0];
    let count = |outcome| {
        Op::ALL
            .iter()
            .map(|op| q.requests(*op, outcome))
            .sum::<u64>()
    };
    let total: u64 = Answer::ALL.iter().map(|o| count(*o)).sum();
    let dropped = seen.get(&Class::Dropped).copied().unwrap_or(0);
    assert_eq!(total, (cases - dropped) as u64, "{seen:?}");
    assert_eq!(q.latency().snapshot().count(), total);
    let unsupp = seen.get(&Class::Rejected(status::UNSUPP)).copied();
    assert_eq!(count(Answer::Unsupp), unsupp.unwrap_or(0) as u64);
    seen
}

#[test]
fn ten_thousand_random_chains_never_panic_and_always_complete_sanely() {
    let mut h = rw();
    let seen = random_chains(&mut h, 0x0bad_c0de_0000_0001, 10_000);
    eprintln!("classes: {seen:?}");
    // The generator reaches every kind of answer, not just rejections.
    for (class, min) in [
        (Class::Dropped, 10),
        (Class::NoStatus, 200),
        (Class::Rejected(status::IOERR), 200),
        (Class::Rejected(status::UNSUPP), 50),
        (Class::ReadHit, 50),
        (Class::ReadMiss, 50),
        (Class::Write, 200),
        (Class::Zeroes, 30),
        (Class::Flush, 50),
        (Class::GetId, 50),
    ] {
        let n = seen.get(&class).copied().unwrap_or(0);
        assert!(
            n >= min,
            "only {n} cases of {class:?} (want {min}): {seen:?}"
        );
    }
}

#[test]
fn random_chains_on_a_read_only_disk() {
    let mut h = harness(Options {
        read_only: true,
        ..Options::default()
    });
    let seen = random_chains(&mut h, 0x0bad_c0de_0000_0002, 1_000);
    assert!(!seen.contains_key(&Class::Write), "{seen:?}");
    assert!(!seen.contains_key(&Class::Zeroes), "{seen:?}");
}

#[test]
fn answered_requests_are_counted_by_op_and_outcome() {
    let mut h = rw();
    let cap = h.capacity() / 512;
    assert!(h.write_mem(0x4000, &[0x5A; 4096]));
    let got = request(&mut h, hdr(types::OUT, 8), &[Desc::r(0x4000, 4096)]);
    assert_eq!(got, (1, status::OK));
    // A hit, then a miss, which waits for the backing store.
    let got = request(&mut h, hdr(types::IN, 8), &[Desc::w(0x4000, 4096)]);
    assert_eq!(got, (4097, status::OK));
    let got = request(&mut h, hdr(types::IN, 64), &[Desc::w(0x4000, 4096)]);
    assert_eq!(got, (4097, status::OK));
    let got = request(&mut h, hdr(types::IN, cap), &[Desc::w(0x4000, 512)]);
    assert_eq!(got, (1, status::IOERR));
    let got = request(&mut h, hdr(7, 0), &[Desc::w(0x4000, 512)]);
    assert_eq!(got, (1, status::UNSUPP));
    assert_eq!(request(&mut h, hdr(types::FLUSH, 0), &[]), (1, status::OK));

    let q = &h.counters().queues()[0];
    assert_eq!(q.requests(Op::Write, Answer::Ok), 1);
    assert_eq!(q.bytes(Op::Write, Answer::Ok), 4096);
    assert_eq!(q.requests(Op::Read, Answer::Ok), 2);
    assert_eq!(q.bytes(Op::Read, Answer::Ok), 8192);
    assert_eq!(q.requests(Op::Read, Answer::IoErr), 1);
    assert_eq!(
        q.bytes(Op::Read, Answer::IoErr),
        0,
        "rejected before its length counts"
    );
    assert_eq!(q.requests(Op::Other, Answer::Unsupp), 1);
    assert_eq!(q.requests(Op::Flush, Answer::Ok), 1);
    assert_eq!(q.latency().snapshot().count(), 6);
}

/// The pages set in a dirty-log bitmap.
fn dirty_pages(log: &std::fs::File) -> Vec<u64> {
    let mut b = vec![0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(log, &mut b, 0).expect("read the log");
    std::os::unix::fs::FileExt::write_all_at(log, &[0u8; 4096], 0).expect("clear the log");
    (0..b.len() as u64 * 8)
        .filter(|p| b[(p / 8) as usize] & (1 << (p % 8)) != 0)
        .collect()
}

#[test]
fn while_logging_every_page_the_device_writes_is_marked_and_no_other() {
    let mut h = rw();
    // SAFETY: a plain memfd_create call with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"pcache-test-log".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: the fd is ours.
    let log = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    log.set_len(4096).unwrap();
    // Not logging: a read marks nothing.
    let (_, st) = request(&mut h, hdr(types::IN, 0), &[Desc::w(0x10000, 4096)]);
    assert_eq!(st, status::OK);
    h.log_dirty(Some((&log, 4096))).unwrap();
    assert_eq!(dirty_pages(&log), Vec::<u64>::new());

    // A read: its data buffer (pages 16-17: it straddles them), the status
    // byte (page 3) and the used ring (page 1); not the header (page 2).
    let (_, st) = request(&mut h, hdr(types::IN, 8), &[Desc::w(0x10800, 4096)]);
    assert_eq!(st, status::OK);
    assert_eq!(dirty_pages(&log), vec![1, 3, 16, 17]);

    // A write: only the status byte and the used ring; its data is read.
    let (_, st) = request(&mut h, hdr(types::OUT, 8), &[Desc::r(0x20000, 4096)]);
    assert_eq!(st, status::OK);
    assert_eq!(dirty_pages(&log), vec![1, 3]);

    // A read through an indirect table (at page 5): its buffers at pages
    // 48 and 56.
    assert!(h.write_mem(0x2000, &hdr(types::IN, 16)));
    let table = [
        Desc {
            next: 1,
            flags: F_NEXT,
            ..Desc::r(0x2000, 16)
        },
        Desc {
            next: 2,
            flags: F_NEXT | F_WRITE,
            ..Desc::w(0x30000, 512)
        },
        Desc {
            next: 3,
            flags: F_NEXT | F_WRITE,
            ..Desc::w(0x38000, 512)
        },
        Desc::w(0x3000, 1),
    ];
    for (i, d) in table.iter().enumerate() {
        assert!(h.write_desc_at(0x5000 + 16 * i as u64, *d));
    }
    let len = run(
        &mut h,
        &[Desc {
            addr: 0x5000,
            len: 64,
            flags: F_INDIRECT,
            next: 0,
        }],
    );
    assert_eq!(len, 1025);
    assert_eq!(dirty_pages(&log), vec![1, 3, 48, 56]);

    // Logging stopped (the migration was cancelled): nothing marked.
    h.log_dirty(None).unwrap();
    let (_, st) = request(&mut h, hdr(types::IN, 0), &[Desc::w(0x10000, 4096)]);
    assert_eq!(st, status::OK);
    assert_eq!(dirty_pages(&log), Vec::<u64>::new());
}
