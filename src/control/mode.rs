//! `pcache mode`: show a running server's cache mode or switch it. Leaving
//! write-back drains first while the guest goes on writing (progress on a
//! terminal, and the target in `pcache status`); the server then holds
//! writes back while it writes back the rest and switches.

use std::path::Path;
use std::time::Duration;

use super::drain;
use super::protocol::{request, Request};
use crate::engine::CacheMode;

/// Dirty bytes the server is left to write back with writes held back.
const DIRTY_LEFT: u64 = 32 << 20;

/// What `pcache mode` reports (`--json`).
#[derive(Debug, serde::Serialize)]
struct Outcome {
    mode: CacheMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    previous: Option<CacheMode>,
}

fn call(control: &Path, req: &Request) -> Result<(), String> {
    let r = request(control, req).map_err(|e| e.to_string())?;
    if r.ok {
        Ok(())
    } else {
        Err(r.error.unwrap_or_else(|| "refused".into()))
    }
}

/// Print the mode, or switch to `to`. Returns the exit code.
pub fn run(
    control: &Path,
    to: Option<CacheMode>,
    timeout: Option<Duration>,
    json: bool,
) -> Result<i32, Box<dyn std::error::Error>> {
    let from = drain::status(control)?.mode;
    let print = |o: &Outcome| {
        if json {
            println!("{}", serde_json::to_string_pretty(o).expect("plain struct"));
        } else if let Some(p) = o.previous.filter(|p| *p != o.mode) {
            println!("mode: {} (was {p})", o.mode);
        } else {
            println!("mode: {}", o.mode);
        }
    };
    let Some(to) = to else {
        print(&Outcome {
            mode: from,
            previous: None,
        });
        return Ok(0);
    };
    call(
        control,
        &Request::Mode {
            mode: to,
            prepare: true,
        },
    )?;
    if from == CacheMode::Writeback && to != CacheMode::Writeback {
        let o = drain::wait(control, DIRTY_LEFT, timeout, !json)?;
        if !o.drained {
            eprintln!(
                "pcache: mode not changed: {} dirty bytes were left at the timeout",
                o.dirty_bytes
            );
            let _ = call(
                control,
                &Request::Mode {
                    mode: from,
                    prepare: false,
                },
            );
            return Ok(1);
        }
    }
    call(
        control,
        &Request::Mode {
            mode: to,
            prepare: false,
        },
    )?;
    print(&Outcome {
        mode: to,
        previous: Some(from),
    });
    Ok(0)
}
