//! The xlb.yaml schema.
