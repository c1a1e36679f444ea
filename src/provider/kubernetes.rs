//! `provider: kubernetes`: the ready endpoints of one Service, from
//! `discovery.k8s.io/v1` EndpointSlices (labelled
//! `kubernetes.io/service-name=<service>`), or from core/v1 Endpoints on
//! clusters without that API.
//!
//! kube-runtime's watcher lists and watches (pages, bookmarks, resuming
//! from the last resourceVersion, relisting on 410 Gone). On top of it:
//! - every error ends that watcher; after kube-runtime's default backoff
//!   a new one relists, and the relisted objects replace the whole view at
//!   once, so objects deleted during an outage disappear. Until then the last
//!   published set stays: an error never empties it;
//! - a 404 on the first EndpointSlice list switches to Endpoints, once;
//! - changes are coalesced: the first change after a quiet spell is published
//!   at once, later ones at most every [`COALESCE`].
//!
//! `start` never waits for the API server: the set starts empty and the
//! health says `synced: false` until the first complete list.

mod objects;

use std::path::Path;
use std::pin::pin;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::stream::{self, BoxStream};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Endpoints;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::utils::{Backoff, StreamBackoff};
use kube::runtime::watcher::{self, DefaultBackoff, Event};
use kube::{Api, Client};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use self::objects::{Lenient, Parsed, Source, Store};
use super::{Backend, Provider, ProviderHealth};
use crate::config::KubernetesProvider;

/// Changes are published at most this often (the first one after a quiet
/// spell at once), so a change reaches the channel within this window.
pub const COALESCE: Duration = Duration::from_millis(50);
/// Watch requests ask the server to end the watch after this long; the
/// watcher resumes from its resourceVersion. It also bounds how long a
/// silently dead connection goes unnoticed (kube adds 5 s).
const WATCH_TIMEOUT_SECS: u32 = 60;
/// No byte for this long on a response (list or watch) fails the request.
/// Longer than a watch lasts, so it only fires on a hung connection.
const READ_TIMEOUT: Duration = Duration::from_secs(75);
/// The label the EndpointSlice controller puts on a Service's slices.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";

/// Which API the provider reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    EndpointSlices,
    Endpoints,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::EndpointSlices => "endpointslices",
            Mode::Endpoints => "endpoints",
        }
    }
}

/// Starts the provider. Fails only when no API client can be configured
/// (an unreadable kubeconfig, or neither a kubeconfig nor an in-cluster
/// service account); an unreachable or failing API server is not an error
/// here: the provider keeps retrying and its health says so.
pub async fn start(cfg: &KubernetesProvider, kubeconfig: Option<&Path>) -> Result<Provider> {
    let client = client(kubeconfig).await.context("kubernetes provider")?;
    Ok(spawn(client, cfg))
}

/// Starts the provider on a ready client.
pub fn spawn(client: Client, cfg: &KubernetesProvider) -> Provider {
    let (set_tx, set_rx) = watch::channel(Vec::new());
    let (health_tx, health_rx) =
        watch::channel(ProviderHealth::new("kubernetes", Mode::EndpointSlices.as_str()));
    let task = tokio::spawn(run(client, cfg.clone(), set_tx, health_tx));
    Provider { backends: set_rx, health: health_rx, task: Some(super::TaskGuard(task)) }
}

async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    // kube builds its TLS config with rustls's process default; make it
    // ring explicitly (if another crate enabled aws-lc-rs as well, rustls
    // could not pick one and would panic).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer().await.context(
            "no Kubernetes API configuration found: set KUBECONFIG or --kubeconfig, \
             or run in a pod with a service account",
        )?,
    };
    config.read_timeout = Some(READ_TIMEOUT);
    // kube retries 429/503/504 inside each request, up to 15 times over
    // minutes, invisibly. Off: every failure surfaces at once (health, log)
    // and the watcher's backoff is the one retry policy.
    config.default_retry = false;
    config.reset_reader_on_write = true;
    info!(server = %config.cluster_url, "kubernetes provider: API server {}", config.cluster_url);
    Client::try_from(config).context("building the Kubernetes API client")
}

async fn run(
    client: Client,
    cfg: KubernetesProvider,
    set_tx: watch::Sender<Vec<Backend>>,
    health_tx: watch::Sender<ProviderHealth>,
) {
    let mut driver = Driver::new(set_tx, health_tx);
    let mut mode = Mode::EndpointSlices;
    loop {
        let ns = cfg.namespace.as_str();
        let svc = cfg.service.as_str();
        let events = match mode {
            Mode::EndpointSlices => {
                info!(
                    mode = mode.as_str(),
                    namespace = ns,
                    service = svc,
                    "kubernetes provider: watching EndpointSlices (discovery.k8s.io/v1) \
                     labelled {SERVICE_LABEL}={svc} in namespace {ns}"
                );
                let api = Api::<Lenient<EndpointSlice>>::namespaced(client.clone(), ns);
                events(api, watcher::Config::default().labels(&format!("{SERVICE_LABEL}={svc}")))
            }
            Mode::Endpoints => {
                info!(
                    mode = mode.as_str(),
                    namespace = ns,
                    service = svc,
                    "kubernetes provider: watching Endpoints (core/v1) {svc} in namespace {ns}"
                );
                let api = Api::<Lenient<Endpoints>>::namespaced(client.clone(), ns);
                events(api, watcher::Config::default().fields(&format!("metadata.name={svc}")))
            }
        };
        match driver.drive(events, mode).await {
            Exit::Closed => return,
            Exit::Fallback => {
                warn!(
                    "kubernetes provider: the EndpointSlice API (discovery.k8s.io/v1) is not served \
                     by this cluster (404); falling back to core/v1 Endpoints"
                );
                mode = Mode::Endpoints;
            }
        }
    }
}

/// The watcher's events, converted. Each error ends the current watcher;
/// after kube-runtime's default backoff a new watcher starts with a fresh
/// list (client-go's reflector does the same), which re-verifies the whole
/// set and drops whatever was deleted meanwhile.
fn events<K: Source>(
    api: Api<Lenient<K>>,
    wc: watcher::Config,
) -> BoxStream<'static, Result<Event<Parsed>, watcher::Error>> {
    let wc = wc.timeout(WATCH_TIMEOUT_SECS);
    let watchers = stream::repeat_with(move || until_error(watcher::watcher(api.clone(), wc.clone())));
    StreamBackoff::new(watchers.flatten(), GrowingBackoff(DefaultBackoff::default()))
        .filter_map(|item| async move {
            match item {
                Ok(ev) => objects::convert(ev).map(Ok),
                Err(e) => Some(Err(e)),
            }
        })
        .boxed()
}

/// Passes items through the first error, then ends without polling `s`
/// again (a watcher polled after an error would already be retrying).
fn until_error<T, E>(s: impl Stream<Item = Result<T, E>> + Send) -> impl Stream<Item = Result<T, E>> + Send {
    stream::unfold(Some(Box::pin(s)), |s| async move {
        let mut s = s?;
        let item = s.next().await?;
        let rest = if item.is_ok() { Some(s) } else { None };
        Some((item, rest))
    })
}

/// kube-runtime's default backoff (800 ms doubling to 30 s, jittered,
/// starting over after 120 s without errors), but not reset by every
/// successful item: a server that lists but fails every watch must not be
/// relisted every 800 ms.
struct GrowingBackoff(DefaultBackoff);

impl Iterator for GrowingBackoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        self.0.next()
    }
}

impl Backoff for GrowingBackoff {
    fn reset(&mut self) {}
}

enum Exit {
    /// Nobody listens any more.
    Closed,
    /// The EndpointSlice API is missing: use Endpoints.
    Fallback,
}

/// Applies events to the store, publishes the set (coalesced) and keeps
/// the health current.
struct Driver {
    store: Store,
    set_tx: watch::Sender<Vec<Backend>>,
    health_tx: watch::Sender<ProviderHealth>,
    /// The store changed since the last publish.
    dirty: bool,
    last_publish: Option<Instant>,
    /// Publishing serving terminating endpoints because none is ready.
    falling_back: bool,
}

impl Driver {
    fn new(set_tx: watch::Sender<Vec<Backend>>, health_tx: watch::Sender<ProviderHealth>) -> Self {
        Driver {
            store: Store::default(),
            set_tx,
            health_tx,
            dirty: false,
            last_publish: None,
            falling_back: false,
        }
    }

    fn publish_due(&self) -> Instant {
        self.last_publish.map_or_else(Instant::now, |t| t + COALESCE)
    }

    async fn drive(
        &mut self,
        events: impl Stream<Item = Result<Event<Parsed>, watcher::Error>>,
        mode: Mode,
    ) -> Exit {
        let mut events = pin!(events);
        self.store = Store::default();
        self.health_tx.send_modify(|h| h.mode = mode.as_str().to_string());
        let mut listed = false;
        loop {
            let due = self.dirty.then(|| self.publish_due());
            let set_tx = self.set_tx.clone();
            tokio::select! {
                biased;
                _ = set_tx.closed() => return Exit::Closed,
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    self.publish();
                }
                item = events.next() => match item {
                    None => return Exit::Closed,
                    Some(Ok(ev)) => {
                        listed |= matches!(ev, Event::InitDone);
                        self.on_event(ev, mode);
                        if self.dirty && self.publish_due() <= Instant::now() {
                            self.publish();
                        }
                    }
                    Some(Err(e)) => {
                        if mode == Mode::EndpointSlices && !listed && is_not_found(&e) {
                            return Exit::Fallback;
                        }
                        self.on_error(&e, mode);
                    }
                },
            }
        }
    }

    fn on_event(&mut self, ev: Event<Parsed>, mode: Mode) {
        let done = matches!(ev, Event::InitDone);
        let change = matches!(ev, Event::Apply(_) | Event::Delete(_));
        match &ev {
            Event::Apply(p) => debug!(object = %p.key, "{} {} applied", mode.as_str(), p.key),
            Event::Delete(p) => debug!(object = %p.key, "{} {} deleted", mode.as_str(), p.key),
            _ => {}
        }
        self.dirty |= self.store.apply(ev);
        // A completed list or a watch event: the API answered.
        if done || change {
            let was_connected = self.health_tx.borrow().connected;
            self.health_tx.send_modify(|h| h.synced_now());
            if !was_connected {
                info!(mode = mode.as_str(), "kubernetes provider: connected to the API server");
            }
        }
        if done {
            let (objects, endpoints, ready) = self.store.counts();
            info!(
                mode = mode.as_str(),
                objects,
                endpoints,
                ready,
                "kubernetes provider: synced {endpoints} endpoints ({ready} ready) from {objects} {}",
                mode.as_str()
            );
        }
    }

    fn on_error(&mut self, e: &watcher::Error, mode: Mode) {
        let described = match api_code(e) {
            Some(code) => anyhow::anyhow!("{} (code {code})", describe(e)),
            None => anyhow::anyhow!("{}", describe(e)),
        };
        self.health_tx.send_modify(|h| {
            h.connected = false;
            h.failed(&described);
        });
        let kept = self.set_tx.borrow().len();
        let hint = if is_forbidden(e) {
            "; the service account needs get/list/watch on endpointslices.discovery.k8s.io and endpoints \
             (docs/kubernetes-provider.md)"
        } else {
            ""
        };
        warn!(
            mode = mode.as_str(),
            "kubernetes provider: API error, keeping the last {kept} backends and retrying with backoff: \
             {described}{hint}"
        );
    }

    /// Sends the merged set if it differs from the last one sent.
    fn publish(&mut self) {
        self.dirty = false;
        self.last_publish = Some(Instant::now());
        let next = self.store.backends();
        let falling_back = self.store.falling_back();
        if falling_back != self.falling_back {
            self.falling_back = falling_back;
            if falling_back {
                warn!(
                    "kubernetes provider: no endpoint is ready; new connections go to the {} serving \
                     terminating ones until one is",
                    next.len()
                );
            } else {
                info!("kubernetes provider: ready endpoints again; terminating ones get no new connections");
            }
        }
        let sent = self.set_tx.send_if_modified(|cur| {
            if *cur == next {
                return false;
            }
            *cur = next;
            true
        });
        if sent {
            debug!(backends = self.set_tx.borrow().len(), "kubernetes provider: backend set published");
        }
    }
}

/// The error with its causes ("connection refused" is often only in a
/// source), each cause once.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

fn api_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        watcher::Error::WatchError(s) => Some(s.code),
        _ => None,
    }
}

/// The first list got a 404: the resource type is not served. (A missing
/// namespace lists as empty, it does not 404.)
fn is_not_found(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(_)) && api_code(e) == Some(404)
}

fn is_forbidden(e: &watcher::Error) -> bool {
    api_code(e) == Some(403)
}

#[cfg(test)]
mod tests {
    use futures::channel::mpsc;
    use kube::core::response::Status;

    use super::objects::Candidate;
    use super::*;

    fn apply(key: &str, addrs: &[&str]) -> Event<Parsed> {
        let candidates = addrs
            .iter()
            .map(|a| Candidate {
                addr: a.parse().unwrap(),
                name: format!("pod-{a}"),
                ready: true,
                fallback: false,
            })
            .collect();
        Event::Apply(Parsed { key: key.into(), candidates })
    }

    fn api_error(code: u16) -> watcher::Error {
        let status = Status::failure("boom", "Testing").with_code(code);
        watcher::Error::InitialListFailed(kube::Error::Api(status.boxed()))
    }

    type Tx = mpsc::UnboundedSender<Result<Event<Parsed>, watcher::Error>>;

    struct Harness {
        tx: Tx,
        set: watch::Receiver<Vec<Backend>>,
        health: watch::Receiver<ProviderHealth>,
        driver: tokio::task::JoinHandle<Exit>,
    }

    fn harness(mode: Mode) -> Harness {
        let (tx, rx) = mpsc::unbounded();
        let (set_tx, set) = watch::channel(Vec::new());
        let (health_tx, health) = watch::channel(ProviderHealth::new("kubernetes", "endpointslices"));
        let driver = tokio::spawn(async move { Driver::new(set_tx, health_tx).drive(rx, mode).await });
        Harness { tx, set, health, driver }
    }

    fn addrs(set: &mut watch::Receiver<Vec<Backend>>) -> Vec<String> {
        set.borrow_and_update().iter().map(|b| b.addr.to_string()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn first_change_is_immediate_bursts_are_coalesced() {
        let mut h = harness(Mode::EndpointSlices);
        let t0 = Instant::now();
        h.tx.unbounded_send(Ok(Event::Init)).unwrap();
        h.tx.unbounded_send(Ok(Event::InitApply(match apply("a", &["10.0.0.1"]) {
            Event::Apply(p) => p,
            _ => unreachable!(),
        })))
        .unwrap();
        h.tx.unbounded_send(Ok(Event::InitDone)).unwrap();
        h.set.changed().await.unwrap();
        assert_eq!(Instant::now(), t0, "the first sync is published at once");
        assert_eq!(addrs(&mut h.set), ["10.0.0.1"]);
        assert!(h.health.borrow().synced && h.health.borrow().connected);

        // Two more changes 10 ms apart: both go out together, 50 ms after
        // the last publish.
        tokio::time::sleep(Duration::from_millis(10)).await;
        h.tx.unbounded_send(Ok(apply("b", &["10.0.0.2"]))).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        h.tx.unbounded_send(Ok(apply("c", &["10.0.0.3"]))).unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(25), h.set.changed()).await.is_err());
        h.set.changed().await.unwrap();
        assert_eq!(Instant::now() - t0, COALESCE);
        assert_eq!(addrs(&mut h.set), ["10.0.0.1", "10.0.0.2", "10.0.0.3"]);

        // After a quiet spell the next change is immediate again.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t1 = Instant::now();
        h.tx.unbounded_send(Ok(Event::Delete(Parsed { key: "a".into(), candidates: vec![] }))).unwrap();
        h.set.changed().await.unwrap();
        assert_eq!(Instant::now(), t1);
        assert_eq!(addrs(&mut h.set), ["10.0.0.2", "10.0.0.3"]);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_keep_the_set_and_show_in_health() {
        let mut h = harness(Mode::EndpointSlices);
        h.tx.unbounded_send(Ok(Event::Init)).unwrap();
        h.tx.unbounded_send(Ok(Event::InitDone)).unwrap();
        h.tx.unbounded_send(Ok(apply("a", &["10.0.0.1"]))).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(addrs(&mut h.set), ["10.0.0.1"]);
        // A 404 after a successful list is an error like any other.
        h.tx.unbounded_send(Err(api_error(404))).unwrap();
        h.tx.unbounded_send(Err(api_error(503))).unwrap();
        // A relist that starts but never completes changes nothing.
        h.tx.unbounded_send(Ok(Event::Init)).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(addrs(&mut h.set), ["10.0.0.1"]);
        let health = h.health.borrow().clone();
        assert_eq!(health.errors, 2);
        assert!(!health.connected);
        assert!(health.synced);
        assert!(health.last_error.unwrap().contains("boom"));
        // The relist completes empty: the service really has none now.
        h.tx.unbounded_send(Ok(Event::InitDone)).unwrap();
        h.set.changed().await.unwrap();
        assert!(h.set.borrow().is_empty());
        assert!(h.health.borrow().connected);
        assert!(!h.driver.is_finished());
    }

    #[tokio::test(start_paused = true)]
    async fn a_404_before_the_first_list_falls_back() {
        let h = harness(Mode::EndpointSlices);
        h.tx.unbounded_send(Ok(Event::Init)).unwrap();
        h.tx.unbounded_send(Err(api_error(404))).unwrap();
        assert!(matches!(h.driver.await.unwrap(), Exit::Fallback));
        // Not in Endpoints mode: there is nothing to fall back to.
        let h = harness(Mode::Endpoints);
        h.tx.unbounded_send(Err(api_error(404))).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!h.driver.is_finished());
        assert_eq!(h.health.borrow().errors, 1);
        assert_eq!(h.health.borrow().mode, "endpoints");
    }

    #[tokio::test(start_paused = true)]
    async fn stops_when_nobody_listens() {
        let Harness { tx, set, health, driver } = harness(Mode::EndpointSlices);
        drop((set, health));
        assert!(matches!(driver.await.unwrap(), Exit::Closed));
        drop(tx);
    }

    #[test]
    fn until_error_ends_after_the_first_error() {
        let items = vec![Ok(1), Ok(2), Err("x"), Ok(3), Err("y")];
        let out: Vec<_> = futures::executor::block_on(until_error(stream::iter(items)).collect());
        assert_eq!(out, vec![Ok(1), Ok(2), Err("x")]);
        // A watcher polled again after an error would already be retrying
        // inside: the stream must end without polling it.
        let s = stream::iter(vec![Ok(1), Err("x")])
            .chain(stream::poll_fn(|_| -> std::task::Poll<Option<Result<i32, &str>>> { panic!("polled") }));
        let out: Vec<_> = futures::executor::block_on(until_error(s).collect());
        assert_eq!(out, vec![Ok(1), Err("x")]);
    }
}
