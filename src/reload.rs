//! SIGHUP: re-read xlb.yaml and apply what can change while running. The
//! provider (its backend list, or the Kubernetes namespace and service, or
//! the kind itself) is replaced live; every other key that changed is named
//! in a log line as needing a restart and keeps its running value. A file
//! that does not validate is rejected as a whole. A reload never stops XLB.

use std::path::Path;

use tracing::{info, warn};

use crate::config::Config;
use crate::provider::Supervisor;

/// The top-level keys whose new value takes effect without a restart.
const LIVE_KEYS: &[&str] = &["provider"];

/// Reloads `path` over `running` (what runs now; only the provider changes
/// live, through the supervisor, which knows which one serves).
pub async fn reload(path: &Path, running: &Config, provider: &Supervisor) {
    info!(file = %path.display(), "SIGHUP: reloading");
    let next = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            let e = anyhow::Error::from(e);
            warn!("reload rejected, keeping the running config: {e:#}");
            provider.failed(&e).await;
            return;
        }
    };
    let restart = changed_keys(running, &next)
        .into_iter()
        .filter(|k| !LIVE_KEYS.contains(&k.as_str()))
        .collect::<Vec<_>>();
    if !restart.is_empty() {
        warn!(
            "reload: {} changed but need{} a restart to take effect; running with the old value{}",
            restart.join(", "),
            if restart.len() == 1 { "s" } else { "" },
            if restart.len() == 1 { "" } else { "s" }
        );
    }
    if next.provider == provider.current() {
        info!("reload: backends unchanged");
        return;
    }
    // The supervisor swaps once the new provider has synced, and logs it.
    if let Err(e) = provider.replace(next.provider.clone()).await {
        warn!("reload rejected, keeping the running provider: {e:#}");
    }
}

/// Top-level keys whose values differ between two configs.
pub fn changed_keys(a: &Config, b: &Config) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return Vec::new();
    };
    let mut keys: Vec<String> =
        a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        Config::parse(
            &format!(
                "listen: {{ip: 10.0.0.1}}\nports: [{{local_port: 80, remote_port: 8080}}]\n\
                 provider: {{static: {{backends: [{{name: a, ip: 10.0.0.2}}]}}}}\n{extra}"
            ),
            "test",
        )
        .unwrap()
    }

    #[test]
    fn changed_keys_names_each_top_level_key() {
        assert!(changed_keys(&cfg(""), &cfg("")).is_empty());
        assert_eq!(changed_keys(&cfg(""), &cfg("shutdown_timeout: 99\n")), ["shutdown_timeout"]);
        let both = changed_keys(&cfg(""), &cfg("shutdown_timeout: 99\nconntrack_capacity: 5000\n"));
        assert_eq!(both, ["conntrack_capacity", "shutdown_timeout"]);
        let mut other = cfg("");
        other.provider = cfg("").provider;
        assert!(changed_keys(&cfg(""), &other).is_empty());
    }
}
