//! `pcache serve --metrics ADDR`: Prometheus metrics at `GET /metrics`
//! (OpenMetrics text, through the `prometheus-client` crate).
//!
//! Every value is read when scraped from what the server keeps anyway: the
//! engine's counters (relaxed atomics), its usage and log positions, the
//! vhost queues' request counters and latency histograms, and the
//! frontend's state. Nothing is counted twice, and the data path does no
//! work for metrics. `http.rs` is the listener.
//!
//! This module reads the engine and the vhost layer; neither knows it.

use std::fmt;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::control::FrontendProbe;
use crate::disk::Phase;
use crate::engine::{Engine, StatsSnapshot};
use crate::vhost::{Counters, Op, Outcome, QueueCounters, BOUNDS_NS};

pub mod http;

/// Prefix of every metric name.
pub const PREFIX: &str = "pcache";

/// What the metrics are read from.
pub struct Sources {
    /// The cache.
    pub engine: Arc<Engine>,
    /// The vhost queues' request counters and latency histograms.
    pub counters: Arc<Counters>,
    /// The frontend connection's state.
    pub frontend: FrontendProbe,
    /// Served read-only.
    pub read_only: bool,
}

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sources")
            .field("counters", &self.counters)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// The registry to encode at each scrape.
pub fn registry(sources: Sources) -> Registry {
    let mut r = Registry::with_prefix(PREFIX);
    r.register_collector(Box::new(sources));
    r
}

/// The OpenMetrics text of `registry` now.
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut s = String::with_capacity(16 << 10);
    prometheus_client::encoding::text::encode(&mut s, registry)?;
    Ok(s)
}

type Enc<'a> = DescriptorEncoder<'a>;

/// An engine counter or gauge: its name (a `_bytes` suffix is its unit),
/// help, and its value in a snapshot of the engine's counters.
type Stat = (&'static str, &'static str, fn(&StatsSnapshot) -> u64);

// One line per metric, as docs/operations.md lists them.
#[rustfmt::skip]
const COUNTERS: &[Stat] = &[
    ("cache_hits", "Reads served from the cache alone", |s| s.read_hits),
    ("cache_misses", "Reads that needed the backing store", |s| s.read_misses),
    ("cache_hit_bytes", "Read bytes served from the cache", |s| s.read_hit_bytes),
    ("cache_miss_bytes", "Read bytes from the backing store", |s| s.read_miss_bytes),
    ("cache_write_bytes", "Bytes the guest wrote into the cache", |s| s.write_bytes),
    ("cache_fill_bytes", "Bytes read misses put into the cache", |s| s.fill_bytes),
    ("zeroed_bytes", "Bytes the guest discarded or zeroed", |s| s.zeroed_bytes),
    ("flushes", "Cache flushes completed", |s| s.flushes),
    ("ksets_closed", "Key sets closed into the log", |s| s.ksets_closed),
    ("cache_full", "Writes that found the cache full and waited", |s| s.cache_full),
    ("log_busy", "Writes that waited for the log closer to close their kset", |s| s.log_busy),
    ("writes_paced", "Writes held back behind a writeback batch", |s| s.writes_paced),
    ("writeback_bytes", "Bytes written back", |s| s.writeback_bytes),
    ("writeback_batches", "Writeback batches completed", |s| s.writeback_batches),
    ("writeback_errors", "Backing errors in writeback (retried)", |s| s.writeback_errors),
    ("gc_segments_freed", "Cache segments freed by GC", |s| s.gc_segs_freed),
    ("data_crc_errors", "Cached data found failing its CRC", |s| s.data_crc_errors),
    ("bad_ranges_marked", "Ranges marked bad at writeback", |s| s.bad_ranges_marked),
    ("write_bypass_bytes", "Bytes of sequential writes sent around the cache", |s| s.write_bypass_bytes),
    ("read_nofill_bytes", "Bytes of sequential reads not cached", |s| s.read_nofill_bytes),
];

#[rustfmt::skip]
const GAUGES: &[Stat] = &[
    ("dirty_bytes", "Dirty bytes not yet written back", |s| s.dirty_bytes),
    ("dirty_zero_bytes", "Zeroed bytes not yet on the backing store", |s| s.dirty_zero_bytes),
    ("replay_keys", "Keys replayed into the index at start", |s| s.replay_keys),
    ("replay_staged_keys", "Of those, from kset slots", |s| s.replay_staged_keys),
];

/// One unlabelled counter or gauge.
fn one(e: &mut Enc, ty: MetricType, name: &str, help: &str, v: u64) -> fmt::Result {
    let (name, unit) = match name.strip_suffix("_bytes") {
        Some(n) => (n, Some(&Unit::Bytes)),
        None => (name, None),
    };
    let m = e.encode_descriptor(name, help, unit, ty)?;
    match ty {
        MetricType::Counter => ConstCounter::new(v).encode(m),
        _ => ConstGauge::new(v).encode(m),
    }
}

impl Sources {
    /// Counters and gauges the engine keeps.
    fn engine(&self, e: &mut Enc) -> fmt::Result {
        let en = &self.engine;
        let s = en.stats().snapshot();
        for (name, help, v) in COUNTERS {
            one(e, MetricType::Counter, name, help, v(&s))?;
        }
        for (name, help, v) in GAUGES {
            one(e, MetricType::Gauge, name, help, v(&s))?;
        }
        let seg = crate::format::SEG_BYTES;
        for (name, help, v) in [
            (
                "used_bytes",
                "Bytes of cache segments in use",
                en.segs_used() as u64 * seg,
            ),
            (
                "capacity_bytes",
                "Bytes of cache segments",
                en.n_segs() as u64 * seg,
            ),
            ("disk_bytes", "Size of the disk served", en.size()),
            (
                "failed",
                "1 once a write to the cache failed",
                en.has_failed().into(),
            ),
        ] {
            one(e, MetricType::Gauge, name, help, v)?;
        }

        // Writeback moves dirty_tail along the log, GC key_tail.
        let mut m = e.encode_descriptor(
            "log_lsn",
            "Sequence number at each log pointer: key_head (next kset), dirty_tail (writeback), key_tail (GC)",
            None,
            MetricType::Gauge,
        )?;
        for (name, pos) in [
            ("key_head", en.key_head()),
            ("dirty_tail", en.dirty_tail()),
            ("key_tail", en.key_tail()),
        ] {
            ConstGauge::new(pos.lsn).encode(m.encode_family(&[("pointer", name)])?)?;
        }

        let order = en.writeback_order().to_string();
        let mode = en.mode().to_string();
        let ro = if self.read_only { "true" } else { "false" };
        e.encode_descriptor(
            "mode",
            "How the cache is run: cache mode, writeback order, read-only",
            None,
            MetricType::Info,
        )?
        .encode_info(&[
            ("mode", mode.as_str()),
            ("writeback_order", order.as_str()),
            ("read_only", ro),
        ])?;
        e.encode_descriptor("build", "The pcache build", None, MetricType::Info)?
            .encode_info(&[("version", env!("CARGO_PKG_VERSION"))])
    }

    /// The frontend connection now.
    fn frontend(&self, e: &mut Enc) -> fmt::Result {
        let f = (self.frontend)();
        for (name, help, v) in [
            (
                "frontend_connected",
                "1 while a frontend is connected",
                f.connected.into(),
            ),
            (
                "queues_started",
                "Queues the frontend has started",
                f.queues_started,
            ),
            (
                "reads_waiting",
                "Reads waiting on the backing store",
                f.reads_waiting,
            ),
            (
                "writes_waiting",
                "Writes waiting for space or pacing",
                f.writes_waiting,
            ),
        ] {
            one(e, MetricType::Gauge, name, help, v)?;
        }
        let mut m = e.encode_descriptor(
            "migration_phase",
            "1 for the disk's live-migration phase now, 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for p in Phase::ALL {
            let v = u64::from(p == f.migration.phase);
            ConstGauge::new(v).encode(m.encode_family(&[("phase", p.to_string().as_str())])?)?;
        }
        Ok(())
    }

    /// Requests by operation and outcome (all queues), and each queue's
    /// latency histogram.
    fn requests(&self, e: &mut Enc) -> fmt::Result {
        let queues = self.counters.queues();
        let (count, bytes) = (QueueCounters::requests, QueueCounters::bytes);
        let help = "Requests answered, by operation and status";
        by_op(e, queues, "requests", None, help, count)?;
        let help = "Data bytes of the requests answered (as asked, whatever the status)";
        by_op(e, queues, "request", Some(&Unit::Bytes), help, bytes)?;

        let mut m = e.encode_descriptor(
            "request_latency",
            "Time from taking a request off its queue to answering it",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for (i, q) in queues.iter().enumerate() {
            let b = q.latency().snapshot();
            let buckets: Vec<(f64, u64)> = BOUNDS_NS
                .iter()
                .map(|ns| *ns as f64 / 1e9)
                .chain([f64::INFINITY])
                .zip(b.counts)
                .collect();
            let queue = i.to_string();
            m.encode_family(&[("queue", queue.as_str())])?
                .encode_histogram::<NoLabelSet>(
                    b.sum_ns as f64 / 1e9,
                    b.count(),
                    &buckets,
                    None::<&std::collections::HashMap<usize, Exemplar<NoLabelSet, f64>>>,
                )?;
        }
        Ok(())
    }
}

/// A counter labelled by operation and outcome, summed over the queues.
fn by_op(
    e: &mut Enc,
    queues: &[QueueCounters],
    name: &str,
    unit: Option<&Unit>,
    help: &str,
    get: impl Fn(&QueueCounters, Op, Outcome) -> u64,
) -> fmt::Result {
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for op in Op::ALL {
        for o in Outcome::ALL {
            let v: u64 = queues.iter().map(|q| get(q, op, o)).sum();
            let labels = [("op", op.name()), ("outcome", o.name())];
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

impl Collector for Sources {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        self.engine(&mut e)?;
        self.frontend(&mut e)?;
        self.requests(&mut e)
    }
}
