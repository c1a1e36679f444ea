//! Inspection commands. `xlb flows`: the live connections of an instance,
//! read straight from its pinned conntrack map (so it also works after a
//! crash). `xlb backends`: the backend set, from the admin API.

use anyhow::Result;
use serde_json::Value;

use crate::dataplane::{pinned_connections, pins::PinDir, Connection};
use crate::telemetry::client::{self, Credentials};

pub fn backends(admin: &str, json: bool, creds: Option<&Credentials>) -> Result<String> {
    let (_, _, doc) = client::fetch(admin, creds)?;
    let list = doc.get("backends").cloned().unwrap_or(Value::Array(Vec::new()));
    if json {
        return Ok(serde_json::to_string_pretty(&list)? + "\n");
    }
    let items = list.as_array().map(Vec::as_slice).unwrap_or_default();
    Ok(backends_table(items, crate::provider::unix_ms()))
}

/// The `xlb backends` table of status-document backends.
fn backends_table(items: &[Value], now_unix_ms: u64) -> String {
    let mut out = format!(
        "{:<20} {:<16} {:>6} {:<9} {:<9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>9} {:>12} {:>12}  {}\n",
        "NAME",
        "ADDRESS",
        "WEIGHT",
        "STATE",
        "HEALTH",
        "CHECK_MS",
        "ACTIVE",
        "CLOSED",
        "ORPHANED",
        "SYNACK_MS",
        "REFUSED",
        "NO_ANSWER",
        "BYTES_IN",
        "BYTES_OUT",
        "LAST_CHECK"
    );
    for b in items {
        let n = |k: &str| b.get(k).and_then(Value::as_u64).unwrap_or(0);
        let t = |k: &str| b.get("traffic").and_then(|t| t.get(k)).and_then(Value::as_u64).unwrap_or(0);
        let s = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        let latency =
            b.get("check_latency_ms").and_then(Value::as_f64).map_or("-".into(), |ms| format!("{ms:.1}"));
        let changed = b
            .get("health_changed_unix_ms")
            .and_then(Value::as_u64)
            .map(|at| format!(" (since {}s)", now_unix_ms.saturating_sub(at) / 1000))
            .unwrap_or_default();
        // How it answered new connections' SYNs, as the data path saw them.
        let hs = |k: &str| b.get("handshakes").and_then(|h| h.get(k)).and_then(Value::as_u64).unwrap_or(0);
        let syn_ack = b
            .get("handshakes")
            .and_then(|h| h.get("latency_mean_ms"))
            .and_then(Value::as_f64)
            .map_or("-".into(), |ms| format!("{ms:.2}"));
        out += &format!(
            "{:<20} {:<16} {:>6} {:<9} {:<9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>9} {:>12} {:>12}  {}{changed}\n",
            s("name"),
            s("address"),
            n("weight"),
            s("state"),
            s("health"),
            latency,
            n("connections_active"),
            n("connections_closed_fin") + n("connections_closed_rst"),
            n("connections_orphaned"),
            syn_ack,
            hs("refused"),
            hs("timed_out"),
            t("bytes_to_backend"),
            t("bytes_to_client"),
            s("last_check"),
        );
    }
    out += &format!("{} backends\n", items.len());
    out
}

pub fn flows(instance: &str, json: bool) -> Result<String> {
    let conns = pinned_connections(&PinDir::for_instance(instance))?;
    if json {
        return Ok(serde_json::to_string_pretty(&conns)? + "\n");
    }
    Ok(table(&conns))
}

fn table(conns: &[Connection]) -> String {
    let mut out = format!(
        "{:<22} {:<22} {:>8} {:<12} {:>9} {:>9} {:>12} {:>12}\n",
        "CLIENT", "BACKEND", "NAT_PORT", "STATE", "AGE_S", "IDLE_S", "BYTES_IN", "BYTES_OUT"
    );
    for c in conns {
        out += &format!(
            "{:<22} {:<22} {:>8} {:<12} {:>9.1} {:>9.1} {:>12} {:>12}\n",
            c.client.to_string(),
            c.backend.to_string(),
            c.nat_port,
            c.state,
            c.age_secs,
            c.idle_secs,
            c.traffic.bytes_to_backend,
            c.traffic.bytes_to_client
        );
    }
    out += &format!("{} connections\n", conns.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_table_shows_health_when_checked() {
        let mut st = crate::telemetry::metrics::tests::running();
        st.backends[1].state = "excluded";
        st.backends[1].check = crate::status::CheckStatus {
            health: Some("unhealthy"),
            last_check: Some("connect refused".into()),
            health_changed_unix_ms: Some(10_000),
            check_latency_ms: Some(0.25),
        };
        let doc = serde_json::to_value(&st).unwrap();
        let text = backends_table(doc["backends"].as_array().unwrap(), 15_000);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("STATE     HEALTH") && lines[0].ends_with("LAST_CHECK"), "{text}");
        let be1 = lines.iter().find(|l| l.starts_with("be1 ")).unwrap();
        assert!(be1.contains(" active    -  ") && be1.ends_with("  -"), "unchecked: {be1:?}");
        let be2 = lines.iter().find(|l| l.starts_with("be2 ")).unwrap();
        assert!(be2.contains(" excluded  unhealthy      0.2 "), "{be2:?}");
        assert!(be2.ends_with("  connect refused (since 5s)"), "{be2:?}");
        assert_eq!(lines.last(), Some(&"2 backends"));
        assert!(lines[0].contains("ORPHANED SYNACK_MS REFUSED NO_ANSWER"), "{text}");
        assert!(be1.contains("         -       0         0 "), "no handshakes yet: {be1:?}");
        st.backends[0].handshakes = crate::status::Handshakes {
            answered: 9,
            refused: 2,
            timed_out: 3,
            latency_mean_ms: Some(0.125),
            ..Default::default()
        };
        let doc = serde_json::to_value(&st).unwrap();
        let text = backends_table(doc["backends"].as_array().unwrap(), 15_000);
        let be1 = text.lines().find(|l| l.starts_with("be1 ")).unwrap();
        assert!(be1.contains("      0.12       2         3 "), "{be1:?}");
    }
}
