//! The composition root of scaleshop: reads the configuration, opens the platform
//! parts (database, later cache, bus, queue), starts the modules of the chosen
//! target, assembles one router and runs it until a shutdown signal.
//!
//! This is the only crate that knows every service; services never know each other
//! except through their public APIs and events.

mod breaker;
mod clients;
pub mod config;
mod invalidation;
pub mod keys;
mod listener;
mod local;
pub mod lock;
pub mod modules;
mod ops;
pub mod projections;
mod ratelimit;
mod read_models;
mod recovery;
pub mod registry;
pub mod server;
pub mod service_client;
pub mod shards;

pub use config::{Config, Overrides};
pub use lock::DataDirLock;
pub use modules::{Module, Service, Target};
pub use server::{App, StartError, bind, open_database, serve, shutdown_signal};
