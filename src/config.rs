//! The `xlb.yaml` schema: types, defaults, validation and one-line errors.
//!
//! Loading has two stages. Serde checks shape and types, so those errors carry
//! a line and column; [`Config::validate`] then checks the rules that need
//! values or span fields. Every default lives in the types here, because
//! `xlb check` prints [`Config::to_yaml`] as the effective configuration.

use std::collections::hash_map::{Entry, HashMap};
use std::collections::BTreeMap;
use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::de::{self, value::MapAccessDeserializer, Deserializer, MapAccess, Unexpected, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// The dataplane keeps the port table in a fixed-size BPF array.
pub const MAX_PORTS: usize = 8;
/// XLB_MAX_SNAT in xlb_consts.h.
pub const MAX_SNAT_IPS: usize = 16;
pub const MAX_WEIGHT: u32 = 10_000;
pub const MAX_SHUTDOWN_TIMEOUT: u64 = 86_400;
pub const CONNTRACK_CAPACITY: RangeInclusive<u32> = 1..=50_000_000;
pub const MAGLEV_TABLE_SIZE: RangeInclusive<u32> = 251..=1_000_003;
/// Below this many Maglev slots per backend the spread gets visibly uneven.
const MAGLEV_SLOTS_PER_BACKEND: u64 = 100;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping of xlb settings")]
pub struct Config {
    pub name: Option<String>,
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub proto: Proto,
    pub ports: Vec<PortMap>,
    pub provider: Provider,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "default_orphan_ttl_secs")]
    pub orphan_ttl_secs: u64,
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: u64,
    #[serde(default = "default_shutdown_file", serialize_with = "lossy_path")]
    pub shutdown_file: PathBuf,
    #[serde(default)]
    pub otel: OtelConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    pub interfaces: Option<Vec<String>>,
    pub snat_ip: Option<Ipv4Addr>,
    /// A pool of source addresses backends see, one per client address by
    /// hash: each multiplies the new connections per second a backend can
    /// take (README "NAT ports"). Excludes snat_ip.
    pub snat_ips: Option<Vec<Ipv4Addr>>,
    /// New connections per second per backend the operator expects: XLB
    /// warns at start when the NAT ports cannot sustain it.
    pub expected_connection_rate: Option<u32>,
    #[serde(default)]
    pub nat_port_range: PortRange,
    #[serde(default = "default_conntrack_capacity")]
    pub conntrack_capacity: u32,
    #[serde(default = "default_maglev_table_size")]
    pub maglev_table_size: u32,
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default)]
    pub unknown_flow: UnknownFlow,
    /// How fast XLB itself answers (ICMP errors, RSTs), per CPU.
    #[serde(default)]
    pub rate_limits: RateLimits,
    /// Whether XLB answers new SYNs itself with SYN cookies.
    #[serde(default)]
    pub syn_proxy: SynProxy,
    /// With syn_proxy: auto, the half-open connections at which the proxy
    /// engages (it lets go below half of it).
    #[serde(default = "default_syn_proxy_threshold")]
    pub syn_proxy_threshold: u32,
    /// Active health checks of every backend; absent: none (every backend
    /// the provider lists is eligible, as without checks).
    #[serde(default)]
    pub health_check: Option<HealthCheck>,
    /// Outlier detection from the data path: backends that leave SYNs
    /// unanswered (or refuse them) leave the table; absent: none.
    #[serde(default)]
    pub passive_health: Option<PassiveHealth>,
}

fn default_syn_proxy_threshold() -> u32 {
    2000
}

/// syn_proxy: whether new connections are opened through SYN cookies from
/// XDP, so a SYN flood creates no state (README "Under attack").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SynProxy {
    /// Engaged while half-open connections are at syn_proxy_threshold or
    /// more (a SYN flood), checked every sweep.
    #[default]
    Auto,
    /// Always: every new connection is proxied.
    On,
    /// Never: SYNs go to the backends as they come.
    Off,
}

/// `health_check`: probes XLB sends to every backend from the node's own
/// network stack. A backend that fails `fall` in a row leaves the Maglev
/// table for new connections; `rise` successes in a row bring it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    #[serde(rename = "type", default)]
    pub kind: CheckType,
    /// Default: the first `ports[]` mapping's remote_port (filled in at parse).
    #[serde(default)]
    pub port: Option<u16>,
    /// http only; default `/` (filled in at parse).
    #[serde(default)]
    pub path: Option<String>,
    /// http only: the statuses that pass, a code or a range; default 200-399.
    #[serde(default)]
    pub expect_status: Option<StatusRange>,
    #[serde(default = "default_check_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_check_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive successes to become healthy.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures to become unhealthy.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_check_interval_ms() -> u64 {
    1000
}
fn default_check_timeout_ms() -> u64 {
    500
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

/// `passive_health`: failures the data path sees in the handshakes of real
/// connections. `fall` of them with no answered SYN in between mark a
/// backend unhealthy, until an active check (`rise` successes) or, without
/// `health_check`, interval_ms x rise (health_check's defaults: 2 s) without
/// a failure clears it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealth {
    /// A SYN forwarded to a backend with no SYN-ACK back within this counts
    /// as a failure.
    #[serde(default = "default_syn_timeout_ms")]
    pub syn_timeout_ms: u64,
    /// A backend answering a SYN with a RST counts as a failure.
    #[serde(default = "default_true")]
    pub rst_on_syn: bool,
    #[serde(default = "default_passive_fall")]
    pub fall: u32,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        PassiveHealth {
            syn_timeout_ms: default_syn_timeout_ms(),
            rst_on_syn: true,
            fall: default_passive_fall(),
        }
    }
}

fn default_syn_timeout_ms() -> u64 {
    1000
}
fn default_true() -> bool {
    true
}
fn default_passive_fall() -> u32 {
    5
}

/// `passive_health.syn_timeout_ms`: a handshake left unanswered is kept 30 s
/// (the sweep's half-open hold), so a timeout must end well before that.
pub const SYN_TIMEOUT_MS: RangeInclusive<u64> = 100..=20_000;

impl PassiveHealth {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        in_range(self.syn_timeout_ms, SYN_TIMEOUT_MS, format!("{at}.syn_timeout_ms"))?;
        in_range(self.fall, CHECK_RISE_FALL, format!("{at}.fall"))
    }
}

/// The bounds of `health_check` values.
pub const CHECK_INTERVAL_MS: RangeInclusive<u64> = 50..=3_600_000;
pub const CHECK_RISE_FALL: RangeInclusive<u32> = 1..=100;

/// `health_check.type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    /// A TCP connect that completes.
    #[default]
    Tcp,
    /// An HTTP/1.1 GET of `path` answered with a status in `expect_status`.
    Http,
}

impl CheckType {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckType::Tcp => "tcp",
            CheckType::Http => "http",
        }
    }
}

/// HTTP statuses `min..=max`, written `200` or `200-399`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    pub min: u16,
    pub max: u16,
}

impl StatusRange {
    pub fn contains(&self, code: u16) -> bool {
        (self.min..=self.max).contains(&code)
    }
}

impl Default for StatusRange {
    fn default() -> Self {
        StatusRange { min: 200, max: 399 }
    }
}

impl fmt::Display for StatusRange {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.min == self.max {
            write!(f, "{}", self.min)
        } else {
            write!(f, "{}-{}", self.min, self.max)
        }
    }
}

impl Serialize for StatusRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.min == self.max {
            s.serialize_u16(self.min)
        } else {
            s.serialize_str(&self.to_string())
        }
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RangeVisitor;
        impl Visitor<'_> for RangeVisitor {
            type Value = StatusRange;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an HTTP status code such as 200 or a range such as 200-399")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<StatusRange, E> {
                let code = u16::try_from(v).map_err(|_| E::invalid_value(Unexpected::Unsigned(v), &self))?;
                Ok(StatusRange { min: code, max: code })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<StatusRange, E> {
                Err(E::invalid_value(Unexpected::Signed(v), &self))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StatusRange, E> {
                let bad = || E::invalid_value(Unexpected::Str(v), &self);
                let (a, b) = v.split_once('-').unwrap_or((v, v));
                let min = a.trim().parse().map_err(|_| bad())?;
                let max = b.trim().parse().map_err(|_| bad())?;
                Ok(StatusRange { min, max })
            }
        }
        d.deserialize_any(RangeVisitor)
    }
}

impl HealthCheck {
    /// Writes out the defaults that depend on the rest of the config, so
    /// `xlb check` prints them: the port, and for http the path and statuses.
    fn fill_defaults(&mut self, ports: &[PortMap]) {
        if self.port.is_none() {
            self.port = ports.first().map(|p| p.remote_port);
        }
        if self.kind == CheckType::Http {
            self.path.get_or_insert_with(|| "/".into());
            self.expect_status.get_or_insert_with(StatusRange::default);
        }
    }

    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        if let Some(port) = self.port {
            in_range(port, 1..=u16::MAX, format!("{at}.port"))?;
        }
        if self.kind == CheckType::Tcp {
            let message = "is for type: http only; remove it or set type: http";
            ensure(self.path.is_none(), format!("{at}.path"), message)?;
            ensure(self.expect_status.is_none(), format!("{at}.expect_status"), message)?;
        }
        if let Some(path) = &self.path {
            // It goes into the request line as it is.
            let message = format!(
                "`{path}` is not a request path; it must start with '/' and hold printable ASCII without spaces"
            );
            let ok =
                path.starts_with('/') && path.len() <= 1024 && path.bytes().all(|b| b.is_ascii_graphic());
            ensure(ok, format!("{at}.path"), message)?;
        }
        if let Some(r) = self.expect_status {
            in_range(r.min, 100..=599, format!("{at}.expect_status"))?;
            in_range(r.max, 100..=599, format!("{at}.expect_status"))?;
            let message = format!("{}-{} is empty; write the lower code first", r.min, r.max);
            ensure(r.min <= r.max, format!("{at}.expect_status"), message)?;
        }
        in_range(self.interval_ms, CHECK_INTERVAL_MS, format!("{at}.interval_ms"))?;
        // A probe ends before the next one to the same backend starts.
        in_range(self.timeout_ms, 1..=self.interval_ms, format!("{at}.timeout_ms"))?;
        in_range(self.rise, CHECK_RISE_FALL, format!("{at}.rise"))?;
        in_range(self.fall, CHECK_RISE_FALL, format!("{at}.fall"))
    }
}

fn default_orphan_ttl_secs() -> u64 {
    300
}
fn default_shutdown_timeout() -> u64 {
    15
}
fn default_shutdown_file() -> PathBuf {
    PathBuf::from("/tmp/shutdown")
}
fn default_conntrack_capacity() -> u32 {
    1_000_000
}
fn default_maglev_table_size() -> u32 {
    65_537
}

/// Lossy so that `to_yaml` cannot fail on a non-UTF-8 path built in code.
fn lossy_path<S: Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&path.to_string_lossy())
}

/// `listen: auto` or `listen: {ip: 10.0.0.1}`. Hand-written because an
/// untagged enum would hide the real problem behind "did not match any variant".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Listen {
    /// The address of the interface holding the default route.
    #[default]
    Auto,
    Ip(Ipv4Addr),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenIp {
    ip: Ipv4Addr,
}

impl Serialize for Listen {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            Listen::Auto => s.serialize_str("auto"),
            Listen::Ip(ip) => ListenIp { ip }.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ListenVisitor;
        impl<'de> Visitor<'de> for ListenVisitor {
            type Value = Listen;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`auto` or a mapping `{ip: <IPv4 address>}`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Listen, E> {
                match v {
                    "auto" => Ok(Listen::Auto),
                    _ => Err(E::invalid_value(Unexpected::Str(v), &self)),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Listen, A::Error> {
                ListenIp::deserialize(MapAccessDeserializer::new(map)).map(|l| Listen::Ip(l.ip))
            }
        }
        d.deserialize_any(ListenVisitor)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortMap {
    pub local_port: u16,
    pub remote_port: u16,
}

/// Exactly one backend source, written as a mapping with one key. Deserialize
/// is hand-written so that "none" and "both" get their own message, reported
/// at the `provider` mapping rather than at the top of the file.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(into = "ProviderRepr")]
pub enum Provider {
    Static(StaticProvider),
    Kubernetes(KubernetesProvider),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProviderRepr {
    #[serde(rename = "static", default, deserialize_with = "present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    static_: Option<StaticProvider>,
    #[serde(default, deserialize_with = "present")]
    #[serde(skip_serializing_if = "Option::is_none")]
    kubernetes: Option<KubernetesProvider>,
}

/// Makes `static:` with an empty value a type error instead of "no provider".
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

impl<'de> Deserialize<'de> for Provider {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ProviderVisitor;
        impl<'de> Visitor<'de> for ProviderVisitor {
            type Value = Provider;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping with one key, `static` or `kubernetes`")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Provider, A::Error> {
                let repr = ProviderRepr::deserialize(MapAccessDeserializer::new(map))?;
                match (repr.static_, repr.kubernetes) {
                    (Some(s), None) => Ok(Provider::Static(s)),
                    (None, Some(k)) => Ok(Provider::Kubernetes(k)),
                    (None, None) => Err(de::Error::custom(
                        "no provider given; set exactly one of `static` or `kubernetes`",
                    )),
                    (Some(_), Some(_)) => Err(de::Error::custom(
                        "both `static` and `kubernetes` given; set exactly one of them",
                    )),
                }
            }
        }
        d.deserialize_map(ProviderVisitor)
    }
}

impl From<Provider> for ProviderRepr {
    fn from(p: Provider) -> Self {
        match p {
            Provider::Static(s) => ProviderRepr { static_: Some(s), kubernetes: None },
            Provider::Kubernetes(k) => ProviderRepr { static_: None, kubernetes: Some(k) },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticProvider {
    pub backends: Vec<StaticBackend>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticBackend {
    pub name: String,
    pub ip: Ipv4Addr,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesProvider {
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub service: String,
}

fn default_namespace() -> String {
    "default".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Nat,
    Dsr,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtelConfig {
    pub enabled: bool,
    pub endpoint: String,
    pub protocol: OtelProtocol,
    pub export_interval_secs: u64,
    pub headers: BTreeMap<String, String>,
    /// Headers whose values come from environment variables (header name ->
    /// variable), so a bearer token can come from a Secret and never sits in
    /// the file, as `admin.auth.password_env` does for the admin password.
    pub headers_env: BTreeMap<String, String>,
}

impl OtelConfig {
    /// `headers` plus each `headers_env` header with its variable's value;
    /// None names a variable that is unset or empty.
    pub fn resolved_headers(&self) -> Result<BTreeMap<String, String>, String> {
        let mut out = self.headers.clone();
        for (name, var) in &self.headers_env {
            match std::env::var(var).ok().filter(|v| !v.is_empty()) {
                Some(v) => out.insert(name.clone(), v),
                None => return Err(var.clone()),
            };
        }
        Ok(out)
    }
}

impl Default for OtelConfig {
    fn default() -> Self {
        OtelConfig {
            enabled: false,
            endpoint: "http://localhost:4317".into(),
            protocol: OtelProtocol::Grpc,
            export_interval_secs: 10,
            headers: BTreeMap::new(),
            headers_env: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtelProtocol {
    #[default]
    Grpc,
    Http,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    pub address: IpAddr,
    pub port: u16,
    /// Basic auth for `/api/*` and `/metrics`; `/healthz` and `/readyz`
    /// stay open for probes. Unset: no auth.
    pub auth: Option<AdminAuth>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { address: Ipv4Addr::LOCALHOST.into(), port: 9090, auth: None }
    }
}

/// `admin.auth: {username, password_env}`: the password never sits in the
/// file; it is read from the named environment variable at startup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminAuth {
    pub username: String,
    #[serde(default = "default_password_env")]
    pub password_env: String,
}

pub const DEFAULT_PASSWORD_ENV: &str = "XLB_ADMIN_PASSWORD";

fn default_password_env() -> String {
    DEFAULT_PASSWORD_ENV.into()
}

impl AdminAuth {
    /// The password from the environment; `None` when unset or empty.
    pub fn password(&self) -> Option<String> {
        std::env::var(&self.password_env).ok().filter(|p| !p.is_empty())
    }

    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let u = &self.username;
        let message =
            format!("`{u}` is not a usable user name; use 1-64 printable characters without ':' or spaces");
        let ok = (1..=64).contains(&u.len()) && u.chars().all(|c| c.is_ascii_graphic() && c != ':');
        ensure(ok, format!("{at}.username"), message)?;
        let v = &self.password_env;
        let message = format!(
            "`{v}` is not an environment variable name; use letters, digits and '_', not starting with a digit"
        );
        ensure(is_env_name(v), format!("{at}.password_env"), message)
    }
}

/// A portable environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A URI authority's port, if it has one, is 0..=65535 (`http::Uri` accepts any digits).
fn has_valid_port(authority: &axum::http::uri::Authority) -> bool {
    let a = authority.as_str();
    let after_host = a.rsplit_once(']').map_or(a, |(_, rest)| rest);
    after_host.rsplit_once(':').is_none_or(|(_, port)| port.parse::<u16>().is_ok())
}

/// An HTTP header name (RFC 9110 token) that is also valid gRPC metadata.
fn is_header_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Source ports the dataplane allocates for NAT'd connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange { min: 10_240, max: 32_767 }
    }
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.min..=self.max).contains(&port)
    }
}

/// What a packet for a listened port gets when it belongs to no connection
/// XLB tracks (one that expired or was never seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownFlow {
    /// A RST (rate-limited): the client's TCP gives up at once and reconnects.
    #[default]
    Rst,
    /// Nothing: the client retransmits until it times out.
    Drop,
}

/// What XLB itself sends goes to a source address anyone can forge: each
/// kind is a token bucket per CPU (so the node's total is this times the
/// CPUs that receive), and what goes over it is dropped and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// ICMP time exceeded and fragmentation needed (the kernel's
    /// icmp_msgs_per_sec is 1000).
    #[serde(default = "RateLimit::answers")]
    pub icmp: RateLimit,
    /// RSTs for packets of no known connection (unknown_flow: rst).
    #[serde(default = "RateLimit::answers")]
    pub rst: RateLimit,
    /// RSTs refusing new connections while draining: every client
    /// connecting during the drain needs one, so the budget is larger.
    #[serde(default = "RateLimit::drain")]
    pub drain_rst: RateLimit,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits { icmp: RateLimit::answers(), rst: RateLimit::answers(), drain_rst: RateLimit::drain() }
    }
}

/// A token bucket: `per_sec` answers a second on average, up to `burst` at
/// once. `per_sec: 0` sends none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_sec: u32,
    pub burst: u32,
}

impl RateLimit {
    fn answers() -> Self {
        RateLimit { per_sec: 1000, burst: 50 }
    }
    fn drain() -> Self {
        RateLimit { per_sec: 10_000, burst: 1000 }
    }

    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        in_range(self.per_sec, 0..=MAX_ANSWER_RATE, format!("{at}.per_sec"))?;
        in_range(self.burst, 1..=MAX_ANSWER_RATE, format!("{at}.burst"))
    }
}

/// Far above any link's packet rate per CPU; keeps a token's cost (1 s /
/// rate) a whole number of microseconds or more.
pub const MAX_ANSWER_RATE: u32 = 1_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    #[default]
    Maglev,
}

/// One problem with a config file, printed on one line as
/// `<origin>: <key path>: <message> (line L, column C)`; empty parts are left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file name, or whatever the caller passed to [`Config::parse`].
    pub origin: String,
    /// Key path such as `ports[1].local_port`; empty for the whole document.
    pub path: String,
    pub message: String,
    /// 1-based (line, column), known for syntax and type errors only.
    pub location: Option<(usize, usize)>,
}

impl ConfigError {
    pub fn new(path: impl fmt::Display, message: impl fmt::Display) -> Self {
        ConfigError {
            origin: String::new(),
            path: path.to_string(),
            message: message.to_string(),
            location: None,
        }
    }

    fn from_serde(err: serde_path_to_error::Error<serde_norway::Error>) -> Self {
        // `?` marks where a syntax error cut the path short; it tells readers nothing.
        let path = match err.path().to_string().replace(".?", "") {
            root if root == "." || root == "?" => String::new(),
            path => path,
        };
        let inner = err.into_inner();
        let location = inner.location().map(|l| (l.line(), l.column()));
        // serde_norway bakes its own path and position into the text; we
        // print ours in fixed places instead, so take its copies out.
        let mut message = inner.to_string();
        if let Some((line, column)) = location {
            message = message.replacen(&format!(" at line {line} column {column}"), "", 1);
        }
        // Its path may stop one key short of ours (unknown fields), so match a prefix.
        if let Some((head, rest)) = message.split_once(": ") {
            if !head.is_empty() && path.starts_with(head) {
                message = rest.to_string();
            }
        }
        // Readers know "a mapping" and "an integer 0..=65535", not Rust type names.
        if let Some(at) = message.find("expected struct ") {
            message.replace_range(at.., "expected a mapping");
        }
        for (ty, allowed) in [("u16", "0..=65535"), ("u32", "0..=4294967295"), ("u64", ">= 0")] {
            message = message.replace(&format!("expected {ty}"), &format!("expected an integer {allowed}"));
        }
        let message = message.replace('\n', " ");
        ConfigError { origin: String::new(), path, message, location }
    }

    fn in_file(self, origin: &str) -> Self {
        ConfigError { origin: origin.into(), ..self }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for part in [&self.origin, &self.path] {
            if !part.is_empty() {
                write!(f, "{part}: ")?;
            }
        }
        f.write_str(&self.message)?;
        match self.location {
            Some((line, column)) => write!(f, " (line {line}, column {column})"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for ConfigError {}

fn ensure(ok: bool, path: impl fmt::Display, message: impl fmt::Display) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(path, message))
    }
}

fn in_range<T: PartialOrd + fmt::Display>(
    value: T,
    range: RangeInclusive<T>,
    path: impl fmt::Display,
) -> Result<(), ConfigError> {
    let message = format!("{value} is out of range; allowed {}..={}", range.start(), range.end());
    ensure(range.contains(&value), path, message)
}

/// Fails on the first item equal to an earlier one, naming both places.
fn unique<T: Eq + Hash + fmt::Display>(
    items: impl IntoIterator<Item = T>,
    path: impl Fn(usize) -> String,
) -> Result<(), ConfigError> {
    let mut seen = HashMap::new();
    for (i, item) in items.into_iter().enumerate() {
        match seen.entry(item) {
            Entry::Occupied(first) => {
                let message =
                    format!("`{}` repeats {}; each must be unique", first.key(), path(*first.get()));
                return Err(ConfigError::new(path(i), message));
            }
            Entry::Vacant(slot) => {
                slot.insert(i);
            }
        }
    }
    Ok(())
}

/// Addresses that can never be one host's own: packets to them fan out or go nowhere.
fn unicast(ip: Ipv4Addr, path: impl fmt::Display) -> Result<(), ConfigError> {
    let ok = !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast());
    ensure(ok, path, format!("{ip} is not a unicast host address"))
}

/// RFC 1123 label, as Kubernetes requires for namespace and service names
/// (and XLB for instance names).
pub fn is_dns_label(s: &str) -> bool {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    (1..=63).contains(&s.len()) && s.chars().all(ok_char) && !s.starts_with('-') && !s.ends_with('-')
}

/// Mirrors the kernel's `dev_valid_name`, so a bad name fails here, not at attach time.
fn is_ifname(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s != "."
        && s != ".."
        && !s.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| n % d != 0)
}

fn next_prime(n: u64) -> u64 {
    (n..).find(|&p| is_prime(p)).expect("primes are unbounded")
}

impl Config {
    /// Reads, parses and validates `path`; errors name the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text, &origin),
            Err(e) => Err(ConfigError::new("", format!("cannot read: {e}")).in_file(&origin)),
        }
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        serde_path_to_error::deserialize(serde_norway::Deserializer::from_str(text))
            .map_err(|e| match serde_norway::from_str(text) {
                // serde_norway reads an empty document as an empty mapping.
                Ok(serde_norway::Value::Null) => {
                    ConfigError::new("", "the file is empty; it needs at least `ports` and `provider`")
                }
                _ => ConfigError::from_serde(e),
            })
            .map(|mut config: Config| {
                if let Some(hc) = &mut config.health_check {
                    hc.fill_defaults(&config.ports);
                }
                config
            })
            .and_then(|config: Config| config.validate().map(|()| config))
            .map_err(|e| e.in_file(origin))
    }

    /// The rules the types cannot express. Reports the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(name) = &self.name {
            ensure(!name.trim().is_empty(), "name", "is empty; omit the key instead")?;
            // It names the pin directory under /sys/fs/bpf/xlb.
            let message =
                format!("`{name}` is not a DNS-1123 label; use 1-63 lowercase letters, digits and '-'");
            ensure(is_dns_label(name), "name", message)?;
        }
        if let Listen::Ip(ip) = self.listen {
            unicast(ip, "listen.ip")?;
        }

        let count = self.ports.len();
        let message = format!("has {count} entries; allowed 1 to {MAX_PORTS}");
        ensure((1..=MAX_PORTS).contains(&count), "ports", message)?;
        let range = self.nat_port_range;
        // Ports below 1024 belong to services; NAT source ports must not collide with them.
        in_range(range.min, 1024..=u16::MAX, "nat_port_range.min")?;
        let message = format!("min {} is above max {}; need min <= max", range.min, range.max);
        ensure(range.min <= range.max, "nat_port_range", message)?;
        for (i, port) in self.ports.iter().enumerate() {
            in_range(port.local_port, 1..=u16::MAX, format!("ports[{i}].local_port"))?;
            in_range(port.remote_port, 1..=u16::MAX, format!("ports[{i}].remote_port"))?;
            // A reply to a NAT'd connection would be taken for a new client connection.
            let message = format!(
                "{} lies inside nat_port_range {}..={}; move the port or the range",
                port.local_port, range.min, range.max
            );
            ensure(!range.contains(port.local_port), format!("ports[{i}].local_port"), message)?;
        }
        unique(self.ports.iter().map(|p| p.local_port), |i| format!("ports[{i}].local_port"))?;

        match &self.provider {
            Provider::Static(s) => s.validate("provider.static")?,
            Provider::Kubernetes(k) => k.validate("provider.kubernetes")?,
        }
        ensure(self.mode == Mode::Nat, "mode", "mode dsr is not supported yet; use nat")?;
        ensure(self.orphan_ttl_secs >= 1, "orphan_ttl_secs", "is 0; must be at least 1")?;
        in_range(self.shutdown_timeout, 0..=MAX_SHUTDOWN_TIMEOUT, "shutdown_timeout")?;
        let message = format!("`{}` is relative; use an absolute path", self.shutdown_file.display());
        ensure(self.shutdown_file.is_absolute(), "shutdown_file", message)?;
        self.otel.validate("otel")?;
        self.rate_limits.icmp.validate("rate_limits.icmp")?;
        self.rate_limits.rst.validate("rate_limits.rst")?;
        self.rate_limits.drain_rst.validate("rate_limits.drain_rst")?;
        in_range(self.syn_proxy_threshold, 1..=50_000_000, "syn_proxy_threshold")?;
        if let Some(hc) = &self.health_check {
            hc.validate("health_check")?;
        }
        if let Some(p) = &self.passive_health {
            p.validate("passive_health")?;
        }
        ensure(self.admin.port != 0, "admin.port", "is 0; allowed 1..=65535")?;
        if let Some(auth) = &self.admin.auth {
            auth.validate("admin.auth")?;
        }

        if let Some(interfaces) = &self.interfaces {
            ensure(!interfaces.is_empty(), "interfaces", "is empty; list names or omit the key")?;
            for (i, name) in interfaces.iter().enumerate() {
                let message = format!(
                    "`{name}` is not a valid interface name; \
                     use 1-15 characters without '/', ':' or spaces"
                );
                ensure(is_ifname(name), format!("interfaces[{i}]"), message)?;
            }
            unique(interfaces, |i| format!("interfaces[{i}]"))?;
        }
        if let Some(ip) = self.snat_ip {
            unicast(ip, "snat_ip")?;
        }
        if let Some(pool) = &self.snat_ips {
            ensure(self.snat_ip.is_none(), "snat_ips", "set with snat_ip; use one of the two")?;
            let message = format!("has {} addresses; allowed 1..={MAX_SNAT_IPS}", pool.len());
            ensure((1..=MAX_SNAT_IPS).contains(&pool.len()), "snat_ips", message)?;
            for (i, ip) in pool.iter().enumerate() {
                unicast(*ip, format!("snat_ips[{i}]"))?;
            }
            unique(pool, |i| format!("snat_ips[{i}]"))?;
        }
        if let Some(rate) = self.expected_connection_rate {
            ensure(rate > 0, "expected_connection_rate", "is 0; omit the key or give a rate")?;
        }
        in_range(self.conntrack_capacity, CONNTRACK_CAPACITY, "conntrack_capacity")?;
        let size = self.maglev_table_size;
        in_range(size, MAGLEV_TABLE_SIZE, "maglev_table_size")?;
        // Maglev's permutation walk only visits every slot when the size is prime.
        let message = format!("{size} is not prime; Maglev needs a prime, e.g. {}", next_prime(size.into()));
        ensure(is_prime(size.into()), "maglev_table_size", message)
    }

    /// Settings the schema accepts but `xlb run` refuses for now.
    pub fn startup_checks(&self) -> Result<(), ConfigError> {
        ensure(self.proto == Proto::Tcp, "proto", "udp is not supported yet; use tcp")?;
        let message = "https with protocol: http is not supported yet; use protocol: grpc for TLS, \
                       or an http:// endpoint";
        ensure(!self.otel.https_over_http(), "otel.endpoint", message)?;
        if self.otel.enabled {
            if let Err(var) = self.otel.resolved_headers() {
                let name =
                    self.otel.headers_env.iter().find(|(_, v)| **v == var).map_or("", |(k, _)| k.as_str());
                let message = format!("{var} is not set or empty; export the header's value in it");
                ensure(false, format!("otel.headers_env.{name}"), message)?;
            }
        }
        if let Some(auth) = &self.admin.auth {
            let message =
                format!("{} is not set or empty; export the admin password in it", auth.password_env);
            ensure(auth.password().is_some(), "admin.auth.password_env", message)?;
        }
        Ok(())
    }

    /// Non-fatal notes for `xlb check` and the startup log.
    pub fn warnings(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.proto == Proto::Udp {
            notes.push("proto: udp is not supported yet: xlb run will refuse it".to_string());
        }
        if self.otel.https_over_http() {
            notes.push(
                "otel.endpoint: https with protocol: http is not supported yet: xlb run will refuse it"
                    .into(),
            );
        }
        if let Provider::Static(s) = &self.provider {
            let backends = s.backends.len() as u64;
            let wanted = MAGLEV_SLOTS_PER_BACKEND * backends;
            if u64::from(self.maglev_table_size) < wanted {
                let better = next_prime(wanted).min((*MAGLEV_TABLE_SIZE.end()).into());
                notes.push(format!(
                    "maglev_table_size: {} is below {MAGLEV_SLOTS_PER_BACKEND} slots \
                     for each of {backends} backends; \
                     traffic will spread unevenly, use a prime of at least {better}",
                    self.maglev_table_size
                ));
            }
        }
        notes
    }

    /// The effective configuration with every default written out; parses back to `self`.
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("every field serializes to YAML")
    }
}

impl StaticProvider {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let backends = &self.backends;
        ensure(!backends.is_empty(), format!("{at}.backends"), "is empty; list at least one backend")?;
        let path = |i: usize, key: &str| format!("{at}.backends[{i}].{key}");
        for (i, b) in backends.iter().enumerate() {
            ensure(!b.name.trim().is_empty(), path(i, "name"), "is empty; every backend needs a name")?;
            unicast(b.ip, path(i, "ip"))?;
            in_range(b.weight, 1..=MAX_WEIGHT, path(i, "weight"))?;
        }
        unique(backends.iter().map(|b| &b.name), |i| path(i, "name"))?;
        unique(backends.iter().map(|b| b.ip), |i| path(i, "ip"))
    }
}

impl KubernetesProvider {
    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        for (key, value) in [("namespace", &self.namespace), ("service", &self.service)] {
            let message = format!(
                "`{value}` is not a DNS-1123 label; use 1-63 lowercase letters, digits or '-', \
                 starting and ending with a letter or digit"
            );
            ensure(is_dns_label(value), format!("{at}.{key}"), message)?;
        }
        Ok(())
    }
}

impl OtelConfig {
    /// TLS is built in for OTLP/gRPC only.
    fn https_over_http(&self) -> bool {
        self.enabled && self.protocol == OtelProtocol::Http && self.endpoint.starts_with("https://")
    }

    fn validate(&self, at: &str) -> Result<(), ConfigError> {
        let host = ["http://", "https://"].iter().find_map(|s| self.endpoint.strip_prefix(s));
        let message = format!(
            "`{}` is not a URL; it must start with http:// or https:// and name a host",
            self.endpoint
        );
        // The exporter parses it as a URI at startup; a failure then would come after attaching.
        let parses =
            self.endpoint.parse::<axum::http::Uri>().is_ok_and(|u| u.authority().is_some_and(has_valid_port));
        ensure(host.is_some_and(|h| !h.is_empty()) && parses, format!("{at}.endpoint"), message)?;
        let message = "is 0; must be at least 1";
        ensure(self.export_interval_secs >= 1, format!("{at}.export_interval_secs"), message)?;
        for (name, value) in &self.headers {
            let message = format!("`{name}` is not a valid header name; use letters, digits and '-'");
            ensure(is_header_name(name), format!("{at}.headers"), message)?;
            // Visible ASCII and spaces: what both HTTP headers and gRPC metadata carry.
            let ok = value.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
            let message = "has a control or non-ASCII character; headers carry printable ASCII only";
            ensure(ok, format!("{at}.headers.{name}"), message)?;
        }
        for (name, var) in &self.headers_env {
            let message = format!("`{name}` is not a valid header name; use letters, digits and '-'");
            ensure(is_header_name(name), format!("{at}.headers_env"), message)?;
            let message = format!("`{name}` is also in {at}.headers; give each header one source");
            ensure(!self.headers.contains_key(name), format!("{at}.headers_env.{name}"), message)?;
            let message =
                format!("`{var}` is not an environment variable name; use letters, digits and '_', not starting with a digit");
            ensure(is_env_name(var), format!("{at}.headers_env.{name}"), message)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "\
ports: [{local_port: 80, remote_port: 8080}]
provider: {static: {backends: [{name: a, ip: 10.0.0.2}]}}
";

    fn base() -> Config {
        Config::parse(MINIMAL, "t.yaml").unwrap()
    }

    fn with(change: impl FnOnce(&mut Config)) -> Config {
        let mut config = base();
        change(&mut config);
        config
    }

    fn static_backends(config: &mut Config) -> &mut Vec<StaticBackend> {
        match &mut config.provider {
            Provider::Static(s) => &mut s.backends,
            Provider::Kubernetes(_) => unreachable!(),
        }
    }

    fn backend(name: &str, ip: [u8; 4]) -> StaticBackend {
        let (name, ip) = (name.into(), ip.into());
        StaticBackend { name, ip, weight: 1 }
    }

    fn k8s(namespace: &str, service: &str) -> Provider {
        let (namespace, service) = (namespace.into(), service.into());
        Provider::Kubernetes(KubernetesProvider { namespace, service })
    }

    #[track_caller]
    fn accepts(config: Config) {
        if let Err(e) = config.validate() {
            panic!("expected valid, got: {e}");
        }
    }

    #[track_caller]
    fn rejects(config: Config, path: &str, needle: &str) {
        let e = config.validate().expect_err("expected a validation error");
        assert_eq!(e.path, path, "{e}");
        assert!(e.message.contains(needle), "{e:?} lacks {needle:?}");
    }

    /// Parses `text`, which must fail with a one-line error containing `needle`.
    #[track_caller]
    fn parse_fails(text: &str, needle: &str) -> String {
        let e = Config::parse(text, "xlb.yaml").expect_err("expected a parse error");
        let line = e.to_string();
        assert!(!line.contains('\n') && line.contains(needle), "{line:?} lacks {needle:?}");
        line
    }

    #[test]
    fn minimal_config_gets_every_default() {
        let c = base();
        let backends = vec![backend("a", [10, 0, 0, 2])];
        assert_eq!(c.name, None);
        assert_eq!(c.listen, Listen::Auto);
        assert_eq!(c.proto, Proto::Tcp);
        assert_eq!(c.ports, [PortMap { local_port: 80, remote_port: 8080 }]);
        assert_eq!(c.provider, Provider::Static(StaticProvider { backends }));
        assert_eq!(c.mode, Mode::Nat);
        assert_eq!(c.orphan_ttl_secs, 300);
        assert_eq!(c.shutdown_timeout, 15);
        assert_eq!(c.shutdown_file, Path::new("/tmp/shutdown"));
        assert!(!c.otel.enabled);
        assert_eq!(c.otel.endpoint, "http://localhost:4317");
        assert_eq!(c.otel.protocol, OtelProtocol::Grpc);
        assert_eq!(c.otel.export_interval_secs, 10);
        assert!(c.otel.headers.is_empty());
        assert_eq!(c.admin.address, IpAddr::from([127, 0, 0, 1]));
        assert_eq!(c.admin.port, 9090);
        assert_eq!(c.admin.auth, None);
        assert_eq!(c.interfaces, None);
        assert_eq!(c.snat_ip, None);
        assert_eq!((c.nat_port_range.min, c.nat_port_range.max), (10240, 32767));
        assert_eq!(c.conntrack_capacity, 1_000_000);
        assert_eq!(c.maglev_table_size, 65537);
        assert_eq!(c.algorithm, Algorithm::Maglev);
        assert!(c.warnings().is_empty());
        assert_eq!(c.startup_checks(), Ok(()));
    }

    #[test]
    fn example_file_parses() {
        let c = Config::parse(include_str!("../config/xlb.yaml"), "config/xlb.yaml").unwrap();
        let Provider::Static(s) = &c.provider else { panic!("the example uses the static provider") };
        assert_eq!(s.backends.len(), 2);
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
    }

    #[test]
    fn seed_kubernetes_example_parses() {
        let text = r#"
proto: tcp
listen: auto
ports:
  - local_port: 80
    remote_port: 8080
  - local_port: 443
    remote_port: 8443
provider:
  kubernetes:
    namespace: default
    service: backend-service
shutdown_timeout: 60
otel:
  enabled: true
  endpoint: "http://opentelemetry-collector:4317"
  protocol: grpc
  export_interval_secs: 10
  headers:
    Authorization: "Bearer your-token"
"#;
        let c = Config::parse(text, "values").unwrap();
        assert_eq!(c.provider, k8s("default", "backend-service"));
        assert_eq!(c.otel.headers["Authorization"], "Bearer your-token");
    }

    #[test]
    fn to_yaml_round_trips() {
        let full = with(|c| {
            c.name = Some("edge".into());
            c.listen = Listen::Ip([192, 0, 2, 1].into());
            c.proto = Proto::Udp;
            c.interfaces = Some(vec!["eth0".into(), "eth1".into()]);
            c.snat_ip = Some([192, 0, 2, 9].into());
            c.otel.headers.insert("Authorization".into(), "Bearer x".into());
            c.otel.protocol = OtelProtocol::Http;
            c.admin.address = "::1".parse().unwrap();
            c.admin.auth = Some(AdminAuth { username: "ops".into(), password_env: "XLB_PW".into() });
        });
        let kube = with(|c| c.provider = k8s("prod", "web"));
        for config in [base(), full, kube] {
            let yaml = config.to_yaml();
            assert_eq!(Config::parse(&yaml, "out").unwrap(), config, "{yaml}");
        }
        let yaml = base().to_yaml();
        for key in ["listen: auto", "shutdown_file: /tmp/shutdown", "maglev_table_size: 65537"] {
            assert!(yaml.contains(key), "{yaml}");
        }
    }

    #[test]
    fn listen_forms() {
        let listen = |v: &str| Config::parse(&format!("{MINIMAL}listen: {v}"), "x").map(|c| c.listen);
        assert_eq!(listen("auto"), Ok(Listen::Auto));
        assert_eq!(listen("{ip: 10.1.2.3}"), Ok(Listen::Ip([10, 1, 2, 3].into())));
        let fails = |v: &str, needle| parse_fails(&format!("{MINIMAL}listen: {v}"), needle);
        fails("10.1.2.3", "listen: invalid value: string \"10.1.2.3\", expected `auto` or a mapping");
        fails("{ip: nope}", "xlb.yaml: listen.ip: invalid IPv4 address syntax (line 3");
        fails("{address: 10.1.2.3}", "unknown field `address`, expected `ip`");
        fails("{}", "listen: missing field `ip`");
    }

    #[test]
    fn error_line_has_origin_path_message_and_position() {
        let text = "\
ports:
  - {local_port: 80, remote_port: 8080}
  - {local_port: 70000, remote_port: 1}
provider: {static: {backends: [{name: a, ip: 10.0.0.2}]}}
";
        let expected = "xlb.yaml: ports[1].local_port: invalid value: integer `70000`, \
                        expected an integer 0..=65535 (line 3, column 18)";
        assert_eq!(parse_fails(text, ""), expected);
        assert_eq!(ConfigError::new("", "whole-file problem").to_string(), "whole-file problem");
    }

    #[test]
    fn document_shape_errors() {
        for empty in ["", "# only a comment\n", "---\n", "null\n"] {
            let expected = "xlb.yaml: the file is empty; it needs at least `ports` and `provider`";
            assert_eq!(parse_fails(empty, ""), expected);
        }
        for not_mapping in ["- a\n- b\n", "just text\n", "42\n"] {
            parse_fails(not_mapping, "expected a mapping of xlb settings (line 1, column 1)");
        }
        parse_fails("ports: [{local_port: 80, remote_port: 8080}]", "missing field `provider`");
        parse_fails("provider: {kubernetes: {service: web}}", "missing field `ports`");
        let syntax = "ports:\n  - local_port: 80\n    remote_port: 8080\n  oops\n";
        let e = parse_fails(syntax, "xlb.yaml: ports[0]: could not find expected ':'");
        assert!(e.ends_with("(line 5, column 1)"), "{e}");
        parse_fails("ports: [1]", "ports[0]: invalid type: integer `1`, expected a mapping (line 1");
        parse_fails(&format!("{MINIMAL}ports: []"), "duplicate field `ports`");
        parse_fails(&format!("{MINIMAL}---\n{MINIMAL}"), "more than one document");
    }

    #[test]
    fn unknown_key_is_named_with_expected_keys_and_line() {
        let e = parse_fails(&format!("{MINIMAL}prots: []"), "xlb.yaml: prots: unknown field `prots`");
        assert!(e.contains("expected one of `name`, `listen`, `proto`, `ports`"), "{e}");
        assert!(e.ends_with("(line 3, column 1)"), "{e}");
        let weight = MINIMAL.replace("8080}", "8080, weight: 2}");
        parse_fails(&weight, "ports[0].weight: unknown field `weight`, expected `local_port` or");
        parse_fails(&format!("{MINIMAL}otel: {{enable: true}}"), "otel.enable: unknown field");
    }

    #[test]
    fn wrong_types_and_values_name_the_key() {
        for (extra, expected) in [
            ("proto: sctp", "proto: unknown variant `sctp`, expected `tcp` or `udp`"),
            ("mode: tunnel", "mode: unknown variant `tunnel`"),
            ("algorithm: random", "algorithm: unknown variant `random`, expected `maglev`"),
            ("otel: {protocol: thrift}", "otel.protocol: unknown variant `thrift`"),
            ("orphan_ttl_secs: -1", "orphan_ttl_secs: invalid type: integer `-1`, expected an integer >= 0"),
            ("conntrack_capacity: lots", "conntrack_capacity: invalid type: string"),
            ("snat_ip: 10.0.0", "snat_ip: invalid IPv4 address syntax"),
            ("admin: {address: localhost}", "admin.address: invalid IP address syntax"),
            ("nat_port_range: {min: 70000}", "nat_port_range.min: invalid value: integer `70000`"),
            ("interfaces: eth0", "interfaces: invalid type: string"),
            ("otel: {enabled: yes}", "otel.enabled: invalid type: string \"yes\", expected a boolean"),
        ] {
            let e = parse_fails(&format!("{MINIMAL}{extra}"), &format!("xlb.yaml: {expected}"));
            assert!(e.contains("(line 3, column"), "{e}");
        }
        let bad_ip = MINIMAL.replace("10.0.0.2", "300.0.0.1");
        parse_fails(&bad_ip, "xlb.yaml: provider.static.backends[0].ip: invalid IPv4 address syntax");
    }

    #[test]
    fn provider_must_be_exactly_one_known_kind() {
        let both = MINIMAL.replace("]}}", "]}, kubernetes: {service: web}}");
        let expected = "provider: both `static` and `kubernetes` given; set exactly one of them \
                        (line 2, column 11)";
        parse_fails(&both, expected);
        let provider = |v: &str| format!("ports: [{{local_port: 80, remote_port: 8080}}]\nprovider: {v}");
        parse_fails(
            &provider("{consul: {}}"),
            "provider.consul: unknown field `consul`, expected `static` or `kubernetes`",
        );
        parse_fails(
            &provider("{}"),
            "provider: no provider given; set exactly one of `static` or `kubernetes`",
        );
        parse_fails(&provider("\n  static:\n"), "provider.static: missing field `backends`");
        parse_fails(&provider("static"), "expected a mapping with one key, `static` or `kubernetes`");
        let c = Config::parse(&provider("{kubernetes: {service: web}}"), "x").unwrap();
        assert_eq!(c.provider, k8s("default", "web"));
    }

    #[test]
    fn load_reads_and_names_the_file() {
        let dir = std::env::temp_dir().join(format!("xlb-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("xlb.yaml");
        std::fs::write(&file, MINIMAL).unwrap();
        assert_eq!(Config::load(&file), Ok(base()));
        std::fs::write(&file, format!("{MINIMAL}mode: dsr\n")).unwrap();
        let e = Config::load(&file).unwrap_err().to_string();
        assert_eq!(e, format!("{}: mode: mode dsr is not supported yet; use nat", file.display()));
        let missing = dir.join("missing.yaml");
        let e = Config::load(&missing).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}: cannot read: ", missing.display())), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn startup_needs_the_admin_password_in_the_environment() {
        let unset = "XLB_TEST_PASSWORD_NOBODY_SETS";
        let auth = |env: &str| AdminAuth { username: "ops".into(), password_env: env.into() };
        let e = with(|c| c.admin.auth = Some(auth(unset))).startup_checks().unwrap_err();
        assert_eq!(e.path, "admin.auth.password_env");
        assert!(e.message.starts_with(&format!("{unset} is not set or empty")), "{e}");
        // PATH is set in every environment the tests run in.
        assert_eq!(with(|c| c.admin.auth = Some(auth("PATH"))).startup_checks(), Ok(()));
    }

    #[test]
    fn admin_auth_parses_with_default_password_env() {
        let c = Config::parse(&format!("{MINIMAL}admin: {{auth: {{username: ops}}}}"), "x").unwrap();
        let auth = c.admin.auth.unwrap();
        assert_eq!((auth.username.as_str(), auth.password_env.as_str()), ("ops", "XLB_ADMIN_PASSWORD"));
        parse_fails(&format!("{MINIMAL}admin: {{auth: {{user: ops}}}}"), "admin.auth.user: unknown field");
        parse_fails(
            &format!("{MINIMAL}admin: {{auth: {{password: x}}}}"),
            "admin.auth.password: unknown field",
        );
    }

    #[test]
    fn startup_refuses_otlp_http_over_tls() {
        let https = |protocol| {
            with(|c| {
                c.otel.enabled = true;
                c.otel.endpoint = "https://collector:4318".into();
                c.otel.protocol = protocol;
            })
        };
        let e = https(OtelProtocol::Http).startup_checks().unwrap_err();
        assert_eq!(e.path, "otel.endpoint");
        assert!(e.message.contains("https with protocol: http is not supported yet"), "{e}");
        assert_eq!(https(OtelProtocol::Http).warnings().len(), 1);
        assert_eq!(https(OtelProtocol::Grpc).startup_checks(), Ok(()));
        assert!(https(OtelProtocol::Grpc).warnings().is_empty());
    }

    #[test]
    fn startup_refuses_udp() {
        let e = with(|c| c.proto = Proto::Udp).startup_checks().unwrap_err();
        assert_eq!(e.to_string(), "proto: udp is not supported yet; use tcp");
        assert_eq!(base().startup_checks(), Ok(()));
    }

    #[test]
    fn warnings_for_udp_and_small_maglev_table() {
        let udp = with(|c| c.proto = Proto::Udp).warnings();
        assert_eq!(udp, ["proto: udp is not supported yet: xlb run will refuse it"]);
        let crowded = with(|c| {
            c.maglev_table_size = 251;
            let backends = static_backends(c);
            backends.push(backend("b", [10, 0, 0, 3]));
            backends.push(backend("c", [10, 0, 0, 4]));
        });
        let expected = "maglev_table_size: 251 is below 100 slots for each of 3 backends; \
                        traffic will spread unevenly, use a prime of at least 307";
        assert_eq!(crowded.warnings(), [expected]);
        assert!(with(|c| c.maglev_table_size = 251).warnings().is_empty());
    }

    #[test]
    fn primes() {
        let small: Vec<u64> = (0..30).filter(|&n| is_prime(n)).collect();
        assert_eq!(small, [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
        assert!(is_prime(65_537) && is_prime(1_000_003) && !is_prime(1_000_001));
        assert_eq!(next_prime(300), 307);
    }

    /// One test per validation rule: each `reject` change must fail at `path`
    /// with a message containing `needle`, and each `accept` change must pass.
    macro_rules! rule {
        ($name:ident: $(reject $bad:expr => $path:expr, $needle:expr;)+ $(accept $good:expr;)+) => {
            #[test]
            fn $name() {
                $(rejects(with($bad), $path, $needle);)+
                $(accepts(with($good));)+
            }
        };
    }

    fn ports(n: u16) -> Vec<PortMap> {
        (1..=n).map(|p| PortMap { local_port: p, remote_port: p }).collect()
    }

    fn interfaces(names: &[&str]) -> Option<Vec<String>> {
        Some(names.iter().map(|n| n.to_string()).collect())
    }

    const BACKEND0: &str = "provider.static.backends[0]";

    rule! { name_not_empty:
        reject |c| c.name = Some(" ".into()) => "name", "is empty";
        accept |c| c.name = Some("edge-lb".into());
    }
    rule! { otel_headers_env_names:
        reject |c| { c.otel.headers_env.insert("Authorization".into(), "1BAD".into()); } => "otel.headers_env.Authorization", "not an environment variable name";
        accept |c| { c.otel.headers_env.insert("Authorization".into(), "XLB_OTEL_TOKEN".into()); };
    }
    rule! { name_is_a_dns_label:
        reject |c| c.name = Some("../x".into()) => "name", "not a DNS-1123 label";
        accept |c| c.name = Some("edge-lb-2".into());
    }
    rule! { listen_ip_unicast:
        reject |c| c.listen = Listen::Ip(Ipv4Addr::UNSPECIFIED) => "listen.ip", "not a unicast";
        accept |c| c.listen = Listen::Ip([10, 0, 0, 1].into());
    }
    rule! { ports_count_1_to_8:
        reject |c| c.ports.clear() => "ports", "has 0 entries; allowed 1 to 8";
        reject |c| c.ports = ports(9) => "ports", "has 9 entries";
        accept |c| c.ports = ports(8);
    }
    rule! { ports_nonzero:
        reject |c| c.ports[0].local_port = 0 => "ports[0].local_port", "allowed 1..=65535";
        reject |c| c.ports[0].remote_port = 0 => "ports[0].remote_port", "allowed 1..=65535";
        accept |c| c.ports[0] = PortMap { local_port: 1, remote_port: 65535 };
    }
    rule! { local_ports_unique:
        reject |c| c.ports.push(PortMap { local_port: 80, remote_port: 9090 })
            => "ports[1].local_port", "`80` repeats ports[0].local_port";
        // Two listeners may share a backend port.
        accept |c| c.ports.push(PortMap { local_port: 443, remote_port: 8080 });
    }
    rule! { local_port_outside_nat_range:
        reject |c| c.ports[0].local_port = 10240
            => "ports[0].local_port", "inside nat_port_range 10240..=32767";
        reject |c| c.ports[0].local_port = 32767 => "ports[0].local_port", "inside nat_port_range";
        accept |c| c.ports[0].local_port = 10239;
        accept |c| c.ports[0].local_port = 32768;
    }
    rule! { nat_port_range_min_at_least_1024:
        reject |c| c.nat_port_range.min = 1023 => "nat_port_range.min", "allowed 1024..=65535";
        accept |c| c.nat_port_range.min = 1024;
    }
    rule! { nat_port_range_ordered:
        reject |c| c.nat_port_range = PortRange { min: 5000, max: 4999 }
            => "nat_port_range", "min 5000 is above max 4999";
        accept |c| c.nat_port_range = PortRange { min: 5000, max: 5000 };
    }
    rule! { static_backends_not_empty:
        reject |c| static_backends(c).clear() => "provider.static.backends", "at least one backend";
        accept |c| static_backends(c).push(backend("b", [10, 0, 0, 3]));
    }
    rule! { backend_name_not_empty:
        reject |c| static_backends(c)[0].name.clear()
            => &format!("{BACKEND0}.name"), "needs a name";
        accept |c| static_backends(c)[0].name = "web-1".into();
    }
    rule! { backend_names_unique:
        reject |c| static_backends(c).push(backend("a", [10, 0, 0, 3]))
            => "provider.static.backends[1].name", "`a` repeats provider.static.backends[0].name";
        accept |c| static_backends(c).push(backend("b", [10, 0, 0, 3]));
    }
    rule! { backend_ips_unique:
        reject |c| static_backends(c).push(backend("b", [10, 0, 0, 2]))
            => "provider.static.backends[1].ip", "`10.0.0.2` repeats";
        accept |c| static_backends(c).push(backend("b", [10, 0, 0, 4]));
    }
    rule! { backend_ip_unicast:
        reject |c| static_backends(c)[0].ip = Ipv4Addr::BROADCAST
            => &format!("{BACKEND0}.ip"), "not a unicast";
        reject |c| static_backends(c)[0].ip = [224, 0, 0, 1].into()
            => &format!("{BACKEND0}.ip"), "not a unicast";
        accept |c| static_backends(c)[0].ip = [192, 168, 1, 1].into();
    }
    rule! { backend_weight_1_to_10000:
        reject |c| static_backends(c)[0].weight = 0
            => &format!("{BACKEND0}.weight"), "allowed 1..=10000";
        reject |c| static_backends(c)[0].weight = 10_001
            => &format!("{BACKEND0}.weight"), "10001 is out of";
        accept |c| static_backends(c)[0].weight = 10_000;
    }
    rule! { kubernetes_names_are_dns_labels:
        reject |c| c.provider = k8s("default", "Web")
            => "provider.kubernetes.service", "DNS-1123 label";
        reject |c| c.provider = k8s("default", "web_1")
            => "provider.kubernetes.service", "DNS-1123 label";
        reject |c| c.provider = k8s("default", "")
            => "provider.kubernetes.service", "DNS-1123 label";
        reject |c| c.provider = k8s("default", "web-")
            => "provider.kubernetes.service", "DNS-1123 label";
        reject |c| c.provider = k8s("-ns", "web")
            => "provider.kubernetes.namespace", "DNS-1123 label";
        reject |c| c.provider = k8s(&"a".repeat(64), "web")
            => "provider.kubernetes.namespace", "DNS-1123";
        accept |c| c.provider = k8s("kube-system", "web-2");
        accept |c| c.provider = k8s("a", &"b".repeat(63));
    }
    rule! { mode_dsr_not_supported:
        reject |c| c.mode = Mode::Dsr => "mode", "mode dsr is not supported yet; use nat";
        accept |c| c.mode = Mode::Nat;
    }
    rule! { orphan_ttl_at_least_1:
        reject |c| c.orphan_ttl_secs = 0 => "orphan_ttl_secs", "at least 1";
        accept |c| c.orphan_ttl_secs = 1;
    }
    rule! { shutdown_timeout_at_most_a_day:
        reject |c| c.shutdown_timeout = 86_401 => "shutdown_timeout", "allowed 0..=86400";
        accept |c| c.shutdown_timeout = 86_400;
        accept |c| c.shutdown_timeout = 0;
    }
    rule! { shutdown_file_absolute:
        reject |c| c.shutdown_file = "tmp/shutdown".into()
            => "shutdown_file", "use an absolute path";
        accept |c| c.shutdown_file = "/run/xlb/drain".into();
    }
    rule! { otel_endpoint_is_http_url:
        reject |c| c.otel.endpoint = "localhost:4317".into()
            => "otel.endpoint", "http:// or https://";
        reject |c| c.otel.endpoint = "grpc://collector:4317".into() => "otel.endpoint", "http://";
        reject |c| c.otel.endpoint = "http://".into() => "otel.endpoint", "name a host";
        reject |c| c.otel.endpoint = "http://exa mple:4317".into() => "otel.endpoint", "is not a URL";
        reject |c| c.otel.endpoint = "http://collector:99999".into() => "otel.endpoint", "is not a URL";
        accept |c| c.otel.endpoint = "https://collector.example:4318".into();
        accept |c| c.otel.endpoint = "http://[::1]:4317/otlp".into();
    }
    rule! { otel_export_interval_at_least_1:
        reject |c| c.otel.export_interval_secs = 0 => "otel.export_interval_secs", "at least 1";
        accept |c| c.otel.export_interval_secs = 1;
    }
    rule! { admin_port_nonzero:
        reject |c| c.admin.port = 0 => "admin.port", "allowed 1..=65535";
        accept |c| c.admin.port = 1;
    }
    rule! { admin_auth_username_valid:
        reject |c| c.admin.auth = Some(AdminAuth { username: "".into(), password_env: "P".into() })
            => "admin.auth.username", "not a usable user name";
        reject |c| c.admin.auth = Some(AdminAuth { username: "a:b".into(), password_env: "P".into() })
            => "admin.auth.username", "without ':'";
        reject |c| c.admin.auth = Some(AdminAuth { username: "a b".into(), password_env: "P".into() })
            => "admin.auth.username", "not a usable";
        accept |c| c.admin.auth = Some(AdminAuth { username: "ops-1".into(), password_env: "P".into() });
    }
    rule! { admin_auth_password_env_is_a_name:
        reject |c| c.admin.auth = Some(AdminAuth { username: "ops".into(), password_env: "".into() })
            => "admin.auth.password_env", "not an environment variable name";
        reject |c| c.admin.auth = Some(AdminAuth { username: "ops".into(), password_env: "1PASS".into() })
            => "admin.auth.password_env", "not starting with a digit";
        reject |c| c.admin.auth = Some(AdminAuth { username: "ops".into(), password_env: "XLB-PASS".into() })
            => "admin.auth.password_env", "not an environment";
        accept |c| c.admin.auth = Some(AdminAuth { username: "ops".into(), password_env: "_XLB_PASS2".into() });
    }
    rule! { otel_headers_valid:
        reject |c| { c.otel.headers.insert("bad header".into(), "x".into()); }
            => "otel.headers", "`bad header` is not a valid header name";
        reject |c| { c.otel.headers.insert("".into(), "x".into()); }
            => "otel.headers", "not a valid header name";
        reject |c| { c.otel.headers.insert("Authorization".into(), "Bearer x\r\nX-Evil: 1".into()); }
            => "otel.headers.Authorization", "control or non-ASCII";
        accept |c| { c.otel.headers.insert("Authorization".into(), "Bearer abc/+=".into()); };
        accept |c| { c.otel.headers.insert("x-scope-orgid".into(), "tenant 1".into()); };
    }
    rule! { interfaces_not_empty:
        reject |c| c.interfaces = interfaces(&[]) => "interfaces", "is empty";
        accept |c| c.interfaces = interfaces(&["eth0"]);
    }
    rule! { interface_names_valid:
        reject |c| c.interfaces = interfaces(&["eth0", ""])
            => "interfaces[1]", "not a valid interface";
        reject |c| c.interfaces = interfaces(&["sixteen-chars-xx"])
            => "interfaces[0]", "1-15 characters";
        reject |c| c.interfaces = interfaces(&["eth/0"])
            => "interfaces[0]", "not a valid interface";
        reject |c| c.interfaces = interfaces(&["eth 0"])
            => "interfaces[0]", "not a valid interface";
        reject |c| c.interfaces = interfaces(&["eth0:1"])
            => "interfaces[0]", "not a valid interface";
        reject |c| c.interfaces = interfaces(&[".."]) => "interfaces[0]", "not a valid interface";
        accept |c| c.interfaces = interfaces(&["fifteen-chars-x", "enp3s0f1.100", "x"]);
    }
    rule! { interfaces_unique:
        reject |c| c.interfaces = interfaces(&["eth0", "eth0"])
            => "interfaces[1]", "`eth0` repeats interfaces[0]";
        accept |c| c.interfaces = interfaces(&["eth0", "eth1"]);
    }
    rule! { snat_ip_unicast:
        reject |c| c.snat_ip = Some(Ipv4Addr::UNSPECIFIED) => "snat_ip", "not a unicast";
        accept |c| c.snat_ip = Some([10, 0, 0, 9].into());
    }
    rule! { snat_ips_pool:
        reject |c| c.snat_ips = Some(vec![]) => "snat_ips", "allowed 1..=16";
        reject |c| c.snat_ips = Some((1..=17).map(|i| Ipv4Addr::new(10, 0, 1, i)).collect())
            => "snat_ips", "has 17 addresses";
        reject |c| c.snat_ips = Some(vec![[10, 0, 0, 9].into(), Ipv4Addr::BROADCAST])
            => "snat_ips[1]", "not a unicast";
        reject |c| c.snat_ips = Some(vec![[10, 0, 0, 9].into(), [10, 0, 0, 9].into()])
            => "snat_ips[1]", "repeats snat_ips[0]";
        reject |c| { c.snat_ip = Some([10, 0, 0, 8].into()); c.snat_ips = Some(vec![[10, 0, 0, 9].into()]) }
            => "snat_ips", "use one of the two";
        accept |c| c.snat_ips = Some(vec![[10, 0, 0, 9].into(), [10, 0, 0, 10].into()]);
    }
    #[test]
    fn rate_limits_default_per_kind_and_parse_partially() {
        let d = base().rate_limits;
        assert_eq!((d.icmp.per_sec, d.icmp.burst, d.rst.per_sec), (1000, 50, 1000));
        assert_eq!((d.drain_rst.per_sec, d.drain_rst.burst), (10_000, 1000));
        let yaml = format!("{MINIMAL}rate_limits:\n  drain_rst: {{per_sec: 0, burst: 1}}\n");
        let c = Config::parse(&yaml, "t.yaml").unwrap();
        assert_eq!(c.rate_limits.drain_rst, RateLimit { per_sec: 0, burst: 1 });
        assert_eq!(c.rate_limits.icmp, d.icmp);
        let e = Config::parse(&format!("{MINIMAL}rate_limits:\n  rst: {{per_sec: 5}}\n"), "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("rate_limits.rst") && e.contains("burst"), "{e}");
    }

    rule! { rate_limits_in_range:
        reject |c| c.rate_limits.icmp.burst = 0 => "rate_limits.icmp.burst", "out of range";
        reject |c| c.rate_limits.rst.per_sec = 2_000_000 => "rate_limits.rst.per_sec", "out of range";
        reject |c| c.rate_limits.drain_rst.burst = 1_000_001 => "rate_limits.drain_rst.burst", "out of range";
        accept |c| c.rate_limits.drain_rst = RateLimit { per_sec: 0, burst: 1 };
        accept |c| c.rate_limits.icmp = RateLimit { per_sec: 1_000_000, burst: 1_000_000 };
    }

    #[test]
    fn syn_proxy_is_auto_unless_set() {
        assert_eq!((base().syn_proxy, base().syn_proxy_threshold), (SynProxy::Auto, 2000));
        let c =
            Config::parse(&format!("{MINIMAL}syn_proxy: on\nsyn_proxy_threshold: 10\n"), "t.yaml").unwrap();
        assert_eq!((c.syn_proxy, c.syn_proxy_threshold), (SynProxy::On, 10));
        let e = Config::parse(&format!("{MINIMAL}syn_proxy: yes\n"), "t.yaml").unwrap_err().to_string();
        assert!(e.contains("syn_proxy") && e.contains("auto"), "{e}");
        let e =
            Config::parse(&format!("{MINIMAL}syn_proxy_threshold: 0\n"), "t.yaml").unwrap_err().to_string();
        assert!(e.contains("syn_proxy_threshold") && e.contains("out of range"), "{e}");
    }

    #[test]
    fn unknown_flow_is_rst_unless_set_to_drop() {
        assert_eq!(base().unknown_flow, UnknownFlow::Rst);
        let c = Config::parse(&format!("{MINIMAL}unknown_flow: drop\n"), "t.yaml").unwrap();
        assert_eq!(c.unknown_flow, UnknownFlow::Drop);
        let e = Config::parse(&format!("{MINIMAL}unknown_flow: reset\n"), "t.yaml").unwrap_err().to_string();
        assert!(e.contains("unknown_flow") && e.contains("rst"), "{e}");
    }

    rule! { expected_connection_rate_positive:
        reject |c| c.expected_connection_rate = Some(0) => "expected_connection_rate", "is 0";
        accept |c| c.expected_connection_rate = Some(500);
    }
    rule! { conntrack_capacity_range:
        reject |c| c.conntrack_capacity = 0 => "conntrack_capacity", "allowed 1..=50000000";
        reject |c| c.conntrack_capacity = 50_000_001 => "conntrack_capacity", "out of range";
        accept |c| c.conntrack_capacity = 1;
        accept |c| c.conntrack_capacity = 50_000_000;
    }
    rule! { maglev_table_size_range:
        reject |c| c.maglev_table_size = 241 => "maglev_table_size", "allowed 251..=1000003";
        reject |c| c.maglev_table_size = 1_000_033 => "maglev_table_size", "out of range";
        accept |c| c.maglev_table_size = 251;
        accept |c| c.maglev_table_size = 1_000_003;
    }
    rule! { maglev_table_size_prime:
        reject |c| c.maglev_table_size = 65_536
            => "maglev_table_size", "not prime; Maglev needs a prime, e.g. 65537";
        accept |c| c.maglev_table_size = 65_521;
    }

    fn check(kind: CheckType) -> HealthCheck {
        let mut hc = HealthCheck {
            kind,
            port: None,
            path: None,
            expect_status: None,
            interval_ms: 1000,
            timeout_ms: 500,
            rise: 2,
            fall: 3,
        };
        hc.fill_defaults(&base().ports);
        hc
    }

    fn hc(c: &mut Config) -> &mut HealthCheck {
        c.health_check.get_or_insert_with(|| check(CheckType::Tcp))
    }

    fn http(c: &mut Config) -> &mut HealthCheck {
        c.health_check.insert(check(CheckType::Http))
    }

    #[test]
    fn health_check_is_off_unless_set_and_fills_its_defaults() {
        assert_eq!(base().health_check, None);
        assert!(base().to_yaml().contains("health_check: null\n"));
        let c = Config::parse(&format!("{MINIMAL}health_check: {{}}\n"), "t.yaml").unwrap();
        let hc = c.health_check.clone().unwrap();
        assert_eq!(hc, check(CheckType::Tcp));
        assert_eq!((hc.port, hc.interval_ms, hc.timeout_ms, hc.rise, hc.fall), (Some(8080), 1000, 500, 2, 3));
        assert_eq!((hc.path, hc.expect_status), (None, None), "tcp has no path or statuses");
        let yaml = c.to_yaml();
        assert!(yaml.contains("health_check:\n  type: tcp\n  port: 8080\n"), "{yaml}");
        assert_eq!(Config::parse(&yaml, "out").unwrap(), c);

        let c = Config::parse(&format!("{MINIMAL}health_check: {{type: http}}\n"), "t.yaml").unwrap();
        let hc = c.health_check.clone().unwrap();
        assert_eq!(
            (hc.path.as_deref(), hc.expect_status),
            (Some("/"), Some(StatusRange { min: 200, max: 399 }))
        );
        let yaml = c.to_yaml();
        assert!(yaml.contains("path: /\n") && yaml.contains("expect_status: 200-399\n"), "{yaml}");
        assert_eq!(Config::parse(&yaml, "out").unwrap(), c);

        let text = format!(
            "{MINIMAL}health_check: {{type: http, port: 9000, path: /healthz, expect_status: 204, \
             interval_ms: 200, timeout_ms: 100, rise: 1, fall: 5}}\n"
        );
        let hc = Config::parse(&text, "t.yaml").unwrap().health_check.unwrap();
        assert_eq!(hc.port, Some(9000));
        assert_eq!(hc.path.as_deref(), Some("/healthz"));
        assert_eq!(hc.expect_status, Some(StatusRange { min: 204, max: 204 }));
        assert_eq!((hc.interval_ms, hc.timeout_ms, hc.rise, hc.fall), (200, 100, 1, 5));
    }

    #[test]
    fn health_check_shape_errors() {
        let fails = |v: &str, needle| parse_fails(&format!("{MINIMAL}health_check: {v}\n"), needle);
        fails("{type: udp}", "health_check.type: unknown variant `udp`, expected `tcp` or `http`");
        fails(
            "{type: http, expect_status: 2xx}",
            "health_check.expect_status: invalid value: string \"2xx\"",
        );
        fails("{type: http, expect_status: -1}", "health_check.expect_status: invalid value");
        fails("{interval: 5}", "health_check.interval: unknown field `interval`, expected one of");
        fails("{port: 70000}", "health_check.port");
    }

    rule! { health_check_port_nonzero:
        reject |c| hc(c).port = Some(0) => "health_check.port", "allowed 1..=65535";
        accept |c| hc(c).port = Some(65535);
    }
    rule! { health_check_path_http_only:
        reject |c| hc(c).path = Some("/healthz".into()) => "health_check.path", "type: http only";
        accept |c| http(c).path = Some("/healthz".into());
    }
    rule! { health_check_path_is_a_request_path:
        reject |c| http(c).path = Some("healthz".into()) => "health_check.path", "must start with '/'";
        reject |c| http(c).path = Some("/a b".into()) => "health_check.path", "without spaces";
        reject |c| http(c).path = Some("/a\r\nX: y".into()) => "health_check.path", "printable ASCII";
        accept |c| http(c).path = Some("/status/ready?full=1".into());
    }
    rule! { health_check_expect_status_range:
        reject |c| hc(c).expect_status = Some(StatusRange::default()) => "health_check.expect_status", "type: http only";
        reject |c| http(c).expect_status = Some(StatusRange { min: 99, max: 200 }) => "health_check.expect_status", "allowed 100..=599";
        reject |c| http(c).expect_status = Some(StatusRange { min: 300, max: 200 }) => "health_check.expect_status", "300-200 is empty";
        accept |c| http(c).expect_status = Some(StatusRange { min: 100, max: 599 });
        accept |c| http(c).expect_status = Some(StatusRange { min: 204, max: 204 });
    }
    rule! { health_check_interval_ms_range:
        reject |c| hc(c).interval_ms = 49 => "health_check.interval_ms", "allowed 50..=3600000";
        reject |c| hc(c).interval_ms = 3_600_001 => "health_check.interval_ms", "out of range";
        accept |c| { hc(c).interval_ms = 50; hc(c).timeout_ms = 50; };
        accept |c| hc(c).interval_ms = 3_600_000;
    }
    rule! { health_check_timeout_ms_within_interval:
        reject |c| hc(c).timeout_ms = 0 => "health_check.timeout_ms", "allowed 1..=1000";
        reject |c| hc(c).timeout_ms = 1001 => "health_check.timeout_ms", "allowed 1..=1000";
        accept |c| hc(c).timeout_ms = 1000;
        accept |c| hc(c).timeout_ms = 1;
    }
    rule! { health_check_rise_1_to_100:
        reject |c| hc(c).rise = 0 => "health_check.rise", "allowed 1..=100";
        reject |c| hc(c).rise = 101 => "health_check.rise", "out of range";
        accept |c| hc(c).rise = 1;
        accept |c| hc(c).rise = 100;
    }
    rule! { health_check_fall_1_to_100:
        reject |c| hc(c).fall = 0 => "health_check.fall", "allowed 1..=100";
        reject |c| hc(c).fall = 101 => "health_check.fall", "out of range";
        accept |c| hc(c).fall = 1;
        accept |c| hc(c).fall = 100;
    }

    fn ph(c: &mut Config) -> &mut PassiveHealth {
        c.passive_health.get_or_insert_with(PassiveHealth::default)
    }

    #[test]
    fn passive_health_is_off_unless_set_and_fills_its_defaults() {
        assert_eq!(base().passive_health, None);
        let c = Config::parse(&format!("{MINIMAL}passive_health: {{}}\n"), "t.yaml").unwrap();
        assert_eq!(c.passive_health, Some(PassiveHealth { syn_timeout_ms: 1000, rst_on_syn: true, fall: 5 }));
        assert!(c
            .to_yaml()
            .contains("passive_health:\n  syn_timeout_ms: 1000\n  rst_on_syn: true\n  fall: 5\n"));
        let text = format!("{MINIMAL}passive_health: {{syn_timeout_ms: 300, rst_on_syn: false, fall: 2}}\n");
        let p = Config::parse(&text, "t.yaml").unwrap().passive_health.unwrap();
        assert_eq!(p, PassiveHealth { syn_timeout_ms: 300, rst_on_syn: false, fall: 2 });
        let fails = |v: &str, needle| parse_fails(&format!("{MINIMAL}passive_health: {v}\n"), needle);
        fails("{syn_timeout: 5}", "passive_health.syn_timeout: unknown field `syn_timeout`, expected one of");
        fails("{rst_on_syn: maybe}", "passive_health.rst_on_syn: invalid type");
        fails("{fall: -1}", "passive_health.fall: invalid type: integer `-1`");
    }

    rule! { passive_health_syn_timeout_ms_range:
        reject |c| ph(c).syn_timeout_ms = 99 => "passive_health.syn_timeout_ms", "allowed 100..=20000";
        reject |c| ph(c).syn_timeout_ms = 20_001 => "passive_health.syn_timeout_ms", "out of range";
        accept |c| ph(c).syn_timeout_ms = 100;
        accept |c| ph(c).syn_timeout_ms = 20_000;
    }
    rule! { passive_health_fall_1_to_100:
        reject |c| ph(c).fall = 0 => "passive_health.fall", "allowed 1..=100";
        reject |c| ph(c).fall = 101 => "passive_health.fall", "out of range";
        accept |c| ph(c).fall = 1;
        accept |c| ph(c).fall = 100;
    }
    rule! { passive_health_rst_on_syn_either_way:
        reject |c| { ph(c).rst_on_syn = false; ph(c).fall = 0; } => "passive_health.fall", "out of range";
        accept |c| ph(c).rst_on_syn = false;
        accept |c| ph(c).rst_on_syn = true;
    }
}
