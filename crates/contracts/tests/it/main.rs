//! Tests of the contracts: the wire form of every event, and the version rules.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed expectation is a failed test"
)]

mod versions;
mod wire;
