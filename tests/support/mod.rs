//! Shared fixtures for the integration tests.
#![allow(dead_code)]
