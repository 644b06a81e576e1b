#![allow(clippy::unwrap_used)]
//! Integration tests, one binary.

mod profiles;
