//! OTLP export of the metric model: one observable instrument per counter
//! or gauge of the catalog, read by the SDK's periodic reader every
//! `export_interval_secs` and pushed over gRPC or HTTP/protobuf with the
//! configured headers.
//!
//! The SDK has no observable histogram (and its data types cannot be built
//! outside it), so each histogram of the catalog is a sync histogram with
//! the catalog's bounds, fed by *replaying* the model's histograms: at the
//! start of every collection (periodic, `flush`, the final one at shutdown)
//! a callback records, per series and bucket, the count increase `d` since
//! the last replay as `d` values equal to the bucket's sum increase over
//! `d`. That mean lies in the bucket, so bucket counts, count and sum are
//! exact (the sum to float rounding); min and max would only be bucket
//! means, so they are not recorded.
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
use opentelemetry::metrics::{AsyncInstrument, Histogram as SyncHistogram, Meter, MeterProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::tonic_types::metadata::MetadataMap;
use opentelemetry_otlp::{MetricExporter, Protocol, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use opentelemetry_sdk::metrics::{
    Aggregation, Instrument, PeriodicReader, SdkMeterProvider, Stream, Temporality,
};
use opentelemetry_sdk::Resource;
use tracing::{info, warn};

use super::metrics::{lookup, Desc, Histogram, Kind, Metrics, Num, Snapshot, Value, CATALOG};
use crate::config::{OtelConfig, OtelProtocol};
use crate::status::SharedStatus;

/// The longest one export may take (per attempt) before it counts as failed.
const MAX_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for the final export.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);
/// Callbacks of one collection share one snapshot taken at most this long ago.
const SNAPSHOT_REUSE: Duration = Duration::from_millis(250);
/// The observable instrument whose callback replays the histograms. It
/// never observes anything, so it is never exported.
const REPLAY_HOOK: &str = "xlb.internal.histogram_replay";

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
    /// The collection replays the histograms first, as every one does.
    pub async fn flush(&self) -> Result<()> {
        let Some(p) = self.provider.clone() else { return Ok(()) };
        tokio::task::spawn_blocking(move || p.force_flush()).await?.context("flushing metrics")
    }

    /// Exports one last time (histograms replayed first, as in every
    /// collection) and stops the exporter, waiting at most a few seconds (a
    /// collector that does not answer does not hold up exit).
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
    let provider = SdkMeterProvider::builder()
        .with_resource(resource)
        .with_reader(reader)
        .with_view(histogram_view)
        .build();
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

    fn observe<T>(&self, desc: &Desc, observer: &dyn AsyncInstrument<T>, convert: fn(&Value) -> T) {
        let snap = self.snapshot();
        let Some(family) = snap.family(desc.name) else { return };
        for p in &family.points {
            let attrs: Vec<KeyValue> = p.labels.iter().map(|(k, v)| KeyValue::new(*k, v.clone())).collect();
            observer.observe(convert(&p.value), &attrs);
        }
    }

    /// Replays the histograms of this collection's snapshot into their
    /// sync instruments.
    fn replay(&self, replays: &Mutex<Vec<Replay>>) {
        let snap = self.snapshot();
        let mut replays = replays.lock().unwrap_or_else(|e| e.into_inner());
        for r in replays.iter_mut() {
            r.run(&snap);
        }
    }
}

fn as_u64(v: &Value) -> u64 {
    match *v {
        Value::U64(v) => v,
        Value::F64(v) => v as u64,
        Value::Histogram(_) => 0,
    }
}

fn as_f64(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The histograms of the catalog: explicit buckets at the catalog's bounds,
/// without min and max (replayed values are bucket means, not extremes).
fn histogram_view(i: &Instrument) -> Option<Stream> {
    let d = lookup(i.name()).filter(|d| d.kind == Kind::Histogram)?;
    let aggregation =
        Aggregation::ExplicitBucketHistogram { boundaries: d.bounds.to_vec(), record_min_max: false };
    Stream::builder().with_aggregation(aggregation).build().ok()
}

/// The counts and sums of one series as last replayed.
#[derive(Debug, Clone, Default, PartialEq)]
struct Replayed {
    counts: Vec<u64>,
    sums: Vec<f64>,
}

/// What to record to bring one series from `last` to `now`: per bucket
/// that grew, (how many values, each value). A count that went down (or a
/// different number of buckets) means the data restarted: then `now` is
/// the increase.
fn replay_values(now: &Histogram, last: Option<&Replayed>) -> Vec<(u64, f64)> {
    let last = last.filter(|l| {
        l.counts.len() == now.counts.len()
            && l.sums.len() == now.sums.len()
            && now.counts.iter().zip(&l.counts).all(|(n, l)| n >= l)
    });
    let mut out = Vec::new();
    for (i, (&n, &sum)) in now.counts.iter().zip(&now.sums).enumerate() {
        let (d, s) = match last {
            Some(l) => (n - l.counts[i], sum - l.sums[i]),
            None => (n, sum),
        };
        if d == 0 {
            continue;
        }
        let (lo, hi) = now.bucket(i);
        out.push((d, within(s / d as f64, lo, hi)));
    }
    out
}

/// `v` moved into (lo, hi], against float rounding (and NaN).
fn within(v: f64, lo: f64, hi: f64) -> f64 {
    if v > hi {
        hi
    } else if v > lo {
        v
    } else if lo.is_finite() {
        next_up(lo)
    } else {
        hi
    }
}

/// The smallest f64 above a finite `x` (`f64::next_up`, newer than the
/// minimum Rust version).
fn next_up(x: f64) -> f64 {
    let bits = x.to_bits();
    if x == 0.0 {
        f64::from_bits(1)
    } else if x > 0.0 {
        f64::from_bits(bits + 1)
    } else {
        f64::from_bits(bits - 1)
    }
}

/// One histogram of the catalog: its sync instrument and, per series (label
/// values), what was replayed into it so far. A series stays here (and in
/// the SDK, which cannot forget a series of a sync instrument) after its
/// backend left.
struct Replay {
    desc: &'static Desc,
    instrument: SyncHistogram<f64>,
    last: HashMap<Vec<(&'static str, String)>, Replayed>,
}

impl Replay {
    fn run(&mut self, snap: &Snapshot) {
        let Some(family) = snap.family(self.desc.name) else { return };
        for p in &family.points {
            let Value::Histogram(h) = &p.value else { continue };
            let last = self.last.get(&p.labels);
            let values = replay_values(h, last);
            if !values.is_empty() {
                let attrs: Vec<KeyValue> =
                    p.labels.iter().map(|(k, v)| KeyValue::new(*k, v.clone())).collect();
                for (d, v) in values {
                    for _ in 0..d {
                        self.instrument.record(v, &attrs);
                    }
                }
            }
            if last.is_none_or(|l| l.counts != h.counts || l.sums != h.sums) {
                let now = Replayed { counts: h.counts.clone(), sums: h.sums.clone() };
                self.last.insert(p.labels.clone(), now);
            }
        }
    }
}

/// One observable instrument per counter and gauge of the catalog, one sync
/// histogram per histogram, and the hook that replays those.
fn register(meter: &Meter, shared: Arc<Shared>) {
    let mut replays = Vec::new();
    for desc in CATALOG {
        let s = shared.clone();
        match (desc.kind, desc.num) {
            (Kind::Histogram, _) => {
                let instrument = meter
                    .f64_histogram(desc.name)
                    .with_description(desc.help)
                    .with_unit(desc.unit)
                    .with_boundaries(desc.bounds.to_vec())
                    .build();
                replays.push(Replay { desc, instrument, last: HashMap::new() });
            }
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
                    .with_callback(move |o| s.observe(desc, o, as_f64))
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
                    .with_callback(move |o| s.observe(desc, o, as_f64))
                    .build();
            }
        }
    }
    // The SDK runs every callback of a collection before it aggregates any
    // instrument, so what this one records is in the same export.
    let replays = Mutex::new(replays);
    meter
        .u64_observable_gauge(REPLAY_HOOK)
        .with_description("Not exported: replays the histograms before each collection")
        .with_callback(move |_| shared.replay(&replays))
        .build();
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

    fn histogram(counts: &[u64], sums: &[f64]) -> Histogram {
        Histogram { bounds: &[0.001, 0.01], counts: counts.to_vec(), sums: sums.to_vec() }
    }

    #[test]
    fn replay_records_each_buckets_increase_at_its_mean() {
        let first = histogram(&[2, 0, 1], &[0.0012, 0.0, 2.5]);
        let got = replay_values(&first, None);
        assert_eq!(got, [(2, 0.0006), (1, 2.5)]);

        let last = Replayed { counts: first.counts.clone(), sums: first.sums.clone() };
        assert!(replay_values(&first, Some(&last)).is_empty(), "nothing new");
        let later = histogram(&[2, 3, 1], &[0.0012, 0.006 + 0.004 + 0.005, 2.5]);
        let got = replay_values(&later, Some(&last));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 3);
        assert!((got[0].1 - 0.005).abs() < 1e-15, "{got:?}");

        // Restarted: counts went down, so they are the increase.
        let restarted = histogram(&[1, 0, 0], &[0.0002, 0.0, 0.0]);
        assert_eq!(replay_values(&restarted, Some(&last)), [(1, 0.0002)]);
        let other_shape = Replayed { counts: vec![0, 0], sums: vec![0.0, 0.0] };
        assert_eq!(replay_values(&first, Some(&other_shape)), [(2, 0.0006), (1, 2.5)]);
    }

    #[test]
    fn replayed_values_stay_in_their_bucket() {
        // A mean on (or by rounding below) the lower bound, above the upper
        // one, or not a number.
        let h = histogram(&[1, 2, 1], &[0.002, 0.002, f64::NAN]);
        let got = replay_values(&h, None);
        assert_eq!(got[0], (1, 0.001), "clamped to the upper bound");
        assert_eq!(got[1].0, 2);
        assert!(got[1].1 > 0.001 && got[1].1 < 0.001 + 1e-15, "{got:?}");
        assert!(got[2].1 > 0.01 && got[2].1 < 0.01 + 1e-15, "{got:?}");
        assert_eq!(within(f64::NAN, f64::NEG_INFINITY, 0.001), 0.001);
        assert_eq!(within(-1.0, f64::NEG_INFINITY, 0.001), -1.0);
        assert_eq!(next_up(0.0), f64::from_bits(1));
        assert!(next_up(-1.0) > -1.0 && next_up(-1.0) < -1.0 + 1e-15);
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
