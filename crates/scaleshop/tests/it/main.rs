//! Process-level tests: the real `scaleshop` binary, started, killed with SIGKILL,
//! restarted, stopped with SIGTERM; driven over HTTP like a client. On SQLite and
//! on the throwaway PostgreSQL of `scripts/test`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    dead_code,
    reason = "test code: a failed expectation is a failed test"
)]

mod process;

mod cache;
mod cli;
mod cluster;
mod crash;
mod deploy;
mod faults;
mod hashing;
mod keys;
mod loadtest;
mod projections;
mod recovery;
mod saga_crash;
mod shards;
mod signals;
mod split;
mod takeover;
mod targets;
mod traces;
