//! The metric model as Prometheus text (exposition format 0.0.4), encoded
//! by `prometheus-client`: names with dots as underscores, `_total` on
//! counters, and the resource attributes as the labels of `target_info`
//! (as OpenTelemetry's Prometheus mapping does). Histograms are classic
//! Prometheus histograms: `_bucket{le=...}` (cumulative, `+Inf` last),
//! `_sum` and `_count`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::metrics::{Kind, Metrics, Snapshot, Value};
use crate::status::SharedStatus;

/// The `Content-Type` of the text this module writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// What `/metrics` serves: its own view of the model (its own rate window)
/// and the resource attributes.
#[derive(Debug)]
pub struct Endpoint {
    metrics: Metrics,
    resource: Vec<(String, String)>,
}

impl Endpoint {
    pub fn new(status: SharedStatus, resource: Vec<(String, String)>) -> Self {
        Endpoint { metrics: Metrics::new(status), resource }
    }

    /// Every metric, now, as Prometheus text.
    pub fn render(&self) -> String {
        render(self.metrics.collect(), &self.resource)
    }
}

/// Encodes a snapshot; `resource` becomes the labels of `target_info`.
pub fn render(snapshot: Snapshot, resource: &[(String, String)]) -> String {
    let mut registry = Registry::default();
    let resource = resource.iter().map(|(k, v)| (k.replace('.', "_"), v.clone())).collect();
    registry.register_collector(Box::new(Encode { snapshot, resource }));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

#[derive(Debug)]
struct Encode {
    snapshot: Snapshot,
    resource: Vec<(String, String)>,
}

impl Collector for Encode {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut info = encoder.encode_descriptor(
            "target",
            "Resource attributes of this XLB instance",
            None,
            MetricType::Info,
        )?;
        info.encode_info(&self.resource)?;
        for family in &self.snapshot.families {
            let d = family.desc;
            let name = d.prometheus_name();
            let kind = match d.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            let mut metric = encoder.encode_descriptor(&name, d.help, None, kind)?;
            for p in &family.points {
                let labels: Vec<(&str, &str)> = p.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let mut series = metric.encode_family(&labels)?;
                match (d.kind, &p.value) {
                    (Kind::Counter, &Value::U64(v)) => ConstCounter::new(v).encode(series)?,
                    (Kind::Counter, &Value::F64(v)) => ConstCounter::new(v).encode(series)?,
                    (Kind::Gauge, &Value::U64(v)) => ConstGauge::new(v).encode(series)?,
                    (Kind::Gauge, &Value::F64(v)) => ConstGauge::new(v).encode(series)?,
                    (Kind::Histogram, Value::Histogram(h)) => {
                        // Per-bucket counts: the encoder accumulates them.
                        let buckets: Vec<(f64, u64)> = h.buckets().collect();
                        series.encode_histogram::<NoLabelSet>(h.sum(), h.count(), &buckets, None)?
                    }
                    // The model never builds these (its builder checks).
                    (_, v) => unreachable!("{} cannot hold {v:?}", d.name),
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::super::metrics::tests::{latency, running};
    use super::super::metrics::{snapshot, Tracker};
    use super::*;

    #[test]
    fn text_has_types_totals_labels_and_target_info() {
        let snap = snapshot(&running(), &mut Tracker::default(), Instant::now(), 0);
        let resource = vec![("service.name".to_string(), "edge \"lb\"".to_string())];
        let text = render(snap, &resource);
        assert!(
            text.contains("# TYPE target_info gauge\ntarget_info{service_name=\"edge \\\"lb\\\"\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE xlb_global_connections_opened_total counter\n"), "{text}");
        assert!(text.contains("\nxlb_global_connections_opened_total 3\n"), "{text}");
        assert!(text.contains("# TYPE xlb_ingress_mbps gauge\n"), "{text}");
        assert!(text.contains("\nxlb_ingress_bytes_total{backend=\"10.0.0.2\",backend_name=\"be1\"} 1000\n"));
        assert!(text.contains("\nxlb_packets_total{action=\"forward\",reason=\"to_backend\"} 10\n"));
        assert!(text.contains("\nxlb_conntrack_utilization 0.04\n"), "{text}");
    }

    #[test]
    fn histograms_have_cumulative_buckets_sum_and_count() {
        let mut st = running();
        st.backends[0].handshakes.answered = 6;
        st.backends[0].handshakes.latency =
            latency(&[(0, 1, 0.000_02), (1, 3, 0.000_08), (4, 1, 0.000_6), (15, 1, 4.0)]);
        let text = render(snapshot(&st, &mut Tracker::default(), Instant::now(), 0), &[]);
        let l = "backend=\"10.0.0.2\",backend_name=\"be1\"";
        let mut want = String::from(
            "# HELP xlb_backend_syn_ack_latency SYN->SYN-ACK latency of new connections to the backend, \
             as the data path measured it (from the SYN XLB forwarded to the backend's SYN-ACK)\n\
             # TYPE xlb_backend_syn_ack_latency histogram\n",
        );
        for (le, n) in [
            ("5e-05", 1),
            ("0.0001", 4),
            ("0.00025", 4),
            ("0.0005", 4),
            ("0.001", 5),
            ("0.0025", 5),
            ("0.005", 5),
            ("0.01", 5),
            ("0.025", 5),
            ("0.05", 5),
            ("0.1", 5),
            ("0.25", 5),
            ("0.5", 5),
            ("1", 5),
            ("3.5", 5),
            ("+Inf", 6),
        ] {
            want += &format!("xlb_backend_syn_ack_latency_bucket{{{l},le=\"{le}\"}} {n}\n");
        }
        want += &format!("xlb_backend_syn_ack_latency_sum{{{l}}} 4.00086\n");
        want += &format!("xlb_backend_syn_ack_latency_count{{{l}}} 6\n");
        // The whole family: be2 has no histogram (no data path behind it).
        want += "# HELP xlb_backend_handshakes_total ";
        let start = text.find("# HELP xlb_backend_syn_ack_latency ").expect("the histogram");
        assert_eq!(&text[start..start + want.len()], want, "{text}");
        assert!(!text.contains("backend_name=\"be2\",le="), "be2 has no histogram: {text}");
        assert!(
            text.contains(&format!("\nxlb_backend_handshakes_total{{{l},result=\"answered\"}} 6\n")),
            "{text}"
        );
    }
}
