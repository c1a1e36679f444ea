//! OTLP export of the metric model: one observable instrument per catalog
//! entry, read by the SDK's periodic reader every `export_interval_secs`
//! and pushed over gRPC or HTTP/protobuf with the configured headers.
//!
//! The reader runs on its own thread and its callbacks only read a copy of
//! the status document, so a slow or absent collector never reaches the
//! data path. The OTLP exporter retries a failed export with exponential
//! backoff; the next interval tries again. Export failures are logged once
//! per change of state (down, recovered), not once per export.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::metrics::{AsyncInstrument, Meter, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::tonic_types::metadata::MetadataMap;
use opentelemetry_otlp::{MetricExporter, Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider, Temporality};
use opentelemetry_sdk::Resource;
use tracing::{info, warn};

use super::metrics::{Desc, Kind, Metrics, Num, Snapshot, Value, CATALOG};
use crate::config::{OtelConfig, OtelProtocol};
use crate::status::SharedStatus;

/// The longest one export may take (per attempt) before it counts as failed.
const MAX_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the final export.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);
/// Callbacks of one collection share one snapshot taken at most this long ago.
const SNAPSHOT_REUSE: Duration = Duration::from_millis(250);

/// A running exporter, or nothing when `otel.enabled` is false.
pub struct Telemetry {
    provider: Option<SdkMeterProvider>,
}

impl Telemetry {
    /// No exporter.
    pub fn disabled() -> Self {
        Telemetry { provider: None }
    }

    pub fn is_exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Collects and exports now, on a blocking thread; for tests and tools.
    pub async fn flush(&self) -> Result<()> {
        let Some(p) = self.provider.clone() else { return Ok(()) };
        tokio::task::spawn_blocking(move || p.force_flush()).await?.context("flushing metrics")
    }

    /// Exports one last time and stops the exporter, waiting at most a few
    /// seconds (a collector that does not answer does not hold up exit).
    pub async fn shutdown(mut self) {
        let Some(p) = self.provider.take() else { return };
        let done = tokio::task::spawn_blocking(move || p.shutdown());
        match tokio::time::timeout(SHUTDOWN_WAIT, done).await {
            Ok(Ok(Ok(()))) => info!("otel exporter stopped"),
            Ok(Ok(Err(e))) => warn!("otel exporter: final export failed: {e}"),
            Ok(Err(e)) => warn!("otel exporter: shutdown task failed: {e}"),
            Err(_) => {
                warn!("otel exporter: final export did not finish within {SHUTDOWN_WAIT:?}; exiting anyway")
            }
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        // Dropping the provider runs a blocking shutdown; never on the runtime.
        if let Some(p) = self.provider.take() {
            let _ = std::thread::Builder::new().name("otel-shutdown".into()).spawn(move || p.shutdown());
        }
    }
}

/// Starts exporting the model of `status` as `otel` says, with `resource`
/// attributes. Must run inside the tokio runtime (the gRPC client lives on
/// it).
pub fn start(otel: &OtelConfig, resource: Vec<(String, String)>, status: SharedStatus) -> Result<Telemetry> {
    if !otel.enabled {
        info!("otel export disabled (otel.enabled: false); /metrics serves Prometheus text");
        return Ok(Telemetry::disabled());
    }
    let target = match otel.protocol {
        OtelProtocol::Grpc => format!("{} (grpc)", otel.endpoint),
        OtelProtocol::Http => format!("{} (http/protobuf)", http_metrics_url(&otel.endpoint)),
    };
    let exporter = Watched::new(build_exporter(otel)?, target.clone());
    let interval = Duration::from_secs(otel.export_interval_secs.max(1));
    let reader = PeriodicReader::builder(exporter).with_interval(interval).build();
    let resource =
        Resource::builder().with_attributes(resource.into_iter().map(|(k, v)| KeyValue::new(k, v))).build();
    let provider = SdkMeterProvider::builder().with_resource(resource).with_reader(reader).build();
    register(&provider.meter("xlb"), Arc::new(Shared::new(Metrics::new(status))));
    info!(interval_secs = interval.as_secs(), "otel export to {target} every {}s", interval.as_secs());
    Ok(Telemetry { provider: Some(provider) })
}

/// The URL OTLP/HTTP posts metrics to: the endpoint plus `/v1/metrics`,
/// unless it already ends so.
pub fn http_metrics_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/metrics") {
        base.to_string()
    } else {
        format!("{base}/v1/metrics")
    }
}

/// The configured headers as HTTP headers (gRPC metadata keys are lower case).
pub fn header_map(headers: &std::collections::BTreeMap<String, String>) -> Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        let name = HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
            .with_context(|| format!("otel.headers: `{k}` is not a valid header name"))?;
        let value = HeaderValue::from_str(v)
            .with_context(|| format!("otel.headers.{k}: not a valid header value"))?;
        map.append(name, value);
    }
    Ok(map)
}

fn build_exporter(otel: &OtelConfig) -> Result<MetricExporter> {
    let headers = otel
        .resolved_headers()
        .map_err(|var| anyhow::anyhow!("otel.headers_env: {var} is not set or empty"))?;
    let timeout =
        Duration::from_secs(otel.export_interval_secs).clamp(Duration::from_secs(1), MAX_EXPORT_TIMEOUT);
    let exporter = match otel.protocol {
        OtelProtocol::Grpc => MetricExporter::builder()
            .with_tonic()
            .with_endpoint(otel.endpoint.clone())
            .with_timeout(timeout)
            .with_metadata(MetadataMap::from_headers(header_map(&headers)?))
            .build(),
        OtelProtocol::Http => {
            header_map(&headers)?;
            let headers: HashMap<String, String> = headers.into_iter().collect();
            MetricExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(http_metrics_url(&otel.endpoint))
                .with_timeout(timeout)
                .with_headers(headers)
                .build()
        }
    };
    exporter.with_context(|| format!("building the OTLP exporter for {}", otel.endpoint))
}

/// The collector as the exporter last saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportState {
    /// Nothing exported yet.
    Unknown,
    Up,
    Down,
}

impl ExportState {
    /// The state after an export; `true` when that changed it (worth a log line).
    pub fn after(self, ok: bool) -> (ExportState, bool) {
        let next = if ok { ExportState::Up } else { ExportState::Down };
        (next, next != self)
    }
}

/// The OTLP exporter, logging when exports start failing or recover.
struct Watched<E> {
    inner: E,
    target: String,
    state: Mutex<ExportState>,
}

impl<E> Watched<E> {
    fn new(inner: E, target: String) -> Self {
        Watched { inner, target, state: Mutex::new(ExportState::Unknown) }
    }

    fn note(&self, result: &OTelSdkResult) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = *state;
        let (next, changed) = before.after(result.is_ok());
        *state = next;
        if !changed {
            return;
        }
        match (before, result) {
            (ExportState::Unknown, Ok(())) => info!("otel: exporting metrics to {}", self.target),
            (_, Ok(())) => info!("otel: metrics export to {} recovered", self.target),
            (_, Err(e)) => warn!(
                "otel: metrics export to {} failed: {e}; retrying with backoff \
                 (logged again when it recovers)",
                self.target
            ),
        }
    }
}

impl<E: PushMetricExporter> PushMetricExporter for Watched<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let result = self.inner.export(metrics).await;
        self.note(&result);
        result
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}

/// One snapshot per collection, shared by every instrument's callback.
struct Shared {
    metrics: Metrics,
    last: Mutex<Option<(Instant, Arc<Snapshot>)>>,
}

impl Shared {
    fn new(metrics: Metrics) -> Self {
        Shared { metrics, last: Mutex::new(None) }
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, snap)) = last.as_ref() {
            if at.elapsed() < SNAPSHOT_REUSE {
                return snap.clone();
            }
        }
        let snap = Arc::new(self.metrics.collect());
        *last = Some((Instant::now(), snap.clone()));
        snap
    }

    fn observe<T>(&self, desc: &Desc, observer: &dyn AsyncInstrument<T>, convert: fn(Value) -> T) {
        let snap = self.snapshot();
        let Some(family) = snap.family(desc.name) else { return };
        for p in &family.points {
            let attrs: Vec<KeyValue> = p.labels.iter().map(|(k, v)| KeyValue::new(*k, v.clone())).collect();
            observer.observe(convert(p.value), &attrs);
        }
    }
}

fn as_u64(v: Value) -> u64 {
    match v {
        Value::U64(v) => v,
        Value::F64(v) => v as u64,
    }
}

/// One observable instrument per catalog entry.
fn register(meter: &Meter, shared: Arc<Shared>) {
    for desc in CATALOG {
        let s = shared.clone();
        match (desc.kind, desc.num) {
            (Kind::Counter, Num::U64) => {
                meter
                    .u64_observable_counter(desc.name)
                    .with_description(desc.help)
                    .with_unit(desc.unit)
                    .with_callback(move |o| s.observe(desc, o, as_u64))
                    .build();
            }
            (Kind::Counter, Num::F64) => {
                meter
                    .f64_observable_counter(desc.name)
                    .with_description(desc.help)
                    .with_unit(desc.unit)
                    .with_callback(move |o| s.observe(desc, o, Value::as_f64))
                    .build();
            }
            (Kind::Gauge, Num::U64) => {
                meter
                    .u64_observable_gauge(desc.name)
                    .with_description(desc.help)
                    .with_unit(desc.unit)
                    .with_callback(move |o| s.observe(desc, o, as_u64))
                    .build();
            }
            (Kind::Gauge, Num::F64) => {
                meter
                    .f64_observable_gauge(desc.name)
                    .with_description(desc.help)
                    .with_unit(desc.unit)
                    .with_callback(move |o| s.observe(desc, o, Value::as_f64))
                    .build();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_state_changes_are_reported_once() {
        let mut state = ExportState::Unknown;
        let mut changes = Vec::new();
        for ok in [true, true, false, false, false, true, true, false] {
            let (next, changed) = state.after(ok);
            if changed {
                changes.push(next);
            }
            state = next;
        }
        use ExportState::{Down, Up};
        assert_eq!(changes, [Up, Down, Up, Down]);
        assert_eq!(ExportState::Unknown.after(false), (Down, true));
    }

    #[test]
    fn http_url_gets_the_metrics_path_once() {
        assert_eq!(http_metrics_url("http://c:4318"), "http://c:4318/v1/metrics");
        assert_eq!(http_metrics_url("http://c:4318/"), "http://c:4318/v1/metrics");
        assert_eq!(http_metrics_url("http://c:4318/v1/metrics"), "http://c:4318/v1/metrics");
        assert_eq!(http_metrics_url("https://c/otlp"), "https://c/otlp/v1/metrics");
    }

    #[test]
    fn headers_become_lower_case_metadata() {
        let headers = [("Authorization".to_string(), "Bearer x".to_string())].into_iter().collect();
        let map = header_map(&headers).unwrap();
        assert_eq!(map.get("authorization").unwrap(), "Bearer x");
        let bad = [("bad header".to_string(), "v".to_string())].into_iter().collect();
        assert!(header_map(&bad).is_err());
    }

    #[tokio::test]
    async fn grpc_over_tls_builds() {
        let otel = OtelConfig {
            enabled: true,
            endpoint: "https://collector.example:4317".into(),
            ..OtelConfig::default()
        };
        let t = start(&otel, Vec::new(), SharedStatus::default()).expect("TLS is built in for gRPC");
        assert!(t.is_exporting());
        drop(t);
    }

    #[tokio::test]
    async fn disabled_means_no_exporter() {
        let otel = OtelConfig::default();
        assert!(!otel.enabled);
        let t = start(&otel, Vec::new(), SharedStatus::default()).unwrap();
        assert!(!t.is_exporting());
        t.flush().await.unwrap();
        t.shutdown().await;
    }
}
