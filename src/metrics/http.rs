//! The metrics listener: just enough HTTP/1.x for a Prometheus scrape.
//!
//! One thread answers one connection at a time, one request per
//! connection, then closes it. `GET /metrics` (or HEAD) gets the metrics;
//! another path 404, another method 405, anything unparsable 400. A client
//! gets [`READ_BUDGET`] to send its request head, so a slow or silent one
//! holds up the next scrape for that long at most.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Longest request head read (request line and headers).
const MAX_HEAD: usize = 8 << 10;
/// Time a client has to send its request head.
pub const READ_BUDGET: Duration = Duration::from_secs(2);
/// Time a client has to take the answer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bind the listener (at start, so a bad address stops `serve` at once).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("Cannot listen for metrics on {addr}: {e}"),
        )
    })
}

/// Answer scrapes on `listener` from a thread; `render` makes the metrics
/// text (None when it cannot, answered 500).
pub fn spawn(
    listener: TcpListener,
    render: impl Fn() -> Option<String> + Send + 'static,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("pcache-metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                crate::sandbox::narrow(crate::sandbox::Kind::Metrics);
                match conn {
                    Ok(c) => {
                        if let Err(e) = answer(c, &render) {
                            tracing::debug!(error = %e, "metrics connection");
                        }
                    }
                    Err(e) => {
                        // Out of descriptors, say: do not spin on it.
                        tracing::warn!(error = %e, "accepting a metrics connection failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
    Ok(())
}

/// Read one request from `c` and answer it.
fn answer(mut c: TcpStream, render: &dyn Fn() -> Option<String>) -> io::Result<()> {
    c.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let reply = match read_head(&mut c)? {
        None => return Ok(()), // closed without a request
        Some(head) => respond(&head, render),
    };
    c.write_all(&reply)?;
    c.flush()?;
    let _ = c.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// The request head (up to the blank line), None if the client sent
/// nothing at all. A head that is cut off, too long or too slow comes back
/// as it is, and does not parse.
fn read_head(c: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + READ_BUDGET;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Some(head));
        }
        c.set_read_timeout(Some(left))?;
        let n = match c.read(&mut buf) {
            Ok(0) => return Ok((!head.is_empty()).then_some(head)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(Some(head))
            }
            Err(e) => return Err(e),
        };
        head.extend_from_slice(&buf[..n]);
        if end_of_head(&head).is_some() || head.len() > MAX_HEAD {
            return Ok(Some(head));
        }
    }
}

/// Where the blank line ending a request head is, if it came.
fn end_of_head(b: &[u8]) -> Option<usize> {
    let crlf = b.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = b.windows(2).position(|w| w == b"\n\n");
    crlf.into_iter().chain(lf).min()
}

/// The whole HTTP response to request head `head`.
pub fn respond(head: &[u8], render: &dyn Fn() -> Option<String>) -> Vec<u8> {
    let text = "text/plain; charset=utf-8";
    let Some(line) = request_line(head) else {
        return response(400, "Bad Request", text, "bad request\n", true);
    };
    let (method, target) = line;
    let body = method != "HEAD";
    if method != "GET" && method != "HEAD" {
        return response(405, "Method Not Allowed", text, "only GET\n", body);
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return response(404, "Not Found", text, "metrics are at /metrics\n", body);
    }
    match render() {
        Some(m) => response(200, "OK", CONTENT_TYPE, &m, body),
        None => response(
            500,
            "Internal Server Error",
            text,
            "cannot encode metrics\n",
            body,
        ),
    }
}

/// (method, target) of a complete, well-formed request head.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    end_of_head(head)?;
    let line_end = head.iter().position(|&b| b == b'\n')?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase());
    let ok = parts.next().is_none()
        && token(method)
        && target.starts_with('/')
        && !target.bytes().any(|b| b.is_ascii_control())
        && matches!(version, "HTTP/1.0" | "HTTP/1.1");
    ok.then_some((method, target))
}

fn response(code: u16, reason: &str, ctype: &str, body: &str, with_body: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if with_body {
        r.extend_from_slice(body.as_bytes());
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(reply: &[u8]) -> (u16, String) {
        let s = String::from_utf8_lossy(reply).to_string();
        let code = s[9..12].parse().expect("status code");
        let body = s.split_once("\r\n\r\n").map(|(_, b)| b.to_string());
        (code, body.unwrap_or_default())
    }

    fn ask(head: &str) -> (u16, String) {
        status(&respond(head.as_bytes(), &|| Some("m 1\n# EOF\n".into())))
    }

    #[test]
    fn get_metrics_is_answered() {
        let (code, body) = ask("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!((code, body.as_str()), (200, "m 1\n# EOF\n"));
        assert_eq!(ask("GET /metrics?x=1 HTTP/1.0\n\n").0, 200);
        let r = String::from_utf8(respond(b"GET /metrics HTTP/1.1\r\n\r\n", &|| {
            Some("abc".into())
        }))
        .unwrap();
        assert!(r.contains("Content-Length: 3\r\n"), "{r}");
        assert!(r.contains(CONTENT_TYPE), "{r}");
        // HEAD: the headers alone.
        assert_eq!(ask("HEAD /metrics HTTP/1.1\r\n\r\n"), (200, String::new()));
    }

    #[test]
    fn other_paths_methods_and_garbage_are_refused() {
        assert_eq!(ask("GET / HTTP/1.1\r\n\r\n").0, 404);
        assert_eq!(ask("GET /metricsx HTTP/1.1\r\n\r\n").0, 404);
        assert_eq!(ask("POST /metrics HTTP/1.1\r\n\r\n").0, 405);
        for bad in [
            "",
            "GET /metrics HTTP/1.1\r\n",           // no blank line
            "GET /metrics\r\n\r\n",                // no version
            "GET  /metrics HTTP/1.1\r\n\r\n",      // two spaces
            "GET metrics HTTP/1.1\r\n\r\n",        // not a path
            "GET /metrics HTTP/2\r\n\r\n",         // not HTTP/1.x
            "get /metrics HTTP/1.1\r\n\r\n",       // not a method token
            "GET /me\x01trics HTTP/1.1\r\n\r\n",   // control byte
            "GET /metrics HTTP/1.1 x\r\n\r\n",     // extra part
            "\u{fffd}\u{fffd} / HTTP/1.1\r\n\r\n", // not ASCII
        ] {
            assert_eq!(ask(bad).0, 400, "{bad:?}");
        }
        assert_eq!(status(&respond(&[0xff; 64], &|| None)).0, 400);
        assert_eq!(
            status(&respond(b"GET /metrics HTTP/1.1\r\n\r\n", &|| None)).0,
            500
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut b = Vec::new();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.clear();
            let n = (x % 64) as usize;
            let alphabet = b"GET /metrics HTTP/1.1\r\n\x00\xff?";
            for i in 0..n {
                let y = x.rotate_left(i as u32 * 7);
                b.push(alphabet[(y % alphabet.len() as u64) as usize]);
            }
            let (code, _) = status(&respond(&b, &|| Some(String::new())));
            assert!([200, 400, 404, 405].contains(&code), "{b:?} -> {code}");
        }
    }

    #[test]
    fn a_real_connection_gets_one_answer() {
        let l = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_addr().unwrap();
        spawn(l, || Some("m 1\n# EOF\n".into())).unwrap();
        // A client that says nothing does not stop the next one.
        let _silent = TcpStream::connect(addr).unwrap();
        for (req, code) in [
            ("GET /metrics HTTP/1.1\r\n\r\n", "200"),
            ("BREW /pot HTTP/1.1\r\n\r\n", "405"),
            ("\x00\x01\x02\r\n\r\n", "400"),
        ] {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(req.as_bytes()).unwrap();
            let mut got = String::new();
            c.read_to_string(&mut got).unwrap();
            assert!(
                got.starts_with(&format!("HTTP/1.1 {code} ")),
                "{req:?}: {got}"
            );
        }
        // Bound twice: a clear error.
        let e = bind(addr).unwrap_err();
        assert!(e.to_string().contains("Cannot listen for metrics"), "{e}");
    }
}
