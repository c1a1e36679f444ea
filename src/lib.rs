//! XLB: an XDP Layer-4 load balancer. Data flows one way: config ->
//! provider -> balancer -> data plane; status and admin only read.

pub mod accounting;
pub mod admin;
pub mod balancer;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod health;
pub mod ifaces;
pub mod inspect;
pub mod lifecycle;
pub mod netinfo;
pub mod nexthops;
pub mod provider;
pub mod reload;
pub mod status;
pub mod status_refresh;
pub mod sweep;
pub mod telemetry;
pub mod triggers;
