//! The completion latency `pcache status` shows: p50 and p99 of every
//! request answered since the server started, estimated from the queues'
//! latency histograms (the buckets `/metrics` exports).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::vhost::Buckets;

/// Latency of the guest's requests since the server started, all queues
/// together.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// Requests answered.
    pub requests: u64,
    /// Median completion latency, microseconds (None before any request).
    pub p50_us: Option<f64>,
    /// 99th percentile, microseconds.
    pub p99_us: Option<f64>,
}

/// Reads the latency histograms when status is asked for.
pub type LatencyProbe = Arc<dyn Fn() -> Latency + Send + Sync>;

impl Latency {
    /// Estimate from histogram counts.
    pub fn of(b: &Buckets) -> Latency {
        let us = |q| b.quantile(q).map(|ns| ns / 1000.0);
        Latency {
            requests: b.count(),
            p50_us: us(0.5),
            p99_us: us(0.99),
        }
    }

    /// "p50 12 us, p99 340 us (1234 requests since start)".
    pub fn text(&self) -> String {
        match (self.p50_us, self.p99_us) {
            (Some(p50), Some(p99)) => format!(
                "p50 {}, p99 {} ({} requests since start)",
                duration(p50),
                duration(p99),
                self.requests
            ),
            _ => "no requests yet".into(),
        }
    }
}

/// Microseconds in the unit that reads best.
fn duration(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.1} us")
    } else if us < 1000.0 {
        format!("{us:.0} us")
    } else if us < 1e6 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost::Histogram;
    use std::time::Duration;

    #[test]
    fn quantiles_come_from_the_histogram() {
        let h = Histogram::default();
        assert_eq!(Latency::of(&h.snapshot()).text(), "no requests yet");
        for n in 1..=1000 {
            h.record(Duration::from_micros(n));
        }
        let l = Latency::of(&h.snapshot());
        assert_eq!(l.requests, 1000);
        assert!((l.p50_us.unwrap() - 500.0).abs() < 1e-6, "{l:?}");
        assert!((l.p99_us.unwrap() - 990.0).abs() < 1e-6, "{l:?}");
        assert_eq!(
            l.text(),
            "p50 500 us, p99 990 us (1000 requests since start)"
        );
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(3.24), "3.2 us");
        assert_eq!(duration(12.4), "12 us");
        assert_eq!(duration(2500.0), "2.5 ms");
        assert_eq!(duration(10e6), "10.00 s");
    }
}
