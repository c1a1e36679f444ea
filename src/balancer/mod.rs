//! Backend selection: the Maglev table.
//!
//! A backend set becomes a fixed-size lookup table (`slot -> backend`) built with weighted
//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI'16). The data plane hashes a new flow's 5-tuple to a slot and sends the
//! flow to that slot's backend; established flows are pinned by conntrack, so the table only
//! decides where *new* connections go.
//!
//! Properties the table gives (and the unit tests check):
//! - every slot is owned when the set is non-empty;
//! - the table depends only on the *set* of backends (identity = [`Backend::key`]) and their
//!   weights, never on the order they arrive in, the process, or the Rust version;
//! - shares follow the weights;
//! - removing one backend moves few slots between the remaining backends, and adding it back
//!   restores the previous table exactly.

mod maglev;
mod set;

pub use maglev::{is_prime, maglev_table, Backend};
pub mod feed;
pub use set::{BackendSet, Changes, Prepared, Table};
