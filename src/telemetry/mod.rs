//! Metrics: one model read from the status document ([`metrics`]),
//! exported over OTLP ([`otel`], when `otel.enabled`) and served as
//! Prometheus text on the admin listener ([`prometheus`]).
//!
//! Telemetry only reads copies of the status document, which the control
//! plane refreshes once a second; it never touches the data plane, never
//! steers anything, and a slow or absent collector only delays the
//! exporter's own thread.

pub mod client;
pub mod metrics;
pub mod otel;
pub mod prometheus;

use crate::config::{Config, Provider};
use crate::status::SharedStatus;

pub use otel::Telemetry;

/// Environment variables the Helm chart sets from the Downward API, and the
/// resource attribute each becomes.
pub const K8S_ENV: &[(&str, &str)] = &[
    ("K8S_POD_NAME", "k8s.pod.name"),
    ("K8S_NAMESPACE_NAME", "k8s.namespace.name"),
    ("K8S_NODE_NAME", "k8s.node.name"),
];

/// `service.name`: the config's `name`, else the Kubernetes service it
/// balances, else `xlb`.
pub fn service_name(cfg: &Config) -> String {
    match (&cfg.name, &cfg.provider) {
        (Some(name), _) => name.clone(),
        (None, Provider::Kubernetes(k)) => k.service.clone(),
        (None, Provider::Static(_)) => "xlb".to_string(),
    }
}

/// The resource attributes of this instance, reading the environment
/// through `env`: service.name, service.version, service.instance.id (the
/// pod name in Kubernetes, else the host name) and the k8s.* attributes
/// whose variables are set and not empty.
pub fn resource_attributes_from(cfg: &Config, env: impl Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    let env = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let instance = env("K8S_POD_NAME").or_else(hostname).unwrap_or_else(|| "xlb".to_string());
    let mut attrs = vec![
        ("service.name".to_string(), service_name(cfg)),
        ("service.version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("service.instance.id".to_string(), instance),
    ];
    for (var, key) in K8S_ENV {
        if let Some(v) = env(var) {
            attrs.push((key.to_string(), v));
        }
    }
    attrs
}

/// [`resource_attributes_from`] the process environment.
pub fn resource_attributes(cfg: &Config) -> Vec<(String, String)> {
    resource_attributes_from(cfg, |k| std::env::var(k).ok())
}

fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_string()).filter(|h| !h.is_empty())
}

/// Starts OTLP export when `otel.enabled` (otherwise returns a handle that
/// does nothing). Must be called inside the tokio runtime (the gRPC client
/// lives on it); export itself runs on the SDK's own thread.
pub fn start(cfg: &Config, status: SharedStatus) -> anyhow::Result<Telemetry> {
    otel::start(&cfg.otel, resource_attributes(cfg), status)
}

/// The Prometheus endpoint's view of the model for this instance.
pub fn prometheus_endpoint(cfg: &Config, status: SharedStatus) -> prometheus::Endpoint {
    prometheus::Endpoint::new(status, resource_attributes(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &str) -> Config {
        let text = format!(
            "ports: [{{local_port: 80, remote_port: 8080}}]\n\
             provider: {{static: {{backends: [{{name: a, ip: 10.0.0.2}}]}}}}\n{extra}"
        );
        Config::parse(&text, "t").unwrap()
    }

    fn attr<'a>(attrs: &'a [(String, String)], key: &str) -> Option<&'a str> {
        attrs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn service_name_prefers_config_then_kubernetes_service() {
        assert_eq!(service_name(&cfg("name: edge")), "edge");
        assert_eq!(service_name(&cfg("")), "xlb");
        let mut k = cfg("");
        k.provider = Provider::Kubernetes(crate::config::KubernetesProvider {
            namespace: "prod".into(),
            service: "web".into(),
        });
        assert_eq!(service_name(&k), "web");
    }

    #[test]
    fn resource_attributes_from_environment() {
        let env = |k: &str| match k {
            "K8S_POD_NAME" => Some("xlb-abc12".to_string()),
            "K8S_NAMESPACE_NAME" => Some("xlb".to_string()),
            "K8S_NODE_NAME" => Some(" ".to_string()),
            _ => None,
        };
        let attrs = resource_attributes_from(&cfg("name: edge"), env);
        assert_eq!(attr(&attrs, "service.name"), Some("edge"));
        assert_eq!(attr(&attrs, "service.version"), Some(env!("CARGO_PKG_VERSION")));
        assert_eq!(attr(&attrs, "service.instance.id"), Some("xlb-abc12"));
        assert_eq!(attr(&attrs, "k8s.pod.name"), Some("xlb-abc12"));
        assert_eq!(attr(&attrs, "k8s.namespace.name"), Some("xlb"));
        assert_eq!(attr(&attrs, "k8s.node.name"), None, "blank values are left out");

        let outside = resource_attributes_from(&cfg(""), |_| None);
        assert_eq!(outside.len(), 3);
        assert!(attr(&outside, "service.instance.id").is_some_and(|h| !h.is_empty()));
    }
}
