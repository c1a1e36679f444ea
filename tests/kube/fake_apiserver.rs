//! A protocol-level Kubernetes API server for tests, on 127.0.0.1: it
//! speaks enough of the real list/watch protocol for a real client (kube)
//! to run against it unchanged:
//!
//! - `GET /apis/discovery.k8s.io/v1/namespaces/NS/endpointslices` and
//!   `GET /api/v1/namespaces/NS/endpoints` (also without `namespaces/NS`):
//!   lists (`EndpointSliceList` / `EndpointsList`, items without
//!   kind/apiVersion as the apiserver sends them) with `labelSelector`,
//!   `fieldSelector` (metadata.name, metadata.namespace), `limit` and
//!   `continue` (consistent snapshots; an unknown token is `410 Gone`);
//! - `watch=1` / `watch=true`: a chunked stream of one JSON event per line,
//!   ADDED / MODIFIED / DELETED replayed from `resourceVersion` out of the
//!   event history, then live; BOOKMARK events when `allowWatchBookmarks`;
//!   `timeoutSeconds` ends the stream cleanly; a `resourceVersion` older
//!   than the compacted history gets an ERROR event with a `410 Expired`
//!   Status, as the apiserver sends it;
//! - faults on demand: 5xx Status replies, connections closed on accept,
//!   responses cut off after their headers, every open connection dropped
//!   mid-stream, `410` on open watches or on new watch requests, a
//!   non-JSON line in open watches, and a plain-text `404 page not found`
//!   for the discovery.k8s.io group to play a cluster without it.
//!
//! Each object gets `metadata.resourceVersion`, `uid`, `generation` and
//! `creationTimestamp` from the server, like the real one.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::AbortHandle;

type Body = BoxBody<Bytes, std::io::Error>;

/// The two resource types the provider reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    EndpointSlice,
    Endpoints,
}

impl Kind {
    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::Endpoints => "v1",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Endpoints => "Endpoints",
        }
    }
}

/// What the server does with the next requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Every request gets this status with a Status body.
    Status(u16),
    /// Connections are closed as soon as they are accepted.
    Refuse,
    /// Requests get response headers, then the connection is cut.
    HangUp,
    /// Watch requests get an HTTP `410 Gone` Status; lists work.
    WatchGone,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub path: String,
    pub query: HashMap<String, String>,
    pub watch: bool,
    pub status: u16,
}

#[derive(Clone)]
struct Stored {
    rv: u64,
    kind: Kind,
    namespace: String,
    etype: &'static str,
    object: Value,
    /// The object before a MODIFIED: a watcher whose selector matched the
    /// old version but not the new one gets DELETED, and the reverse ADDED.
    prev: Option<Value>,
}

impl Stored {
    /// How this event looks through a watch filter, if it is seen at all.
    fn through(&self, f: &Filter) -> Option<Bytes> {
        let now = f.admits(self.kind, &self.namespace, &self.object);
        let before = self.prev.as_ref().map(|p| f.admits(self.kind, &self.namespace, p));
        let etype = match (self.etype, before, now) {
            ("MODIFIED", Some(true), true) | ("MODIFIED", None, true) => "MODIFIED",
            ("MODIFIED", Some(false), true) => "ADDED",
            ("MODIFIED", Some(true), false) => "DELETED",
            (t, _, true) => t,
            _ => return None,
        };
        Some(event_line(etype, &self.object))
    }
}

#[derive(Clone)]
enum Msg {
    Event(Stored),
    /// Send this line as it is (for malformed stream content).
    Raw(String),
    /// Send a 410 Expired ERROR event and end the watch.
    Expire,
}

struct Inner {
    rv: u64,
    uid: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: VecDeque<Stored>,
    /// Watches from a resourceVersion below this get 410.
    compacted: u64,
    discovery: bool,
    fault: Fault,
    log: Vec<Logged>,
    /// Lists being paged: id -> (resourceVersion, items).
    snapshots: HashMap<u64, (u64, Vec<Value>)>,
    next_snapshot: u64,
    bookmark_every: Duration,
}

struct Shared {
    inner: Mutex<Inner>,
    live: broadcast::Sender<Msg>,
    conns: Mutex<Vec<AbortHandle>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct FakeApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.accept.abort();
        self.drop_connections();
    }
}

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                rv: 1000,
                uid: 0,
                objects: BTreeMap::new(),
                history: VecDeque::new(),
                compacted: 0,
                discovery: true,
                fault: Fault::None,
                log: Vec::new(),
                snapshots: HashMap::new(),
                next_snapshot: 1,
                bookmark_every: Duration::from_millis(200),
            }),
            live: broadcast::channel(100_000).0,
            conns: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone())).abort_handle();
        FakeApiServer { addr, shared, accept }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server (no auth) into `dir`.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> std::path::PathBuf {
        write_kubeconfig(dir, &self.url(), false)
    }

    /// Creates or replaces an object (`metadata.name` and the namespace
    /// given); returns its new resourceVersion.
    pub fn put(&self, kind: Kind, namespace: &str, mut object: Value) -> u64 {
        let mut g = self.shared.lock();
        let name = object["metadata"]["name"].as_str().expect("metadata.name").to_string();
        let key = (kind, namespace.to_string(), name);
        g.rv += 1;
        let rv = g.rv;
        let old = g.objects.get(&key).cloned();
        let (uid, generation) = match &old {
            Some(o) => (o["metadata"]["uid"].clone(), o["metadata"]["generation"].as_u64().unwrap_or(1) + 1),
            None => {
                g.uid += 1;
                (json!(format!("0000-{:08}", g.uid)), 1)
            }
        };
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("namespace".into(), json!(namespace));
            meta.insert("resourceVersion".into(), json!(rv.to_string()));
            meta.insert("uid".into(), uid);
            meta.insert("generation".into(), json!(generation));
            meta.entry("creationTimestamp").or_insert(json!("2025-01-01T00:00:00Z"));
        }
        if let Some(o) = object.as_object_mut() {
            o.insert("kind".into(), json!(kind.kind()));
            o.insert("apiVersion".into(), json!(kind.api_version()));
        }
        g.objects.insert(key, object.clone());
        let etype = if old.is_some() { "MODIFIED" } else { "ADDED" };
        let ev = Stored { rv, kind, namespace: namespace.to_string(), etype, object, prev: old };
        g.history.push_back(ev.clone());
        let _ = self.shared.live.send(Msg::Event(ev));
        rv
    }

    /// Deletes an object; watchers get a DELETED event with its last state.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let mut g = self.shared.lock();
        let Some(mut object) = g.objects.remove(&(kind, namespace.to_string(), name.to_string())) else {
            return;
        };
        g.rv += 1;
        let rv = g.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let ev = Stored { rv, kind, namespace: namespace.to_string(), etype: "DELETED", object, prev: None };
        g.history.push_back(ev.clone());
        let _ = self.shared.live.send(Msg::Event(ev));
    }

    /// Deletes an object as if its event had been lost: no watcher hears
    /// of it and the history is compacted past it, so only a relist shows it.
    pub fn delete_unobserved(&self, kind: Kind, namespace: &str, name: &str) {
        let mut g = self.shared.lock();
        g.objects.remove(&(kind, namespace.to_string(), name.to_string()));
        g.rv += 1;
        g.compacted = g.rv;
        g.history.clear();
    }

    /// Forgets the event history: watches from any earlier resourceVersion
    /// get `410 Expired`.
    pub fn compact(&self) {
        let mut g = self.shared.lock();
        g.rv += 1;
        g.compacted = g.rv;
        g.history.clear();
    }

    /// Open watches get an ERROR event with a 410 Expired Status and end.
    pub fn expire_watches(&self) {
        let _g = self.shared.lock();
        let _ = self.shared.live.send(Msg::Expire);
    }

    /// Open watches get this line as it is.
    pub fn send_raw_line(&self, line: &str) {
        let _g = self.shared.lock();
        let _ = self.shared.live.send(Msg::Raw(line.to_string()));
    }

    /// Sends an event to open watches without storing anything.
    pub fn inject_event(&self, kind: Kind, namespace: &str, etype: &'static str, object: Value) {
        let mut g = self.shared.lock();
        g.rv += 1;
        let ev = Stored { rv: g.rv, kind, namespace: namespace.to_string(), etype, object, prev: None };
        let _ = self.shared.live.send(Msg::Event(ev));
    }

    pub fn set_fault(&self, fault: Fault) {
        self.shared.lock().fault = fault;
        if fault == Fault::Refuse {
            self.drop_connections();
        }
    }

    /// Serve (or not) the discovery.k8s.io group.
    pub fn set_discovery(&self, on: bool) {
        self.shared.lock().discovery = on;
    }

    pub fn set_bookmark_interval(&self, every: Duration) {
        self.shared.lock().bookmark_every = every;
    }

    /// Closes every open connection at once, watches mid-stream included.
    pub fn drop_connections(&self) {
        for c in self.shared.conns.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            c.abort();
        }
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.shared.lock().log.clone()
    }

    /// Successful lists (first pages) of a resource path suffix.
    pub fn lists(&self, suffix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| !r.watch && r.status == 200 && r.path.ends_with(suffix))
            .filter(|r| !r.query.contains_key("continue"))
            .count()
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else { continue };
        if shared.lock().fault == Fault::Refuse {
            drop(sock);
            continue;
        }
        let s = shared.clone();
        let svc = hyper::service::service_fn(move |req| {
            let s = s.clone();
            async move { Ok::<_, Infallible>(handle(&s, req)) }
        });
        let conn = tokio::spawn(async move {
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(sock), svc).await;
        });
        let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| !c.is_finished());
        conns.push(conn.abort_handle());
    }
}

fn full(status: StatusCode, content_type: &str, body: String) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed())
        .unwrap()
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn status_reply(code: u16, reason: &str, message: &str) -> Response<Body> {
    full(
        StatusCode::from_u16(code).unwrap(),
        "application/json",
        status_json(code, reason, message).to_string(),
    )
}

fn handle(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query().unwrap_or(""));
    let watch = matches!(query.get("watch").map(String::as_str), Some("1" | "true"));
    let resp = route(shared, &path, &query, watch);
    shared.lock().log.push(Logged { path, query, watch, status: resp.status().as_u16() });
    resp
}

fn route(shared: &Arc<Shared>, path: &str, q: &HashMap<String, String>, watch: bool) -> Response<Body> {
    let fault = shared.lock().fault;
    match fault {
        Fault::Status(code) => {
            let reason = if code == 503 { "ServiceUnavailable" } else { "InternalError" };
            return status_reply(code, reason, "the server is currently unable to handle the request");
        }
        Fault::HangUp => {
            let cut = futures::stream::iter([Err::<Frame<Bytes>, _>(std::io::Error::other("hang up"))]);
            return Response::builder()
                .header("content-type", "application/json")
                .body(BodyExt::boxed(StreamBody::new(cut)))
                .unwrap();
        }
        Fault::WatchGone if watch => {
            return status_reply(410, "Expired", "too old resource version");
        }
        _ => {}
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (kind, ns) = match parts.as_slice() {
        ["apis", "discovery.k8s.io", "v1", "namespaces", ns, "endpointslices"] => {
            (Kind::EndpointSlice, Some(*ns))
        }
        ["apis", "discovery.k8s.io", "v1", "endpointslices"] => (Kind::EndpointSlice, None),
        ["api", "v1", "namespaces", ns, "endpoints"] => (Kind::Endpoints, Some(*ns)),
        ["api", "v1", "endpoints"] => (Kind::Endpoints, None),
        _ => return full(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "404 page not found\n".into()),
    };
    if kind == Kind::EndpointSlice && !shared.lock().discovery {
        // What the apiserver's mux answers for a group it does not serve.
        return full(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "404 page not found\n".into());
    }
    let filter = match Filter::new(kind, ns, q) {
        Ok(f) => f,
        Err(e) => return status_reply(400, "BadRequest", &e),
    };
    if watch {
        watch_reply(shared, filter, q)
    } else {
        list_reply(shared, &filter, q)
    }
}

struct Filter {
    kind: Kind,
    namespace: Option<String>,
    labels: Vec<(String, Op, String)>,
    fields: Vec<(String, Op, String)>,
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Eq,
    Ne,
    Exists,
    NotExists,
}

fn parse_selector(s: &str) -> Result<Vec<(String, Op, String)>, String> {
    let mut out = Vec::new();
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let t = if let Some((k, v)) = term.split_once("!=") {
            (k.trim().to_string(), Op::Ne, v.trim().to_string())
        } else if let Some((k, v)) = term.split_once("==") {
            (k.trim().to_string(), Op::Eq, v.trim().to_string())
        } else if let Some((k, v)) = term.split_once('=') {
            (k.trim().to_string(), Op::Eq, v.trim().to_string())
        } else if let Some(k) = term.strip_prefix('!') {
            (k.trim().to_string(), Op::NotExists, String::new())
        } else if term.contains(' ') {
            return Err(format!("unsupported selector {term:?}"));
        } else {
            (term.to_string(), Op::Exists, String::new())
        };
        out.push(t);
    }
    Ok(out)
}

fn matches(terms: &[(String, Op, String)], get: impl Fn(&str) -> Option<String>) -> bool {
    terms.iter().all(|(k, op, v)| {
        let have = get(k);
        match op {
            Op::Eq => have.as_deref() == Some(v.as_str()),
            Op::Ne => have.as_deref() != Some(v.as_str()),
            Op::Exists => have.is_some(),
            Op::NotExists => have.is_none(),
        }
    })
}

impl Filter {
    fn new(kind: Kind, ns: Option<&str>, q: &HashMap<String, String>) -> Result<Filter, String> {
        let labels = parse_selector(q.get("labelSelector").map_or("", String::as_str))?;
        let fields = parse_selector(q.get("fieldSelector").map_or("", String::as_str))?;
        for (f, _, _) in &fields {
            if f != "metadata.name" && f != "metadata.namespace" {
                return Err(format!("field label not supported: {f}"));
            }
        }
        Ok(Filter { kind, namespace: ns.map(str::to_string), labels, fields })
    }

    fn admits(&self, kind: Kind, namespace: &str, obj: &Value) -> bool {
        kind == self.kind
            && self.namespace.as_deref().is_none_or(|n| n == namespace)
            && matches(&self.labels, |k| obj["metadata"]["labels"][k].as_str().map(str::to_string))
            && matches(&self.fields, |k| match k {
                "metadata.name" => obj["metadata"]["name"].as_str().map(str::to_string),
                "metadata.namespace" => Some(namespace.to_string()),
                _ => None,
            })
    }
}

fn list_reply(shared: &Arc<Shared>, f: &Filter, q: &HashMap<String, String>) -> Response<Body> {
    let mut g = shared.lock();
    let limit = q.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
    let (snapshot_id, offset, items, rv) = match q.get("continue") {
        Some(token) => {
            let parsed =
                token.split_once(':').and_then(|(id, off)| Some((id.parse().ok()?, off.parse().ok()?)));
            let Some((id, off)) = parsed else {
                return status_reply(400, "BadRequest", "invalid continue token");
            };
            let Some((rv, items)) = g.snapshots.get(&id).cloned() else {
                return status_reply(410, "Expired", "the provided continue parameter is too old");
            };
            (id, off, items, rv)
        }
        None => {
            let items: Vec<Value> = g
                .objects
                .iter()
                .filter(|((k, ns, _), o)| f.admits(*k, ns, o))
                .map(|(_, o)| {
                    let mut o = o.clone();
                    if let Some(m) = o.as_object_mut() {
                        m.remove("kind");
                        m.remove("apiVersion");
                    }
                    o
                })
                .collect();
            g.next_snapshot += 1;
            (g.next_snapshot, 0, items, g.rv)
        }
    };
    let offset = offset.min(items.len());
    let end = limit.map_or(items.len(), |l| (offset + l).min(items.len()));
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if end < items.len() {
        g.snapshots.insert(snapshot_id, (rv, items.clone()));
        metadata["continue"] = json!(format!("{snapshot_id}:{end}"));
        metadata["remainingItemCount"] = json!(items.len() - end);
    }
    let body = json!({
        "kind": format!("{}List", f.kind.kind()),
        "apiVersion": f.kind.api_version(),
        "metadata": metadata,
        "items": items[offset..end],
    });
    full(StatusCode::OK, "application/json", body.to_string())
}

fn event_line(etype: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": etype, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn bookmark(kind: Kind, rv: u64) -> Bytes {
    let mut object = json!({
        "kind": kind.kind(), "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": rv.to_string(), "creationTimestamp": null},
    });
    if kind == Kind::EndpointSlice {
        object["addressType"] = json!("");
        object["endpoints"] = Value::Null;
    }
    event_line("BOOKMARK", &object)
}

fn expired(rv: u64, compacted: u64) -> Bytes {
    let msg = format!("too old resource version: {rv} ({compacted})");
    event_line("ERROR", &status_json(410, "Expired", &msg))
}

fn watch_reply(shared: &Arc<Shared>, f: Filter, q: &HashMap<String, String>) -> Response<Body> {
    let bookmarks = matches!(q.get("allowWatchBookmarks").map(String::as_str), Some("true" | "1"));
    let timeout = q.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).map(Duration::from_secs);
    let from: Option<u64> = q.get("resourceVersion").and_then(|v| v.parse().ok()).filter(|v| *v != 0);
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1024);
    let mut first: Vec<Bytes> = Vec::new();
    let (live, mut seen, every) = {
        let g = shared.lock();
        let live = shared.live.subscribe();
        match from {
            Some(rv) if rv < g.compacted => first.push(expired(rv, g.compacted)),
            Some(rv) => {
                first.extend(g.history.iter().filter(|e| e.rv > rv).filter_map(|e| e.through(&f)));
            }
            None => {
                for ((k, ns, _), o) in &g.objects {
                    if f.admits(*k, ns, o) {
                        first.push(event_line("ADDED", o));
                    }
                }
            }
        }
        (live, g.rv, g.bookmark_every)
    };
    let gone = from.is_some_and(|rv| rv < shared.lock().compacted);
    let shared = shared.clone();
    tokio::spawn(async move {
        let mut tx = tx;
        let mut live = live;
        for b in first {
            if tx.send(Ok(b)).await.is_err() {
                return;
            }
        }
        if gone {
            return; // the apiserver ends the watch after the 410
        }
        let deadline = tokio::time::sleep(timeout.unwrap_or(Duration::from_secs(1800)));
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            let out = tokio::select! {
                _ = &mut deadline => return, // a clean end of the stream
                _ = tick.tick(), if bookmarks => {
                    // Everything up to the current resourceVersion is either
                    // sent or filtered out once the queue is drained.
                    let now = shared.lock().rv;
                    let mut lines = Vec::new();
                    let mut ended = false;
                    while let Ok(m) = live.try_recv() {
                        match to_line(&f, &m, &mut seen) {
                            Step::Line(l) => lines.push(l),
                            Step::Skip => {}
                            Step::End(l) => {
                                lines.push(l);
                                ended = true;
                                break;
                            }
                        }
                    }
                    if ended {
                        for l in lines {
                            let _ = tx.send(Ok(l)).await;
                        }
                        return;
                    }
                    seen = seen.max(now);
                    lines.push(bookmark(f.kind, seen));
                    lines
                }
                m = live.recv() => match m {
                    Ok(m) => match to_line(&f, &m, &mut seen) {
                        Step::Line(l) => vec![l],
                        Step::Skip => continue,
                        Step::End(l) => {
                            let _ = tx.send(Ok(l)).await;
                            return;
                        }
                    },
                    Err(_) => return,
                },
            };
            for l in out {
                if tx.send(Ok(l)).await.is_err() {
                    return;
                }
            }
        }
    });
    Response::builder()
        .header("content-type", "application/json")
        .header("transfer-encoding", "chunked")
        .body(BodyExt::boxed(StreamBody::new(rx.map(|r| r.map(Frame::data)))))
        .unwrap()
}

enum Step {
    Line(Bytes),
    Skip,
    End(Bytes),
}

fn to_line(f: &Filter, m: &Msg, seen: &mut u64) -> Step {
    match m {
        Msg::Event(ev) => {
            *seen = (*seen).max(ev.rv);
            ev.through(f).map_or(Step::Skip, Step::Line)
        }
        Msg::Raw(l) => Step::Line(Bytes::from(format!("{l}\n"))),
        Msg::Expire => Step::End(expired(*seen, *seen)),
    }
}

/// `application/x-www-form-urlencoded` query pairs; empty pairs (kube
/// starts its queries with `?&`) are skipped.
pub fn parse_query(q: &str) -> HashMap<String, String> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex =
                    std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A kubeconfig with one cluster at `server`, no credentials.
pub fn write_kubeconfig(dir: &std::path::Path, server: &str, insecure: bool) -> std::path::PathBuf {
    let path = dir.join("kubeconfig");
    let extra = if insecure { "\n    insecure-skip-tls-verify: true" } else { "" };
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {server}{extra}
contexts:
- name: fake
  context:
    cluster: fake
    user: nobody
    namespace: default
current-context: fake
users:
- name: nobody
  user: {{}}
"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// One endpoint of a slice, as tests describe it.
#[derive(Clone, Debug)]
pub struct Ep {
    pub ip: String,
    pub ready: Option<bool>,
    pub serving: Option<bool>,
    pub terminating: Option<bool>,
    pub pod: Option<String>,
    pub hostname: Option<String>,
}

impl Ep {
    /// A ready endpoint of pod `pod`.
    pub fn ready(ip: &str, pod: &str) -> Ep {
        Ep {
            ip: ip.into(),
            ready: Some(true),
            serving: Some(true),
            terminating: Some(false),
            pod: Some(pod.into()),
            hostname: None,
        }
    }
    pub fn not_ready(ip: &str, pod: &str) -> Ep {
        Ep { ready: Some(false), serving: Some(false), ..Ep::ready(ip, pod) }
    }
    /// Terminating as the EndpointSlice controller shows it: not ready,
    /// still serving.
    pub fn terminating(ip: &str, pod: &str) -> Ep {
        Ep { ready: Some(false), serving: Some(true), terminating: Some(true), ..Ep::ready(ip, pod) }
    }
    pub fn json(&self) -> Value {
        let mut conditions = serde_json::Map::new();
        for (k, v) in [("ready", self.ready), ("serving", self.serving), ("terminating", self.terminating)] {
            if let Some(v) = v {
                conditions.insert(k.into(), json!(v));
            }
        }
        let mut e =
            json!({"addresses": [self.ip], "conditions": conditions, "nodeName": "node-1", "zone": "zone-a"});
        if let Some(p) = &self.pod {
            e["targetRef"] =
                json!({"kind": "Pod", "namespace": "default", "name": p, "uid": format!("uid-{p}")});
        }
        if let Some(h) = &self.hostname {
            e["hostname"] = json!(h);
        }
        e
    }
}

/// An EndpointSlice of `service` as the EndpointSlice controller writes it.
pub fn slice(name: &str, service: &str, eps: &[Ep]) -> Value {
    json!({
        "metadata": {
            "name": name,
            "generateName": format!("{service}-"),
            "labels": {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
            },
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Service", "name": service,
                "uid": "svc-uid", "controller": true, "blockOwnerDeletion": true,
            }],
        },
        "addressType": "IPv4",
        "endpoints": if eps.is_empty() { Value::Null } else { eps.iter().map(Ep::json).collect() },
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    })
}

/// A core/v1 Endpoints object for `service`.
pub fn endpoints(service: &str, ready: &[(&str, &str)], not_ready: &[(&str, &str)]) -> Value {
    let addr = |(ip, pod): &(&str, &str)| {
        json!({"ip": ip, "nodeName": "node-1",
               "targetRef": {"kind": "Pod", "namespace": "default", "name": pod, "uid": format!("uid-{pod}")}})
    };
    let mut subset = json!({"ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]});
    if !ready.is_empty() {
        subset["addresses"] = ready.iter().map(addr).collect();
    }
    if !not_ready.is_empty() {
        subset["notReadyAddresses"] = not_ready.iter().map(addr).collect();
    }
    let mut o = json!({"metadata": {"name": service, "labels": {"app": service}}});
    if !ready.is_empty() || !not_ready.is_empty() {
        o["subsets"] = json!([subset]);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = parse_query("&watch=true&labelSelector=kubernetes.io%2Fservice-name%3Dweb&x=a+b&bad=%zz%4");
        assert_eq!(q["watch"], "true");
        assert_eq!(q["labelSelector"], "kubernetes.io/service-name=web");
        assert_eq!(q["x"], "a b");
        assert_eq!(q["bad"], "%zz%4");
    }
}
