//! XLB: an XDP Layer-4 load balancer. See README.md for the tour.

pub mod balancer;
pub mod config;
pub mod dataplane;
pub mod netinfo;
