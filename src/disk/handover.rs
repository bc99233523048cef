//! Who writes the disk, and handing it to another host in a live migration.
//!
//! A local write-back cache holds the disk's newest data, so a migrating
//! guest's disk must be handed over, not only its memory copied:
//!
//! - While the frontend copies the guest (it logs dirty pages), writes go
//!   to the backing store where nothing is dirty and writeback drains
//!   ([`Engine::set_handing_over`]); the cache mode does not change.
//! - At the switchover the frontend stops every ring; before the last stop
//!   is answered, whatever is still dirty is written back, the store is
//!   flushed, the cache is emptied (its clean data will be stale once the
//!   destination writes) and the store is handed off (an RBD image's lock
//!   released). The destination starts only after that answer.
//! - A pcache claims the store ([`Backing::claim`]) before it first
//!   writes: at start if its cache holds dirty data, else when a guest
//!   starts a ring. A destination, started the ordinary way on an empty
//!   cache, therefore writes nothing until its guest runs.
//! - A cancelled migration (logging stops while the rings run) is back in
//!   its mode at once; a migration that fails after the switchover finds
//!   the source empty and claims the store again when the rings restart.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::backing::Backing;
use crate::engine::Engine;

/// How long a starting ring waits for another client to let go of the
/// store (a migration's source releases it just before the destination
/// starts).
const CLAIM_WAIT: Duration = Duration::from_secs(5);
/// How often a long switchover says what it waits for.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where the disk stands in a live migration, as `pcache status` shows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Not claimed yet: nothing is written to the backing store until a
    /// guest starts (a migration's destination waits here).
    #[default]
    Standby,
    /// Serving a guest, in the cache's mode.
    Serving,
    /// The frontend is copying the guest elsewhere: writes go through, the
    /// cache drains.
    Copying,
    /// The guest stopped for the switchover: writing back what is left.
    SwitchingOver,
    /// The backing store holds everything and was handed off; the cache
    /// was emptied.
    HandedOver,
}

impl Phase {
    /// Every phase, in order.
    pub const ALL: [Phase; 5] = [
        Phase::Standby,
        Phase::Serving,
        Phase::Copying,
        Phase::SwitchingOver,
        Phase::HandedOver,
    ];
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Standby => "standby",
            Phase::Serving => "serving",
            Phase::Copying => "copying",
            Phase::SwitchingOver => "switching-over",
            Phase::HandedOver => "handed-over",
        })
    }
}

/// The last switchover this process made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switchover {
    /// Dirty bytes left when the guest stopped.
    pub dirty_bytes: u64,
    /// From the last ring's stop to the answer (the downtime it added).
    pub millis: u64,
}

/// What status reports of the handover.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverStatus {
    /// The phase now.
    pub phase: Phase,
    /// The last switchover, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_switchover: Option<Switchover>,
}

/// The disk's owner state, shared by every connection of the process.
pub struct Handover {
    engine: Arc<Engine>,
    backing: Arc<dyn Backing>,
    state: Mutex<HandoverStatus>,
}

impl std::fmt::Debug for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handover")
            .field("state", &self.status())
            .finish_non_exhaustive()
    }
}

impl Handover {
    /// The owner state of `engine` in front of `backing`; `claimed`: the
    /// store was claimed already (the cache held dirty data at start).
    pub fn new(engine: Arc<Engine>, backing: Arc<dyn Backing>, claimed: bool) -> Handover {
        let phase = if claimed {
            Phase::Serving
        } else {
            Phase::Standby
        };
        Handover {
            engine,
            backing,
            state: Mutex::new(HandoverStatus {
                phase,
                last_switchover: None,
            }),
        }
    }

    /// The cache.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The backing store.
    pub fn backing(&self) -> &Arc<dyn Backing> {
        &self.backing
    }

    /// The phase and the last switchover.
    pub fn status(&self) -> HandoverStatus {
        *self.state.lock().expect("handover lock")
    }

    fn set_phase(&self, p: Phase) {
        let mut st = self.state.lock().expect("handover lock");
        if st.phase != p {
            tracing::info!(from = %st.phase, to = %p, "disk ownership");
            st.phase = p;
        }
    }

    /// A guest starts a ring (`logging`: while the frontend logs dirty
    /// pages): claim the store if not done, waiting a little for a
    /// previous owner to let go.
    pub fn ring_starting(&self, logging: bool) -> io::Result<()> {
        let phase = self.status().phase;
        if matches!(phase, Phase::Standby | Phase::HandedOver) && !self.engine.is_read_only() {
            let t0 = Instant::now();
            loop {
                match self.backing.claim() {
                    Ok(()) => break,
                    Err(e) if t0.elapsed() < CLAIM_WAIT => {
                        tracing::debug!(error = %e, "claiming the backing store; retrying");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot claim the backing store; the guest's rings are not started");
                        return Err(e);
                    }
                }
            }
        }
        self.engine.set_handing_over(logging);
        self.set_phase(if logging {
            Phase::Copying
        } else {
            Phase::Serving
        });
        Ok(())
    }

    /// The frontend starts (`true`) or stops logging dirty pages while the
    /// guest runs: a migration began, or was cancelled or failed.
    pub fn set_logging(&self, on: bool) {
        let phase = self.status().phase;
        if matches!(phase, Phase::Serving | Phase::Copying) {
            self.engine.set_handing_over(on);
            self.set_phase(if on { Phase::Copying } else { Phase::Serving });
            if on {
                tracing::info!(
                    "live migration: writes go through to the backing store, the cache drains"
                );
            }
        }
    }

    /// The frontend's connection ended: a copy in progress ends with it (a
    /// reconnecting frontend says again that it logs).
    pub fn session_ended(&self) {
        if self.status().phase == Phase::Copying {
            self.set_logging(false);
        }
    }

    /// Every ring stopped while the frontend logs: the switchover. Returns
    /// once the backing store holds every completed write and is handed
    /// off, however long that takes: answering earlier would let the
    /// destination run on a store that lacks them.
    pub fn switchover(&self) {
        if self.status().phase != Phase::Copying {
            return;
        }
        self.set_phase(Phase::SwitchingOver);
        let t0 = Instant::now();
        let dirty = self.engine.stats().snapshot().dirty_bytes;
        // Read-only, nothing was written and nothing is held.
        if !self.engine.is_read_only() {
            self.retry("write back what is dirty", || self.write_back_all());
            self.retry("flush the backing store", || self.backing.flush());
            self.retry("empty the cache", || {
                self.engine
                    .invalidate(Duration::from_secs(60))
                    .map(|_| ())
                    .map_err(io::Error::other)
            });
            self.engine.set_handing_over(false);
            self.retry("hand off the backing store", || self.backing.hand_off());
        }
        let last = Switchover {
            dirty_bytes: dirty,
            millis: t0.elapsed().as_millis() as u64,
        };
        tracing::info!(
            dirty_bytes = last.dirty_bytes,
            millis = last.millis,
            "live migration: switchover done; the backing store holds every write"
        );
        let mut st = self.state.lock().expect("handover lock");
        st.phase = Phase::HandedOver;
        st.last_switchover = Some(last);
    }

    /// Write back everything dirty, waiting for it.
    fn write_back_all(&self) -> io::Result<()> {
        self.engine.request_drain().map_err(io::Error::other)?;
        let mut said = Instant::now();
        while self.engine.is_dirty() {
            if self.engine.has_failed() {
                return Err(io::Error::other("the cache failed"));
            }
            if said.elapsed() >= PROGRESS_EVERY {
                said = Instant::now();
                tracing::warn!(
                    dirty_bytes = self.engine.stats().snapshot().dirty_bytes,
                    "live migration: the switchover waits for writeback"
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Run `f` until it succeeds, saying why not every few seconds.
    fn retry(&self, what: &str, mut f: impl FnMut() -> io::Result<()>) {
        let mut said: Option<Instant> = None;
        while let Err(e) = f() {
            if said.is_none_or(|t| t.elapsed() >= PROGRESS_EVERY) {
                said = Some(Instant::now());
                tracing::error!(error = %e, "live migration: cannot {what}; the switchover waits (the destination must not start)");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
