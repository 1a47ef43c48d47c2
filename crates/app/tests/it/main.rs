//! Integration tests: each test starts the whole app on port 0 with a fresh
//! database and drives it over HTTP like a client. Every storage-touching test runs
//! twice, on SQLite and on a real PostgreSQL (`scripts/test` starts a throwaway
//! cluster and exports `SCALESHOP_TEST_PG_URL`).
//!
//! One test binary for the crate (faster linking); modules by subject.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    dead_code,
    reason = "test code: a failed expectation is a failed test"
)]

mod helpers;

mod commerce;
mod conventions;
mod hashing;
mod lifecycle;
mod limits;
mod listing;
mod media;
mod messaging;
mod operations;
mod ratelimit;
mod replicas;
mod search;
mod sessions;
mod shards;
mod users;
