//! `pcache drain`: ask a running server to write back everything, and
//! wait until nothing is dirty, showing progress on a terminal.

use std::path::Path;
use std::time::{Duration, Instant};

use super::protocol::{request, Request, Status};

/// How often progress is polled (and the drain asked for again, so writes
/// completed meanwhile are logged and drained too).
const POLL: Duration = Duration::from_millis(250);

/// What a drain ended with (`--json`).
#[derive(Debug, serde::Serialize)]
pub(super) struct Outcome {
    pub(super) drained: bool,
    pub(super) dirty_bytes: u64,
    pub(super) written_back_bytes: u64,
    pub(super) seconds: f64,
}

pub(super) fn status(control: &Path) -> Result<Status, String> {
    let r = request(control, &Request::Status).map_err(|e| e.to_string())?;
    r.status
        .ok_or_else(|| r.error.unwrap_or_else(|| "no status in reply".into()))
}

fn ask(control: &Path) -> Result<(), String> {
    let r = request(control, &Request::Drain).map_err(|e| e.to_string())?;
    if r.ok {
        Ok(())
    } else {
        Err(r.error.unwrap_or_else(|| "drain refused".into()))
    }
}

/// Drain the server at `control` until at most `left` bytes are dirty
/// (0: all); give up after `timeout`. Returns the exit code: 0 once
/// drained, 1 on a timeout.
pub fn run(
    control: &Path,
    left: u64,
    timeout: Option<Duration>,
    json: bool,
) -> Result<i32, String> {
    let o = wait(control, left, timeout, !json)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&o).expect("plain struct")
        );
    } else if o.drained {
        println!(
            "drained: {} bytes written back in {:.1} s",
            o.written_back_bytes, o.seconds
        );
    }
    if !o.drained {
        eprintln!(
            "pcache: drain timed out after {:.1} s with {} dirty bytes left",
            o.seconds, o.dirty_bytes
        );
        return Ok(1);
    }
    Ok(0)
}

/// Ask for a drain and wait as [`run`] does, with a progress bar on a
/// terminal when `bar`; returns how it ended.
pub(super) fn wait(
    control: &Path,
    left: u64,
    timeout: Option<Duration>,
    bar: bool,
) -> Result<Outcome, String> {
    let t0 = Instant::now();
    ask(control)?;
    let first = status(control)?;
    let start = first.cache.dirty_bytes;
    let written_before = first.stats.writeback_bytes;
    // Drawn on stderr when it is a terminal, like `pcache writeback`'s.
    let bar = if bar {
        indicatif::ProgressBar::new(start)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "draining {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("static template"),
    );
    let mut st = first;
    let mut total = start;
    loop {
        // Zeroed ranges take no cache space but must reach the store too.
        let done = st.cache.dirty_bytes <= left && (left > 0 || st.cache.dirty_zero_bytes == 0);
        if done || timeout.is_some_and(|t| t0.elapsed() >= t) {
            bar.finish_and_clear();
            return Ok(Outcome {
                drained: done,
                dirty_bytes: st.cache.dirty_bytes,
                written_back_bytes: st.stats.writeback_bytes.saturating_sub(written_before),
                seconds: t0.elapsed().as_secs_f64(),
            });
        }
        // Writes arriving meanwhile can raise dirty data past the start.
        total = total.max(st.cache.dirty_bytes);
        bar.set_length(total);
        bar.set_position(total - st.cache.dirty_bytes);
        std::thread::sleep(POLL);
        ask(control)?;
        st = status(control)?;
    }
}
