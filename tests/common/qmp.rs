//! A QMP client (QEMU's JSON monitor protocol) over a unix socket, for the
//! tests that drive QEMU itself: migrate, query-migrate, quit.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A QMP connection, past the capabilities handshake.
pub struct Qmp {
    out: UnixStream,
    inp: BufReader<UnixStream>,
}

impl Qmp {
    /// Connect to `sock` (waiting up to `limit` for QEMU to create it).
    pub fn connect(sock: &Path, limit: Duration) -> Qmp {
        let t = Instant::now();
        let s = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        t.elapsed() < limit,
                        "no QMP monitor on {} within {limit:?}: {e}",
                        sock.display()
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .expect("set timeout");
        let mut q = Qmp {
            out: s.try_clone().expect("clone"),
            inp: BufReader::new(s),
        };
        let greeting = q.line();
        assert!(greeting.get("QMP").is_some(), "not QMP: {greeting}");
        q.ok("qmp_capabilities", json!({}));
        q
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        let n = self.inp.read_line(&mut l).expect("read from QMP");
        assert!(n > 0, "QEMU closed its QMP monitor");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP sent {l:?}: {e}"))
    }

    /// Run `cmd` with `args`: its reply (`return` or `error`), events skipped.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        // One write: QEMU acts on the object before the newline arrives,
        // and a `quit` may close the socket in between.
        let msg = format!("{}\n", json!({"execute": cmd, "arguments": args}));
        self.out.write_all(msg.as_bytes()).expect("write to QMP");
        loop {
            let v = self.line();
            if v.get("return").is_some() || v.get("error").is_some() {
                return v;
            }
        }
    }

    /// Ask QEMU to exit, and wait until it has closed the monitor (it may
    /// do so before its reply arrives).
    pub fn quit(mut self) {
        let _ = self.out.write_all(b"{\"execute\": \"quit\"}\n");
        let mut l = String::new();
        while matches!(self.inp.read_line(&mut l), Ok(n) if n > 0) {
            l.clear();
        }
    }

    /// Run `cmd`, which must succeed: its `return` value.
    pub fn ok(&mut self, cmd: &str, args: Value) -> Value {
        let v = self.execute(cmd, args);
        match v.get("return") {
            Some(r) => r.clone(),
            None => panic!("QMP {cmd} failed: {v}"),
        }
    }

    /// Poll query-migrate until its status is one of `states` (or
    /// `limit` passes): the last reply.
    pub fn wait_migration(&mut self, states: &[&str], limit: Duration) -> Value {
        let t = Instant::now();
        loop {
            let r = self.ok("query-migrate", json!({}));
            let st = r["status"].as_str().unwrap_or("none").to_string();
            if states.contains(&st.as_str()) {
                return r;
            }
            assert!(
                t.elapsed() < limit,
                "migration still {st} after {limit:?}: {r}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
