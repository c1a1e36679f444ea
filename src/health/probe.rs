//! One health probe from the node's own network stack: a TCP connect, or an
//! HTTP/1.1 GET whose status line is checked. Ordinary kernel sockets: the
//! source port is an ephemeral one, outside nat_port_range (XLB refuses to
//! start when the two overlap), so the replies go to the kernel, never
//! through XLB's NAT. Sockets close with a RST (zero linger): a probe
//! leaves no TIME_WAIT behind on the node.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::state::Observation;
use crate::config::{CheckType, HealthCheck, StatusRange};

/// The most of an answer read to find its status line.
const STATUS_LINE_LIMIT: usize = 1024;

/// What to probe and how, from `health_check`.
#[derive(Debug, Clone)]
pub struct Probe {
    kind: CheckType,
    port: u16,
    path: String,
    expect: StatusRange,
    timeout: Duration,
}

impl Probe {
    /// `default_port` serves when the config left `port` unset.
    pub fn new(hc: &HealthCheck, default_port: u16) -> Self {
        Probe {
            kind: hc.kind,
            port: hc.port.unwrap_or(default_port),
            path: hc.path.clone().unwrap_or_else(|| "/".into()),
            expect: hc.expect_status.unwrap_or_default(),
            timeout: Duration::from_millis(hc.timeout_ms),
        }
    }

    /// Probes `addr` once; never takes much longer than the timeout.
    pub async fn run(&self, addr: Ipv4Addr) -> Observation {
        let start = Instant::now();
        let (ok, detail) = match self.attempt(addr, start).await {
            Ok(detail) => (true, detail),
            Err(detail) => (false, detail),
        };
        Observation { ok, detail, latency: start.elapsed() }
    }

    async fn attempt(&self, addr: Ipv4Addr, start: Instant) -> Result<String, String> {
        let target = SocketAddr::from((addr, self.port));
        let ms = self.timeout.as_millis();
        let stream = match tokio::time::timeout(self.timeout, TcpStream::connect(target)).await {
            Err(_) => return Err(format!("connect timeout after {ms} ms")),
            Ok(Err(e)) => return Err(connect_error(&e)),
            Ok(Ok(s)) => s,
        };
        let _ = stream.set_zero_linger();
        if self.kind == CheckType::Tcp {
            return Ok("connect ok".into());
        }
        let left = self.timeout.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, self.http_status(stream, addr)).await {
            Err(_) => Err(format!("no answer within {ms} ms")),
            Ok(Err(e)) => Err(e),
            Ok(Ok(code)) if self.expect.contains(code) => Ok(format!("status {code}")),
            Ok(Ok(code)) => Err(format!("status {code}, expected {}", self.expect)),
        }
    }

    /// Sends the GET and reads the answer's status code.
    async fn http_status(&self, mut s: TcpStream, addr: Ipv4Addr) -> Result<u16, String> {
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {addr}:{}\r\nUser-Agent: xlb-health/{}\r\nAccept: */*\r\n\
             Connection: close\r\n\r\n",
            self.path,
            self.port,
            env!("CARGO_PKG_VERSION")
        );
        s.write_all(request.as_bytes()).await.map_err(|e| format!("sending the request: {e}"))?;
        let mut buf = Vec::with_capacity(256);
        let mut chunk = [0u8; 256];
        while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < STATUS_LINE_LIMIT {
            let n = s.read(&mut chunk).await.map_err(|e| format!("reading the answer: {e}"))?;
            if n == 0 {
                return Err("connection closed before a status line".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        parse_status_line(&buf).ok_or_else(|| "not an HTTP answer".to_string())
    }
}

/// `HTTP/1.1 200 OK\r\n...` -> 200.
fn parse_status_line(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|&b| b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    parts.next().filter(|v| v.starts_with("HTTP/1."))?;
    let code = parts.next()?;
    (code.len() == 3).then(|| code.parse().ok()).flatten()
}

fn connect_error(e: &std::io::Error) -> String {
    match e.kind() {
        ErrorKind::ConnectionRefused => "connect refused".into(),
        ErrorKind::HostUnreachable => "host unreachable".into(),
        ErrorKind::NetworkUnreachable => "network unreachable".into(),
        _ => format!("connect failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503 Service Unavailable\r\nX: y"), Some(503));
        assert_eq!(parse_status_line(b"HTTP/1.1 204\r\n"), Some(204));
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 2000 x\r\n"), None);
    }
}
