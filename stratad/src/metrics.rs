//! The Prometheus text endpoint (`--metrics ADDR`, off by default): a tiny HTTP/1.0 responder
//! on one thread that answers `GET /metrics` with the reactor and queue counters, and with
//! `--port` the packet queue and XDP steering counters ([`render_ports`]), in the Prometheus
//! text exposition format (version 0.0.4).
//!
//! No framework: one request per connection, the response closes it. The thread only reads
//! counters (relaxed atomic loads through [`StatsHandle`]), so a scrape never disturbs the
//! reactors.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use dataplane::server::{ServerStats, StatsHandle};

/// A scraper must send its request head within this time: the thread serves one client at a
/// time and must not be held by a silent one.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head read (a scrape's head is a few hundred bytes).
const REQUEST_HEAD_MAX: usize = 8 << 10;
/// Nanoseconds per second, for the `_seconds_total` counters.
const NS_PER_SEC: f64 = 1e9;

/// Binds `addr` (e.g. `127.0.0.1:9187`) and serves it on a new thread. Returns the bound
/// address (useful with port 0).
pub fn spawn(
    addr: &str,
    stats: StatsHandle,
    ports: crate::ports::PortCounters,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        if let Err(e) = serve_client(s, &stats, &ports) {
                            tracing::debug!(err = %e, "metrics client");
                        }
                    }
                    Err(e) => tracing::warn!(err = %e, "metrics accept"),
                }
            }
        })?;
    Ok(local)
}

/// Reads the request head and answers it.
fn serve_client(
    mut stream: TcpStream,
    stats: &StatsHandle,
    ports: &crate::ports::PortCounters,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut head = [0u8; REQUEST_HEAD_MAX];
    let mut len = 0;
    while len < head.len() {
        let n = stream.read(&mut head[len..])?;
        if n == 0 {
            break;
        }
        len += n;
        if head[..len].windows(4).any(|w| w == b"\r\n\r\n")
            || head[..len].windows(2).any(|w| w == b"\n\n")
        {
            break;
        }
    }
    let first = head[..len].split(|&b| b == b'\n').next().unwrap_or(&[]);
    let first = String::from_utf8_lossy(first);
    let mut parts = first.split_ascii_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") | ("GET", "/") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(&stats.stats()) + &render_ports(&ports.snapshot()),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let resp = format!(
        "HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes())?;
    stream.flush()
}

/// Escapes a label value (backslash, double quote, newline), as the text format requires.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// One metric family: its HELP and TYPE lines, then one sample per (labels, value).
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// The exposition text of `s`.
pub fn render(s: &ServerStats) -> String {
    let mut out = String::new();
    let rlabel = |i: usize, cpu: &Option<usize>| match cpu {
        Some(c) => format!("reactor=\"{i}\",cpu=\"{c}\""),
        None => format!("reactor=\"{i}\",cpu=\"\""),
    };
    type ReactorField = fn(&dataplane::stats::ReactorStatsSnapshot) -> f64;
    let reactor_families: [(&str, &str, &str, ReactorField); 12] = [
        (
            "strata_reactor_busy_seconds_total",
            "counter",
            "Time in reactor loop iterations that found work.",
            |r| r.busy_ns as f64 / NS_PER_SEC,
        ),
        (
            "strata_reactor_busy_cycles_total",
            "counter",
            "Time-stamp-counter cycles in loop iterations that found work (/ requests = cycles per I/O).",
            |r| r.busy_cycles as f64,
        ),
        (
            "strata_reactor_spin_idle_seconds_total",
            "counter",
            "Time spent polling without finding work.",
            |r| r.spin_idle_ns as f64 / NS_PER_SEC,
        ),
        (
            "strata_reactor_sleep_seconds_total",
            "counter",
            "Time asleep in epoll_wait.",
            |r| r.sleep_ns as f64 / NS_PER_SEC,
        ),
        (
            "strata_reactor_sleeps_total",
            "counter",
            "Times the reactor went to sleep.",
            |r| r.sleeps as f64,
        ),
        (
            "strata_reactor_requests_total",
            "counter",
            "Requests started.",
            |r| r.requests as f64,
        ),
        (
            "strata_reactor_pop_batches_total",
            "counter",
            "Loop iterations that took at least one request (requests / pop batches = batch size).",
            |r| r.pop_batches as f64,
        ),
        (
            "strata_reactor_submits_total",
            "counter",
            "Engine submissions that carried at least one operation.",
            |r| r.submits as f64,
        ),
        (
            "strata_reactor_submitted_ops_total",
            "counter",
            "Operations carried by engine submissions.",
            |r| r.submitted_ops as f64,
        ),
        (
            "strata_reactor_reap_batches_total",
            "counter",
            "Engine reaps that returned at least one completion.",
            |r| r.reap_batches as f64,
        ),
        (
            "strata_reactor_reaped_total",
            "counter",
            "Completions returned by engine reaps.",
            |r| r.reaped as f64,
        ),
        (
            "strata_reactor_queues",
            "gauge",
            "Virtqueues currently served.",
            |r| r.queues as f64,
        ),
    ];
    for (name, kind, help, get) in reactor_families {
        let samples: Vec<(String, f64)> = s
            .reactors
            .iter()
            .enumerate()
            .map(|(i, (cpu, r))| (rlabel(i, cpu), get(r)))
            .collect();
        family(&mut out, name, kind, help, &samples);
    }
    type QueueField = fn(&dataplane::stats::QueueStatsSnapshot) -> f64;
    let queue_families: [(&str, &str, QueueField); 7] = [
        (
            "strata_queue_requests_total",
            "Requests completed (any status).",
            |q| q.requests as f64,
        ),
        (
            "strata_queue_read_bytes_total",
            "Bytes read by the guest.",
            |q| q.read_bytes as f64,
        ),
        (
            "strata_queue_write_bytes_total",
            "Bytes written by the guest.",
            |q| q.write_bytes as f64,
        ),
        (
            "strata_queue_invalid_requests_total",
            "Requests refused by validation.",
            |q| q.invalid_requests as f64,
        ),
        (
            "strata_queue_unsupported_requests_total",
            "Requests of unsupported types.",
            |q| q.unsupported_requests as f64,
        ),
        (
            "strata_queue_io_errors_total",
            "Requests the backend failed.",
            |q| q.io_errors as f64,
        ),
        (
            "strata_queue_notifications_total",
            "Guest notifications sent (call eventfd writes).",
            |q| q.notifications as f64,
        ),
    ];
    for (name, help, get) in queue_families {
        let mut samples = Vec::new();
        for d in &s.disks {
            let disk = escape(&d.name);
            for (qi, q) in d.queues.iter().enumerate() {
                samples.push((format!("disk=\"{disk}\",queue=\"{qi}\""), get(q)));
            }
        }
        family(&mut out, name, "counter", help, &samples);
    }
    out
}

/// The exposition text of the packet queue and steering counters (families without samples
/// when stratad serves no `--port`).
pub fn render_ports(p: &crate::ports::PortsSnapshot) -> String {
    let mut out = String::new();
    type QueueField = fn(&(String, u32, &'static str, u64, u64, u64)) -> u64;
    let queue_families: [(&str, &str, QueueField); 3] = [
        (
            "strata_packet_queue_rx_frames_total",
            "Frames received by a packet queue (--port).",
            |q| q.3,
        ),
        (
            "strata_packet_queue_rx_bytes_total",
            "Bytes received by a packet queue.",
            |q| q.4,
        ),
        (
            "strata_packet_queue_errors_total",
            "Failed receive bursts of a packet queue.",
            |q| q.5,
        ),
    ];
    for (name, help, get) in queue_families {
        let samples: Vec<(String, f64)> = p
            .queues
            .iter()
            .map(|q| {
                (
                    format!(
                        "iface=\"{}\",queue=\"{}\",backend=\"{}\"",
                        escape(&q.0),
                        q.1,
                        q.2
                    ),
                    get(q) as f64,
                )
            })
            .collect();
        family(&mut out, name, "counter", help, &samples);
    }
    type SteerField = fn(&crate::ports::SteeringCounters) -> u64;
    let steer_families: [(&str, &str, SteerField); 4] = [
        (
            "strata_xdp_steered_total",
            "Frames the XDP program redirected to an AF_XDP socket.",
            |c| c.steered,
        ),
        (
            "strata_xdp_passed_total",
            "Frames the XDP program passed to the kernel (not storage traffic).",
            |c| c.passed,
        ),
        (
            "strata_xdp_malformed_total",
            "Frames with truncated or invalid headers, passed to the kernel.",
            |c| c.malformed,
        ),
        (
            "strata_xdp_unbound_total",
            "Storage frames on a queue without a socket, passed to the kernel.",
            |c| c.unbound,
        ),
    ];
    for (name, help, get) in steer_families {
        let samples: Vec<(String, f64)> = p
            .steering
            .iter()
            .map(|(iface, c)| (format!("iface=\"{}\"", escape(iface)), get(c) as f64))
            .collect();
        family(&mut out, name, "counter", help, &samples);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use dataplane::backend::NullBackend;
    use dataplane::engine::EngineKind;
    use dataplane::server::{DiskConfig, Server, ServerConfig};

    use super::*;

    fn scrape(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).expect("connect");
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").expect("send");
        let mut resp = String::new();
        s.read_to_string(&mut resp).expect("read");
        resp
    }

    #[test]
    fn scrape_reports_reactor_and_queue_counters() {
        let dir = std::env::temp_dir().join(format!("stratad-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let mut server = Server::new(&ServerConfig {
            cpus: vec![None],
            engine: EngineKind::Sync,
        })
        .expect("server");
        server
            .add_disk(DiskConfig {
                name: "d\"0".into(),
                socket: dir.join("d0.sock"),
                backend: Arc::new(NullBackend::new(1 << 20, true).expect("null")),
                num_queues: 2,
            })
            .expect("disk");
        let addr = spawn(
            "127.0.0.1:0",
            server.stats_handle(),
            crate::ports::PortCounters::default(),
        )
        .expect("spawn");
        let resp = scrape(addr, "/metrics");
        assert!(resp.starts_with("HTTP/1.0 200 OK\r\n"), "{resp}");
        assert!(resp.contains("Content-Type: text/plain; version=0.0.4"));
        let body = resp.split("\r\n\r\n").nth(1).expect("body");
        assert!(body.contains("# TYPE strata_reactor_busy_seconds_total counter\n"));
        assert!(body.contains("strata_reactor_requests_total{reactor=\"0\",cpu=\"\"} 0\n"));
        assert!(body.contains("strata_reactor_pop_batches_total{"));
        assert!(body.contains("strata_queue_requests_total{disk=\"d\\\"0\",queue=\"1\"} 0\n"));
        // Every sample line is `name{labels} number`.
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').expect("sample");
            value.parse::<f64>().expect("numeric value");
        }
        assert!(scrape(addr, "/nope").starts_with("HTTP/1.0 404"));
        // No --port: the port families are present, without samples.
        assert!(body.contains("# TYPE strata_xdp_steered_total counter\n"));
        assert!(!body.contains("strata_xdp_steered_total{"));
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn port_counters_render_per_queue_and_interface() {
        let snap = crate::ports::PortsSnapshot {
            queues: vec![
                ("eth0".into(), 0, "af_xdp", 10, 640, 0),
                ("eth0".into(), 1, "af_xdp", 5, 320, 1),
            ],
            steering: vec![(
                "eth0".into(),
                crate::ports::SteeringCounters {
                    steered: 15,
                    passed: 7,
                    malformed: 2,
                    unbound: 1,
                },
            )],
        };
        let text = render_ports(&snap);
        for line in [
            "strata_packet_queue_rx_frames_total{iface=\"eth0\",queue=\"0\",backend=\"af_xdp\"} 10\n",
            "strata_packet_queue_rx_bytes_total{iface=\"eth0\",queue=\"1\",backend=\"af_xdp\"} 320\n",
            "strata_packet_queue_errors_total{iface=\"eth0\",queue=\"1\",backend=\"af_xdp\"} 1\n",
            "strata_xdp_steered_total{iface=\"eth0\"} 15\n",
            "strata_xdp_passed_total{iface=\"eth0\"} 7\n",
            "strata_xdp_malformed_total{iface=\"eth0\"} 2\n",
            "strata_xdp_unbound_total{iface=\"eth0\"} 1\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
