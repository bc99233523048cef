//! A guest FLUSH: every write completed before it becomes durable.
//!
//! First the cache: its open ksets are closed and persisted (on the
//! queue's thread when that is a fence or a tmpfs msync, else by the
//! persisting thread). Then the backing store, through the queue's backing
//! queue, when writes reached it around the cache: in every mode but
//! write-back, and in write-back mode when a write went around the cache
//! since the last flush. In write-back mode the cache is the durable copy;
//! writeback flushes the store itself before it moves dirty_tail.

use std::sync::atomic::Ordering;

use super::ctx::{with_room, Ctx, JobId, Step};
use super::request::Status;
use super::syncer::{SyncOp, Synced};
use crate::backing::{Completion, IoOp};
use crate::engine::CacheMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Cache,
    Backing,
    BackingSent,
}

/// A flush in progress.
pub(super) struct FlushJob {
    pub tag: u64,
    stage: Stage,
    asked: bool,
    synced: Option<Synced>,
    /// The flag taken for writes around the cache (restored on failure).
    around: bool,
    in_flight: usize,
    failed: bool,
    /// The space epoch at which it last found no room (see `with_room`).
    room: Option<u64>,
}

impl FlushJob {
    pub fn new(tag: u64) -> FlushJob {
        FlushJob {
            tag,
            stage: Stage::Cache,
            asked: false,
            synced: None,
            around: false,
            in_flight: 0,
            failed: false,
            room: None,
        }
    }

    /// Has it started (later writes need not wait behind it)?
    pub fn started(&self) -> bool {
        self.stage != Stage::Cache || self.asked
    }

    /// Backing operations in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn step(&mut self, cx: &mut Ctx, id: JobId) -> Step {
        loop {
            match self.stage {
                Stage::Cache => {
                    let e = &cx.shared.engine;
                    if cx.shared.syncer.is_some() {
                        match self.synced.take() {
                            Some(Synced::Ok) => {}
                            Some(Synced::Failed) => return Step::Done(Status::IoErr),
                            Some(Synced::Retry(epoch)) => {
                                self.room = Some(epoch);
                                return self.ask(cx, id);
                            }
                            None => return self.ask(cx, id),
                        }
                    } else {
                        match with_room(&mut self.room, e, || e.flush()) {
                            Some(Ok(())) => {}
                            None => return Step::Wait,
                            Some(Err(e)) if e.retry_from().is_some() => return Step::Wait,
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "flush failed");
                                return Step::Done(Status::IoErr);
                            }
                        }
                    }
                    self.stage = Stage::Backing;
                }
                Stage::Backing => {
                    let sh = &cx.shared;
                    // Cleared first: a write around the cache that lands
                    // meanwhile sets it again for the next flush.
                    self.around = sh.backing_unflushed.swap(false, Ordering::SeqCst);
                    let needed = self.around || sh.mode() != CacheMode::Writeback;
                    if !needed || sh.cfg.read_only {
                        return Step::Done(Status::Ok);
                    }
                    cx.submit(id, 0, IoOp::Flush);
                    cx.kick();
                    self.in_flight = 1;
                    self.stage = Stage::BackingSent;
                }
                Stage::BackingSent => {
                    if self.in_flight > 0 {
                        return Step::InFlight;
                    }
                    return Step::Done(if self.failed {
                        Status::IoErr
                    } else {
                        Status::Ok
                    });
                }
            }
        }
    }

    /// Ask the persisting thread to flush the cache (once room was freed,
    /// if it last found none).
    fn ask(&mut self, cx: &mut Ctx, id: JobId) -> Step {
        let waiting = self
            .room
            .is_some_and(|w| cx.shared.engine.space_epoch() == w);
        if !self.asked && !waiting {
            self.asked = true;
            cx.ask_sync(SyncOp::Flush, u64::from(id));
        }
        Step::Wait
    }

    /// The persisting thread answered.
    pub fn on_sync(&mut self, s: Synced) {
        self.asked = false;
        self.synced = Some(s);
    }

    /// The backing flush came back.
    pub fn on_io(&mut self, cx: &mut Ctx, c: Completion) {
        self.in_flight = 0;
        if let Err(e) = c.result {
            tracing::warn!(error = %e, "flushing the backing store failed");
            self.failed = true;
            cx.shared
                .backing_unflushed
                .fetch_or(self.around, Ordering::SeqCst);
        }
    }
}
