//! What the guest asked of each queue: requests and bytes by operation and
//! outcome, and how long they took to complete.
//!
//! [`Counters`] lives as long as the process (a reconnecting frontend
//! carries on counting where the last one stopped); the metrics exporter
//! and `pcache status` read it. Each queue writes its own
//! [`QueueCounters`] through a [`Track`], which remembers what it needs of
//! each request it has taken (when, what, how many bytes) in a table by
//! descriptor head until the request is answered: a clock read and a few
//! relaxed atomic adds per request, no lock, no allocation.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::chain::Done;
use super::latency::{bump, Buckets, Histogram};
use super::request::{status, types, RequestKind, HEADER_BYTES};

/// A request's operation, from the type in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
    /// Any other type, or no readable header.
    Other,
}

impl Op {
    /// Every operation, in the order of the counters.
    pub const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Discard,
        Op::WriteZeroes,
        Op::GetId,
        Op::Other,
    ];

    /// Its name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Discard => "discard",
            Op::WriteZeroes => "write_zeroes",
            Op::GetId => "get_id",
            Op::Other => "other",
        }
    }

    /// The operation a header asks for.
    pub fn of_header(header: Option<&[u8; HEADER_BYTES]>) -> Op {
        let Some(h) = header else {
            return Op::Other;
        };
        match u32::from_le_bytes([h[0], h[1], h[2], h[3]]) {
            types::IN => Op::Read,
            types::OUT => Op::Write,
            types::FLUSH => Op::Flush,
            types::DISCARD => Op::Discard,
            types::WRITE_ZEROES => Op::WriteZeroes,
            types::GET_ID => Op::GetId,
            _ => Op::Other,
        }
    }
}

/// How a request ended: the status the guest was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// VIRTIO_BLK_S_OK.
    Ok,
    /// VIRTIO_BLK_S_IOERR, or no status at all (a broken chain).
    IoErr,
    /// VIRTIO_BLK_S_UNSUPP.
    Unsupp,
}

impl Outcome {
    /// Every outcome, in the order of the counters.
    pub const ALL: [Outcome; 3] = [Outcome::Ok, Outcome::IoErr, Outcome::Unsupp];

    /// Its name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::IoErr => "ioerr",
            Outcome::Unsupp => "unsupp",
        }
    }

    fn of_status(s: u8) -> Outcome {
        match s {
            status::OK => Outcome::Ok,
            status::UNSUPP => Outcome::Unsupp,
            _ => Outcome::IoErr,
        }
    }
}

type Table = [[AtomicU64; Outcome::ALL.len()]; Op::ALL.len()];

/// One queue's counters.
#[derive(Debug, Default)]
pub struct QueueCounters {
    requests: Table,
    bytes: Table,
    latency: Histogram,
}

impl QueueCounters {
    /// Requests answered with `outcome`.
    pub fn requests(&self, op: Op, outcome: Outcome) -> u64 {
        self.requests[op as usize][outcome as usize].load(Ordering::Relaxed)
    }

    /// Data bytes of those requests (a read's or write's data, a discarded
    /// or zeroed range; what was asked, whatever the outcome).
    pub fn bytes(&self, op: Op, outcome: Outcome) -> u64 {
        self.bytes[op as usize][outcome as usize].load(Ordering::Relaxed)
    }

    /// Time from taking a request off the ring to putting it in the used
    /// ring.
    pub fn latency(&self) -> &Histogram {
        &self.latency
    }
}

/// Every queue's counters, kept for the life of the process.
pub struct Counters {
    queues: Box<[QueueCounters]>,
}

impl Counters {
    /// Counters for `num_queues` queues, all zero.
    pub fn new(num_queues: u16) -> Arc<Counters> {
        Arc::new(Counters {
            queues: (0..num_queues).map(|_| QueueCounters::default()).collect(),
        })
    }

    /// Each queue's.
    pub fn queues(&self) -> &[QueueCounters] {
        &self.queues
    }

    /// The latency histograms of all queues added up.
    pub fn latency(&self) -> Buckets {
        let mut all = Buckets::default();
        for q in self.queues.iter() {
            all.add(&q.latency.snapshot());
        }
        all
    }
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counters({} queues)", self.queues.len())
    }
}

/// What a queue remembers of a request until it is answered.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// When it was taken; None once answered.
    taken: Option<Instant>,
    op: Op,
    bytes: u64,
}

const IDLE: Slot = Slot {
    taken: None,
    op: Op::Other,
    bytes: 0,
};

/// A queue's side of its counters: the requests in flight, by head.
pub struct Track {
    counters: Arc<Counters>,
    q: usize,
    /// By descriptor head; a head names one request at a time.
    slots: Vec<Slot>,
    /// Heads at or past this (the largest ring accepted) are not tracked:
    /// no ring has them, and a hostile driver's are dropped unanswered.
    max_heads: usize,
}

impl Track {
    /// Tracking for queue `q` of `counters`, whose rings have at most
    /// `max_heads` entries.
    pub fn new(counters: Arc<Counters>, q: usize, max_heads: u16) -> Track {
        assert!(q < counters.queues.len(), "queue {q} has no counters");
        Track {
            counters,
            q,
            slots: Vec::new(),
            max_heads: max_heads as usize,
        }
    }

    /// The request at `head` was taken at `at`.
    pub fn begin(&mut self, head: u16, at: Instant) {
        let i = head as usize;
        if i >= self.max_heads {
            return;
        }
        if i >= self.slots.len() {
            // Grows a few times per connection at most, up to the ring.
            let n = (i + 1).next_power_of_two().clamp(256, self.max_heads);
            self.slots.resize(n, IDLE);
        }
        self.slots[i] = Slot {
            taken: Some(at),
            ..IDLE
        };
    }

    /// The request at `head` has this header (None: none readable).
    pub fn header(&mut self, head: u16, header: Option<&[u8; HEADER_BYTES]>) {
        if let Some(s) = self.slots.get_mut(head as usize) {
            s.op = Op::of_header(header);
        }
    }

    /// The request at `head` parsed as `kind`.
    pub fn parsed(&mut self, head: u16, kind: &RequestKind) {
        if let Some(s) = self.slots.get_mut(head as usize) {
            s.bytes = match *kind {
                RequestKind::Read { len, .. }
                | RequestKind::Write { len, .. }
                | RequestKind::Zeroes { len, .. } => len,
                RequestKind::Flush | RequestKind::GetId => 0,
            };
        }
    }

    /// Count a request answered now; returns now. One never begun (or
    /// answered twice) is not counted.
    pub fn done(&mut self, d: &Done) -> Instant {
        let now = Instant::now();
        let Some(s) = self.slots.get_mut(d.head as usize) else {
            return now;
        };
        let Some(taken) = s.taken.take() else {
            return now;
        };
        let c = &self.counters.queues[self.q];
        let (op, out) = (s.op as usize, Outcome::of_status(d.status) as usize);
        // The queue's lock holder is the only writer.
        bump(&c.requests[op][out], 1);
        bump(&c.bytes[op][out], s.bytes);
        c.latency.record(now.saturating_duration_since(taken));
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(ty: u32) -> [u8; HEADER_BYTES] {
        let mut h = [0u8; HEADER_BYTES];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h
    }

    #[test]
    fn requests_are_counted_by_op_and_outcome_once() {
        let c = Counters::new(2);
        let mut t = Track::new(c.clone(), 1, 1024);
        t.begin(300, Instant::now());
        t.header(300, Some(&hdr(types::IN)));
        t.parsed(300, &RequestKind::Read { off: 0, len: 4096 });
        let d = Done::new(300, 4097, status::OK);
        t.done(&d);
        t.done(&d); // a second answer of one request is not counted
        t.begin(3, Instant::now());
        t.header(3, Some(&hdr(99)));
        t.done(&Done::new(3, 1, status::UNSUPP));
        t.begin(4, Instant::now());
        t.header(4, None);
        t.done(&Done::unanswered(4));
        t.done(&Done::new(5, 1, status::OK)); // never begun
        t.begin(1024, Instant::now()); // past the largest ring: not tracked
        t.done(&Done::unanswered(1024));

        let q = &c.queues()[1];
        assert_eq!(q.requests(Op::Read, Outcome::Ok), 1);
        assert_eq!(q.bytes(Op::Read, Outcome::Ok), 4096);
        assert_eq!(q.requests(Op::Other, Outcome::Unsupp), 1);
        assert_eq!(q.requests(Op::Other, Outcome::IoErr), 1);
        assert_eq!(q.latency().snapshot().count(), 3);
        assert_eq!(c.queues()[0].latency().snapshot().count(), 0);
        assert_eq!(c.latency().count(), 3);
    }

    #[test]
    fn ops_by_header_type() {
        for (ty, op) in [
            (types::IN, Op::Read),
            (types::OUT, Op::Write),
            (types::FLUSH, Op::Flush),
            (types::DISCARD, Op::Discard),
            (types::WRITE_ZEROES, Op::WriteZeroes),
            (types::GET_ID, Op::GetId),
            (7, Op::Other),
        ] {
            assert_eq!(Op::of_header(Some(&hdr(ty))), op);
        }
        assert_eq!(Op::of_header(None), Op::Other);
        for (i, op) in Op::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i);
        }
        for (i, o) in Outcome::ALL.iter().enumerate() {
            assert_eq!(*o as usize, i);
        }
    }
}
