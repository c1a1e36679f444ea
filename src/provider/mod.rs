//! Backend providers: each yields the current backend set. The static
//! provider reads it from the config; Kubernetes discovery comes later.

pub mod static_list;

use std::net::Ipv4Addr;

/// A backend as providers describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub name: String,
    pub addr: Ipv4Addr,
    pub weight: u32,
}
