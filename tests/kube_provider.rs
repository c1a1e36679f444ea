//! The Kubernetes provider through kube's real client against a
//! protocol-level API server on 127.0.0.1 (tests/kube/fake_apiserver.rs).
//! Every wait is bounded; nothing leaves loopback (the end-to-end test at
//! the bottom uses network namespaces it makes, like tests/e2e.rs).

#[path = "common/mod.rs"]
mod common;
#[path = "kube/fake_apiserver.rs"]
mod fake_apiserver;

use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::workout::Shape;
use fake_apiserver::{endpoints, slice, write_kubeconfig, Ep, FakeApiServer, Fault, Kind};
use serde_json::json;
use tokio::sync::watch;
use xlb::config::KubernetesProvider;
use xlb::provider::{self, kubernetes, Backend, Provider, ProviderHealth};

const NS: &str = "default";
const SVC: &str = "web";
/// Upper bound for anything that needs no retry.
const QUICK: Duration = Duration::from_secs(5);
/// Upper bound for recoveries that wait out the backoff (0.8 s doubling,
/// jittered up to twice that).
const RECOVERY: Duration = Duration::from_secs(12);

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
}

struct Env {
    api: FakeApiServer,
    set: watch::Receiver<Vec<Backend>>,
    health: watch::Receiver<ProviderHealth>,
    /// Every set the provider published, in order.
    history: Arc<Mutex<Vec<Vec<Backend>>>>,
    _dir: tempfile::TempDir,
    /// The provider runs while this lives.
    _task: Option<provider::TaskGuard>,
}

async fn start_provider(api: FakeApiServer, namespace: &str, service: &str) -> Env {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let cfg = KubernetesProvider { namespace: namespace.into(), service: service.into() };
    let t = Instant::now();
    let Provider { backends, health, task } =
        bounded(QUICK, "start", kubernetes::start(&cfg, Some(&kubeconfig))).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(2), "start must not wait for the API: {:?}", t.elapsed());
    let history = Arc::new(Mutex::new(Vec::new()));
    let mut rec = backends.clone();
    let h = history.clone();
    tokio::spawn(async move {
        while rec.changed().await.is_ok() {
            let v = rec.borrow_and_update().clone();
            h.lock().unwrap().push(v);
        }
    });
    Env { api, set: backends, health, history, _dir: dir, _task: task }
}

async fn env() -> Env {
    start_provider(FakeApiServer::start().await, NS, SVC).await
}

async fn bounded<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

fn addrs(set: &[Backend]) -> Vec<String> {
    set.iter().map(|b| b.addr.to_string()).collect()
}

impl Env {
    /// Waits until the published set is exactly `want` (sorted addresses).
    async fn wait_set(&mut self, want: &[&str], limit: Duration) -> Vec<Backend> {
        let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        want.sort_by_key(|a| a.parse::<Ipv4Addr>().unwrap());
        let res = tokio::time::timeout(limit, self.set.wait_for(|s| addrs(s) == want))
            .await
            .map(|r| r.map(|s| s.clone()));
        match res {
            Ok(Ok(s)) => s,
            _ => panic!(
                "backend set never became {want:?} within {limit:?}; it is {:?}; health {:?}",
                addrs(&self.set.borrow()),
                self.health.borrow()
            ),
        }
    }

    async fn wait_health(&mut self, what: &str, limit: Duration, f: impl Fn(&ProviderHealth) -> bool) {
        let ok = matches!(tokio::time::timeout(limit, self.health.wait_for(|h| f(h))).await, Ok(Ok(_)));
        if !ok {
            panic!("health never became {what} within {limit:?}: {:?}", self.health.borrow());
        }
    }

    /// Asserts the set stays `want` for `d`.
    async fn holds(&mut self, want: &[&str], d: Duration) {
        let end = tokio::time::Instant::now() + d;
        while tokio::time::Instant::now() < end {
            assert_eq!(addrs(&self.set.borrow()), want, "the set changed; health {:?}", self.health.borrow());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn published(&self) -> Vec<Vec<String>> {
        self.history.lock().unwrap().iter().map(|s| addrs(s)).collect()
    }
}

fn ready(ips: &[&str]) -> Vec<Ep> {
    ips.iter().enumerate().map(|(i, ip)| Ep::ready(ip, &format!("web-{i}"))).collect()
}

#[tokio::test]
async fn initial_list_selects_the_service_and_names_backends() {
    let api = FakeApiServer::start().await;
    let bare = Ep {
        pod: None,
        hostname: None,
        ready: None,
        serving: None,
        terminating: None,
        ..Ep::ready("10.0.0.3", "")
    };
    let host = Ep { pod: None, hostname: Some("web-host".into()), ..Ep::ready("10.0.0.2", "") };
    api.put(
        Kind::EndpointSlice,
        NS,
        slice(
            "web-abc12",
            SVC,
            &[Ep::ready("10.0.0.1", "web-7d9c-x1"), host, bare, Ep::not_ready("10.0.0.4", "w4")],
        ),
    );
    // Another service's slice, and this service's name in another namespace.
    api.put(Kind::EndpointSlice, NS, slice("db-1", "db", &ready(&["10.0.9.1"])));
    api.put(Kind::EndpointSlice, "other", slice("web-zz", SVC, &ready(&["10.0.9.2"])));
    let mut e = start_provider(api, NS, SVC).await;
    let set = e.wait_set(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], QUICK).await;
    let names: Vec<&str> = set.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(names, ["web-7d9c-x1", "web-host", "10.0.0.3"]);
    assert!(set.iter().all(|b| b.weight == 1));
    e.wait_health("synced", QUICK, |h| h.synced && h.connected).await;
    let h = e.health.borrow().clone();
    assert_eq!((h.kind, h.mode.as_str(), h.errors), ("kubernetes", "endpointslices", 0));
    assert!(h.last_sync_unix_ms.is_some());

    // The requests as the apiserver saw them.
    let reqs = e.api.requests();
    let list = reqs.iter().find(|r| !r.watch).expect("a list");
    assert_eq!(list.path, "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices");
    assert_eq!(list.query["labelSelector"], "kubernetes.io/service-name=web");
    bounded(QUICK, "a watch request", async {
        loop {
            if let Some(w) = e.api.requests().into_iter().find(|r| r.watch) {
                assert_eq!(w.query["labelSelector"], "kubernetes.io/service-name=web");
                assert_eq!(w.query["allowWatchBookmarks"], "true");
                assert!(w.query["resourceVersion"].parse::<u64>().unwrap() > 0);
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn adds_removals_and_ready_flips_follow_the_slice() {
    let mut e = env().await;
    e.api.put(Kind::EndpointSlice, NS, slice("web-a", SVC, &ready(&["10.0.0.1", "10.0.0.2"])));
    e.wait_set(&["10.0.0.1", "10.0.0.2"], QUICK).await;
    let steps: Vec<(Vec<Ep>, Vec<&str>)> = vec![
        (ready(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]), vec!["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
        (
            vec![Ep::ready("10.0.0.1", "a"), Ep::not_ready("10.0.0.2", "b"), Ep::ready("10.0.0.3", "c")],
            vec!["10.0.0.1", "10.0.0.3"],
        ),
        (ready(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]), vec!["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
        (ready(&["10.0.0.3"]), vec!["10.0.0.3"]),
        (vec![], vec![]),
        (ready(&["10.0.0.5"]), vec!["10.0.0.5"]),
    ];
    for (eps, want) in steps {
        e.api.put(Kind::EndpointSlice, NS, slice("web-a", SVC, &eps));
        e.wait_set(&want, QUICK).await;
    }
    e.api.delete(Kind::EndpointSlice, NS, "web-a");
    e.wait_set(&[], QUICK).await;
    assert_eq!(e.health.borrow().errors, 0);
}

#[tokio::test]
async fn terminating_endpoints_leave_the_set_unless_none_is_ready() {
    let mut e = env().await;
    e.api.put(Kind::EndpointSlice, NS, slice("web-a", SVC, &ready(&["10.0.0.1", "10.0.0.2"])));
    e.wait_set(&["10.0.0.1", "10.0.0.2"], QUICK).await;
    // Pod deletion: not ready, still serving, terminating.
    e.api.put(
        Kind::EndpointSlice,
        NS,
        slice("web-a", SVC, &[Ep::ready("10.0.0.1", "a"), Ep::terminating("10.0.0.2", "b")]),
    );
    e.wait_set(&["10.0.0.1"], QUICK).await;
    // publishNotReadyAddresses: ready stays true while terminating.
    let odd =
        Ep { ready: Some(true), serving: Some(true), terminating: Some(true), ..Ep::ready("10.0.0.1", "a") };
    e.api.put(Kind::EndpointSlice, NS, slice("web-a", SVC, &[odd, Ep::terminating("10.0.0.2", "b")]));
    // No endpoint is ready: the serving terminating ones get new
    // connections, as kube-proxy does (ProxyTerminatingEndpoints).
    e.wait_set(&["10.0.0.1", "10.0.0.2"], QUICK).await;
    // A ready one comes back: only it.
    e.api.put(
        Kind::EndpointSlice,
        NS,
        slice("web-a", SVC, &[Ep::ready("10.0.0.3", "c"), Ep::terminating("10.0.0.2", "b")]),
    );
    e.wait_set(&["10.0.0.3"], QUICK).await;
    // Terminating and no longer serving: never, even with nothing else.
    let gone = Ep { serving: Some(false), ..Ep::terminating("10.0.0.2", "b") };
    e.api.put(Kind::EndpointSlice, NS, slice("web-a", SVC, &[gone]));
    e.wait_set(&[], QUICK).await;
    e.api.put(Kind::EndpointSlice, NS, slice("web-a", SVC, &[]));
    e.holds(&[], Duration::from_millis(100)).await;
}

#[tokio::test]
async fn slices_are_merged_and_deduplicated() {
    let api = FakeApiServer::start().await;
    api.put(Kind::EndpointSlice, NS, slice("web-a", SVC, &ready(&["10.0.0.1", "10.0.0.2"])));
    api.put(Kind::EndpointSlice, NS, slice("web-b", SVC, &ready(&["10.0.0.2", "10.0.0.3"])));
    let mut v6 = slice("web-v6", SVC, &[Ep::ready("fd00::1", "v6")]);
    v6["addressType"] = json!("IPv6");
    api.put(Kind::EndpointSlice, NS, v6);
    let mut e = start_provider(api, NS, SVC).await;
    let set = e.wait_set(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], QUICK).await;
    assert_eq!(set.len(), 3, "10.0.0.2 once");
    e.api.put(Kind::EndpointSlice, NS, slice("web-c", SVC, &ready(&["10.0.0.4"])));
    e.wait_set(&["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"], QUICK).await;
    // 10.0.0.2 is still listed by web-b.
    e.api.delete(Kind::EndpointSlice, NS, "web-a");
    e.wait_set(&["10.0.0.2", "10.0.0.3", "10.0.0.4"], QUICK).await;
    // A slice relabelled to another service leaves this one (the watch
    // sees it as DELETED), and comes back when relabelled again.
    e.api.put(Kind::EndpointSlice, NS, slice("web-c", "other-svc", &ready(&["10.0.0.4"])));
    e.wait_set(&["10.0.0.2", "10.0.0.3"], QUICK).await;
    e.api.put(Kind::EndpointSlice, NS, slice("web-c", SVC, &ready(&["10.0.0.4"])));
    e.wait_set(&["10.0.0.2", "10.0.0.3", "10.0.0.4"], QUICK).await;
    // Not ready in one slice, ready in another: it is ready.
    e.api.put(
        Kind::EndpointSlice,
        NS,
        slice("web-c", SVC, &[Ep::not_ready("10.0.0.2", "x"), Ep::ready("10.0.0.4", "y")]),
    );
    e.holds(&["10.0.0.2", "10.0.0.3", "10.0.0.4"], Duration::from_millis(150)).await;
}

#[tokio::test]
async fn an_outage_keeps_the_set_and_the_relist_removes_stale_backends() {
    let mut e = env().await;
    e.api.put(Kind::EndpointSlice, NS, slice("web-a", SVC, &ready(&["10.0.0.1", "10.0.0.2"])));
    e.api.put(Kind::EndpointSlice, NS, slice("web-b", SVC, &ready(&["10.0.0.3"])));
    e.wait_set(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], QUICK).await;
    let published_before = e.published().len();
    let lists_before = e.api.lists("endpointslices");

    // The apiserver fails: 503 for every request, open watches cut.
    e.api.set_fault(Fault::Status(503));
    e.api.drop_connections();
    e.wait_health("disconnected with errors", QUICK, |h| !h.connected && h.errors > 0).await;
    // Meanwhile the service changes.
    e.api.delete(Kind::EndpointSlice, NS, "web-b");
    e.api.put(Kind::EndpointSlice, NS, slice("web-a", SVC, &ready(&["10.0.0.1", "10.0.0.4"])));
    e.holds(&["10.0.0.1", "10.0.0.2", "10.0.0.3"], Duration::from_millis(1000)).await;
    e.wait_health("a 503", RECOVERY, |h| h.last_error.as_deref().unwrap_or("").contains("503")).await;
    assert_eq!(addrs(&e.set.borrow()), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);

    e.api.set_fault(Fault::None);
    e.wait_set(&["10.0.0.1", "10.0.0.4"], RECOVERY).await;
    e.wait_health("connected", QUICK, |h| h.connected && h.synced).await;
    assert!(e.api.lists("endpointslices") > lists_before, "recovery relisted");
    // Nothing in between: the outage published nothing, the relist one set.
    let published = e.published();
    assert_eq!(published[published_before..], [vec!["10.0.0.1".to_string(), "10.0.0.4".to_string()]]);
    assert!(published.iter().skip(1).all(|s| !s.is_empty()), "never emptied: {published:?}");
}

#[tokio::test]
async fn refused_and_cut_connections_keep_the_set() {
    let mut e = env().await;
    e.api.put(Kind::EndpointSlice, NS, slice("web-a", SVC, &ready(&["10.0.0.1"])));
    e.api.put(Kind::EndpointSlice, NS, slice("web-b", SVC, &ready(&["10.0.0.2"])));
    e.wait_set(&["10.0.0.1", "10.0.0.2"], QUICK).await;

    // Connections closed on accept (and the open watch dropped).
    e.api.set_fault(Fault::Refuse);
    e.wait_health("an error", QUICK, |h| h.errors >= 1).await;
    e.api.delete(Kind::EndpointSlice, NS, "web-b");
    e.holds(&["10.0.0.1", "10.0.0.2"], Duration::from_millis(500)).await;

    // Responses cut after their headers.
    e.api.set_fault(Fault::HangUp);
    let errors = e.health.borrow().errors;
    e.wait_health("another error", RECOVERY, |h| h.errors > errors).await;
    assert_eq!(addrs(&e.set.borrow()), ["10.0.0.1", "10.0.0.2"]);

    e.api.set_fault(Fault::None);
    e.wait_set(&["10.0.0.1"], RECOVERY).await;
    assert!(e.published().iter().skip(1).all(|s| !s.is_empty()));
}

#[tokio::test]
async fn a_dropped_watch_catches_up_with_what_changed_meanwhile() {
    let mut e = env().await;
    e.api.put(Kind::EndpointSlice, NS, slice("web-a", SVC, &ready(&["10.0.0.1"])));
    e.api.put(Kind::EndpointSlice, NS, slice("web-b", SVC, &ready(&["10.0.0.2"])));
    e.wait_set(&["10.0.0.1", "10.0.0.2"], QUICK).await;
    // Let the watch start, then cut it and change things while it is down.
    wait_for_watches(&e.api, 1).await;
    e.api.drop_connections();
    e.api.delete(Kind::EndpointSlice, NS, "web-b");
    e.api.put(Kind::EndpointSlice, NS, slice("web-c", SVC, &ready(&["10.0.0.3"])));
    e.wait_set(&["10.0.0.1", "10.0.0.3"], RECOVERY).await;
    // Usually kube re-watches from the resourceVersion it reached and the
    // server replays the events; if the re-watch itself fails (a pooled
    // connection the drop killed), the provider relists. Either way no
    // error may reach the set, and the watch is re-established.
    let watches: Vec<_> = e.api.requests().into_iter().filter(|r| r.watch).collect();
    assert!(watches.len() >= 2, "re-watched");
    assert!(watches.iter().all(|w| w.query["resourceVersion"].parse::<u64>().unwrap() > 0));
    assert!(e.published().iter().skip(1).all(|s| !s.is_empty()));
}

async fn wait_for_watches(api: &FakeApiServer, n: usize) {
    bounded(QUICK, "watch requests", async {
        while api.requests().iter().filter(|r| r.watch).count() < n {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // The watch is open once its request is logged; give it a moment to
    // deliver its first bytes.
    tokio::time::sleep(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn gone_410_relists_and_drops_what_was_missed() {
    let mut e = env().await;
    e.api.put(Kind::EndpointSlice, NS, slice("web-a", SVC, &ready(&["10.0.0.1"])));
    e.api.put(Kind::EndpointSlice, NS, slice("web-b", SVC, &ready(&["10.0.0.2"])));
    e.wait_set(&["10.0.0.1", "10.0.0.2"], QUICK).await;
    wait_for_watches(&e.api, 1).await;
    let lists = e.api.lists("endpointslices");

    // The deletion's event is lost and the history compacted; the open
    // watch gets an ERROR 410 Expired. Only a relist can show the deletion.
    e.api.delete_unobserved(Kind::EndpointSlice, NS, "web-b");
    e.api.expire_watches();
    e.wait_set(&["10.0.0.1"], RECOVERY).await;
    assert!(e.api.lists("endpointslices") > lists);
    assert!(e.health.borrow().last_error.as_deref().unwrap_or("").contains("410"), "{:?}", e.health.borrow());

    // A watch cut while the history is compacted: resuming from the old
    // resourceVersion gets 410 in the stream, then a relist.
    wait_for_watches(&e.api, 2).await;
    e.api.drop_connections();
    e.api.put(Kind::EndpointSlice, NS, slice("web-c", SVC, &ready(&["10.0.0.3"])));
    e.api.delete_unobserved(Kind::EndpointSlice, NS, "web-a");
    e.wait_set(&["10.0.0.3"], RECOVERY).await;

    // And a watch request answered with HTTP 410 itself.
    let lists = e.api.lists("endpointslices");
    e.api.set_fault(Fault::WatchGone);
    e.api.drop_connections();
    e.api.delete_unobserved(Kind::EndpointSlice, NS, "web-c");
    e.api.put(Kind::EndpointSlice, NS, slice("web-d", SVC, &ready(&["10.0.0.4"])));
    e.wait_set(&["10.0.0.4"], RECOVERY).await;
    assert!(e.api.lists("endpointslices") > lists);
    e.api.set_fault(Fault::None);
}

#[tokio::test]
async fn falls_back_to_endpoints_when_discovery_is_missing() {
    let api = FakeApiServer::start().await;
    api.set_discovery(false);
    api.put(
        Kind::Endpoints,
        NS,
        endpoints(SVC, &[("10.0.1.1", "web-1"), ("10.0.1.2", "web-2")], &[("10.0.1.3", "web-3")]),
    );
    api.put(Kind::Endpoints, NS, endpoints("db", &[("10.0.9.9", "db-1")], &[]));
    let mut e = start_provider(api, NS, SVC).await;
    let set = e.wait_set(&["10.0.1.1", "10.0.1.2"], QUICK).await;
    assert_eq!(set[0].name, "web-1");
    e.wait_health("synced in endpoints mode", QUICK, |h| h.synced && h.mode == "endpoints").await;
    let reqs = e.api.requests();
    assert_eq!(reqs[0].path, "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices");
    assert_eq!(reqs[0].status, 404);
    let list = reqs.iter().find(|r| r.path == "/api/v1/namespaces/default/endpoints").unwrap();
    assert_eq!(list.query["fieldSelector"], "metadata.name=web");
    assert_eq!(e.health.borrow().errors, 0, "the fallback is not an error");

    e.api.put(
        Kind::Endpoints,
        NS,
        endpoints(SVC, &[("10.0.1.2", "web-2"), ("10.0.1.3", "web-3")], &[("10.0.1.1", "web-1")]),
    );
    e.wait_set(&["10.0.1.2", "10.0.1.3"], QUICK).await;
    e.api.delete(Kind::Endpoints, NS, SVC);
    e.wait_set(&[], QUICK).await;
    e.api.put(Kind::Endpoints, NS, endpoints(SVC, &[("10.0.1.7", "web-7")], &[]));
    e.wait_set(&["10.0.1.7"], QUICK).await;
    // It stays on Endpoints.
    assert_eq!(e.api.requests().iter().filter(|r| r.path.contains("endpointslices")).count(), 1);
}

#[tokio::test]
async fn a_missing_service_or_namespace_is_an_empty_synced_set() {
    let mut e = start_provider(FakeApiServer::start().await, "not-yet", SVC).await;
    e.wait_health("synced", QUICK, |h| h.synced && h.connected).await;
    assert!(e.set.borrow().is_empty());
    assert_eq!(e.health.borrow().errors, 0);
    e.api.put(Kind::EndpointSlice, "not-yet", slice("web-x", SVC, &ready(&["10.0.2.1"])));
    e.wait_set(&["10.0.2.1"], QUICK).await;
}

#[tokio::test]
async fn malformed_objects_are_skipped() {
    let api = FakeApiServer::start().await;
    api.put(Kind::EndpointSlice, NS, slice("web-a", SVC, &ready(&["10.0.0.1"])));
    let mut bad = slice("web-bad", SVC, &ready(&["10.0.0.2"]));
    bad["endpoints"] = json!("garbage");
    api.put(Kind::EndpointSlice, NS, bad);
    let mut odd = slice("web-odd", SVC, &ready(&["10.0.0.3", "10.0.0.4"]));
    odd["endpoints"][0]["addresses"] = json!(["not-an-ip"]);
    odd["endpoints"][1] = json!({"addresses": ["10.0.0.4"], "conditions": {"ready": "yes"}});
    api.put(Kind::EndpointSlice, NS, odd);
    let mut e = start_provider(api, NS, SVC).await;
    e.wait_set(&["10.0.0.1"], QUICK).await;
    e.wait_health("synced", QUICK, |h| h.synced).await;

    // Fixed: it counts.
    e.api.put(Kind::EndpointSlice, NS, slice("web-bad", SVC, &ready(&["10.0.0.2"])));
    e.wait_set(&["10.0.0.1", "10.0.0.2"], QUICK).await;
    // A nameless object in the watch stream, then a broken version of web-a:
    // web-a's endpoints no longer count.
    e.api.inject_event(
        Kind::EndpointSlice,
        NS,
        "ADDED",
        json!({"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1",
               "metadata": {"resourceVersion": "1", "labels": {"kubernetes.io/service-name": SVC}},
               "addressType": "IPv4", "endpoints": []}),
    );
    let mut broken = slice("web-a", SVC, &ready(&["10.0.0.1"]));
    broken["endpoints"][0]["conditions"] = json!(["nonsense"]);
    e.api.put(Kind::EndpointSlice, NS, broken);
    e.wait_set(&["10.0.0.2"], QUICK).await;
    assert_eq!(e.health.borrow().errors, 0, "a malformed object is not an API error");

    // A line that is not JSON at all breaks the stream: the provider
    // relists and keeps serving what it had.
    e.api.send_raw_line("{this is not json");
    e.wait_health("the decode error", QUICK, |h| h.errors == 1).await;
    e.api.put(Kind::EndpointSlice, NS, slice("web-a", SVC, &ready(&["10.0.0.1"])));
    e.wait_set(&["10.0.0.1", "10.0.0.2"], RECOVERY).await;
}

#[tokio::test]
async fn list_pages_are_followed() {
    let api = FakeApiServer::start().await;
    // 600 slices: more than kube's page of 500.
    let mut want = Vec::new();
    for i in 0..600u32 {
        let ip = format!("10.1.{}.{}", i / 250, i % 250 + 1);
        api.put(Kind::EndpointSlice, NS, slice(&format!("web-{i:03}"), SVC, &ready(&[ip.as_str()])));
        want.push(ip);
    }
    let mut e = start_provider(api, NS, SVC).await;
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    e.wait_set(&want, QUICK).await;
    assert!(e.api.requests().iter().any(|r| r.query.contains_key("continue")), "paged");
}

/// 1,000 endpoints in 10 slices: single changes reach the channel within
/// the coalescing window of their event, and a burst is coalesced.
#[tokio::test]
async fn changes_at_1000_endpoints_are_quick_and_coalesced() {
    let api = FakeApiServer::start().await;
    let ip = |s: usize, i: usize| format!("10.2.{s}.{}", i + 1);
    let slice_eps = |s: usize, down: Option<usize>| -> Vec<Ep> {
        (0..100)
            .map(|i| if Some(i) == down { Ep::not_ready(&ip(s, i), "p") } else { Ep::ready(&ip(s, i), "p") })
            .collect()
    };
    for s in 0..10 {
        api.put(Kind::EndpointSlice, NS, slice(&format!("web-{s}"), SVC, &slice_eps(s, None)));
    }
    let mut e = start_provider(api, NS, SVC).await;
    bounded(QUICK, "1000 backends", e.set.wait_for(|s| s.len() == 1000)).await.unwrap();
    wait_for_watches(&e.api, 1).await;

    // One change at a time, spaced past the coalescing window.
    let mut lat = Vec::new();
    for n in 0..20 {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let s = n % 10;
        let gone = ip(s, n);
        e.set.borrow_and_update();
        let t = Instant::now();
        e.api.put(Kind::EndpointSlice, NS, slice(&format!("web-{s}"), SVC, &slice_eps(s, Some(n))));
        bounded(QUICK, "the change", e.set.wait_for(|set| set.len() == 999 && !addrs(set).contains(&gone)))
            .await
            .unwrap();
        lat.push(t.elapsed());
        e.api.put(Kind::EndpointSlice, NS, slice(&format!("web-{s}"), SVC, &slice_eps(s, None)));
        bounded(QUICK, "the revert", e.set.wait_for(|set| set.len() == 1000)).await.unwrap();
    }
    lat.sort();
    let (p50, max) = (lat[lat.len() / 2], lat[lat.len() - 1]);
    println!("change-to-channel latency at 1000 endpoints: p50 {p50:?}, max {max:?} (n={})", lat.len());
    assert!(p50 < Duration::from_millis(100), "p50 {p50:?}; all: {lat:?}");

    // A burst of 200 changes: published coalesced, at most one set per
    // window (plus the leading one), and the last state wins.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = e.published().len();
    let t = Instant::now();
    for n in 0..200 {
        e.api.put(
            Kind::EndpointSlice,
            NS,
            slice(&format!("web-{}", n % 10), SVC, &slice_eps(n % 10, Some(n % 100))),
        );
    }
    let burst = t.elapsed();
    // The last write of each slice took down endpoint 90..99 of slice s.
    bounded(
        QUICK,
        "the burst's last state",
        e.set.wait_for(|set| set.len() == 990 && (0..10).all(|s| !addrs(set).contains(&ip(s, 90 + s)))),
    )
    .await
    .unwrap();
    let settled = t.elapsed();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sets = e.published().len() - before;
    let bound = (settled.as_millis() / kubernetes::COALESCE.as_millis()) as usize + 2;
    println!(
        "burst of 200 writes in {burst:?}, settled after {settled:?}: {sets} sets published (bound {bound})"
    );
    assert!(sets <= bound, "{sets} sets published for a burst that settled in {settled:?}");
}

#[tokio::test]
async fn an_unreachable_or_failing_api_is_not_fatal() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let cfg = KubernetesProvider { namespace: NS.into(), service: SVC.into() };
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let kc = write_kubeconfig(dir.path(), &format!("http://127.0.0.1:{port}"), false);
    let t = Instant::now();
    let p = bounded(QUICK, "start", kubernetes::start(&cfg, Some(&kc))).await.unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    let mut health = p.health.clone();
    bounded(QUICK, "an error", health.wait_for(|h| h.errors > 0)).await.unwrap();
    let h = health.borrow().clone();
    assert!(!h.synced && !h.connected, "{h:?}");
    assert!(p.backends.borrow().is_empty());

    // TLS (rustls) to a server that only speaks plain HTTP: the handshake
    // fails, the provider reports it and keeps trying.
    let api = FakeApiServer::start().await;
    let dir2 = tempfile::tempdir().unwrap();
    let kc = write_kubeconfig(dir2.path(), &format!("https://{}", api.addr), true);
    let p = bounded(QUICK, "start", kubernetes::start(&cfg, Some(&kc))).await.unwrap();
    let mut health = p.health.clone();
    bounded(QUICK, "a TLS error", health.wait_for(|h| h.errors > 0)).await.unwrap();
    assert!(!health.borrow().synced);
}

#[tokio::test]
async fn a_bad_kubeconfig_fails_start() {
    let cfg = KubernetesProvider { namespace: NS.into(), service: SVC.into() };
    let missing = PathBuf::from("/nonexistent/kubeconfig");
    let err = match bounded(QUICK, "start", kubernetes::start(&cfg, Some(&missing))).await {
        Ok(_) => panic!("a missing kubeconfig must fail"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("/nonexistent/kubeconfig"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("kc");
    std::fs::write(&garbage, "clusters: {{{").unwrap();
    assert!(bounded(QUICK, "start", kubernetes::start(&cfg, Some(&garbage))).await.is_err());
}

#[tokio::test]
async fn provider_start_dispatches_kubernetes_configs() {
    init_logs();
    let api = FakeApiServer::start().await;
    api.put(Kind::EndpointSlice, "shop", slice("cart-1", "cart", &ready(&["10.0.3.1"])));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let cfg = xlb::config::Config::parse(
        "ports: [{local_port: 80, remote_port: 8080}]\nprovider: {kubernetes: {namespace: shop, service: cart}}\n",
        "xlb.yaml",
    )
    .unwrap();
    let sources =
        provider::Sources { config_path: dir.path().join("xlb.yaml"), kubeconfig: Some(kubeconfig) };
    let p = bounded(QUICK, "start", provider::start(&cfg, &sources)).await.unwrap();
    let mut set = p.backends.clone();
    bounded(QUICK, "the backend", set.wait_for(|s| addrs(s) == ["10.0.3.1"])).await.unwrap();
    assert_eq!(p.health.borrow().kind, "kubernetes");
}

/// The fake API server running inside a network namespace (its listener
/// and connections live there), on its own thread and runtime.
struct ApiInNetns {
    server: Option<FakeApiServer>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ApiInNetns {
    fn start(ns: &common::NsRef) -> ApiInNetns {
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = ns.spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                tx.send(FakeApiServer::start().await).unwrap();
                let _ = stopped.await;
            });
        });
        let server = rx.recv_timeout(QUICK).expect("the API server starts in the namespace");
        ApiInNetns { server: Some(server), stop: Some(stop), thread: Some(thread) }
    }

    fn api(&self) -> &FakeApiServer {
        self.server.as_ref().unwrap()
    }
}

impl Drop for ApiInNetns {
    fn drop(&mut self) {
        drop(self.server.take());
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `xlb run --kubeconfig` in a namespace; killed (and its pins removed) on drop.
struct KubeXlb {
    child: std::process::Child,
    log: PathBuf,
    instance: String,
    _dir: tempfile::TempDir,
}

impl KubeXlb {
    fn start(ns: &common::NsRef, server: &str) -> KubeXlb {
        let x = KubeXlb::spawn(ns, server, "interfaces: [lb-client, lb-be1, lb-be2]\nshutdown_timeout: 1\n");
        let lb = ns.clone();
        let ready = common::wait_for(Duration::from_secs(30), || {
            let lb = lb.clone();
            let code = lb.run(|| common::http_get("127.0.0.1:9090", "/readyz").map(|r| r.status));
            (code.ok() == Some(200)).then_some(())
        });
        assert!(ready.is_some(), "xlb did not become ready:\n{}", x.log());
        x
    }

    /// Starts xlb with `extra` config lines and returns at once.
    fn spawn(ns: &common::NsRef, server: &str, extra: &str) -> KubeXlb {
        let dir = tempfile::tempdir().unwrap();
        let instance = common::unique("xk");
        let cfg = dir.path().join("xlb.yaml");
        std::fs::write(
            &cfg,
            format!(
                "name: {instance}\nlisten: {{ip: {}}}\nports:\n  - {{local_port: 80, remote_port: 8080}}\n\
                 provider:\n  kubernetes: {{namespace: {NS}, service: {SVC}}}\n\
                 {extra}",
                common::LISTEN
            ),
        )
        .unwrap();
        let kubeconfig = write_kubeconfig(dir.path(), server, false);
        let log = dir.path().join("xlb.log");
        let child = std::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .arg(env!("CARGO_BIN_EXE_xlb"))
            .args(["run", "-c"])
            .arg(&cfg)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(dir.path().join("stdout")).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn xlb");
        KubeXlb { child, log, instance, _dir: dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        common::wait_for(Duration::from_secs(30), || self.child.try_wait().ok().flatten())
            .expect("xlb exits after SIGTERM")
    }
}

impl Drop for KubeXlb {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        common::remove_pins(&self.instance);
    }
}

/// End to end (root, network namespaces as in tests/e2e.rs): the real `xlb`
/// binary with `provider: kubernetes`, its API server in the LB's
/// namespace, routes real TCP to the endpoints the slice lists; when the
/// slice marks the busy backend terminating, new connections avoid it while
/// the transfer already on it completes byte-identical.
#[test]
fn e2e_xlb_routes_to_the_listed_endpoints_and_drains_a_terminating_one() {
    let t = common::Topology::new(2);
    let _b1 = common::start_backend(&t.backends[0], "be1");
    let _b2 = common::start_backend(&t.backends[1], "be2");
    let api = ApiInNetns::start(&t.lb);
    let both = [Ep::ready(&common::backend_ip(1), "be1"), Ep::ready(&common::backend_ip(2), "be2")];
    api.api().put(Kind::EndpointSlice, NS, slice("web-e2e", SVC, &both));
    let mut xlb = KubeXlb::start(&t.lb, &api.api().url());
    let url = format!("{}:80", common::LISTEN);

    let u = url.clone();
    let answers = t.client.run(move || {
        (0..40)
            .map(|_| String::from_utf8(common::http_get(&u, "/").unwrap().body).unwrap())
            .collect::<Vec<_>>()
    });
    for be in ["backend be1\n", "backend be2\n"] {
        let n = answers.iter().filter(|a| *a == be).count();
        assert!(n >= 5, "{be:?} answered {n} of 40: {answers:?}");
    }
    // Counters are read once a second.
    let flows = common::wait_for(Duration::from_secs(5), || {
        let n = common::counter(&common::status(&t.lb), "new_flow");
        (n >= 40).then_some(n)
    });
    assert!(flows.is_some(), "XDP opened the connections: {}", common::status(&t.lb));
    let s = common::status(&t.lb);
    assert_eq!(s["provider"]["kind"], "kubernetes", "{s}");
    assert_eq!(s["provider"]["mode"], "endpointslices", "{s}");

    // A slow transfer, then its backend starts terminating.
    const SIZE: usize = 4 * 1024 * 1024;
    let u = url.clone();
    let bytes = |s: &serde_json::Value, k: usize| -> u64 {
        s["backends"].as_array().unwrap().iter().find(|b| b["name"] == format!("be{k}")).unwrap()["traffic"]
            ["bytes_to_client"]
            .as_u64()
            .unwrap()
    };
    let base = common::status(&t.lb);
    let transfer = t.client.spawn(move || common::http_get(&u, &format!("/slow/{SIZE}")));
    // The backend whose traffic grows by more than the small answers can.
    let busy = common::wait_for(Duration::from_secs(5), || {
        let s = common::status(&t.lb);
        (1..=2).find(|&k| bytes(&s, k) > bytes(&base, k) + 256 * 1024)
    })
    .unwrap_or_else(|| panic!("the status API shows the transfer's backend: {}", common::status(&t.lb)));
    let keep = 3 - busy;
    let eps = [
        Ep::terminating(&common::backend_ip(busy), &format!("be{busy}")),
        Ep::ready(&common::backend_ip(keep), &format!("be{keep}")),
    ];
    api.api().put(Kind::EndpointSlice, NS, slice("web-e2e", SVC, &eps));
    common::wait_for(Duration::from_secs(5), || {
        xlb.log().contains(&format!("backend removed: be{busy}")).then_some(())
    })
    .unwrap_or_else(|| panic!("the removal reached xlb:\n{}", xlb.log()));
    // The status API shows the set once it is in the maps (draining: it
    // still carries the transfer).
    common::wait_for(Duration::from_secs(5), || {
        let s = common::status(&t.lb);
        let b = s["backends"].as_array()?.iter().find(|b| b["name"] == format!("be{busy}"))?.clone();
        (b["state"] == "draining").then_some(())
    })
    .unwrap_or_else(|| panic!("be{busy} draining: {}", common::status(&t.lb)));

    let u = url.clone();
    let after = t.client.run(move || {
        (0..20)
            .map(|_| String::from_utf8(common::http_get(&u, "/").unwrap().body).unwrap())
            .collect::<Vec<_>>()
    });
    assert!(
        after.iter().all(|a| a == &format!("backend be{keep}\n")),
        "new connections avoid be{busy}: {after:?}"
    );
    let body = transfer.join().unwrap().expect("the transfer on the terminating backend finishes");
    assert!(body.body == common::blob(SIZE), "byte-identical");

    let log = xlb.log();
    assert!(log.contains("kubernetes provider: synced 2 endpoints (2 ready)"), "{log}");
    assert!(log.contains(&format!("backend added: be1 {}", common::backend_ip(1))), "{log}");
    assert!(xlb.terminate().success(), "{}", xlb.log());
}

fn readyz(lb: &common::NsRef) -> Option<u16> {
    lb.run(|| common::http_get("127.0.0.1:9090", "/readyz").map(|r| r.status)).ok()
}

fn attached(lb: &common::NsRef) -> Vec<String> {
    let Ok(r) = lb.run(|| common::http_get("127.0.0.1:9090", "/api/v1/status")) else { return Vec::new() };
    let s: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
    s["interfaces"]
        .as_array()
        .map(|a| a.iter().map(|i| i["name"].as_str().unwrap_or_default().to_string()).collect())
        .unwrap_or_default()
}

/// 60 requests through XLB; the set of backends that answered, or the
/// first failure.
fn answering(client: &common::NsRef) -> Result<std::collections::BTreeSet<String>, String> {
    let url = format!("{}:80", common::LISTEN);
    client.run(move || {
        (0..60)
            .map(|i| match common::http_get(&url, "/") {
                Ok(r) => Ok(String::from_utf8(r.body).unwrap().trim().to_string()),
                Err(e) => Err(format!("request {i}: {e}")),
            })
            .collect()
    })
}

/// Interfaces follow the backends (auto, no `interfaces:` list): the
/// service's endpoints appear only 2 s after XLB started, behind three
/// interfaces it was not attached to; then one backend moves to an
/// interface created after start; then that interface is deleted.
#[test]
fn e2e_interfaces_follow_backends_that_appear_move_and_vanish() {
    let t = common::Topology::new(3);
    let _b: Vec<_> = (1..=3).map(|k| common::start_backend(&t.backends[k - 1], &format!("be{k}"))).collect();
    let api = ApiInNetns::start(&t.lb);
    let mut xlb = KubeXlb::spawn(&t.lb, &api.api().url(), "shutdown_timeout: 3\n");
    // Running (attached) once the first sync waited out its 5 s.
    common::wait_for(Duration::from_secs(20), || (!attached(&t.lb).is_empty()).then_some(()))
        .unwrap_or_else(|| panic!("attached:\n{}", xlb.log()));
    assert_eq!(readyz(&t.lb), Some(503), "no endpoints yet");
    assert_eq!(attached(&t.lb), ["lb-client"], "only the listen interface at first");

    std::thread::sleep(Duration::from_secs(2));
    let eps: Vec<Ep> = (1..=3).map(|k| Ep::ready(&common::backend_ip(k), &format!("be{k}"))).collect();
    api.api().put(Kind::EndpointSlice, NS, slice("web-late", SVC, &eps));
    common::wait_for(Duration::from_secs(10), || (readyz(&t.lb) == Some(200)).then_some(()))
        .unwrap_or_else(|| panic!("ready once endpoints appear:\n{}", xlb.log()));
    common::wait_for(Duration::from_secs(10), || (attached(&t.lb).len() == 4).then_some(())).unwrap_or_else(
        || panic!("attached to the backends' interfaces: {:?}\n{}", attached(&t.lb), xlb.log()),
    );
    let all: std::collections::BTreeSet<String> = (1..=3).map(|k| format!("backend be{k}")).collect();
    assert_eq!(answering(&t.client), Ok(all.clone()), "{}\n{}", xlb.log(), common::status(&t.lb));
    let shape = Shape { client: &t.client, lb: &t.lb, listen: common::LISTEN, backends: 3 };
    shape.hundred_requests_reach_every_backend();
    shape.ten_megabytes_arrive_byte_identical();
    shape.two_hundred_concurrent_connections();
    for k in 1..=3 {
        assert!(xlb.log().contains(&format!("XDP attached to lb-be{k} in generic mode")), "{}", xlb.log());
    }

    // be3 moves behind an interface that did not exist when XLB started.
    let be3 = &t.backends[2];
    common::sh(&format!(
        "ip link add eth1 netns {} type veth peer name lb-new netns {}",
        be3.name, t.lb.name
    ));
    t.lb.exec("ip addr add 10.150.0.1/24 dev lb-new && ip link set lb-new up");
    be3.exec("ip addr add 10.150.0.2/24 dev eth1 && ip link set eth1 up");
    be3.exec("ethtool -K eth1 tx off >/dev/null && ethtool -K eth1 gro on >/dev/null");
    be3.exec("ip route replace default via 10.150.0.1 dev eth1");
    let moved = [
        Ep::ready(&common::backend_ip(1), "be1"),
        Ep::ready(&common::backend_ip(2), "be2"),
        Ep::ready("10.150.0.2", "be3"),
    ];
    api.api().put(Kind::EndpointSlice, NS, slice("web-late", SVC, &moved));
    common::wait_for(Duration::from_secs(10), || {
        let a = attached(&t.lb);
        (a.contains(&"lb-new".to_string()) && !a.contains(&"lb-be3".to_string())).then_some(())
    })
    .unwrap_or_else(|| {
        panic!("attached to lb-new, detached from lb-be3: {:?}\n{}", attached(&t.lb), xlb.log())
    });
    assert_eq!(answering(&t.client), Ok(all), "be3 answers through its new interface: {}", xlb.log());
    let log = xlb.log();
    assert!(log.contains("XDP attached to lb-new"), "{log}");
    assert!(log.contains("XDP detached from lb-be3"), "{log}");

    // Its interface is deleted: XLB lets go of it and keeps serving.
    t.lb.exec("ip link del lb-new");
    common::wait_for(Duration::from_secs(10), || {
        (!attached(&t.lb).contains(&"lb-new".to_string())).then_some(())
    })
    .unwrap_or_else(|| panic!("lb-new forgotten: {:?}\n{}", attached(&t.lb), xlb.log()));
    let two = [Ep::ready(&common::backend_ip(1), "be1"), Ep::ready(&common::backend_ip(2), "be2")];
    api.api().put(Kind::EndpointSlice, NS, slice("web-late", SVC, &two));
    common::wait_for(Duration::from_secs(10), || {
        xlb.log().contains("backend removed: be3 10.150.0.2").then_some(())
    })
    .unwrap_or_else(|| panic!("be3 removed:\n{}", xlb.log()));
    let left: std::collections::BTreeSet<String> = (1..=2).map(|k| format!("backend be{k}")).collect();
    assert_eq!(answering(&t.client), Ok(left), "{}", xlb.log());
    assert!(xlb.log().contains("lb-new is gone"), "{}", xlb.log());
    assert!(xlb.child.try_wait().unwrap().is_none(), "still running");
    let shape = Shape { client: &t.client, lb: &t.lb, listen: common::LISTEN, backends: 2 };
    shape.hundred_requests_reach_every_backend();
    let pid = nix::unistd::Pid::from_raw(xlb.child.id() as i32);
    let log = xlb.log.clone();
    let child = &mut xlb.child;
    shape.drain_refuses_with_rst_of(
        pid,
        || common::wait_for(Duration::from_secs(15), || child.try_wait().ok().flatten()),
        &log,
    );
}

/// `systemctl reload` (the unit's ExecReload: `xlb check`, then SIGHUP)
/// under the Kubernetes provider: the process stays, a changed service is
/// watched from then on, a bad file is refused and the running one serves.
#[test]
fn e2e_sighup_switches_the_watched_service_and_never_exits() {
    let t = common::Topology::new(2);
    let _b1 = common::start_backend(&t.backends[0], "be1");
    let _b2 = common::start_backend(&t.backends[1], "be2");
    let api = ApiInNetns::start(&t.lb);
    api.api().put(Kind::EndpointSlice, NS, slice("web-a", SVC, &[Ep::ready(&common::backend_ip(1), "be1")]));
    api.api().put(
        Kind::EndpointSlice,
        NS,
        slice("other-a", "other", &[Ep::ready(&common::backend_ip(2), "be2")]),
    );
    let xlb = KubeXlb::start(&t.lb, &api.api().url());
    let only = |be: &'static str| {
        let url = format!("{}:80", common::LISTEN);
        t.client.run(move || {
            (0..10).all(|_| {
                common::http_get(&url, "/").is_ok_and(|r| r.body == format!("backend {be}\n").into_bytes())
            })
        })
    };
    assert!(only("be1"), "service web: be1\n{}", xlb.log());

    let path = xlb._dir.path().join("xlb.yaml");
    let text = std::fs::read_to_string(&path).unwrap().replace(&format!("service: {SVC}"), "service: other");
    std::fs::write(&path, text).unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_xlb"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let pid = nix::unistd::Pid::from_raw(xlb.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    common::wait_for(Duration::from_secs(10), || xlb.log().contains("backend removed: be1").then_some(()))
        .unwrap_or_else(|| panic!("the other service's endpoints replaced web's:\n{}", xlb.log()));
    assert!(xlb.log().contains("provider replaced by kubernetes service default/other"), "{}", xlb.log());
    assert!(only("be2"), "service other: be2\n{}", xlb.log());

    std::fs::write(&path, "provider: [}\n").unwrap();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    common::wait_for(Duration::from_secs(5), || xlb.log().contains("reload rejected").then_some(()))
        .unwrap_or_else(|| panic!("bad file refused:\n{}", xlb.log()));
    std::thread::sleep(Duration::from_millis(300));
    let mut xlb = xlb;
    assert!(xlb.child.try_wait().unwrap().is_none(), "never exits on SIGHUP");
    assert!(only("be2"), "the running config keeps serving");
    assert!(xlb.terminate().success(), "{}", xlb.log());
}

/// preStop may run while XLB still waits for its provider's first sync: the
/// shutdown file it creates is a request, not a leftover.
#[test]
fn e2e_a_shutdown_file_created_during_startup_is_honoured() {
    let t = common::Topology::new(1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("shutdown");
    // No API server answers: startup waits out its first-sync grace period.
    let mut xlb = KubeXlb::spawn(
        &t.lb,
        "http://127.0.0.1:9",
        &format!("interfaces: [lb-client]\nshutdown_timeout: 2\nshutdown_file: {}\n", file.display()),
    );
    std::thread::sleep(Duration::from_millis(1000));
    std::fs::write(&file, "").unwrap();
    let t0 = Instant::now();
    let exited = common::wait_for(Duration::from_secs(20), || xlb.child.try_wait().ok().flatten())
        .unwrap_or_else(|| panic!("xlb drains and exits:\n{}", xlb.log()));
    assert!(exited.success(), "{}", xlb.log());
    let log = xlb.log();
    assert!(!log.contains("removing a shutdown file"), "{log}");
    assert!(log.contains("appeared") && log.contains("drain done"), "{log}");
    // The first-sync wait (5 s from start), then the 2 s drain.
    assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(file.exists(), "the request is not deleted");
}

/// Health checks on top of the Kubernetes provider (root, network
/// namespaces): every endpoint is ready in the API, but one fails its http
/// check and gets no new connections until it passes; an endpoint that
/// appears later is probed before it gets any; one that leaves the slice is
/// no longer probed.
#[test]
fn e2e_an_endpoint_ready_in_the_api_but_failing_its_check_gets_no_connections() {
    let t = common::Topology::new(3);
    let servers: Vec<common::Backend> =
        (0..3).map(|k| common::start_backend(&t.backends[k], &format!("be{}", k + 1))).collect();
    servers[1].check.store(500, std::sync::atomic::Ordering::Relaxed);
    servers[2].check.store(503, std::sync::atomic::Ordering::Relaxed);
    let api = ApiInNetns::start(&t.lb);
    let ep = |k: usize| Ep::ready(&common::backend_ip(k), &format!("be{k}"));
    api.api().put(Kind::EndpointSlice, NS, slice("web-hc", SVC, &[ep(1), ep(2)]));
    let mut xlb = KubeXlb::spawn(
        &t.lb,
        &api.api().url(),
        "interfaces: [lb-client, lb-be1, lb-be2, lb-be3]\nshutdown_timeout: 1\n\
         health_check: {type: http, path: /check, interval_ms: 200, timeout_ms: 150, rise: 2, fall: 2}\n",
    );
    common::wait_for(Duration::from_secs(30), || (readyz(&t.lb) == Some(200)).then_some(()))
        .unwrap_or_else(|| panic!("xlb did not become ready:\n{}", xlb.log()));
    let entry = |name: &str| -> Option<serde_json::Value> {
        let s = common::status(&t.lb);
        s["backends"].as_array()?.iter().find(|b| b["name"] == name).cloned()
    };
    let be2 = entry("be2").expect("be2 listed");
    assert_eq!(
        (be2["health"].as_str(), be2["state"].as_str()),
        (Some("unhealthy"), Some("excluded")),
        "{be2}"
    );
    assert_eq!(answering(&t.client), Ok(["backend be1".to_string()].into()), "be2 is ready in the API only");

    // Passes again: in.
    servers[1].check.store(200, std::sync::atomic::Ordering::Relaxed);
    common::wait_for(Duration::from_secs(3), || (entry("be2")?["health"] == "healthy").then_some(()))
        .unwrap_or_else(|| panic!("be2 healthy: {:?}", entry("be2")));
    assert_eq!(answering(&t.client), Ok(["backend be1".to_string(), "backend be2".to_string()].into()));

    // be3 appears ready in the API while failing its check: probed, kept out.
    api.api().put(Kind::EndpointSlice, NS, slice("web-hc", SVC, &[ep(1), ep(2), ep(3)]));
    common::wait_for(Duration::from_secs(5), || (entry("be3")?["health"] == "unhealthy").then_some(()))
        .unwrap_or_else(|| panic!("be3 probed: {}\n{}", common::status(&t.lb), xlb.log()));
    assert_eq!(answering(&t.client), Ok(["backend be1".to_string(), "backend be2".to_string()].into()));

    // be2 leaves the slice: no longer listed, no longer probed.
    api.api().put(Kind::EndpointSlice, NS, slice("web-hc", SVC, &[ep(1), ep(3)]));
    common::wait_for(Duration::from_secs(5), || entry("be2").is_none().then_some(()))
        .unwrap_or_else(|| panic!("be2 gone: {}", common::status(&t.lb)));
    servers[1].check.store(500, std::sync::atomic::Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(answering(&t.client), Ok(["backend be1".to_string()].into()));
    let log = xlb.log();
    let be2_ip = common::backend_ip(2);
    assert!(
        log.contains(&format!("backend be2 {be2_ip} unhealthy: status 500, expected 200-399 (1/2)")),
        "{log}"
    );
    assert_eq!(
        log.matches(&format!("backend be2 {be2_ip} unhealthy")).count(),
        1,
        "not probed once removed: {log}"
    );
    assert!(log.contains(&format!("backend be3 {} unhealthy: status 503", common::backend_ip(3))), "{log}");
    assert!(xlb.terminate().success(), "{}", xlb.log());
}
