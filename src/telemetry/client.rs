//! `xlb status`: reads `/api/v1/status` (and `/readyz`) from a running
//! instance's admin listener and prints a readable summary, or the document
//! itself with `--json`.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub const DEFAULT_ADMIN: &str = "127.0.0.1:9090";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Basic-auth credentials for an instance with `admin.auth`.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

/// `HOST:PORT`, `:PORT` or an `http://` URL -> the base URL.
pub fn base_url(admin: &str) -> Result<String> {
    let admin = admin.trim().trim_end_matches('/');
    if admin.starts_with("https://") {
        bail!("--admin {admin}: the admin listener speaks plain http");
    }
    let hostport = admin.strip_prefix("http://").unwrap_or(admin);
    let hostport = match hostport.strip_prefix(':') {
        Some(port) => format!("127.0.0.1:{port}"),
        None => hostport.to_string(),
    };
    let port_ok = hostport.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if !port_ok || hostport.contains('/') {
        bail!("--admin {admin}: expected HOST:PORT, e.g. {DEFAULT_ADMIN}");
    }
    Ok(format!("http://{hostport}"))
}

/// GET `base + path`: (HTTP status, body).
fn get(
    client: &reqwest::blocking::Client,
    base: &str,
    path: &str,
    creds: Option<&Credentials>,
) -> Result<(u16, String)> {
    let mut req = client.get(format!("{base}{path}"));
    if let Some(c) = creds {
        req = req.basic_auth(&c.user, Some(&c.password));
    }
    let resp = req.send().map_err(|e| {
        let why = if e.is_timeout() { "no answer in time".to_string() } else { root_cause(&e) };
        anyhow::anyhow!(
            "no xlb answers on {base} ({why}); is it running? point --admin at its admin listener"
        )
    })?;
    let code = resp.status().as_u16();
    let body = resp.text().with_context(|| format!("reading the answer from {base}{path}"))?;
    Ok((code, body))
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// Fetches the status document and readiness; returns what to print.
pub fn status(admin: &str, json: bool, creds: Option<&Credentials>) -> Result<String> {
    let (base, client, doc) = fetch(admin, creds)?;
    if json {
        return Ok(serde_json::to_string_pretty(&doc)? + "\n");
    }
    let ready = match get(&client, &base, "/readyz", None) {
        Ok((200, _)) => "ready".to_string(),
        Ok((_, why)) => format!("not ready: {}", why.trim()),
        Err(_) => "readiness unknown".to_string(),
    };
    Ok(summary(&base, &doc, &ready, crate::provider::unix_ms()))
}

/// The status document of the instance at `admin`, with the base URL and
/// client used.
pub fn fetch(admin: &str, creds: Option<&Credentials>) -> Result<(String, reqwest::blocking::Client, Value)> {
    let base = base_url(admin)?;
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .build()
        .context("building the HTTP client")?;
    let path = "/api/v1/status";
    let (code, body) = get(&client, &base, path, creds)?;
    match code {
        200 => {}
        401 if creds.is_none() => bail!(
            "{base}{path}: 401 unauthorized: this instance has admin.auth; \
             pass --user and put the password in $XLB_ADMIN_PASSWORD (or --password-env)"
        ),
        401 => bail!("{base}{path}: 401 unauthorized: user or password rejected"),
        _ => bail!("{base}{path}: HTTP {code}: {}", body.trim()),
    }
    let doc: Value = serde_json::from_str(&body)
        .with_context(|| format!("{base}{path} did not answer with a status document"))?;
    Ok((base, client, doc))
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
}

fn n(v: &Value, key: &str) -> u64 {
    v.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// 1536 -> "1.5 KiB".
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|x| x.len()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, x)| format!("{x:<w$}", w = width[i])).collect();
        let _ = writeln!(out, "  {}", line.join("  ").trim_end());
    }
    out
}

/// The readable summary of a status document.
pub fn summary(base: &str, doc: &Value, ready: &str, now_unix_ms: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "xlb {} at {base}: {}, {ready}", s(doc, "version"), s(doc, "phase"));

    let ports: Vec<String> = doc["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("{}->{}", n(p, "local_port"), n(p, "remote_port")))
        .collect();
    // The whole pool when there is one (older servers send `snat` only).
    let pool: Vec<&str> =
        doc["snat_ips"].as_array().into_iter().flatten().filter_map(|v| v.as_str()).collect();
    let snat = if pool.len() > 1 { pool.join(", ") } else { s(doc, "snat").to_string() };
    let _ = writeln!(
        out,
        "listen       {}  ports {}  snat {}",
        s(doc, "listen"),
        if ports.is_empty() { "-".to_string() } else { ports.join(", ") },
        snat
    );

    let ifaces: Vec<String> = doc["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            let transmit = i.get("transmit").and_then(|t| t.as_str()).unwrap_or("-");
            format!("{} ({}, {transmit}, ifindex {})", s(i, "name"), s(i, "xdp_mode"), n(i, "ifindex"))
        })
        .collect();
    let _ = writeln!(
        out,
        "interfaces   {}",
        if ifaces.is_empty() { "none attached".into() } else { ifaces.join(", ") }
    );

    match doc.get("provider").filter(|p| !p.is_null()) {
        None => {
            let _ = writeln!(out, "provider     not started");
        }
        Some(p) => {
            let flag = |k: &str, yes: &str, no: &str| {
                if p[k].as_bool().unwrap_or(false) {
                    yes.to_string()
                } else {
                    no.to_string()
                }
            };
            let age = match p["last_sync_unix_ms"].as_u64() {
                Some(at) => format!("last sync {}s ago", now_unix_ms.saturating_sub(at) / 1000),
                None => "never synced".to_string(),
            };
            let mut line = format!(
                "provider     {} ({}): {}, {}, {age}, {} errors",
                s(p, "kind"),
                s(p, "mode"),
                flag("connected", "connected", "disconnected"),
                flag("synced", "synced", "not synced"),
                n(p, "errors")
            );
            if let Some(e) = p["last_error"].as_str() {
                let _ = write!(line, " (last: {e})");
            }
            let _ = writeln!(out, "{line}");
        }
    }

    let active = n(doc, "connections_active");
    let capacity = n(doc, "conntrack_capacity");
    let usage = if capacity > 0 {
        format!(" of {capacity} ({:.1}% of conntrack)", active as f64 * 100.0 / capacity as f64)
    } else {
        String::new()
    };
    let _ = writeln!(out, "connections  {active} active{usage}");

    let backends = doc["backends"].as_array().cloned().unwrap_or_default();
    let draining = backends.iter().filter(|b| b["state"] == "draining").count();
    let excluded = backends.iter().filter(|b| b["state"] == "excluded").count();
    let mut line =
        format!("\nbackends: {} active, {draining} draining", backends.len() - draining - excluded);
    if let Some(h) = doc.get("health_checks").filter(|h| !h.is_null()) {
        let _ = write!(
            line,
            ", {excluded} excluded; {} checks: {} healthy, {} unhealthy, {} unknown",
            s(h, "type"),
            n(h, "healthy"),
            n(h, "unhealthy"),
            n(h, "unknown")
        );
        if h["fail_open"].as_bool().unwrap_or(false) {
            line += " (none healthy: failing open, every listed backend stays eligible)";
        }
    }
    let _ = writeln!(out, "{line}");
    if !backends.is_empty() {
        let mut rows = vec![[
            "NAME",
            "ADDRESS",
            "WEIGHT",
            "STATE",
            "HEALTH",
            "LAST CHECK",
            "ACTIVE",
            "FIN",
            "RST",
            "ORPHANED",
            "TO BACKEND",
            "TO CLIENT",
        ]
        .map(String::from)
        .to_vec()];
        for b in &backends {
            let t = &b["traffic"];
            rows.push(vec![
                s(b, "name").to_string(),
                s(b, "address").to_string(),
                n(b, "weight").to_string(),
                s(b, "state").to_string(),
                s(b, "health").to_string(),
                match (b["last_check"].as_str(), b["check_latency_ms"].as_f64()) {
                    (Some(r), Some(ms)) => format!("{r} ({ms:.1} ms)"),
                    // A passive verdict has no probe time.
                    (Some(r), None) => r.to_string(),
                    _ => "-".to_string(),
                },
                n(b, "connections_active").to_string(),
                n(b, "connections_closed_fin").to_string(),
                n(b, "connections_closed_rst").to_string(),
                n(b, "connections_orphaned").to_string(),
                format!("{} / {} pkts", bytes(n(t, "bytes_to_backend")), n(t, "packets_to_backend")),
                format!("{} / {} pkts", bytes(n(t, "bytes_to_client")), n(t, "packets_to_client")),
            ]);
        }
        out.push_str(&table(&rows));
    }

    let counters: Vec<(String, u64)> = doc["counters"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
        .collect();
    let sum =
        |prefix: &str| counters.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v).sum::<u64>();
    let _ = writeln!(
        out,
        "\npackets: {} forwarded, {} passed to the kernel, {} dropped; {} connections opened",
        sum("fwd_"),
        sum("pass_"),
        sum("drop_"),
        sum("new_flow")
    );
    let moved: Vec<Vec<String>> =
        counters.iter().filter(|(_, v)| *v > 0).map(|(k, v)| vec![k.clone(), v.to_string()]).collect();
    out.push_str(&table(&moved));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_address_forms() {
        assert_eq!(base_url("127.0.0.1:9090").unwrap(), "http://127.0.0.1:9090");
        assert_eq!(base_url("http://10.0.0.1:9091/").unwrap(), "http://10.0.0.1:9091");
        assert_eq!(base_url(":9092").unwrap(), "http://127.0.0.1:9092");
        assert_eq!(base_url("[::1]:9090").unwrap(), "http://[::1]:9090");
        assert_eq!(base_url("lb.example:9090").unwrap(), "http://lb.example:9090");
        for bad in ["127.0.0.1", "9090", "host:port", "https://x:1", "http://x:1/api"] {
            assert!(base_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(10 * 1024 * 1024), "10.0 MiB");
    }

    #[test]
    fn summary_of_a_document() {
        let mut status = crate::telemetry::metrics::tests::running();
        status.backends[1].state = "draining";
        status.provider.as_mut().unwrap().last_sync_unix_ms = Some(1_000);
        let doc = serde_json::to_value(&status).unwrap();
        let text = summary("http://127.0.0.1:9090", &doc, "ready", 4_000);
        let head = format!("xlb {} at http://127.0.0.1:9090: running, ready\n", env!("CARGO_PKG_VERSION"));
        assert!(text.starts_with(&head), "{text}");
        assert!(text.contains("interfaces   eth0 (native, xdp_tx, ifindex 2)"), "{text}");
        assert!(text.contains("static (static): connected, synced, last sync 3s ago, 0 errors"), "{text}");
        assert!(text.contains("connections  4 active of 100 (4.0% of conntrack)"), "{text}");
        assert!(text.contains("backends: 1 active, 1 draining"), "{text}");
        assert!(text.contains("be2   10.0.0.3  1       draining  -       -"), "{text}");

        let mut checked = crate::telemetry::metrics::tests::running();
        checked.backends[1].state = "excluded";
        checked.backends[1].check.health = Some("unhealthy");
        checked.backends[1].check.last_check = Some("connect refused".into());
        checked.backends[1].check.check_latency_ms = Some(0.42);
        checked.health_checks = Some(crate::status::HealthChecks {
            kind: "tcp",
            healthy: 1,
            unhealthy: 1,
            unknown: 0,
            fail_open: false,
        });
        let doc = serde_json::to_value(&checked).unwrap();
        let text = summary("http://127.0.0.1:9090", &doc, "ready", 4_000);
        assert!(
            text.contains(
                "backends: 1 active, 0 draining, 1 excluded; tcp checks: 1 healthy, 1 unhealthy, 0 unknown\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("be2   10.0.0.3  1       excluded  unhealthy  connect refused (0.4 ms)"),
            "{text}"
        );
        assert!(
            text.contains("30 forwarded, 0 passed to the kernel, 1 dropped; 3 connections opened"),
            "{text}"
        );
        assert!(text.contains("drop_nat_exhausted  1"), "{text}");
    }
}
