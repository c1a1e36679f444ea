//! OTLP receivers for tests, built from the official protos
//! (`opentelemetry-proto`): a gRPC `MetricsService` (tonic) and an
//! OTLP/HTTP protobuf endpoint (`POST /v1/metrics`, axum). Each listens on
//! 127.0.0.1 and hands every export it receives, with the request's
//! headers, to the test.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, HistogramDataPoint, Metric, NumberDataPoint,
};
use prost::Message;
use tokio::sync::mpsc;

/// One export as a receiver got it.
#[derive(Debug, Clone)]
pub struct Received {
    /// Header (gRPC metadata) names in lower case, with their values.
    pub headers: BTreeMap<String, String>,
    pub request: ExportMetricsServiceRequest,
}

fn header_map(h: &HeaderMap) -> BTreeMap<String, String> {
    h.iter().map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("<binary>").to_string())).collect()
}

pub struct Receiver {
    pub addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Received>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Grpc(mpsc::UnboundedSender<Received>);

#[tonic::async_trait]
impl MetricsService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let headers = header_map(&request.metadata().clone().into_headers());
        let _ = self.0.send(Received { headers, request: request.into_inner() });
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

async fn http_export(
    State(tx): State<mpsc::UnboundedSender<Received>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let request = match ExportMetricsServiceRequest::decode(body) {
        Ok(r) => r,
        Err(e) => {
            return (StatusCode::BAD_REQUEST, format!("not an OTLP metrics request: {e}")).into_response()
        }
    };
    let _ = tx.send(Received { headers: header_map(&headers), request });
    let reply = ExportMetricsServiceResponse::default().encode_to_vec();
    ([(axum::http::header::CONTENT_TYPE, "application/x-protobuf")], reply).into_response()
}

impl Receiver {
    /// An OTLP/gRPC receiver on `addr` (127.0.0.1:0 for any port).
    pub async fn grpc_on(addr: &str) -> Receiver {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("binding the gRPC receiver");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(MetricsServiceServer::new(Grpc(tx)))
                .serve_with_incoming(incoming)
                .await
                .expect("gRPC receiver");
        });
        Receiver { addr, rx, task }
    }

    pub async fn grpc() -> Receiver {
        Self::grpc_on("127.0.0.1:0").await
    }

    /// An OTLP/HTTP (protobuf) receiver: `POST /v1/metrics`.
    pub async fn http() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the HTTP receiver");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let app = axum::Router::new().route("/v1/metrics", axum::routing::post(http_export)).with_state(tx);
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("HTTP receiver");
        });
        Receiver { addr, rx, task }
    }

    /// The first export whose metrics include every name in `names`;
    /// panics after `within`.
    pub async fn wait_for(&mut self, names: &[&str], within: Duration) -> Received {
        let deadline = tokio::time::Instant::now() + within;
        let mut seen = BTreeSet::new();
        loop {
            let got = match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(got)) => got,
                Ok(None) => panic!("the receiver stopped"),
                Err(_) => {
                    let missing: Vec<_> = names.iter().filter(|n| !seen.contains(**n)).collect();
                    panic!("no export with all expected metrics within {within:?}; missing {missing:?}")
                }
            };
            let have = metric_names(&got.request);
            if names.iter().all(|n| have.contains(*n)) {
                return got;
            }
            seen.extend(have);
        }
    }

    /// Whatever arrives within `within`, if anything.
    pub async fn next_within(&mut self, within: Duration) -> Option<Received> {
        tokio::time::timeout(within, self.rx.recv()).await.ok().flatten()
    }
}

pub fn metric_names(r: &ExportMetricsServiceRequest) -> BTreeSet<String> {
    metrics(r).map(|m| m.name.clone()).collect()
}

pub fn metrics(r: &ExportMetricsServiceRequest) -> impl Iterator<Item = &Metric> {
    r.resource_metrics.iter().flat_map(|rm| &rm.scope_metrics).flat_map(|sm| &sm.metrics)
}

pub fn metric<'a>(r: &'a ExportMetricsServiceRequest, name: &str) -> &'a Metric {
    metrics(r).find(|m| m.name == name).unwrap_or_else(|| panic!("{name} not exported"))
}

fn string_of(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// The resource attributes of the (single) resource in the export.
pub fn resource(r: &ExportMetricsServiceRequest) -> BTreeMap<String, String> {
    r.resource_metrics
        .iter()
        .filter_map(|rm| rm.resource.as_ref())
        .flat_map(|res| &res.attributes)
        .map(|kv| (kv.key.clone(), string_of(kv)))
        .collect()
}

/// A data point: its attributes and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub attrs: BTreeMap<String, String>,
    pub value: f64,
    pub is_int: bool,
}

fn point(p: &NumberDataPoint) -> Point {
    let attrs = p.attributes.iter().map(|kv| (kv.key.clone(), string_of(kv))).collect();
    let (value, is_int) = match p.value {
        Some(number_data_point::Value::AsInt(i)) => (i as f64, true),
        Some(number_data_point::Value::AsDouble(d)) => (d, false),
        None => (f64::NAN, false),
    };
    Point { attrs, value, is_int }
}

/// Kind of a metric: "sum" (with monotonic and temporality), "gauge" or
/// "histogram" (with temporality).
pub fn kind(m: &Metric) -> (&'static str, bool, i32) {
    match &m.data {
        Some(metric::Data::Sum(s)) => ("sum", s.is_monotonic, s.aggregation_temporality),
        Some(metric::Data::Gauge(_)) => ("gauge", false, 0),
        Some(metric::Data::Histogram(h)) => ("histogram", false, h.aggregation_temporality),
        other => panic!("{} has unexpected data {other:?}", m.name),
    }
}

pub fn points(m: &Metric) -> Vec<Point> {
    match &m.data {
        Some(metric::Data::Sum(s)) => s.data_points.iter().map(point).collect(),
        Some(metric::Data::Gauge(g)) => g.data_points.iter().map(point).collect(),
        _ => Vec::new(),
    }
}

/// The value of the point of `name` whose attributes include `attrs`.
pub fn value(r: &ExportMetricsServiceRequest, name: &str, attrs: &[(&str, &str)]) -> f64 {
    let m = metric(r, name);
    let ps = points(m);
    ps.iter()
        .find(|p| attrs.iter().all(|(k, v)| p.attrs.get(*k).map(String::as_str) == Some(*v)))
        .unwrap_or_else(|| panic!("{name} has no point with {attrs:?}: {ps:?}"))
        .value
}

/// A histogram data point, as sent.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramPoint {
    pub attrs: BTreeMap<String, String>,
    pub count: u64,
    pub sum: Option<f64>,
    pub bucket_counts: Vec<u64>,
    pub explicit_bounds: Vec<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

fn histogram_point(p: &HistogramDataPoint) -> HistogramPoint {
    HistogramPoint {
        attrs: p.attributes.iter().map(|kv| (kv.key.clone(), string_of(kv))).collect(),
        count: p.count,
        sum: p.sum,
        bucket_counts: p.bucket_counts.clone(),
        explicit_bounds: p.explicit_bounds.clone(),
        min: p.min,
        max: p.max,
    }
}

/// The data points of a histogram metric (none for other kinds).
pub fn histogram_points(m: &Metric) -> Vec<HistogramPoint> {
    match &m.data {
        Some(metric::Data::Histogram(h)) => h.data_points.iter().map(histogram_point).collect(),
        _ => Vec::new(),
    }
}

/// The point of histogram `name` whose attributes include `attrs`.
pub fn histogram(r: &ExportMetricsServiceRequest, name: &str, attrs: &[(&str, &str)]) -> HistogramPoint {
    let ps = histogram_points(metric(r, name));
    ps.iter()
        .find(|p| attrs.iter().all(|(k, v)| p.attrs.get(*k).map(String::as_str) == Some(*v)))
        .unwrap_or_else(|| panic!("{name} has no point with {attrs:?}: {ps:?}"))
        .clone()
}
