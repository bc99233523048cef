//! Formatting a cache medium and opening it: superblock, settings, tails,
//! segment gens, then replay.

use std::sync::atomic::{AtomicBool, AtomicU8};
use std::sync::{Arc, Mutex, OnceLock};

use super::cache::{Engine, Kick};
use super::error::{Error, Result};
use super::kset::{LogHead, OpenKset};
use super::record::{Settings, Tail};
use super::replay::Staged;
use super::segment::SegTable;
use super::stats::Stats;
use crate::format::KSET_SLOTS;
use crate::format::{
    self, pick_latest, seg_off, segs_for_size, CacheInfo, MetaRecord, PosOnMedia, SegGen, SegInfo,
    Superblock, CACHE_FLAG_DATA_CRC, CACHE_FLAG_INIT_DONE, CACHE_INFO_OFF, DIRTY_TAIL_OFF,
    FORMAT_VERSION, KEY_TAIL_OFF, KSET_HEADER_BYTES, REGION_BYTES, SB_OFF, SEGMENTS_OFF,
    SEG_DATA_OFF, SEG_GEN_OFF, SEG_INFO_OFF, SEG_INFO_TYPE_DATA, WB_TARGET_OFF,
};
use crate::pmem::Region;

/// Settings for a new cache.
#[derive(Debug, Clone, Copy)]
pub struct FormatOptions {
    /// Size of the backing store the cache will front.
    pub backing_bytes: u64,
    /// Keep a crc32c of every key's data and check it on every hit.
    pub data_crc: bool,
    /// GC starts when this percentage of segments is used (0..=90).
    pub gc_percent: u8,
    /// Overwrite a medium that already holds pcache metadata.
    pub force: bool,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            backing_bytes: 0,
            data_crc: false,
            gc_percent: format::GC_PERCENT_DEFAULT,
            force: false,
        }
    }
}

/// How to open a cache.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Never write to the medium (inspect, check).
    pub read_only: bool,
}

fn read_vec(region: &Region, off: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    region.read(off, &mut v);
    v
}

fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        if f.read_exact(&mut u).is_ok() {
            return u;
        }
    }
    // No /dev/urandom: time and pid still make a collision very unlikely.
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    u[..16].copy_from_slice(&(t ^ ((std::process::id() as u128) << 64)).to_le_bytes());
    u
}

impl Engine {
    /// Write a new, empty pcache onto `region`.
    ///
    /// Refuses a medium that already holds a pcache superblock (or any
    /// non-zero superblock area) unless `opts.force`. Write order: zero the
    /// metadata, initialise every segment (headers zeroed, gen 0, info),
    /// settings, tails, and the superblock last, so a crash during format
    /// leaves a medium that is not mistaken for a valid cache.
    pub fn format(region: &Region, opts: &FormatOptions) -> Result<Superblock> {
        let n_segs = segs_for_size(region.len())?;
        if opts.gc_percent > format::GC_PERCENT_MAX {
            return Err(Error::Refused(format!(
                "gc_percent must be 0..={}, not {}",
                format::GC_PERCENT_MAX,
                opts.gc_percent
            )));
        }
        if opts.backing_bytes == 0 || !opts.backing_bytes.is_multiple_of(format::SECTOR_BYTES) {
            return Err(Error::Refused(format!(
                "backing store size {} is not a positive multiple of 512",
                opts.backing_bytes
            )));
        }
        if opts.backing_bytes > format::MAX_DISK_BYTES {
            return Err(Error::Refused(format!(
                "backing store size {} is above the largest pcache fronts ({} bytes)",
                opts.backing_bytes,
                format::MAX_DISK_BYTES
            )));
        }
        if !opts.force {
            let sb = read_vec(region, SB_OFF, format::SB_BYTES);
            let magic = u64::from_le_bytes(sb[8..16].try_into().expect("8 bytes"));
            if magic == format::SB_MAGIC {
                return Err(Error::Refused(format!(
                    "{} already holds a pcache cache; refusing to re-format it (use --force to erase it, losing any dirty data)",
                    region.path().display()
                )));
            }
            if sb.iter().any(|b| *b != 0) {
                return Err(Error::Refused(format!(
                    "{} holds data in its superblock area but no pcache magic; refusing to format it (use --force to overwrite)",
                    region.path().display()
                )));
            }
        }
        region.zero(0, SEGMENTS_OFF as usize);
        region.persist().map_err(Error::Persist)?; // old superblock gone first
        for seg in 0..n_segs {
            let base = seg_off(seg);
            region.zero(base, SEG_DATA_OFF as usize + KSET_HEADER_BYTES);
            // Both replicas of every record are written at format (same
            // seq: slot 0 wins the tie), so one bad copy never strands a
            // record that was not updated since.
            for off in SEG_GEN_OFF {
                region.write(base + off, &SegGen { gen: 0 }.encode(1));
            }
            let info = SegInfo {
                flags: SEG_INFO_TYPE_DATA << 1 | u32::from(seg + 1 < n_segs),
                next_seg: if seg + 1 < n_segs { seg + 1 } else { 0 },
            };
            for off in SEG_INFO_OFF {
                region.write(base + off, &info.encode(1));
            }
        }
        let info = CacheInfo {
            n_segs,
            flags: if opts.data_crc {
                CACHE_FLAG_DATA_CRC
            } else {
                0
            },
            gc_percent: opts.gc_percent,
            ..Default::default()
        };
        let start = PosOnMedia {
            seg: 0,
            off: 0,
            lsn: 1,
        };
        for slot in 0..2 {
            region.write(CACHE_INFO_OFF[slot], &info.encode(1));
            region.write(KEY_TAIL_OFF[slot], &start.encode(1));
            region.write(DIRTY_TAIL_OFF[slot], &start.encode(1));
            region.write(WB_TARGET_OFF[slot], &start.encode(1));
        }
        region.persist().map_err(Error::Persist)?; // everything before the superblock
        let sb = Superblock {
            flags: 0,
            version: FORMAT_VERSION,
            seg_num: n_segs,
            uuid: random_uuid(),
            cache_bytes: region.len(),
            backing_bytes: opts.backing_bytes,
        };
        region.write(SB_OFF, &sb.encode());
        region.persist().map_err(Error::Persist)?;
        tracing::info!(
            segments = n_segs,
            backing_bytes = opts.backing_bytes,
            "formatted cache"
        );
        Ok(sb)
    }

    /// Open the pcache on `region`: validate every metadata record, replay
    /// the key log and rebuild the index. Background workers are not
    /// started (see [`super::workers::Workers`]).
    pub fn open(region: Arc<Region>, opts: &OpenOptions) -> Result<Arc<Engine>> {
        // Every fixed record must lie inside the medium before one is read
        // (a file cut short, a small foreign device).
        if region.len() < format::SEGMENTS_OFF {
            return Err(if region.len() < SB_OFF + format::SB_BYTES as u64 {
                format::Error::NotPcache
            } else {
                format::Error::BadSize {
                    bytes: region.len(),
                    detail: format!(
                        "smaller than the {} bytes of metadata before the first segment",
                        format::SEGMENTS_OFF
                    ),
                }
            }
            .into());
        }
        let sb_bytes = read_vec(&region, SB_OFF, format::SB_BYTES);
        let sb = Superblock::decode(&sb_bytes, region.len())?;
        let n_segs = sb.seg_num;

        let slots = |offs: [u64; 2], len: usize| {
            [
                read_vec(&region, offs[0], len),
                read_vec(&region, offs[1], len),
            ]
        };
        let ci = slots(CACHE_INFO_OFF, CacheInfo::BYTES);
        let info = pick_latest::<CacheInfo>([&ci[0], &ci[1]], CACHE_INFO_OFF)?;
        warn_replica("cache_info", &info.other_error);
        if info.rec.n_segs != n_segs {
            return Err(format::Error::Corrupt {
                what: "cache_info",
                offset: CACHE_INFO_OFF[info.slot],
                detail: format!(
                    "n_segs {} differs from the superblock's {}",
                    info.rec.n_segs, n_segs
                ),
            }
            .into());
        }
        let kt = slots(KEY_TAIL_OFF, PosOnMedia::BYTES);
        let key_tail = pick_latest::<PosOnMedia>([&kt[0], &kt[1]], KEY_TAIL_OFF)
            .map_err(|e| rename(e, "key_tail"))?;
        warn_replica("key_tail", &key_tail.other_error);
        let dt = slots(DIRTY_TAIL_OFF, PosOnMedia::BYTES);
        let dirty_tail = pick_latest::<PosOnMedia>([&dt[0], &dt[1]], DIRTY_TAIL_OFF)
            .map_err(|e| rename(e, "dirty_tail"))?;
        warn_replica("dirty_tail", &dirty_tail.other_error);
        for (name, t, offs) in [
            ("key_tail", &key_tail, KEY_TAIL_OFF),
            ("dirty_tail", &dirty_tail, DIRTY_TAIL_OFF),
        ] {
            check_pos(name, &t.rec, n_segs, offs[t.slot])?;
        }
        let wb_target = read_wb_target(&region, n_segs, dirty_tail.rec)?;

        let mut gens = Vec::with_capacity(n_segs as usize);
        for seg in 0..n_segs {
            let base = seg_off(seg);
            let g = slots(
                [base + SEG_GEN_OFF[0], base + SEG_GEN_OFF[1]],
                SegGen::BYTES,
            );
            let gen = pick_latest::<SegGen>(
                [&g[0], &g[1]],
                [base + SEG_GEN_OFF[0], base + SEG_GEN_OFF[1]],
            )?;
            warn_replica("segment_gen", &gen.other_error);
            let si = slots(
                [base + SEG_INFO_OFF[0], base + SEG_INFO_OFF[1]],
                SegInfo::BYTES,
            );
            let inf = pick_latest::<SegInfo>(
                [&si[0], &si[1]],
                [base + SEG_INFO_OFF[0], base + SEG_INFO_OFF[1]],
            )?;
            warn_replica("segment_info", &inf.other_error);
            gens.push((gen.rec.gen, gen.slot as u8));
        }

        let size = info.rec.disk_bytes(sb.backing_bytes)?;
        let engine = Engine {
            sb,
            n_segs,
            backing_bytes: std::sync::atomic::AtomicU64::new(size),
            data_crc: info.rec.flags & CACHE_FLAG_DATA_CRC != 0,
            read_only: opts.read_only,
            gc_percent: AtomicU8::new(info.rec.gc_percent),
            mode: AtomicU8::new(info.rec.mode),
            mode_target: Mutex::new(None),
            settings: Mutex::new(Settings {
                info: info.rec,
                slot: info.slot,
                seq: info.seq,
            }),
            segs: SegTable::new(gens),
            shards: super::shards::ShardTable::new(size.div_ceil(REGION_BYTES)),
            // Eras are set from the slots once they are replayed.
            ksets: (0..KSET_SLOTS)
                .map(|i| Mutex::new(OpenKset::new(i, 0)))
                .collect(),
            log: Mutex::new(LogHead {
                pos: key_tail.rec,
                epoch: 0,
            }),
            key_tail: Mutex::new(Tail {
                pos: key_tail.rec,
                slot: key_tail.slot,
                seq: key_tail.seq,
            }),
            dirty_tail: Mutex::new(Tail {
                pos: dirty_tail.rec,
                slot: dirty_tail.slot,
                seq: dirty_tail.seq,
            }),
            failed: AtomicBool::new(false),
            halting: AtomicBool::new(false),
            space_wanted: AtomicBool::new(false),
            writeback_wanted: AtomicBool::new(false),
            drain_wanted: AtomicBool::new(false),
            handing_over: AtomicBool::new(false),
            writes_paused: AtomicBool::new(false),
            defer_closes: AtomicBool::new(false),
            log_waiters: AtomicBool::new(false),
            writers: std::sync::atomic::AtomicU64::new(0),
            stats: Stats::default(),
            writeback_kick: Kick::default(),
            gc_kick: Kick::default(),
            closer_kick: Kick::default(),
            writeback: Mutex::new(super::wb_state::WbState::new(wb_target)),
            pacer: super::pace::Pacer::new(),
            gc_lock: Mutex::new(()),
            staged_dirty: OnceLock::new(),
            region,
        };
        let started = std::time::Instant::now();
        let (_, staged) = engine.replay()?;
        let s = engine.stats.snapshot();
        let staged_keys: usize = staged.iter().map(|(_, k)| k.len()).sum();
        tracing::info!(
            keys = s.replay_keys,
            stale = s.replay_stale_keys,
            staged_keys,
            key_head = ?engine.key_head(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "replayed key log"
        );
        engine
            .stats
            .replay_staged_keys
            .store(staged_keys as u64, std::sync::atomic::Ordering::Relaxed);
        if opts.read_only {
            let dirty: Vec<_> = staged
                .iter()
                .flat_map(|(_, k)| k)
                .filter(|k| !k.is_clean())
                .copied()
                .collect();
            let bytes = dirty.iter().map(super::kset::dirty_data_bytes).sum();
            super::stats::add(&engine.stats.dirty_bytes, bytes);
            let zero = dirty.iter().map(super::kset::dirty_zero_bytes).sum();
            super::stats::add(&engine.stats.dirty_zero_bytes, zero);
            let _ = engine.staged_dirty.set(dirty);
        } else {
            engine.relog_staged(staged)?;
        }
        if !opts.read_only
            && engine.settings.lock().expect("settings lock").info.flags & CACHE_FLAG_INIT_DONE == 0
        {
            let mut s = engine.settings.lock().expect("settings lock");
            let mut info = s.info;
            info.flags |= CACHE_FLAG_INIT_DONE;
            engine.write_settings(&mut s, info)?;
        }
        Ok(Arc::new(engine))
    }

    /// Append the keys found in the kset slots to the log, then start a new
    /// era in every slot and persist it.
    ///
    /// Each slot with keys is closed like any open kset (marked `closing`,
    /// so a death before it is emptied does not replay it twice). A new era
    /// is the slot's era + 2, persisted before any key is staged in it: the
    /// persisted era is never more than one behind the one stored (each
    /// close persists the slot before it starts the next era), so after a
    /// power failure too the new era is above every era ever used, and no
    /// key of an earlier one can pass for a key of this one.
    fn relog_staged(&self, staged: Staged) -> Result<()> {
        for (slot, (seq, keys)) in staged.into_iter().enumerate() {
            let mut ks = self.ksets[slot].lock().expect("kset lock");
            ks.resume(seq, &keys);
            self.kset_close(&mut ks)?;
            let next = ks.seq() + 2;
            self.slot_reset(&mut ks, next);
        }
        self.persist()
    }

    /// Persist new settings into the replica that is not the newest.
    pub(super) fn write_settings(&self, s: &mut Settings, info: CacheInfo) -> Result<()> {
        let slot = 1 - s.slot;
        let seq = s.seq + 1;
        self.region.write(CACHE_INFO_OFF[slot], &info.encode(seq));
        self.persist()?;
        *s = Settings { info, slot, seq };
        Ok(())
    }

    /// Persist a new position into a tail record (key_tail or dirty_tail),
    /// into the replica that does not hold the newest copy.
    pub(super) fn write_tail(
        &self,
        tail: &mut Tail,
        offs: [u64; 2],
        pos: PosOnMedia,
    ) -> Result<()> {
        let slot = 1 - tail.slot;
        let seq = tail.seq + 1;
        self.region.write(offs[slot], &pos.encode(seq));
        self.persist()?;
        *tail = Tail { pos, slot, seq };
        Ok(())
    }
}

/// The writeback target record. Caches formatted before it existed hold
/// zeros there: no batch is pending, which reads as dirty_tail.
fn read_wb_target(region: &Region, n_segs: u32, dirty_tail: PosOnMedia) -> Result<Tail> {
    let r = [
        read_vec(region, WB_TARGET_OFF[0], PosOnMedia::BYTES),
        read_vec(region, WB_TARGET_OFF[1], PosOnMedia::BYTES),
    ];
    if r.iter().all(|b| b.iter().all(|&x| x == 0)) {
        return Ok(Tail {
            pos: dirty_tail,
            slot: 1,
            seq: 0,
        });
    }
    let t = pick_latest::<PosOnMedia>([&r[0], &r[1]], WB_TARGET_OFF)
        .map_err(|e| rename(e, "writeback target"))?;
    warn_replica("writeback target", &t.other_error);
    check_pos("writeback target", &t.rec, n_segs, WB_TARGET_OFF[t.slot])?;
    Ok(Tail {
        pos: t.rec,
        slot: t.slot,
        seq: t.seq,
    })
}

fn warn_replica(what: &str, err: &Option<format::Error>) {
    if let Some(e) = err {
        tracing::warn!(record = what, error = %e, "one replica is invalid; using the other");
    }
}

fn rename(e: format::Error, what: &'static str) -> format::Error {
    match e {
        format::Error::Corrupt { offset, detail, .. } => format::Error::Corrupt {
            what,
            offset,
            detail,
        },
        other => other,
    }
}

fn check_pos(what: &'static str, p: &PosOnMedia, n_segs: u32, offset: u64) -> Result<()> {
    let max_off = format::SEG_DATA_BYTES - KSET_HEADER_BYTES as u64;
    if p.seg >= n_segs || p.off as u64 > max_off || p.lsn == 0 {
        return Err(format::Error::Corrupt {
            what,
            offset,
            detail: format!(
                "position {}:{} lsn {} is outside the cache",
                p.seg, p.off, p.lsn
            ),
        }
        .into());
    }
    Ok(())
}
