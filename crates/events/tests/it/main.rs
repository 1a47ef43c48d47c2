//! Integration tests of the event log and the dispatcher, each run on SQLite and on
//! the throwaway PostgreSQL of `scripts/test` (`SCALESHOP_TEST_PG_URL`).
//!
//! The consumers are test code: their handler writes a row into a table the test
//! creates (`effects`), in the dispatcher's transaction, so what was delivered is
//! observable in the database; they also remember every call in memory.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    dead_code,
    reason = "test code: a failed expectation is a failed test"
)]

mod helpers;

mod dead;
mod deadlock;
mod dedup;
mod delivery;
mod lease;
mod nats;
mod retry;
mod versions;
mod wake;
