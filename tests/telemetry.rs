//! Metrics, the admin listener and `xlb status`, without root or XDP: a
//! hand-filled status document stands in for the running data plane.
//!
//! - OTLP export to real receivers built from the official protos
//!   (`tests/otlp`): gRPC and HTTP/protobuf, every documented metric with
//!   its attributes, the resource attributes and the configured headers;
//!   a collector that is down at first is logged once and recovers;
//! - `/metrics` read by a Prometheus text parser and a strict line check;
//! - basic auth on `/api/*` and `/metrics`, open health endpoints, and the
//!   `/readyz` transitions;
//! - the `xlb status` binary against a real admin router.
//!
//! Every wait is bounded.

mod otlp;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use otlp::Receiver;
use xlb::admin::BasicAuth;
use xlb::config::Config;
use xlb::dataplane::SYN_ACK_LATENCY_BOUNDS;
use xlb::provider::ProviderHealth;
use xlb::status::{
    BackendStatus, CheckStatus, Handshakes, HealthChecks, InterfaceStatus, LatencyHistogram, Phase,
    PortStatus, SharedStatus, Traffic,
};
use xlb::telemetry::metrics::{Kind, CATALOG};

const WAIT: Duration = Duration::from_secs(20);

/// The metrics the issue names; renaming any of them breaks dashboards.
const NAMED_IN_ISSUE: &[&str] = &[
    "xlb.global.backends.available",
    "xlb.global.connections.active",
    "xlb.global.connections.opened",
    "xlb.global.connections.closed",
    "xlb.global.connections.orphaned",
    "xlb.ingress.bytes",
    "xlb.ingress.packets",
    "xlb.ingress.mbps",
    "xlb.ingress.pps",
    "xlb.ingress.flows.active",
    "xlb.ingress.flows.closed",
    "xlb.egress.bytes",
    "xlb.egress.packets",
    "xlb.egress.mbps",
    "xlb.egress.pps",
    "xlb.egress.flows.active",
    "xlb.packets",
    "xlb.conntrack.connections",
    "xlb.conntrack.capacity",
    "xlb.nat.port_allocation_failures",
    "xlb.drain.rst_sent",
    "xlb.provider.connected",
    "xlb.provider.last_sync.age",
    "xlb.provider.errors",
    "xlb.interface.xdp_mode",
];

fn config(extra: &str) -> Config {
    let text = format!(
        "name: edge-test\n\
         ports: [{{local_port: 80, remote_port: 8080}}]\n\
         provider: {{static: {{backends: [{{name: web-1, ip: 10.1.0.2}}]}}}}\n{extra}\n"
    );
    Config::parse(&text, "test.yaml").expect("test config")
}

/// web-1's SYN->SYN-ACK latencies: (bucket, how many, seconds each).
const WEB1_LATENCY: &[(usize, u64, f64)] = &[(1, 4, 0.000_08), (4, 3, 0.000_8), (8, 1, 0.02), (15, 1, 4.2)];
/// What web-1's histogram holds per bucket.
const WEB1_BUCKETS: [u64; 16] = [0, 4, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1];
const WEB1_SUM: f64 = 4.0 * 0.000_08 + 3.0 * 0.000_8 + 0.02 + 4.2;

/// A histogram over the data path's bounds with the given latencies.
fn latency(values: &[(usize, u64, f64)]) -> LatencyHistogram {
    let n = SYN_ACK_LATENCY_BOUNDS.len() + 1;
    let mut h = LatencyHistogram { bounds: SYN_ACK_LATENCY_BOUNDS, counts: vec![0; n], sums: vec![0.0; n] };
    for &(i, count, secs) in values {
        h.counts[i] += count;
        h.sums[i] += count as f64 * secs;
    }
    h
}

fn backend(
    name: &str,
    last: u8,
    state: &'static str,
    bytes: u64,
    latencies: &[(usize, u64, f64)],
) -> BackendStatus {
    let latency = latency(latencies);
    let answered = latency.count();
    BackendStatus {
        name: name.into(),
        address: Ipv4Addr::new(10, 1, 0, last),
        weight: 3,
        state,
        connections_active: 7,
        connections_closed_fin: 11,
        connections_closed_rst: 2,
        connections_orphaned: 1,
        traffic: Traffic {
            bytes_to_backend: bytes,
            packets_to_backend: 20,
            bytes_to_client: bytes * 4,
            packets_to_client: 30,
        },
        check: CheckStatus {
            health: Some("healthy"),
            last_check: Some("connect ok".into()),
            health_changed_unix_ms: Some(1_000),
            check_latency_ms: Some(0.25),
        },
        handshakes: Handshakes {
            answered,
            refused: 2,
            timed_out: 1,
            latency_mean_ms: (answered > 0).then(|| latency.sum() / answered as f64 * 1000.0),
            latency,
        },
    }
}

/// A running instance as the control plane would describe it.
fn running_status() -> SharedStatus {
    let status = SharedStatus::default();
    status.update(|s| {
        s.phase = Phase::Running;
        s.listen = Some(Ipv4Addr::new(10, 1, 0, 1));
        s.snat = Some(Ipv4Addr::new(10, 1, 0, 1));
        s.ports = vec![PortStatus { local_port: 80, remote_port: 8080 }];
        s.interfaces = vec![
            InterfaceStatus {
                name: "eth0".into(),
                ifindex: 2,
                xdp_mode: "native".into(),
                transmit: "redirect".into(),
                redirect_target: true,
            },
            InterfaceStatus {
                name: "eth1".into(),
                ifindex: 3,
                xdp_mode: "generic".into(),
                transmit: "xdp_tx".into(),
                redirect_target: false,
            },
        ];
        s.backends = vec![
            backend("web-1", 2, "active", 1234, WEB1_LATENCY),
            backend("web-old", 9, "draining", 99, &[(2, 1, 0.000_2)]),
        ];
        let mut p = ProviderHealth::new("static", "static");
        p.synced_now();
        s.provider = Some(p);
        s.health_checks =
            Some(HealthChecks { kind: "tcp", healthy: 1, unhealthy: 0, unknown: 0, fail_open: false });
        s.connections_active = 14;
        s.conntrack_capacity = 1000;
        for (k, v) in [
            ("fwd_to_backend", 500),
            ("fwd_to_client", 700),
            ("new_flow", 40),
            ("pass_not_ours", 9),
            ("drop_no_flow", 4),
            ("drop_nat_exhausted", 2),
            ("drain_rst", 5),
            ("nat_port_derived", 38),
            ("nat_port_probed", 2),
            ("nat_port_collision", 3),
            ("ct_reopened", 6),
            ("nexthop_miss", 11),
            ("rst_unknown_flow", 1),
        ] {
            s.counters.insert(k.to_string(), v);
        }
    });
    status
}

fn k8s_env(k: &str) -> Option<String> {
    match k {
        "K8S_POD_NAME" => Some("xlb-7d9f-abcde".into()),
        "K8S_NAMESPACE_NAME" => Some("lb".into()),
        "K8S_NODE_NAME" => Some("node-3".into()),
        _ => None,
    }
}

/// Everything one OTLP export must carry, whatever the transport.
fn check_export(got: &otlp::Received, expect_headers: &[(&str, &str)], k8s: bool) {
    for (k, v) in expect_headers {
        assert_eq!(got.headers.get(*k).map(String::as_str), Some(*v), "header {k}: {:?}", got.headers);
    }
    let r = &got.request;
    let res = otlp::resource(r);
    assert_eq!(res.get("service.name").map(String::as_str), Some("edge-test"), "{res:?}");
    assert_eq!(res.get("service.version").map(String::as_str), Some(env!("CARGO_PKG_VERSION")));
    assert!(res.get("service.instance.id").is_some_and(|v| !v.is_empty()), "{res:?}");
    if k8s {
        assert_eq!(res.get("service.instance.id").map(String::as_str), Some("xlb-7d9f-abcde"));
        assert_eq!(res.get("k8s.pod.name").map(String::as_str), Some("xlb-7d9f-abcde"));
        assert_eq!(res.get("k8s.namespace.name").map(String::as_str), Some("lb"));
        assert_eq!(res.get("k8s.node.name").map(String::as_str), Some("node-3"));
    }

    // Every catalog metric arrives, with its type, unit and label keys.
    let names = otlp::metric_names(r);
    for d in CATALOG {
        assert!(names.contains(d.name), "{} was not exported; got {names:?}", d.name);
        let m = otlp::metric(r, d.name);
        assert_eq!(m.unit, d.unit, "{}", d.name);
        let (kind, monotonic, temporality) = otlp::kind(m);
        match d.kind {
            Kind::Counter => {
                assert_eq!((kind, monotonic), ("sum", true), "{}", d.name);
                assert_eq!(temporality, 2, "{} should be cumulative", d.name);
            }
            Kind::Gauge => assert_eq!(kind, "gauge", "{}", d.name),
            Kind::Histogram => {
                assert_eq!(kind, "histogram", "{}", d.name);
                assert_eq!(temporality, 2, "{} should be cumulative", d.name);
            }
        }
        let want: BTreeSet<&str> = d.labels.iter().copied().collect();
        for p in otlp::points(m) {
            let keys: BTreeSet<&str> = p.attrs.keys().map(String::as_str).collect();
            assert_eq!(keys, want, "{} point {p:?}", d.name);
        }
        for p in otlp::histogram_points(m) {
            let keys: BTreeSet<&str> = p.attrs.keys().map(String::as_str).collect();
            assert_eq!(keys, want, "{} point {p:?}", d.name);
            assert_eq!(p.explicit_bounds, d.bounds, "{}", d.name);
        }
    }

    // Values come from the status document.
    let web1 = [("backend", "10.1.0.2"), ("backend_name", "web-1")];
    let v = |name: &str, attrs: &[(&str, &str)]| otlp::value(r, name, attrs);
    assert_eq!(v("xlb.global.backends.available", &[]), 1.0);
    assert_eq!(v("xlb.global.connections.active", &[]), 14.0);
    assert_eq!(v("xlb.global.connections.opened", &[]), 40.0);
    assert_eq!(v("xlb.global.connections.closed", &[]), 26.0);
    assert_eq!(v("xlb.global.connections.orphaned", &[]), 2.0);
    assert_eq!(v("xlb.ingress.bytes", &web1), 1234.0);
    assert_eq!(v("xlb.egress.bytes", &web1), 4936.0);
    assert_eq!(v("xlb.ingress.packets", &web1), 20.0);
    assert_eq!(v("xlb.egress.packets", &web1), 30.0);
    assert_eq!(v("xlb.ingress.flows.active", &web1), 7.0);
    assert_eq!(v("xlb.ingress.flows.closed", &[("backend", "10.1.0.2"), ("type", "fin")]), 11.0);
    assert_eq!(v("xlb.ingress.flows.closed", &[("backend", "10.1.0.2"), ("type", "rst")]), 2.0);
    assert_eq!(v("xlb.backend.draining", &[("backend_name", "web-old")]), 1.0);
    assert_eq!(v("xlb.backend.weight", &web1), 3.0);
    assert_eq!(v("xlb.packets", &[("action", "forward"), ("reason", "to_client")]), 700.0);
    assert_eq!(v("xlb.packets", &[("action", "drop"), ("reason", "no_flow")]), 4.0);
    assert_eq!(v("xlb.packets", &[("action", "rst"), ("reason", "drain")]), 5.0);
    assert_eq!(v("xlb.nat.port_allocation_failures", &[]), 2.0);
    assert_eq!(v("xlb.drain.rst_sent", &[]), 5.0);
    assert_eq!(v("xlb.conntrack.capacity", &[]), 1000.0);
    assert_eq!(v("xlb.conntrack.utilization", &[]), 0.014);
    assert_eq!(v("xlb.interface.xdp_mode", &[("interface", "eth1"), ("mode", "generic")]), 1.0);
    assert_eq!(v("xlb.provider.synced", &[("kind", "static"), ("mode", "static")]), 1.0);
    assert!(v("xlb.provider.last_sync.age", &[("kind", "static")]) < 60.0);
    assert_eq!(v("xlb.lifecycle.phase", &[("phase", "running")]), 1.0);
    assert_eq!(v("xlb.ready", &[]), 1.0);
    let bytes = otlp::points(otlp::metric(r, "xlb.ingress.bytes"));
    assert!(bytes.iter().all(|p| p.is_int), "counters are integers");
    let handshakes = |result: &str| {
        v("xlb.backend.handshakes", &[("backend", "10.1.0.2"), ("backend_name", "web-1"), ("result", result)])
    };
    assert_eq!((handshakes("answered"), handshakes("refused"), handshakes("timed_out")), (9.0, 2.0, 1.0));

    // The histogram, exactly as the status document has it.
    let h = otlp::histogram(r, "xlb.backend.syn_ack.latency", &web1);
    let attrs: Vec<(&str, &str)> = h.attrs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(attrs, web1, "{h:?}");
    check_web1_latency(&h, &WEB1_BUCKETS, WEB1_SUM);
    let old = otlp::histogram(r, "xlb.backend.syn_ack.latency", &[("backend_name", "web-old")]);
    assert_eq!((old.count, old.bucket_counts[2]), (1, 1), "{old:?}");
    assert_eq!(otlp::histogram_points(otlp::metric(r, "xlb.backend.syn_ack.latency")).len(), 2);
}

/// web-1's SYN->SYN-ACK latency point in the next export.
async fn next_web1_latency(rx: &mut Receiver) -> otlp::HistogramPoint {
    let got = rx.next_within(WAIT).await.expect("an export");
    otlp::histogram(
        &got.request,
        "xlb.backend.syn_ack.latency",
        &[("backend", "10.1.0.2"), ("backend_name", "web-1")],
    )
}

/// web-1's SYN->SYN-ACK latency point: these bucket counts and sum, the
/// data path's bounds, no min or max (the exporter cannot know them).
fn check_web1_latency(h: &otlp::HistogramPoint, buckets: &[u64], sum: f64) {
    assert_eq!(h.explicit_bounds, SYN_ACK_LATENCY_BOUNDS, "{h:?}");
    assert_eq!(h.bucket_counts, buckets, "{h:?}");
    assert_eq!(h.count, buckets.iter().sum::<u64>(), "{h:?}");
    let got = h.sum.expect("a sum");
    assert!((got - sum).abs() < 1e-9, "sum {got}, want {sum}");
    assert_eq!((h.min, h.max), (None, None), "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_grpc_export_carries_every_metric_resource_and_metadata() {
    let mut rx = Receiver::grpc().await;
    let cfg = config(&format!(
        "otel: {{enabled: true, endpoint: 'http://{}', protocol: grpc, export_interval_secs: 1, \
         headers: {{Authorization: 'Bearer t0ken', X-Scope-OrgID: tenant-7}}}}",
        rx.addr
    ));
    let attrs = xlb::telemetry::resource_attributes_from(&cfg, k8s_env);
    let telemetry = xlb::telemetry::otel::start(&cfg.otel, attrs, running_status()).unwrap();
    assert!(telemetry.is_exporting());
    let got = rx.wait_for(NAMED_IN_ISSUE, WAIT).await;
    // gRPC metadata keys are lower case.
    check_export(&got, &[("authorization", "Bearer t0ken"), ("x-scope-orgid", "tenant-7")], true);
    assert_eq!(got.headers.get("content-type").map(String::as_str), Some("application/grpc"));
    telemetry.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_http_protobuf_export_carries_every_metric_resource_and_headers() {
    let mut rx = Receiver::http().await;
    // The endpoint is the collector's base URL; /v1/metrics is appended.
    let cfg = config(&format!(
        "otel: {{enabled: true, endpoint: 'http://{}', protocol: http, export_interval_secs: 1, \
         headers: {{Authorization: 'Bearer h77p', X-Team: lb}}}}",
        rx.addr
    ));
    // Through the public entry point, as lifecycle calls it.
    let telemetry = xlb::telemetry::start(&cfg, running_status()).unwrap();
    let got = rx.wait_for(NAMED_IN_ISSUE, WAIT).await;
    check_export(&got, &[("authorization", "Bearer h77p"), ("x-team", "lb")], false);
    assert_eq!(got.headers.get("content-type").map(String::as_str), Some("application/x-protobuf"));
    telemetry.shutdown().await;
}

/// The SDK has no observable histogram: XLB replays the new latencies into
/// a sync one at the start of every collection, so each export (periodic, a
/// flush, the final one) carries the status document as it was then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_histogram_follows_the_status_document_at_every_collection() {
    let mut rx = Receiver::grpc().await;
    // No periodic export during the test: only flushes and the final one.
    let cfg = config(&format!(
        "otel: {{enabled: true, endpoint: 'http://{}', protocol: grpc, export_interval_secs: 3600}}",
        rx.addr
    ));
    let status = running_status();
    let telemetry = xlb::telemetry::start(&cfg, status.clone()).unwrap();
    // Past the exporter's reuse of one snapshot within a collection.
    let settle = || tokio::time::sleep(Duration::from_millis(400));

    telemetry.flush().await.unwrap();
    check_web1_latency(&next_web1_latency(&mut rx).await, &WEB1_BUCKETS, WEB1_SUM);

    // Two more answers in (0.00025, 0.0005]: in the very next export.
    status.update(|s| {
        let l = &mut s.backends[0].handshakes.latency;
        l.counts[3] += 2;
        l.sums[3] += 0.000_3 + 0.000_5;
    });
    settle().await;
    telemetry.flush().await.unwrap();
    let mut buckets = WEB1_BUCKETS;
    buckets[3] += 2;
    let sum = WEB1_SUM + 0.000_8;
    check_web1_latency(&next_web1_latency(&mut rx).await, &buckets, sum);

    // Nothing new: the same cumulative point.
    settle().await;
    telemetry.flush().await.unwrap();
    check_web1_latency(&next_web1_latency(&mut rx).await, &buckets, sum);

    // The backend's data restarted (its counts went down): what it has now
    // is added, the export stays monotonic; the final export at shutdown
    // replays too.
    status.update(|s| s.backends[0].handshakes.latency = latency(&[(0, 1, 0.000_03), (15, 1, 5.0)]));
    settle().await;
    telemetry.shutdown().await;
    buckets[0] += 1;
    buckets[15] += 1;
    check_web1_latency(&next_web1_latency(&mut rx).await, &buckets, sum + 5.000_03);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_disabled_starts_no_exporter() {
    let mut rx = Receiver::grpc().await;
    let cfg =
        config(&format!("otel: {{enabled: false, endpoint: 'http://{}', export_interval_secs: 1}}", rx.addr));
    let telemetry = xlb::telemetry::start(&cfg, running_status()).unwrap();
    assert!(!telemetry.is_exporting());
    assert!(rx.next_within(Duration::from_millis(2500)).await.is_none(), "something exported");
    telemetry.shutdown().await;
}

/// Log lines of the whole test binary (the exporter logs from its own thread).
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || Sink(sink.clone()))
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        buf
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collector_down_is_retried_and_logged_once_per_change() {
    let logs = captured_logs();
    // A port with nothing listening (yet).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let cfg = config(&format!("otel: {{enabled: true, endpoint: '{endpoint}', export_interval_secs: 1}}"));
    let telemetry = xlb::telemetry::start(&cfg, running_status()).unwrap();
    let lines = |needle: &str| {
        let text = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
        text.lines().filter(|l| l.contains(&endpoint) && l.contains(needle)).count()
    };
    // Several intervals of failing exports: one warning.
    let deadline = Instant::now() + WAIT;
    while lines("failed") == 0 {
        assert!(Instant::now() < deadline, "no failure was logged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(lines("failed"), 1, "a down collector is logged once, not per export");

    // The collector comes up: exports arrive again, one recovery line.
    let mut rx = Receiver::grpc_on(&format!("127.0.0.1:{port}")).await;
    rx.wait_for(&["xlb.global.connections.active"], WAIT).await;
    let deadline = Instant::now() + WAIT;
    while lines("recovered") == 0 {
        assert!(Instant::now() < deadline, "no recovery was logged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(lines("recovered"), 1);
    assert_eq!(lines("failed"), 1);
    telemetry.shutdown().await;
}

/// An admin router served on 127.0.0.1 by its own runtime, for blocking clients.
struct Admin {
    addr: SocketAddr,
    _rt: tokio::runtime::Runtime,
}

impl Admin {
    fn start(status: &SharedStatus, auth: Option<BasicAuth>) -> Admin {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let cfg = config("");
        let endpoint = xlb::telemetry::prometheus_endpoint(&cfg, status.clone());
        let app = xlb::admin::router(status.clone(), endpoint, auth);
        rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Admin { addr, _rt: rt }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().no_proxy().timeout(Duration::from_secs(5)).build().unwrap()
}

fn get(url: &str, creds: Option<(&str, &str)>) -> (u16, String, reqwest::header::HeaderMap) {
    let mut req = client().get(url);
    if let Some((u, p)) = creds {
        req = req.basic_auth(u, Some(p));
    }
    let resp = req.send().unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let code = resp.status().as_u16();
    let headers = resp.headers().clone();
    (code, resp.text().unwrap(), headers)
}

/// Checks every line against the text exposition format: HELP and TYPE
/// comments, samples `name{label="value",...} number` whose name belongs to
/// a TYPE'd family, no series twice. Returns the sample names.
fn strict_prometheus_check(text: &str) -> BTreeSet<String> {
    let valid_name = |n: &str| {
        let mut c = n.chars();
        c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':')
    };
    let mut typed = BTreeMap::new();
    let mut series = BTreeSet::new();
    let mut names = BTreeSet::new();
    assert!(text.ends_with('\n'), "the text must end with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap();
            assert!(valid_name(name), "{line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("{line}"));
            assert!(valid_name(name), "{line}");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(typed.insert(name.to_string(), kind.to_string()).is_none(), "TYPE twice: {line}");
            continue;
        }
        assert!(!line.starts_with('#') && !line.is_empty(), "unexpected line {line:?}");
        let (head, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert!(value.parse::<f64>().is_ok() || ["+Inf", "-Inf", "NaN"].contains(&value), "{line}");
        let (name, labels) = match head.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').unwrap_or_else(|| panic!("{line}"))),
            None => (head, ""),
        };
        assert!(valid_name(name), "{line}");
        // A histogram's samples are its name plus _bucket (with `le`), _sum, _count.
        let histogram = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            (typed.get(base).map(String::as_str) == Some("histogram")).then_some(*suffix)
        });
        assert!(typed.contains_key(name) || histogram.is_some(), "sample without a TYPE: {line}");
        let le = labels.contains("le=\"");
        assert_eq!(le, histogram == Some("_bucket"), "`le` belongs to histogram buckets: {line}");
        // label="value" pairs, values with \\, \" and \n escapes only.
        let mut rest = labels;
        while !rest.is_empty() {
            let (key, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
            assert!(valid_name(key) && !key.starts_with("__"), "{line}");
            let mut end = None;
            let mut chars = after.char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => assert!(matches!(chars.next(), Some((_, '\\' | '"' | 'n'))), "{line}"),
                    '"' => {
                        end = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let end = end.unwrap_or_else(|| panic!("unterminated label value: {line}"));
            rest = &after[end + 1..];
            rest = rest.strip_prefix(',').unwrap_or(rest);
        }
        assert!(series.insert(head.to_string()), "series twice: {line}");
        names.insert(name.to_string());
    }
    names
}

#[test]
fn metrics_endpoint_serves_prometheus_text_with_every_documented_metric() {
    let status = running_status();
    let admin = Admin::start(&status, None);
    let (code, text, headers) = get(&admin.url("/metrics"), None);
    assert_eq!(code, 200, "{text}");
    assert_eq!(headers["content-type"], "text/plain; version=0.0.4; charset=utf-8");

    let sample_names = strict_prometheus_check(&text);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses");
    let parsed: BTreeSet<&str> = scrape.samples.iter().map(|s| s.metric.as_str()).collect();
    for d in CATALOG {
        let name = d.prometheus_name() + if d.kind == Kind::Counter { "_total" } else { "" };
        // The parser files a histogram's buckets under its name.
        assert!(parsed.contains(name.as_str()), "{name} missing:\n{text}");
        if d.kind == Kind::Histogram {
            for suffix in ["_bucket", "_sum", "_count"] {
                assert!(sample_names.contains(&format!("{name}{suffix}")), "{name}{suffix} missing:\n{text}");
            }
        } else {
            assert!(sample_names.contains(&name), "{name} missing:\n{text}");
        }
        let doc = &scrape.docs[&name];
        assert_eq!(doc, d.help, "{name}");
    }
    let sample = |name: &str, labels: &[(&str, &str)]| {
        let s = scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no {name} {labels:?}"));
        match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        }
    };
    assert_eq!(
        sample("xlb_ingress_bytes_total", &[("backend", "10.1.0.2"), ("backend_name", "web-1")]),
        1234.0
    );
    assert_eq!(sample("xlb_ingress_flows_closed_total", &[("backend_name", "web-1"), ("type", "rst")]), 2.0);
    assert_eq!(sample("xlb_packets_total", &[("action", "pass"), ("reason", "not_ours")]), 9.0);
    assert_eq!(sample("xlb_global_connections_opened_total", &[]), 40.0);
    assert_eq!(sample("xlb_interface_xdp_mode", &[("interface", "eth0"), ("mode", "native")]), 1.0);
    assert_eq!(sample("target_info", &[("service_name", "edge-test")]), 1.0);
    assert!(matches!(
        scrape.samples.iter().find(|s| s.metric == "xlb_drain_rst_sent_total").unwrap().value,
        prometheus_parse::Value::Counter(5.0)
    ));
    assert_eq!(
        sample("xlb_backend_handshakes_total", &[("backend_name", "web-1"), ("result", "timed_out")]),
        1.0
    );

    // web-1's SYN->SYN-ACK latency: cumulative buckets, sum and count.
    let l = "backend=\"10.1.0.2\",backend_name=\"web-1\"";
    let mut cumulative = 0;
    let mut lines = String::new();
    // The bounds as Go writes floats (and the encoder does).
    let les = [
        "5e-05", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1",
        "0.25", "0.5", "1", "3.5", "+Inf",
    ];
    assert_eq!(les.len(), SYN_ACK_LATENCY_BOUNDS.len() + 1);
    for (le, n) in les.iter().zip(WEB1_BUCKETS) {
        cumulative += n;
        lines += &format!("xlb_backend_syn_ack_latency_bucket{{{l},le=\"{le}\"}} {cumulative}\n");
    }
    lines += &format!("xlb_backend_syn_ack_latency_sum{{{l}}} 4.22272\n");
    lines += &format!("xlb_backend_syn_ack_latency_count{{{l}}} 9\n");
    assert!(text.contains(&lines), "{lines}\nnot in\n{text}");
    let parsed = scrape
        .samples
        .iter()
        .find(|s| s.metric == "xlb_backend_syn_ack_latency" && s.labels.get("backend_name") == Some("web-1"))
        .expect("the parsed histogram");
    let prometheus_parse::Value::Histogram(buckets) = &parsed.value else { panic!("{parsed:?}") };
    assert_eq!(buckets.len(), SYN_ACK_LATENCY_BOUNDS.len() + 1);
    assert_eq!(buckets.last().map(|b| (b.less_than, b.count)), Some((f64::INFINITY, 9.0)));

    // Values follow the status document.
    status.update(|s| {
        s.backends[0].traffic.bytes_to_backend += 1000;
        *s.counters.get_mut("new_flow").unwrap() += 1;
    });
    let (_, text, _) = get(&admin.url("/metrics"), None);
    assert!(
        text.contains("\nxlb_ingress_bytes_total{backend=\"10.1.0.2\",backend_name=\"web-1\"} 2234\n"),
        "{text}"
    );
    assert!(text.contains("\nxlb_global_connections_opened_total 41\n"), "{text}");
}

#[test]
fn basic_auth_guards_api_and_metrics_but_not_health() {
    let status = running_status();
    let admin = Admin::start(&status, Some(BasicAuth::new("ops", "pa:ss w0rd")));
    for path in ["/metrics", "/api/v1/status"] {
        let url = admin.url(path);
        let (code, _, headers) = get(&url, None);
        assert_eq!(code, 401, "{path} without credentials");
        assert!(headers["www-authenticate"].to_str().unwrap().starts_with("Basic realm=\"xlb\""));
        assert_eq!(get(&url, Some(("ops", "wrong"))).0, 401, "{path} with a wrong password");
        assert_eq!(get(&url, Some(("admin", "pa:ss w0rd"))).0, 401, "{path} with a wrong user");
        let (code, body, _) = get(&url, Some(("ops", "pa:ss w0rd")));
        assert_eq!(code, 200, "{path} with the right credentials: {body}");
    }
    assert_eq!(get(&admin.url("/healthz"), None).0, 200);
    let (code, body, _) = get(&admin.url("/readyz"), None);
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    status.update(|s| s.phase = Phase::Draining);
    assert_eq!(get(&admin.url("/readyz"), None).0, 503, "probes get the real answer, not a 401");
}

#[test]
fn readyz_follows_the_lifecycle() {
    let status = SharedStatus::default();
    let admin = Admin::start(&status, None);
    let readyz = || {
        let (code, body, _) = get(&admin.url("/readyz"), None);
        (code, body.trim().to_string())
    };
    assert_eq!(readyz(), (503, "starting".into()));
    let full = running_status().read();
    status.update(|s| *s = full.clone());
    assert_eq!(readyz(), (200, "ready".into()));
    status.update(|s| s.backends.retain(|b| b.state != "active"));
    assert_eq!(readyz(), (503, "no_backends".into()));
    status.update(|s| *s = full.clone());
    assert_eq!(readyz(), (200, "ready".into()));
    status.update(|s| s.phase = Phase::Draining);
    assert_eq!(readyz(), (503, "shutting_down".into()));
    // The same transitions in the metric.
    let (_, text, _) = get(&admin.url("/metrics"), None);
    assert!(
        text.contains("\nxlb_ready 0\n") && text.contains("xlb_lifecycle_phase{phase=\"draining\"} 1\n"),
        "{text}"
    );
}

/// Runs the real binary, killing it if it takes longer than `WAIT`.
fn xlb(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xlb"));
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.env_remove("XLB_ADMIN").env_remove("XLB_ADMIN_USER").env_remove("XLB_ADMIN_PASSWORD");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("running xlb");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("xlb {args:?} did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn status_command_prints_a_summary_and_the_json_document() {
    let status = running_status();
    let admin = Admin::start(&status, None);
    let addr = admin.addr.to_string();

    let out = xlb(&["status", "--admin", &addr], &[]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}{}", stdout, text(&out.stderr));
    let head = format!("xlb {} at http://{addr}: running, ready", env!("CARGO_PKG_VERSION"));
    assert!(stdout.starts_with(&head), "{stdout}");
    for needle in [
        "listen       10.1.0.1  ports 80->8080  snat 10.1.0.1",
        "eth0 (native, redirect, ifindex 2), eth1 (generic, xdp_tx, ifindex 3)",
        "static (static): connected, synced",
        "connections  14 active of 1000 (1.4% of conntrack)",
        "backends: 1 active, 1 draining",
        "web-1",
        "web-old",
        "draining",
        "1.2 KiB / 20 pkts",
        "1200 forwarded, 9 passed to the kernel, 6 dropped; 40 connections opened",
        "drop_nat_exhausted",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing from:\n{stdout}");
    }

    let out = xlb(&["status", "--json", "--admin", &format!("http://{addr}")], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(doc, serde_json::to_value(status.read()).unwrap());

    // XLB_ADMIN names the instance too.
    let out = xlb(&["status"], &[("XLB_ADMIN", &addr)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn status_command_fails_clearly_when_nothing_answers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = xlb(&["status", "--admin", &format!("127.0.0.1:{port}")], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with(&format!("error: no xlb answers on http://127.0.0.1:{port}")), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(out.stdout.is_empty());

    let out = xlb(&["status", "--admin", "nonsense"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("expected HOST:PORT"), "{}", text(&out.stderr));
}

#[test]
fn status_command_with_admin_auth() {
    let status = running_status();
    let admin = Admin::start(&status, Some(BasicAuth::new("ops", "s3cret")));
    let addr = admin.addr.to_string();

    let out = xlb(&["status", "--admin", &addr], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("401 unauthorized: this instance has admin.auth"),
        "{}",
        text(&out.stderr)
    );

    let out = xlb(&["status", "--admin", &addr, "--user", "ops"], &[("XLB_ADMIN_PASSWORD", "wrong")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("user or password rejected"), "{}", text(&out.stderr));

    let out = xlb(&["status", "--admin", &addr, "--user", "ops"], &[("XLB_ADMIN_PASSWORD", "s3cret")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("running, ready"));

    let out = xlb(
        &["status", "--json", "--admin", &addr, "--user", "ops", "--password-env", "MY_PW"],
        &[("MY_PW", "s3cret")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn run_refuses_a_missing_admin_password_and_otlp_http_over_tls_before_attaching() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, extra: &str| {
        let path = dir.path().join(name);
        let text = format!(
            "ports: [{{local_port: 80, remote_port: 8080}}]\n\
             provider: {{static: {{backends: [{{name: a, ip: 10.1.0.2}}]}}}}\n{extra}\n"
        );
        std::fs::write(&path, text).unwrap();
        path.to_string_lossy().into_owned()
    };

    let auth = write("auth.yaml", "admin: {auth: {username: ops}}");
    let out = xlb(&["run", "-c", &auth], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert_eq!(
        stderr,
        "error: admin.auth.password_env: XLB_ADMIN_PASSWORD is not set or empty; \
         export the admin password in it\n"
    );

    let tls = write("tls.yaml", "otel: {enabled: true, endpoint: 'https://collector:4318', protocol: http}");
    let out = xlb(&["run", "-c", &tls], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: otel.endpoint: https with protocol: http is not supported yet"),
        "{stderr}"
    );
    let out = xlb(&["check", "-c", &tls], &[]);
    assert!(out.status.success());
    assert!(
        text(&out.stderr).contains("warning: otel.endpoint: https with protocol: http"),
        "{}",
        text(&out.stderr)
    );
}
