//! The control socket's server: one thread listening, one per client,
//! each answering requests from the engine and the serve loop's probes.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::latency::{Latency, LatencyProbe};
use super::protocol::{Frontend, FrontendProbe, Reply, Request, Resizer, ServeInfo, Status};
use crate::engine::Engine;
use crate::report::Report;

/// Build a status report.
pub fn status(engine: &Engine, info: &ServeInfo, frontend: Frontend, latency: Latency) -> Status {
    let stats = engine.stats().snapshot();
    Status {
        cache: Report::of(engine),
        mode: engine.mode(),
        switching_to: engine.switching_to(),
        read_hits: stats.read_hits,
        read_misses: stats.read_misses,
        failed: engine.has_failed(),
        serve: info.clone(),
        frontend,
        latency,
        stats,
    }
}

/// What a control connection answers from.
#[derive(Clone)]
pub struct Server {
    /// The cache.
    pub engine: Arc<Engine>,
    /// Facts about the server.
    pub info: ServeInfo,
    /// The frontend's state, read at each status.
    pub frontend: FrontendProbe,
    /// The requests' latency, read at each status.
    pub latency: LatencyProbe,
    /// Grows the disk (`pcache resize`).
    pub resize: Resizer,
}

fn handle(srv: &Server, line: &str) -> Reply {
    let (engine, info) = (&srv.engine, &srv.info);
    let err = |e: String| Reply {
        ok: false,
        error: Some(e),
        status: None,
        resized: None,
    };
    let ok = Reply {
        ok: true,
        error: None,
        status: None,
        resized: None,
    };
    match serde_json::from_str::<Request>(line) {
        Err(e) => err(format!("bad request: {e}")),
        Ok(Request::Status) => Reply {
            status: Some(status(engine, info, (srv.frontend)(), (srv.latency)())),
            ..ok
        },
        Ok(Request::GcPercent { value }) => match engine.set_gc_percent(value) {
            Ok(()) => ok,
            Err(e) => err(e.to_string()),
        },
        Ok(Request::Flush) => match engine.flush() {
            Ok(()) => ok,
            Err(e) => err(e.to_string()),
        },
        Ok(Request::Drain) => match engine.request_drain() {
            Ok(()) => ok,
            Err(e) => err(e.to_string()),
        },
        // Drained by the client first, so little is left to write back.
        Ok(Request::Invalidate) => match engine.invalidate(Duration::from_secs(30)) {
            Ok(_) => ok,
            Err(e) => err(e.to_string()),
        },
        Ok(Request::Mode {
            mode,
            prepare: true,
        }) => match engine.prepare_mode(mode) {
            Ok(()) => ok,
            Err(e) => err(e.to_string()),
        },
        // The client drained it first, so little is left to write back.
        Ok(Request::Mode {
            mode,
            prepare: false,
        }) => match engine.set_mode(mode, Duration::from_secs(30)) {
            Ok(()) => ok,
            Err(e) => err(e.to_string()),
        },
        Ok(Request::Resize) => match (srv.resize)() {
            Ok(r) => Reply {
                resized: Some(r),
                ..ok
            },
            Err(e) => err(e),
        },
    }
}

/// Listen on `path` (mode 0600) and answer requests on a thread.
pub fn spawn_server(path: &Path, srv: Server) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    // Made 0600 by the bind itself: no window with a wider mode.
    let old = crate::util::set_umask(0o177);
    let listener = UnixListener::bind(path);
    crate::util::set_umask(old);
    let listener = listener?;
    std::thread::Builder::new()
        .name("pcache-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                crate::sandbox::narrow(crate::sandbox::Kind::Control);
                let Ok(conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                let srv = srv.clone();
                // A slow client must not hold up the next one.
                let _ = std::thread::Builder::new()
                    .name("pcache-control-conn".into())
                    .spawn(move || {
                        crate::sandbox::narrow(crate::sandbox::Kind::Control);
                        serve_conn(conn, &srv)
                    });
            }
        })?;
    Ok(())
}

fn serve_conn(conn: UnixStream, srv: &Server) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let reply = handle(srv, &line);
        let Ok(mut s) = serde_json::to_string(&reply) else {
            return;
        };
        s.push('\n');
        if out.write_all(s.as_bytes()).is_err() {
            return;
        }
    }
}
