//! The frontend's messages: pcache's own handler on the vhost crate's
//! request-handler trait.
//!
//! vhost-user-backend's handler answers the inflight messages "not
//! supported" and is private to that crate, so pcache handles the protocol
//! itself: memory table, features, ring setup, start and stop, config
//! space and the inflight region. A ring starts when it has a kick fd
//! (and is enabled); starting it first reads its part of the inflight
//! region, sets where the ring resumes and queues the requests the previous
//! backend took and did not return. Stopping it (GET_VRING_BASE) finishes
//! every request taken from it before the base is returned.
//!
//! Live migration: the frontend shares a dirty log (SET_LOG_BASE) and sets
//! VHOST_F_LOG_ALL while it copies the guest, and clears it if the
//! migration is cancelled; the last ring stopped while it logs is the
//! switchover, answered only once the disk is handed over
//! ([`crate::disk::handover`]).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Backend, Error, GpuBackend, Result, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
};

use super::device::Device;
use super::guest::{Mem, Vring};
use super::inflight::InflightRegion;
use super::ring::{chains_for, Ring};
use super::shm::{guest_region, Owner};
use super::worker::Worker;

/// Memory slots offered (the kernel's vhost limit, as QEMU's libvhost-user).
const MAX_MEM_SLOTS: u64 = 509;

/// Where a frontend's virtual addresses land in guest memory.
#[derive(Debug)]
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

/// The state of one frontend connection's vhost-user session.
pub struct Handler {
    dev: Arc<Device>,
    vrings: Vec<Vring>,
    workers: Vec<Worker>,
    owned: bool,
    acked_features: u64,
    acked_protocol: u64,
    mappings: Vec<AddrMapping>,
    inflight: Option<Arc<InflightRegion>>,
    backend_req: Option<Backend>,
}

fn req_err(e: impl std::fmt::Display) -> Error {
    Error::ReqHandlerError(io::Error::other(e.to_string()))
}

impl Handler {
    /// A session for `dev`, with one worker thread per queue.
    pub fn new(dev: Arc<Device>) -> io::Result<Handler> {
        let n = dev.num_queues();
        let mut vrings = Vec::with_capacity(n);
        let mut workers = Vec::with_capacity(n);
        for q in 0..n {
            vrings.push(
                Vring::new(dev.memory().clone(), dev.max_queue_size()).map_err(io::Error::other)?,
            );
            workers.push(Worker::start(dev.clone(), q)?);
        }
        Ok(Handler {
            dev,
            vrings,
            workers,
            owned: false,
            acked_features: 0,
            acked_protocol: 0,
            mappings: Vec::new(),
            inflight: None,
            backend_req: None,
        })
    }

    fn vring(&self, index: u32) -> Result<&Vring> {
        self.vrings.get(index as usize).ok_or(Error::InvalidParam)
    }

    fn vmm_va_to_gpa(&self, va: u64) -> Result<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| va - m.vmm_addr + m.gpa_base)
            .ok_or_else(|| req_err(format!("address {va:#x} is in no memory region")))
    }

    /// Does the frontend log dirty pages (it is migrating the guest)?
    fn logging(&self) -> bool {
        self.acked_features & super::config::bits::LOG_ALL != 0
    }

    fn inflight_on(&self) -> bool {
        self.acked_protocol & VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits() != 0
    }

    /// Watch the ring's kick while it is started and enabled.
    fn update_registration(&mut self, q: usize) {
        let vring = &self.vrings[q];
        let st = vring.get_ref();
        let fd = (st.get_queue().ready() && st.is_enabled())
            .then(|| st.get_kick().as_ref().map(|k| k.as_raw_fd()))
            .flatten();
        drop(st);
        self.workers[q].set_kick(fd);
        if fd.is_some() {
            // Requests the driver queued before we watched, or that a
            // previous backend left, run now.
            self.workers[q].wake();
        }
    }

    /// A ring got its kick fd (and, with it, everything it needs): start
    /// it. With an inflight region, resume where the previous backend
    /// stopped and queue the requests it left unreturned.
    fn start_ring(&mut self, q: usize) -> Result<()> {
        // The first write may follow at once: the store must be ours.
        self.dev
            .conn
            .disk
            .handover()
            .ring_starting(self.logging())
            .map_err(Error::ReqHandlerError)?;
        let vring = self.vrings[q].clone();
        vring.set_queue_ready(true);
        let mut resubmit = Vec::new();
        let mut tracker = None;
        if let (true, Some(region)) = (self.inflight_on(), &self.inflight) {
            tracker = region.queue(q);
        }
        if let Some(t) = &tracker {
            let used = vring.queue_used_idx().map_err(req_err)?;
            let size = vring.get_ref().get_queue().size();
            let rec = t.recover(used, size);
            if let Some(next) = rec.next_avail {
                vring.set_queue_next_avail(next);
            }
            if !rec.resubmit.is_empty() {
                tracing::info!(
                    queue = q,
                    n = rec.resubmit.len(),
                    "running again the requests the previous backend left"
                );
            }
            resubmit = chains_for(&vring, self.dev.memory(), &rec.resubmit)
                .map_err(Error::ReqHandlerError)?;
        }
        {
            let mut qs = self.dev.queues[q].lock().expect("queue lock");
            qs.ring = Some(Ring::new(
                vring.clone(),
                tracker,
                self.dev.conn.log.clone(),
                self.dev.memory().clone(),
            ));
            qs.resubmit = resubmit.into();
        }
        // A previous backend may have returned requests without telling
        // the driver.
        let _ = vring.signal_used_queue();
        self.update_registration(q);
        Ok(())
    }

    /// Start the ring if it has become ready to start.
    fn maybe_start(&mut self, q: usize) -> Result<()> {
        let needs = {
            let st = self.vrings[q].get_ref();
            !st.get_queue().ready() && st.get_kick().is_some()
        };
        if needs {
            self.start_ring(q)?;
        }
        Ok(())
    }

    fn replace_memory(&mut self, mem: Mem) {
        tracing::debug!(regions = mem.iter().count(), "guest memory table");
        self.dev.memory().lock().expect("memory lock").replace(mem);
    }

    /// Has any ring been started (and not stopped)?
    fn any_started(&self) -> bool {
        self.dev
            .queues
            .iter()
            .any(|q| q.lock().expect("queue lock").ring.is_some())
    }

    /// Stop every started ring and its worker (the connection is over).
    pub fn stop_all(&mut self) {
        for q in 0..self.vrings.len() {
            self.workers[q].set_kick(None);
        }
        self.workers.clear();
    }
}

/// Map a region of the frontend's memory table, checked first; a refusal
/// is logged (the error ends the connection).
fn map_region(file: &File, offset: u64, size: u64) -> Result<MmapRegion<Owner>> {
    guest_region(file, offset, size).map_err(|e| {
        tracing::error!(error = %e, "refusing the frontend's memory table; closing the connection");
        Error::ReqHandlerError(e)
    })
}

impl VhostUserBackendReqHandlerMut for Handler {
    fn set_owner(&mut self) -> Result<()> {
        if self.owned {
            return Err(Error::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> Result<()> {
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> Result<()> {
        Err(Error::InvalidOperation("RESET_DEVICE is not offered"))
    }

    fn get_features(&mut self) -> Result<u64> {
        Ok(self.dev.features())
    }

    fn set_features(&mut self, features: u64) -> Result<()> {
        if features & !self.dev.features() != 0 {
            return Err(Error::InvalidParam);
        }
        let was_logging = self.logging();
        self.acked_features = features;
        let logging = self.logging();
        self.dev.conn.log.set_logging(logging);
        if logging != was_logging {
            tracing::info!(logging, "the frontend's dirty-page log");
            if self.any_started() {
                self.dev.conn.disk.handover().set_logging(logging);
            }
        }
        // Without protocol features every ring is enabled at once.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for q in 0..self.vrings.len() {
                self.vrings[q].set_enabled(true);
                self.update_registration(q);
            }
        }
        let event_idx = features & super::config::bits::EVENT_IDX != 0;
        for v in &self.vrings {
            v.set_queue_event_idx(event_idx);
        }
        self.dev.set_acked_features(features);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy: Option<bool>,
    ) -> Result<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy.is_some() {
            return Err(Error::InvalidOperation("postcopy is not offered"));
        }
        let mut regions = Vec::new();
        let mut mappings = Vec::new();
        for (region, file) in ctx.iter().zip(files) {
            let r = GuestRegionMmap::new(
                map_region(&file, region.mmap_offset, region.memory_size)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or_else(|| req_err("memory region overflows"))?;
            regions.push(r);
            mappings.push(AddrMapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa_base: region.guest_phys_addr,
            });
        }
        let mem = GuestMemoryMmap::from_regions(regions).map_err(req_err)?;
        self.replace_memory(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> Result<()> {
        let vring = self.vring(index)?;
        if num == 0 || num > self.dev.max_queue_size() as u32 {
            tracing::error!(
                index,
                num,
                max = self.dev.max_queue_size(),
                "ring size out of range"
            );
            return Err(Error::InvalidParam);
        }
        vring.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> Result<()> {
        let desc = self.vmm_va_to_gpa(descriptor)?;
        let avail = self.vmm_va_to_gpa(available)?;
        let used = self.vmm_va_to_gpa(used)?;
        let vring = self.vring(index)?;
        {
            let st = vring.get_ref();
            let q = st.get_queue();
            if q.ready() && (q.desc_table(), q.avail_ring(), q.used_ring()) == (desc, avail, used) {
                // A running ring's addresses said again: the frontend starts
                // or stops logging (the log flag). The worker keeps
                // returning requests; the used index must not be reread.
                return Ok(());
            }
        }
        vring
            .set_queue_info(desc, avail, used)
            .map_err(|_| Error::InvalidParam)?;
        // Resume returning requests where the used ring says.
        let idx = vring.queue_used_idx().map_err(req_err)?;
        vring.set_queue_next_used(idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> Result<()> {
        self.vring(index)?.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> Result<VhostUserVringState> {
        let vring = self.vring(index)?.clone();
        // Stop taking requests, then finish those taken.
        vring.set_queue_ready(false);
        self.workers[index as usize].set_kick(None);
        self.dev
            .stop_queue(index as usize)
            .map_err(Error::ReqHandlerError)?;
        let next_avail = vring.queue_next_avail();
        if self.logging() {
            // The used ring's last writes (avail_event too) reach the
            // destination with the frontend's final read of the log.
            self.dev.conn.log.mark_used_ring(&vring);
            if !self.any_started() {
                self.dev.conn.disk.handover().switchover();
            }
        }
        vring.set_kick(None);
        vring.set_call(None);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, file: Option<File>) -> Result<()> {
        let q = index as usize;
        let vring = self.vring(q as u32)?.clone();
        // The old fd is about to close: stop watching it first.
        self.workers[q].set_kick(None);
        if let Some(f) = &file {
            // A worker woken by the old fd reads the new one: with a
            // blocking fd a frontend gave (QEMU's are not), that read
            // would wait forever holding the ring, and the next message
            // with it.
            crate::util::set_nonblocking(f.as_raw_fd()).map_err(Error::ReqHandlerError)?;
        }
        vring.set_kick(file);
        self.maybe_start(q)?;
        self.update_registration(q);
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, file: Option<File>) -> Result<()> {
        let q = index as usize;
        let vring = self.vring(q as u32)?.clone();
        if let Some(f) = &file {
            // An eventfd a frontend filled to its limit would block our
            // signal, with the ring held.
            crate::util::set_nonblocking(f.as_raw_fd()).map_err(Error::ReqHandlerError)?;
        }
        vring.set_call(file);
        self.maybe_start(q)?;
        // Requests returned while the ring had no call fd (QEMU sets it
        // after the kick, so this happens after every restart) were never
        // signalled: signal once now, or the driver may wait forever.
        let _ = vring.signal_used_queue();
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, file: Option<File>) -> Result<()> {
        self.vring(index as u32)?.set_err(file);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> Result<VhostUserProtocolFeatures> {
        Ok(self.dev.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> Result<()> {
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> Result<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> Result<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(Error::InactiveFeature(
                VhostUserVirtioFeatures::PROTOCOL_FEATURES,
            ));
        }
        self.vring(index)?.set_enabled(enable);
        self.update_registration(index as usize);
        Ok(())
    }

    fn get_config(&mut self, offset: u32, size: u32, _f: VhostUserConfigFlags) -> Result<Vec<u8>> {
        Ok(self.dev.get_config(offset, size))
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _f: VhostUserConfigFlags) -> Result<()> {
        self.dev
            .set_config(offset, buf)
            .map_err(Error::ReqHandlerError)
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        if self.acked_protocol & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0 {
            backend.set_reply_ack_flag(true);
        }
        self.backend_req = Some(backend);
    }

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> Result<()> {
        Err(Error::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> Result<File> {
        Err(Error::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> Result<(VhostUserInflight, File)> {
        if msg.num_queues == 0 || msg.num_queues as usize > self.vrings.len() {
            return Err(Error::InvalidParam);
        }
        let region = InflightRegion::create(msg.num_queues, msg.queue_size)
            .map_err(Error::ReqHandlerError)?;
        let file = region.file().try_clone().map_err(Error::ReqHandlerError)?;
        let reply = VhostUserInflight::new(region.len() as u64, 0, msg.num_queues, msg.queue_size);
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> Result<()> {
        let region = InflightRegion::map(
            file,
            msg.mmap_offset,
            msg.mmap_size,
            msg.num_queues,
            msg.queue_size,
        )
        .map_err(|e| {
            tracing::error!(error = %e, "the frontend's inflight region is unusable");
            Error::ReqHandlerError(e)
        })?;
        tracing::info!(
            queues = msg.num_queues,
            queue_size = msg.queue_size,
            "the frontend keeps an inflight region"
        );
        self.inflight = Some(Arc::new(region));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> Result<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        file: File,
        postcopy: Option<bool>,
    ) -> Result<Option<VhostUserMemoryRegionBase>> {
        if postcopy.is_some() {
            return Err(Error::InvalidOperation("postcopy is not offered"));
        }
        let r = Arc::new(
            GuestRegionMmap::new(
                map_region(&file, region.mmap_offset, region.memory_size)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or_else(|| req_err("memory region overflows"))?,
        );
        let mem = self
            .dev
            .memory()
            .memory()
            .insert_region(r)
            .map_err(req_err)?;
        self.replace_memory(mem);
        self.mappings.push(AddrMapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa_base: region.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> Result<()> {
        let (mem, _) = self
            .dev
            .memory()
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(req_err)?;
        self.replace_memory(mem);
        self.mappings
            .retain(|m| m.gpa_base != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _file: File,
    ) -> Result<Option<File>> {
        Err(Error::InvalidOperation(
            "device state transfer is not offered",
        ))
    }

    fn check_device_state(&mut self) -> Result<()> {
        Err(Error::InvalidOperation(
            "device state transfer is not offered",
        ))
    }

    fn get_shmem_config(&mut self) -> Result<VhostUserShMemConfig> {
        Err(Error::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> Result<()> {
        self.dev
            .conn
            .log
            .set_base(&file, log.mmap_size, log.mmap_offset)
            .map_err(|e| {
                tracing::error!(error = %e, "the frontend's dirty log is unusable");
                Error::ReqHandlerError(e)
            })?;
        tracing::info!(bytes = log.mmap_size, "the frontend shares a dirty log");
        Ok(())
    }
}
