//! Integration tests of the job queue, each run on SQLite and on the throwaway
//! PostgreSQL of `scripts/test` (`SCALESHOP_TEST_PG_URL`).
//!
//! The handlers are test code: a successful run writes a row into a table the test
//! creates (`job_effects`), `on_dead` writes into `job_dead_notes` in the
//! transaction that marks the job dead; every run is also remembered in memory.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    dead_code,
    reason = "test code: a failed expectation is a failed test"
)]

mod helpers;

mod concurrency;
mod delays;
mod enqueue;
mod failures;
mod lease;
mod recovery;
mod shutdown;
