//! Host network facts.
