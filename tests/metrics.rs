//! `pcache serve --metrics`: a real server scraped over plain TCP while a
//! libblkio client does I/O on two queues; the counters move by what the
//! client did, each queue has a latency histogram, `pcache status` shows
//! p50/p99, bad HTTP requests are refused, and a taken port stops `serve`.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{fill_block, pcache, status, text, Client, Disk};

const BLOCK: usize = 4096;
const MIB: u64 = 1 << 20;

/// A port nothing listens on now.
fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// Send `request` and return the whole answer.
fn http(addr: SocketAddr, request: &[u8]) -> String {
    let mut c = TcpStream::connect(addr).expect("connect to the metrics port");
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(request).unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).unwrap();
    s
}

/// Scrape /metrics: the OpenMetrics text, checked to be a 200.
fn scrape(addr: SocketAddr) -> String {
    let r = http(addr, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    let (head, body) = r.split_once("\r\n\r\n").expect("a head and a body");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    assert!(
        body.ends_with("# EOF\n"),
        "not a complete exposition: {body}"
    );
    body.to_string()
}

/// Every sample: `name{labels}` -> value.
fn samples(body: &str) -> HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {l:?}"));
            let v = v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}"));
            (k.to_string(), v)
        })
        .collect()
}

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have {:?}", m.keys()))
}

/// How much a sample moved between two scrapes.
fn delta(a: &HashMap<String, f64>, b: &HashMap<String, f64>, key: &str) -> f64 {
    get(b, key) - get(a, key)
}

fn requests(op: &str, outcome: &str) -> String {
    format!("pcache_requests_total{{op=\"{op}\",outcome=\"{outcome}\"}}")
}

#[test]
fn scrapes_show_the_counters_moving_and_a_histogram_per_queue() {
    let disk = Disk::new(16 * MIB, None);
    let addr = free_addr();
    let server = disk.serve(&["--num-queues", "2", "--metrics", &addr.to_string()]);

    let body1 = scrape(addr);
    let m1 = samples(&body1);
    assert_eq!(get(&m1, "pcache_frontend_connected"), 0.0);
    assert_eq!(get(&m1, "pcache_migration_phase{phase=\"standby\"}"), 1.0);

    // Writes on both queues, reads that hit them, reads that miss, and a
    // read past the end of the disk.
    let mut c = Client::connect(&disk.socket, 2, 4 << 20);
    let writes = 64u64;
    for b in 0..writes {
        fill_block(&mut c.mem()[..BLOCK], b, 1);
        let q = (b % 2) as usize;
        assert_eq!(c.write_sync(q, b * BLOCK as u64, 0, BLOCK), 0);
    }
    for b in 0..writes {
        assert_eq!(c.read_sync((b % 2) as usize, b * BLOCK as u64, 0, BLOCK), 0);
    }
    let misses = 8u64;
    for b in 0..misses {
        let off = (1000 + b) * BLOCK as u64;
        assert_eq!(c.read_sync(0, off, 0, BLOCK), 0);
    }
    assert_eq!(c.flush_sync(1), 0);
    assert_ne!(
        c.read_sync(0, 16 * MIB, 0, BLOCK),
        0,
        "a read past the end fails"
    );

    let body2 = scrape(addr);
    let m2 = samples(&body2);
    let moved = |k: &str| delta(&m1, &m2, k);
    assert_eq!(moved(&requests("write", "ok")), writes as f64);
    assert_eq!(moved(&requests("read", "ok")), (writes + misses) as f64);
    assert_eq!(moved(&requests("read", "ioerr")), 1.0);
    assert_eq!(moved(&requests("flush", "ok")), 1.0);
    assert_eq!(
        moved("pcache_request_bytes_total{op=\"write\",outcome=\"ok\"}"),
        (writes * BLOCK as u64) as f64
    );
    assert!(moved("pcache_cache_hits_total") >= writes as f64, "{body2}");
    assert!(
        moved("pcache_cache_misses_total") >= misses as f64,
        "{body2}"
    );
    assert_eq!(
        moved("pcache_cache_write_bytes_total"),
        (writes * BLOCK as u64) as f64
    );
    assert!(get(&m2, "pcache_dirty_bytes") >= (writes * BLOCK as u64) as f64);
    assert!(get(&m2, "pcache_used_bytes") > 0.0);
    assert!(get(&m2, "pcache_capacity_bytes") >= get(&m2, "pcache_used_bytes"));
    assert_eq!(get(&m2, "pcache_frontend_connected"), 1.0);
    assert_eq!(get(&m2, "pcache_queues_started"), 2.0);
    assert_eq!(get(&m2, "pcache_migration_phase{phase=\"serving\"}"), 1.0);
    assert_eq!(get(&m2, "pcache_migration_phase{phase=\"standby\"}"), 0.0);
    assert_eq!(
        get(
            &m2,
            "pcache_mode_info{mode=\"writeback\",writeback_order=\"batch\",read_only=\"false\"}"
        ),
        1.0
    );

    // One latency histogram per queue, each holding that queue's requests.
    assert!(
        body2.contains("# TYPE pcache_request_latency_seconds histogram\n"),
        "{body2}"
    );
    let mut total = 0.0;
    for q in 0..2 {
        let inf = get(
            &m2,
            &format!("pcache_request_latency_seconds_bucket{{le=\"+Inf\",queue=\"{q}\"}}"),
        );
        let count = get(
            &m2,
            &format!("pcache_request_latency_seconds_count{{queue=\"{q}\"}}"),
        );
        let sum = get(
            &m2,
            &format!("pcache_request_latency_seconds_sum{{queue=\"{q}\"}}"),
        );
        assert_eq!(inf, count, "queue {q}");
        assert!(count >= writes as f64 / 2.0, "queue {q} counted {count}");
        assert!(
            sum > 0.0 && sum < count * 10.0,
            "queue {q}: sum {sum} of {count}"
        );
        // Cumulative buckets never go down, and there are 22 finite ones.
        let prefix = "pcache_request_latency_seconds_bucket{le=\"";
        let mut buckets: Vec<(f64, f64)> = m2
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && k.ends_with(&format!("queue=\"{q}\"}}")))
            .map(|(k, v)| {
                let le = &k[prefix.len()..k.find("\",").unwrap()];
                (le.parse().unwrap_or(f64::INFINITY), *v)
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(buckets.len(), 23, "queue {q}: {buckets:?}");
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{buckets:?}");
        total += count;
    }
    let answered: f64 = m2
        .iter()
        .filter(|(k, _)| k.starts_with("pcache_requests_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(total, answered, "every request answered has a latency");

    // pcache status: p50 and p99 from the same histograms.
    let st = status(&server);
    let lat = &st["latency"];
    assert_eq!(lat["requests"].as_f64(), Some(total), "{st}");
    let (p50, p99) = (
        lat["p50_us"].as_f64().unwrap(),
        lat["p99_us"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= 10e6, "{lat}");
    let o = pcache(&["status", "--control", &server.control.display().to_string()]);
    let t = text(&o);
    assert!(
        t.lines()
            .any(|l| l.starts_with("latency      p50 ") && l.contains(", p99 ")),
        "{t}"
    );

    // Bad requests are refused, and the server answers after them.
    let r = http(addr, b"GET /other HTTP/1.1\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 404 "), "{r}");
    let r = http(addr, b"\x16\x03\x01\x02\x00garbage\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
    let r = http(addr, b"DELETE /metrics HTTP/1.1\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
    let m3 = samples(&scrape(addr));
    assert!(get(&m3, &requests("write", "ok")) >= get(&m2, &requests("write", "ok")));

    drop(c);
    server.stop();
}

#[test]
fn a_metrics_port_in_use_stops_serve_with_a_message() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let disk = Disk::new(16 * MIB, None);
    let args = disk.serve_args(&["--cache-size", "512M", "--metrics", &addr]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_pcache"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("pcache serve kept running with its metrics port taken");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let o = child.wait_with_output().unwrap();
    let msg = text(&o);
    assert_eq!(st.code(), Some(1), "{msg}");
    assert!(
        msg.contains(&format!("Cannot listen for metrics on {addr}")),
        "{msg}"
    );
    assert!(!disk.socket.exists(), "no vhost socket was left: {msg}");

    // Not an address at all: refused as a bad argument.
    let o = pcache(&["serve", "--metrics", "localhost"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}
