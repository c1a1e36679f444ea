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
    let mut out = format!(
        "{:<20} {:<16} {:>6} {:<9} {:>8} {:>8} {:>8} {:>12} {:>12}\n",
        "NAME", "ADDRESS", "WEIGHT", "STATE", "ACTIVE", "CLOSED", "ORPHANED", "BYTES_IN", "BYTES_OUT"
    );
    let items = list.as_array().map(Vec::as_slice).unwrap_or_default();
    for b in items {
        let n = |k: &str| b.get(k).and_then(Value::as_u64).unwrap_or(0);
        let t = |k: &str| b.get("traffic").and_then(|t| t.get(k)).and_then(Value::as_u64).unwrap_or(0);
        let s = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("-").to_string();
        out += &format!(
            "{:<20} {:<16} {:>6} {:<9} {:>8} {:>8} {:>8} {:>12} {:>12}\n",
            s("name"),
            s("address"),
            n("weight"),
            s("state"),
            n("connections_active"),
            n("connections_closed_fin") + n("connections_closed_rst"),
            n("connections_orphaned"),
            t("bytes_to_backend"),
            t("bytes_to_client"),
        );
    }
    out += &format!("{} backends\n", items.len());
    Ok(out)
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
