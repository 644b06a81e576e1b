//! Gateway configuration.
pub mod diag;
