//! What the provider reads from the API, reduced to what the balancer
//! needs: EndpointSlices (or core/v1 Endpoints) are decoded leniently, so a
//! malformed object is skipped with a warning instead of failing a whole
//! list or watch, and each object becomes a list of IPv4 candidates. The
//! [`Store`] merges the candidates of every object of the service into one
//! deduplicated backend set.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::{Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{EndpointAddress, Endpoints, ObjectReference};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::watcher::Event;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use tracing::{debug, warn};

use crate::provider::Backend;

/// An API object decoded in two steps: the metadata the watcher needs
/// (name, resourceVersion) as far as it can be read, and the body as plain
/// JSON. Decoding never fails on the object's content, so one bad object
/// cannot fail a LIST or stall a watch; [`parse`] then decodes the body with
/// the real API type and skips the object if that fails.
pub struct Lenient<K> {
    pub metadata: ObjectMeta,
    pub body: Value,
    kind: PhantomData<fn() -> K>,
}

impl<K> Lenient<K> {
    #[cfg(test)]
    pub fn from_json(body: Value) -> Self {
        serde_json::from_value(body).expect("any JSON decodes")
    }
}

impl<K> Clone for Lenient<K> {
    fn clone(&self) -> Self {
        Lenient { metadata: self.metadata.clone(), body: self.body.clone(), kind: PhantomData }
    }
}

impl<K> fmt::Debug for Lenient<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lenient").field("name", &self.metadata.name).finish_non_exhaustive()
    }
}

impl<'de, K> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let body = Value::deserialize(d)?;
        let metadata = lenient_meta(body.get("metadata"));
        Ok(Lenient { metadata, body, kind: PhantomData })
    }
}

/// The object's metadata; if it does not decode as a whole, the fields the
/// watcher and the store rely on, one by one.
fn lenient_meta(v: Option<&Value>) -> ObjectMeta {
    let Some(v) = v else { return ObjectMeta::default() };
    ObjectMeta::deserialize(v).unwrap_or_else(|_| {
        let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        ObjectMeta {
            name: field("name"),
            namespace: field("namespace"),
            resource_version: field("resourceVersion"),
            uid: field("uid"),
            ..ObjectMeta::default()
        }
    })
}

impl<K: k8s_openapi::Resource> kube::Resource for Lenient<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(_: &()) -> Cow<'_, str> {
        K::KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        K::GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        K::VERSION.into()
    }
    fn api_version(_: &()) -> Cow<'_, str> {
        K::API_VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        K::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// One address of the service as an object lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub addr: Ipv4Addr,
    pub name: String,
    /// May receive new connections: ready, serving and not terminating.
    pub ready: bool,
    /// Serving but terminating: receives new connections only while no
    /// endpoint is ready (as kube-proxy does since ProxyTerminatingEndpoints).
    pub fallback: bool,
}

/// An object reduced to its candidates, keyed by its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub key: String,
    pub candidates: Vec<Candidate>,
}

/// The API types the provider can read.
pub trait Source: k8s_openapi::Resource + DeserializeOwned + Send + 'static {
    /// The object's IPv4 candidates; `key` names it in log lines.
    fn candidates(self, key: &str) -> Vec<Candidate>;
}

impl Source for EndpointSlice {
    fn candidates(self, key: &str) -> Vec<Candidate> {
        match self.address_type.as_str() {
            "IPv4" => {}
            "IPv6" | "FQDN" => {
                debug!(slice = key, "EndpointSlice {key} has addressType {}: skipped", self.address_type);
                return Vec::new();
            }
            other => {
                warn!(slice = key, "EndpointSlice {key} has unknown addressType {other:?}: skipped");
                return Vec::new();
            }
        }
        let mut out = Vec::with_capacity(self.endpoints.len());
        for ep in self.endpoints {
            // The addresses of one endpoint are fungible; like kube-proxy,
            // use the first.
            let Some(first) = ep.addresses.first() else {
                warn!(slice = key, "EndpointSlice {key}: an endpoint without addresses: skipped");
                continue;
            };
            let Some(addr) = ipv4(first, key) else { continue };
            let c = ep.conditions.unwrap_or_default();
            // API docs: ready nil means ready; serving nil defers to ready;
            // terminating nil means not terminating.
            let serving = c.serving.or(c.ready) != Some(false);
            let terminating = c.terminating == Some(true);
            let ready = c.ready != Some(false) && serving && !terminating;
            let fallback = serving && terminating;
            let name = endpoint_name(ep.target_ref.as_ref(), ep.hostname.as_deref(), addr);
            out.push(Candidate { addr, name, ready, fallback });
        }
        out
    }
}

impl Source for Endpoints {
    fn candidates(self, key: &str) -> Vec<Candidate> {
        let mut out = Vec::new();
        for subset in self.subsets.unwrap_or_default() {
            let ready = subset.addresses.unwrap_or_default().into_iter().map(|a| (a, true));
            let not_ready = subset.not_ready_addresses.unwrap_or_default().into_iter().map(|a| (a, false));
            for (a, ready) in ready.chain(not_ready) {
                let EndpointAddress { ip, hostname, target_ref, .. } = a;
                let Some(addr) = ipv4(&ip, key) else { continue };
                let name = endpoint_name(target_ref.as_ref(), hostname.as_deref(), addr);
                // core/v1 Endpoints say nothing of terminating: no fallback.
                out.push(Candidate { addr, name, ready, fallback: false });
            }
        }
        out
    }
}

/// IPv4 addresses only: IPv6 is skipped quietly, anything else with a warning.
fn ipv4(s: &str, key: &str) -> Option<Ipv4Addr> {
    if let Ok(a) = s.parse::<Ipv4Addr>() {
        return Some(a);
    }
    if s.parse::<Ipv6Addr>().is_ok() {
        debug!(object = key, "{key}: IPv6 endpoint {s} skipped");
    } else {
        warn!(object = key, "{key}: endpoint address {s:?} is not an IP address: skipped");
    }
    None
}

/// The pod's name if the endpoint references one, else its hostname, else the IP.
fn endpoint_name(target: Option<&ObjectReference>, hostname: Option<&str>, addr: Ipv4Addr) -> String {
    target
        .and_then(|t| t.name.as_deref())
        .or(hostname)
        .filter(|n| !n.is_empty())
        .map_or_else(|| addr.to_string(), str::to_string)
}

/// Reduces an object; None when it has no name (it cannot be tracked). An
/// object whose body does not decode as `K` is kept with no candidates, so
/// an earlier good version of it stops counting.
pub fn parse<K: Source>(obj: Lenient<K>) -> Option<Parsed> {
    let Some(key) = obj.metadata.name.filter(|n| !n.is_empty()) else {
        warn!(kind = K::KIND, "a {} without metadata.name: skipped", K::KIND);
        return None;
    };
    let candidates = match serde_json::from_value::<K>(obj.body) {
        Ok(o) => o.candidates(&key),
        Err(e) => {
            warn!(kind = K::KIND, object = %key, "malformed {} {key} skipped: {e}", K::KIND);
            Vec::new()
        }
    };
    Some(Parsed { key, candidates })
}

/// Converts a watcher event; objects without a name are dropped. Deletions
/// only need the name.
pub fn convert<K: Source>(ev: Event<Lenient<K>>) -> Option<Event<Parsed>> {
    Some(match ev {
        Event::Init => Event::Init,
        Event::InitDone => Event::InitDone,
        Event::InitApply(o) => Event::InitApply(parse(o)?),
        Event::Apply(o) => Event::Apply(parse(o)?),
        Event::Delete(o) => {
            Event::Delete(Parsed { key: o.metadata.name.filter(|n| !n.is_empty())?, candidates: Vec::new() })
        }
    })
}

/// Every object of the service, by name; the objects of a relist are
/// buffered and replace the whole store at once when the list is complete,
/// so objects deleted while the watch was down disappear.
#[derive(Debug, Default)]
pub struct Store {
    objects: BTreeMap<String, Vec<Candidate>>,
    relist: Option<BTreeMap<String, Vec<Candidate>>>,
}

impl Store {
    /// Applies an event; true when the live view may have changed.
    pub fn apply(&mut self, ev: Event<Parsed>) -> bool {
        match ev {
            Event::Init => {
                self.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(p) => {
                self.relist.get_or_insert_with(BTreeMap::new).insert(p.key, p.candidates);
                false
            }
            Event::InitDone => {
                self.objects = self.relist.take().unwrap_or_default();
                true
            }
            Event::Apply(p) => {
                self.objects.insert(p.key, p.candidates.clone()).as_ref() != Some(&p.candidates)
            }
            Event::Delete(p) => self.objects.remove(&p.key).is_some(),
        }
    }

    /// The backends that may receive new connections: every ready IPv4
    /// address once (the first ready occurrence names it), sorted; when
    /// none is ready, every serving terminating one (kube-proxy's rule).
    /// Never one that is not serving.
    pub fn backends(&self) -> Vec<Backend> {
        let pick = |f: fn(&Candidate) -> bool| {
            let mut out: BTreeMap<Ipv4Addr, &str> = BTreeMap::new();
            for c in self.objects.values().flatten().filter(|c| f(c)) {
                out.entry(c.addr).or_insert(&c.name);
            }
            out.into_iter()
                .map(|(addr, name)| Backend { name: name.to_string(), addr, weight: 1 })
                .collect::<Vec<_>>()
        };
        let ready = pick(|c| c.ready);
        if ready.is_empty() {
            pick(|c| c.fallback)
        } else {
            ready
        }
    }

    /// Whether the backends are serving terminating endpoints because none
    /// is ready.
    pub fn falling_back(&self) -> bool {
        let all = || self.objects.values().flatten();
        !all().any(|c| c.ready) && all().any(|c| c.fallback)
    }

    /// (objects, IPv4 endpoints listed, of which ready), for log lines.
    pub fn counts(&self) -> (usize, usize, usize) {
        let all = self.objects.values().flatten();
        let ready = all.clone().filter(|c| c.ready).count();
        (self.objects.len(), all.count(), ready)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn slice(name: &str, endpoints: Value) -> Value {
        json!({
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {
                "name": name,
                "namespace": "default",
                "resourceVersion": "7",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        })
    }

    fn parsed(v: Value) -> Option<Parsed> {
        parse::<EndpointSlice>(Lenient::from_json(v))
    }

    fn cand(addr: &str, name: &str, ready: bool) -> Candidate {
        Candidate { addr: addr.parse().unwrap(), name: name.into(), ready, fallback: false }
    }

    fn serving_terminating(addr: &str) -> Candidate {
        Candidate { fallback: true, ..cand(addr, addr, false) }
    }

    #[test]
    fn conditions_decide_readiness() {
        let p = parsed(slice(
            "web-a",
            json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true, "serving": true, "terminating": false},
                 "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "default"}},
                {"addresses": ["10.0.0.2"], "conditions": {}, "hostname": "web-2"},
                {"addresses": ["10.0.0.3"]},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.5"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.6"], "conditions": {"ready": true, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.7"], "conditions": {"ready": true, "serving": false}},
            ]),
        ))
        .unwrap();
        assert_eq!(p.key, "web-a");
        assert_eq!(
            p.candidates,
            vec![
                cand("10.0.0.1", "web-1", true),
                cand("10.0.0.2", "web-2", true),
                cand("10.0.0.3", "10.0.0.3", true),
                cand("10.0.0.4", "10.0.0.4", false),
                serving_terminating("10.0.0.5"),
                serving_terminating("10.0.0.6"),
                cand("10.0.0.7", "10.0.0.7", false),
            ]
        );
    }

    #[test]
    fn serving_terminating_endpoints_take_over_only_when_none_is_ready() {
        let mut set = Store::default();
        let p = parsed(slice(
            "web-a",
            json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                {"addresses": ["10.0.0.5"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": false, "serving": false, "terminating": true}},
            ]),
        ))
        .unwrap();
        set.apply(Event::Apply(p));
        let addrs = |set: &Store| set.backends().iter().map(|b| b.addr.to_string()).collect::<Vec<_>>();
        assert_eq!(addrs(&set), ["10.0.0.1"]);
        assert!(!set.falling_back());
        let p = parsed(slice(
            "web-a",
            json!([
                {"addresses": ["10.0.0.1"], "conditions": {"ready": false, "serving": false}},
                {"addresses": ["10.0.0.5"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.4"], "conditions": {"ready": false, "serving": false, "terminating": true}},
            ]),
        ))
        .unwrap();
        set.apply(Event::Apply(p));
        assert_eq!(addrs(&set), ["10.0.0.5"], "serving terminating, never not-serving");
        assert!(set.falling_back());
    }

    #[test]
    fn ipv6_fqdn_and_bad_addresses_are_skipped() {
        let mut v6 = slice("web-v6", json!([{"addresses": ["fd00::1"]}]));
        v6["addressType"] = json!("IPv6");
        assert!(parsed(v6).unwrap().candidates.is_empty());
        let mut fqdn = slice("web-f", json!([{"addresses": ["example.com"]}]));
        fqdn["addressType"] = json!("FQDN");
        assert!(parsed(fqdn).unwrap().candidates.is_empty());
        let mixed = slice(
            "web-m",
            json!([{"addresses": ["fd00::1"]}, {"addresses": ["nonsense"]}, {"addresses": []}, {"addresses": ["10.1.1.1"]}]),
        );
        assert_eq!(parsed(mixed).unwrap().candidates, vec![cand("10.1.1.1", "10.1.1.1", true)]);
    }

    #[test]
    fn endpoints_null_is_an_empty_slice() {
        // The apiserver sends `"endpoints": null` for a slice with none.
        assert!(parsed(slice("web-e", Value::Null)).unwrap().candidates.is_empty());
    }

    #[test]
    fn malformed_objects_are_kept_empty_or_dropped() {
        // A body that does not decode: tracked with no candidates.
        let bad = parsed(slice("web-bad", json!("not a list"))).unwrap();
        assert_eq!(bad, Parsed { key: "web-bad".into(), candidates: vec![] });
        let bad = parsed(slice("web-bad", json!([{"addresses": [1, 2]}]))).unwrap();
        assert!(bad.candidates.is_empty());
        let mut bad_meta = slice("web-meta", json!([{"addresses": ["10.0.0.9"]}]));
        bad_meta["metadata"]["labels"] = json!("oops");
        let l = Lenient::<EndpointSlice>::from_json(bad_meta);
        assert_eq!(l.metadata.name.as_deref(), Some("web-meta"));
        assert_eq!(l.metadata.resource_version.as_deref(), Some("7"));
        // No name: cannot be tracked at all.
        let mut nameless = slice("x", json!([]));
        nameless["metadata"] = json!({"resourceVersion": "3"});
        assert!(parsed(nameless).is_none());
        assert!(parsed(json!(42)).is_none());
    }

    #[test]
    fn core_endpoints_ready_and_not_ready() {
        let v = json!({
            "kind": "Endpoints", "apiVersion": "v1",
            "metadata": {"name": "web", "namespace": "default", "resourceVersion": "5"},
            "subsets": [
                {"addresses": [{"ip": "10.0.1.1", "targetRef": {"kind": "Pod", "name": "web-1"}},
                               {"ip": "fd00::2"}],
                 "notReadyAddresses": [{"ip": "10.0.1.2", "hostname": "web-2"}],
                 "ports": [{"port": 8080}]},
                {"addresses": [{"ip": "10.0.1.3"}]},
            ],
        });
        let p = parse::<Endpoints>(Lenient::from_json(v)).unwrap();
        assert_eq!(
            p.candidates,
            vec![
                cand("10.0.1.1", "web-1", true),
                cand("10.0.1.2", "web-2", false),
                cand("10.0.1.3", "10.0.1.3", true)
            ]
        );
    }

    fn p(key: &str, c: Vec<Candidate>) -> Parsed {
        Parsed { key: key.into(), candidates: c }
    }

    #[test]
    fn store_merges_dedupes_and_relists() {
        let mut s = Store::default();
        assert!(!s.apply(Event::Init));
        assert!(!s.apply(Event::InitApply(p("b", vec![cand("10.0.0.2", "pod-b", true)]))));
        assert!(!s.apply(Event::InitApply(p(
            "a",
            vec![cand("10.0.0.2", "pod-a", true), cand("10.0.0.1", "x", false)]
        ))));
        assert!(s.backends().is_empty(), "nothing before the list completes");
        assert!(s.apply(Event::InitDone));
        let b = s.backends();
        assert_eq!(b, vec![Backend { name: "pod-a".into(), addr: "10.0.0.2".parse().unwrap(), weight: 1 }]);
        assert_eq!(s.counts(), (2, 3, 2));
        // The same address not ready in one slice, ready in another: ready.
        assert!(s.apply(Event::Apply(p("c", vec![cand("10.0.0.1", "pod-c", true)]))));
        assert_eq!(s.backends().len(), 2);
        assert!(!s.apply(Event::Apply(p("c", vec![cand("10.0.0.1", "pod-c", true)]))), "no-op update");
        assert!(s.apply(Event::Delete(p("c", vec![]))));
        assert!(!s.apply(Event::Delete(p("c", vec![]))));
        // A relist replaces everything: "a" vanished meanwhile.
        s.apply(Event::Init);
        s.apply(Event::InitApply(p("b", vec![cand("10.0.0.2", "pod-b", true)])));
        assert_eq!(s.backends().len(), 1, "the old view stays until the relist completes");
        s.apply(Event::InitDone);
        assert_eq!(s.backends()[0].name, "pod-b");
        assert_eq!(s.counts(), (1, 1, 1));
    }
}
