//! A queue worker never spins on a ring it cannot take from: one being
//! stopped, or one whose available index a driver broke.

use super::harness::{Desc, Options, QUEUE_SIZE};
use super::request::types;
use super::tests::{harness, hdr};

/// A one-sector write at sector 0 (it completes at once, in the cache),
/// its header written into guest memory.
fn write_chain(h: &super::harness::Harness) -> [Desc; 3] {
    assert!(h.write_mem(0x2000, &hdr(types::OUT, 0)));
    [
        Desc::r(0x2000, 16),
        Desc::r(0x10000, 512),
        Desc::w(0x3000, 1),
    ]
}

#[test]
fn a_worker_polling_a_ring_that_is_being_stopped_does_not_spin() {
    worker_on_a_ring_being_stopped(false);
}

#[test]
fn a_worker_re_enabling_notifications_on_a_ring_being_stopped_does_not_spin() {
    worker_on_a_ring_being_stopped(true);
}

fn worker_on_a_ring_being_stopped(event_idx: bool) {
    let mut h = harness(Options {
        poll_us: 100_000,
        ..Options::default()
    });
    h.set_event_idx(event_idx);
    let write = write_chain(&h);
    // Batches in quick succession open the polling window.
    for _ in 0..12 {
        h.offer_chain(&write);
        h.kick().expect("kick");
    }
    assert_eq!(h.take_used().len(), 12);
    // The frontend stops the ring while the driver has a request available
    // that the worker has not taken: it stays for the next backend, and
    // the worker must go back to sleep rather than poll for it forever
    // (the frontend's GET_VRING_BASE waits for the worker's queue lock).
    h.offer_chain(&write);
    h.set_ready(false);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = h.kick();
        let _ = tx.send((r.is_ok(), h.take_used().len()));
    });
    let (ok, used) = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the worker kept polling a ring that is not ready");
    assert!(ok);
    assert_eq!(used, 0, "a request was taken from a stopped ring");
}

/// A driver that sets its available index further ahead than the ring
/// holds (nothing can be taken from it) does not get a worker spinning on
/// it, with or without EVENT_IDX and polling; the queue serves again once
/// the index is sane. (Found by the `frontend` fuzz target.)
#[test]
fn an_available_index_past_the_ring_does_not_make_the_worker_spin() {
    for event_idx in [false, true] {
        let mut h = harness(Options {
            poll_us: 100_000,
            ..Options::default()
        });
        h.set_event_idx(event_idx);
        let write = write_chain(&h);
        h.offer_chain(&write);
        h.kick().expect("kick");
        assert_eq!(h.take_used().len(), 1);
        let next = h.read_mem(super::harness::AVAIL_RING + 2, 2).unwrap();
        let next = u16::from_le_bytes([next[0], next[1]]);
        // Ahead by more than the ring's 256 entries.
        let avail_idx = super::harness::AVAIL_RING + 2;
        assert!(h.write_mem(avail_idx, &next.wrapping_add(QUEUE_SIZE + 7).to_le_bytes()));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = h.kick();
            let _ = tx.send((r.is_ok(), h));
        });
        let (ok, mut h) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the worker spins on a broken available index");
        assert!(ok);
        assert!(h.take_used().is_empty());
        // Sane again: the next request is served.
        assert!(h.write_mem(avail_idx, &next.to_le_bytes()));
        h.offer_chain(&write);
        h.kick().expect("kick");
        assert_eq!(h.take_used().len(), 1, "event_idx {event_idx}");
    }
}
