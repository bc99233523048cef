//! Completion-latency histograms: fixed buckets of relaxed atomics, so a
//! queue's worker records a request with two atomic adds and no lock, and
//! the metrics exporter and `pcache status` read them at any time.
//!
//! The buckets go 1-2-5 from 1 us to 10 s, plus one for anything slower.
//! Quantiles are estimated as Prometheus' `histogram_quantile` does
//! (linear within a bucket), so `pcache status` and a dashboard built on
//! the exported buckets agree.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets in nanoseconds (a bucket holds the
/// latencies above the previous bound, up to and including its own).
pub const BOUNDS_NS: [u64; 22] = [
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    20_000_000,
    50_000_000,
    100_000_000,
    200_000_000,
    500_000_000,
    1_000_000_000,
    2_000_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Buckets, the last one unbounded (+Inf).
pub const BUCKETS: usize = BOUNDS_NS.len() + 1;

/// A latency histogram written by one queue and read by anyone.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS],
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Count one latency. Only the queue's lock holder records, so a plain
    /// load and store do (see [`bump`]).
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        bump(&self.counts[bucket_of(ns)], 1);
        bump(&self.sum_ns, ns);
    }

    /// The counts now. Each is read on its own while requests go on, so
    /// the sum may be a request ahead of or behind the buckets.
    pub fn snapshot(&self) -> Buckets {
        Buckets {
            counts: std::array::from_fn(|i| self.counts[i].load(Ordering::Relaxed)),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// Add `n` to a counter that one thread at a time writes (readers only
/// load it): a load and a store, without the locked read-modify-write of
/// `fetch_add`, whose cost showed on 4 KiB hits at QD32.
pub fn bump(a: &AtomicU64, n: u64) {
    a.store(a.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// The bucket a latency of `ns` falls in.
fn bucket_of(ns: u64) -> usize {
    BOUNDS_NS.partition_point(|&b| b < ns)
}

/// A histogram's counts at one moment; several add up (all queues).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Buckets {
    /// Latencies in each bucket (not cumulative); the last is above 10 s.
    pub counts: [u64; BUCKETS],
    /// Sum of all latencies, nanoseconds.
    pub sum_ns: u64,
}

impl Buckets {
    /// Latencies counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Add another histogram's counts to these.
    pub fn add(&mut self, other: &Buckets) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.sum_ns = self.sum_ns.wrapping_add(other.sum_ns);
    }

    /// Estimate the `q`-quantile (0..=1) in nanoseconds: find the bucket
    /// holding it and interpolate linearly between its bounds. None when
    /// nothing was counted. A quantile in the last bucket is reported as
    /// its lower bound, 10 s: all that is known is that it is slower.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = q * n as f64;
        let mut below = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let lo = if i == 0 { 0 } else { BOUNDS_NS[i - 1] } as f64;
            if below as f64 + c as f64 >= rank {
                let Some(&hi) = BOUNDS_NS.get(i) else {
                    return Some(lo);
                };
                let within = (rank - below as f64).max(0.0) / c as f64;
                return Some(lo + (hi as f64 - lo) * within);
            }
            below += c;
        }
        // Not reached: q <= 1 keeps the rank within the count.
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn bounds_are_inclusive_and_slow_requests_land_in_the_last_bucket() {
        let h = Histogram::default();
        h.record(Duration::ZERO);
        h.record(us(1));
        h.record(Duration::from_nanos(1_001));
        h.record(us(10_000_000));
        h.record(Duration::from_secs(11));
        h.record(Duration::MAX);
        let b = h.snapshot();
        assert_eq!(b.counts[0], 2, "0 and 1 us are in the first bucket");
        assert_eq!(b.counts[1], 1, "1.001 us is in (1, 2] us");
        assert_eq!(b.counts[BUCKETS - 2], 1, "10 s is in (5, 10] s");
        assert_eq!(b.counts[BUCKETS - 1], 2, "above 10 s");
        assert_eq!(b.count(), 6);
    }

    #[test]
    fn sum_and_count_add_up() {
        let h = Histogram::default();
        for n in [3, 30, 300] {
            h.record(us(n));
        }
        let b = h.snapshot();
        assert_eq!(b.sum_ns, 333_000);
        let mut all = Buckets::default();
        all.add(&b);
        all.add(&b);
        assert_eq!(all.count(), 6);
        assert_eq!(all.sum_ns, 666_000);
        assert_eq!(all.counts[bucket_of(30_000)], 2);
    }

    #[test]
    fn empty_has_no_quantile() {
        assert_eq!(Buckets::default().quantile(0.5), None);
        let h = Histogram::default();
        h.record(us(5));
        assert_eq!(h.snapshot().quantile(1.5), None);
        assert_eq!(h.snapshot().quantile(f64::NAN), None);
    }

    #[test]
    fn quantile_interpolates_within_the_bucket() {
        // 1..=1000 us, one each: the bounds 200, 500 and 1000 us fall on
        // bucket edges, so linear interpolation is exact there.
        let h = Histogram::default();
        for n in 1..=1000 {
            h.record(us(n));
        }
        let b = h.snapshot();
        let at = |q: f64| b.quantile(q).expect("samples") / 1000.0;
        assert!((at(0.5) - 500.0).abs() < 1e-6, "p50 {}", at(0.5));
        assert!((at(0.99) - 990.0).abs() < 1e-6, "p99 {}", at(0.99));
        assert!((at(0.2) - 200.0).abs() < 1e-6, "p20 {}", at(0.2));
        assert!((at(1.0) - 1000.0).abs() < 1e-6);
    }

    #[test]
    fn one_value_is_placed_inside_its_bucket() {
        let h = Histogram::default();
        for _ in 0..100 {
            h.record(us(12));
        }
        let b = h.snapshot();
        for q in [0.0, 0.5, 0.99, 1.0] {
            let v = b.quantile(q).expect("samples");
            assert!((10_000.0..=20_000.0).contains(&v), "q {q}: {v}");
        }
        assert_eq!(b.quantile(0.5), Some(15_000.0));
    }

    #[test]
    fn a_quantile_past_10_s_is_reported_as_10_s() {
        let h = Histogram::default();
        h.record(us(3));
        for _ in 0..99 {
            h.record(Duration::from_secs(30));
        }
        let b = h.snapshot();
        assert_eq!(b.quantile(0.99), Some(10e9));
        assert!(b.quantile(0.0).expect("samples") <= 5_000.0);
    }

    #[test]
    fn estimate_lies_in_the_bucket_of_the_true_quantile() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..50 {
            let h = Histogram::default();
            let mut v = Vec::new();
            for _ in 0..(round * 37 + 1) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Log-uniform from 100 ns to about 100 ms.
                let ns = (100.0 * 1e6f64.powf((x >> 11) as f64 / (1u64 << 53) as f64)) as u64;
                h.record(Duration::from_nanos(ns));
                v.push(ns);
            }
            v.sort_unstable();
            let b = h.snapshot();
            for q in [0.5, 0.9, 0.99] {
                let est = b.quantile(q).expect("samples");
                // The sample of rank ceil(q n) is the true quantile.
                let k = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
                let i = bucket_of(v[k]);
                let lo = if i == 0 { 0 } else { BOUNDS_NS[i - 1] } as f64;
                let hi = BOUNDS_NS[i] as f64;
                assert!(
                    lo <= est && est <= hi,
                    "round {round} q {q}: estimate {est} outside ({lo}, {hi}] of {}",
                    v[k]
                );
            }
        }
    }
}
