//! Configuration: read in this one place, validated at start, handed down as typed
//! values. Precedence: defaults < TOML file (`--config`) < `SCALESHOP_*` environment
//! < command-line flags. An unknown key in the file, or a value of the wrong type
//! anywhere, stops the start with a message naming the key and where it came from.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// A value that must never be printed (passwords, secrets, URLs with credentials).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Every setting. Field names are the TOML keys; `SCALESHOP_` + upper-case name is
/// the environment variable.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the API listens; `:PORT` means every interface (`:0` picks a free port).
    pub http_addr: String,
    /// Embedded state: the SQLite database, mail files, image files (and the
    /// `signing.key` of earlier versions, imported into the key store).
    pub data_dir: PathBuf,
    /// `postgres://...` moves every service's data to PostgreSQL; unset = SQLite.
    pub database_url: Option<Secret>,
    /// Comma list of `postgres://...` streaming replicas of `database_url`: reads
    /// that tolerate staleness go to a healthy one. Unset: every read on the
    /// primary.
    pub read_replica_urls: Option<Secret>,
    /// Comma list of `postgres://...` shard databases (with a PostgreSQL
    /// `database_url`): users and their sessions live in hash slots spread over
    /// them, the main database keeps the shard map and the directory of
    /// addresses. The list may only grow, in the same order. Unset: no shards.
    pub shard_urls: Option<Secret>,
    /// Embedded sharding (SQLite): this many shard files in `data_dir/shards`.
    /// 0: no shards.
    pub shards: u32,
    /// A replica further behind than this gets no reads.
    pub replica_max_lag_ms: u64,
    /// How long a read with a consistency token waits for a replica that has the
    /// write before it reads the primary.
    pub replica_wait_ms: u64,
    /// How long a read waits for a read model (search index, product listing,
    /// order history) to apply the log up to its head as it is at the read
    /// before the command side answers it.
    pub projection_wait_ms: u64,
    /// Keep the product search projection (a tantivy index in
    /// `data_dir/search`); off: searches read the products table.
    pub search_enabled: bool,
    pub admin_email: Option<String>,
    pub admin_password: Option<Secret>,
    /// Send email over SMTP instead of writing `.eml` files.
    pub smtp_url: Option<Secret>,
    /// One static signing secret for tokens, cursors and consistency tokens (at
    /// least 32 characters), overriding the key store. Unset: the keys live in the
    /// database, shared by every instance, and rotate with `scaleshop keys rotate`.
    pub jwt_secret: Option<Secret>,
    /// Lifetime of a session token, in seconds.
    pub token_ttl_secs: u64,
    /// How often a process reloads the signing keys from the database (a rotation
    /// elsewhere becomes its signing key within this time), in seconds.
    pub key_refresh_secs: u64,
    pub db_max_connections: u32,
    pub db_min_connections: u32,
    pub db_idle_timeout_secs: u64,
    pub db_acquire_timeout_ms: u64,
    /// Upper bound of one SQL statement.
    pub db_statement_timeout_ms: u64,
    /// Upper bound of one HTTP request.
    pub request_timeout_ms: u64,
    /// A request head must arrive complete within this, counted from when the
    /// server starts waiting for it.
    pub http_header_read_timeout_ms: u64,
    /// A connection with no bytes moving either way for this long is closed.
    pub http_idle_timeout_ms: u64,
    /// Connections served at once; more wait in the accept queue.
    pub http_max_connections: u32,
    /// Sign-in attempts per client address per minute.
    pub login_rate_per_address: u32,
    /// Sign-in attempts per email per minute.
    pub login_rate_per_email: u32,
    /// Sign-ups per client address per minute. Unset: `login_rate_per_address`.
    pub signup_rate_per_address: Option<u32>,
    /// Password hashes (argon2id, 19 MiB each) running at once in one process.
    /// Unset: the number of cores.
    pub password_hash_concurrency: Option<u32>,
    /// How long a sign-up, sign-in or password change waits for a hashing slot
    /// before a 503 with `Retry-After` (less than `request_timeout_ms`).
    pub password_hash_queue_ms: u64,
    /// Sender of every email.
    pub smtp_from: String,
    /// Upper bound of one SMTP exchange.
    pub smtp_timeout_ms: u64,
    /// Delivery attempts of an event to one consumer before it is parked as dead.
    pub event_max_attempts: u32,
    /// First retry delay of a failing event handler (doubles each attempt, with jitter).
    pub event_min_backoff_ms: u64,
    pub event_max_backoff_ms: u64,
    /// How long a process holds a consumer of the event log without renewing (a
    /// dead process's consumers move after this).
    pub event_lease_ms: u64,
    /// How often a heartbeat renews the consumer leases (unset: a quarter of
    /// `event_lease_ms`); must be less than the lease.
    pub event_lease_renew_ms: Option<u64>,
    /// Safety-net poll of the event log: commits wake the dispatchers at once (in
    /// this process, and through `LISTEN` from others on PostgreSQL).
    pub event_poll_ms: u64,
    /// How long a worker holds a job without renewing (a dead worker's job runs
    /// again after this).
    pub job_lease_ms: u64,
    /// How often a running job's lease is renewed (unset: a quarter of
    /// `job_lease_ms`); must be less than the lease.
    pub job_lease_renew_ms: Option<u64>,
    /// Safety-net poll of the job queue: commits and due times wake the workers.
    pub job_poll_ms: u64,
    /// First retry delay of a failed job (doubles each attempt, with jitter).
    pub job_min_backoff_ms: u64,
    pub job_max_backoff_ms: u64,
    /// Jobs of the `email` queue running at once in one process.
    pub email_concurrency: u32,
    /// Order sagas (`orders` queue) running at once in one process.
    pub order_concurrency: u32,
    /// Attempts of one order's saga (a payment provider error is retried until the
    /// last one, then the order fails with `payment_error`).
    pub order_max_attempts: u32,
    /// Tests only (default 0 = off): this share of the charges the sandbox payment
    /// gateway makes lose their answer (the charge is made; the caller sees a
    /// provider timeout and must ask again with the same key). 0..=100.
    pub payments_sandbox_lost_answer_percent: u8,
    /// Image jobs (`images` queue) running at once in one process (decoding is
    /// CPU-bound: about one per core).
    pub images_concurrency: u32,
    /// Upper bound of one object-storage call (image files).
    pub image_storage_timeout_ms: u64,
    /// The folder of image files without `s3_bucket` (unset: `data_dir/images`).
    /// Instances that serve the same images share it (a shared volume), or use S3.
    pub image_dir: Option<PathBuf>,
    /// Keep image files in this S3 bucket instead of the data folder.
    pub s3_bucket: Option<String>,
    /// URL of an S3-compatible service (such as `http://127.0.0.1:9000`), addressed
    /// path-style; unset: AWS S3.
    pub s3_endpoint: Option<String>,
    pub s3_region: String,
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<Secret>,
    /// Allow a plain-http `s3_endpoint` (a service on the same host or network).
    pub s3_allow_http: bool,
    /// Tests only: made-up `.test` host names the image fetcher resolves to the
    /// given addresses, exempt from the SSRF address rules (so a test can fetch from
    /// a server on 127.0.0.1). Not a key: no file, variable or flag can set it
    /// (`serde(skip)`), only code that builds a `Config`; names outside `.test` are
    /// refused; empty (the default) changes nothing.
    #[serde(skip)]
    pub image_fetch_test_hosts: scaleshop_media::HostOverrides,
    /// `redis://[:password@]host:port`: the shared L2 cache and cross-process
    /// invalidation. Unset: an in-process cache only.
    pub redis_url: Option<Secret>,
    /// Upper bound of one Redis call; failures fall back to the database.
    pub redis_timeout_ms: u64,
    /// `nats://[user:password@]host:port`: carry the event log between
    /// processes over NATS JetStream (a relay from the outbox, durable pull
    /// consumers). Unset: every process reads the log from the database.
    pub nats_url: Option<Secret>,
    /// Upper bound of one NATS request (publish acknowledgement, info, ack).
    pub nats_timeout_ms: u64,
    /// Copies of the event streams on a NATS cluster (1 on one server).
    pub nats_replicas: u64,
    /// How long the broker waits for a consumer's ack before it redelivers.
    pub nats_ack_wait_ms: u64,
    /// The window within which the broker drops a republished event (by its id).
    pub nats_duplicate_window_secs: u64,
    /// How long the event stream keeps an event (the outbox keeps them all).
    pub nats_max_age_secs: u64,
    /// `false` turns the read cache off (every read goes to the database): the
    /// baseline that shows what the cache buys (the loadtest lab's `cache-off`).
    pub cache_enabled: bool,
    pub cache_l1_ttl_secs: u64,
    pub cache_l1_capacity: u64,
    pub cache_l2_ttl_secs: u64,
    /// How long a missing id is remembered as missing.
    pub cache_negative_ttl_secs: u64,
    /// How long a process may keep a user's session state (epoch, signed-out
    /// tokens) without reading it again: the bound on a revocation whose
    /// invalidation never reached the process.
    pub session_cache_ttl_secs: u64,
    /// Where each service answers when another process runs it (`http://host:port`):
    /// a target that calls a service it does not run needs its address.
    pub service_url_users: Option<String>,
    pub service_url_inventory: Option<String>,
    pub service_url_catalog: Option<String>,
    pub service_url_payments: Option<String>,
    pub service_url_orders: Option<String>,
    pub service_url_notifications: Option<String>,
    pub service_url_media: Option<String>,
    /// Upper bound of one call to another service over HTTP (one try).
    pub service_timeout_ms: u64,
    /// Further tries of a call to another service that is safe to repeat.
    pub service_retries: u32,
    /// Failures in a row after which calls to a service fail fast (the breaker opens).
    pub service_breaker_failures: u32,
    /// How long an open breaker fails calls fast before one trial call goes through.
    pub service_breaker_open_ms: u64,
    /// Log filter when `RUST_LOG` is unset.
    pub log_filter: String,
    /// The OpenTelemetry collector's OTLP/HTTP address (`http://host:4318`):
    /// traces are exported there when set, and cost next to nothing when not.
    pub otlp_endpoint: Option<String>,
    /// The share of new traces recorded (0.0 to 1.0); a trace that arrives with
    /// a parent follows the parent's decision.
    pub otlp_sample_ratio: f64,
    /// How long SIGTERM waits for in-flight requests, in seconds.
    pub shutdown_grace_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http_addr: "127.0.0.1:8080".to_owned(),
            data_dir: PathBuf::from("./data"),
            database_url: None,
            read_replica_urls: None,
            shard_urls: None,
            shards: 0,
            replica_max_lag_ms: 1000,
            replica_wait_ms: 200,
            projection_wait_ms: 200,
            search_enabled: true,
            admin_email: None,
            admin_password: None,
            smtp_url: None,
            jwt_secret: None,
            token_ttl_secs: 24 * 3600,
            key_refresh_secs: 30,
            db_max_connections: 20,
            db_min_connections: 5,
            db_idle_timeout_secs: 30,
            db_acquire_timeout_ms: 2000,
            db_statement_timeout_ms: 5000,
            request_timeout_ms: 15_000,
            http_header_read_timeout_ms: 10_000,
            http_idle_timeout_ms: 5_000,
            http_max_connections: 10_000,
            login_rate_per_address: 30,
            login_rate_per_email: 10,
            signup_rate_per_address: None,
            password_hash_concurrency: None,
            password_hash_queue_ms: 2000,
            smtp_from: "scaleshop <noreply@scaleshop.invalid>".to_owned(),
            smtp_timeout_ms: 10_000,
            event_max_attempts: 8,
            event_min_backoff_ms: 100,
            event_max_backoff_ms: 30_000,
            event_lease_ms: 6000,
            event_lease_renew_ms: None,
            event_poll_ms: 300_000,
            job_lease_ms: 4000,
            job_lease_renew_ms: None,
            job_poll_ms: 300_000,
            job_min_backoff_ms: 500,
            job_max_backoff_ms: 300_000,
            email_concurrency: 5,
            order_concurrency: 8,
            order_max_attempts: 5,
            payments_sandbox_lost_answer_percent: 0,
            images_concurrency: 2,
            image_storage_timeout_ms: 10_000,
            image_dir: None,
            s3_bucket: None,
            s3_endpoint: None,
            s3_region: "us-east-1".to_owned(),
            s3_access_key_id: None,
            s3_secret_access_key: None,
            s3_allow_http: false,
            image_fetch_test_hosts: scaleshop_media::HostOverrides::default(),
            redis_url: None,
            redis_timeout_ms: 50,
            nats_url: None,
            nats_timeout_ms: 5000,
            nats_replicas: 1,
            nats_ack_wait_ms: 30_000,
            nats_duplicate_window_secs: 120,
            nats_max_age_secs: 7 * 24 * 3600,
            cache_enabled: true,
            cache_l1_ttl_secs: 300,
            cache_l1_capacity: 100_000,
            cache_l2_ttl_secs: 3600,
            cache_negative_ttl_secs: 10,
            session_cache_ttl_secs: 60,
            service_url_users: None,
            service_url_inventory: None,
            service_url_catalog: None,
            service_url_payments: None,
            service_url_orders: None,
            service_url_notifications: None,
            service_url_media: None,
            service_timeout_ms: 2000,
            service_retries: 2,
            service_breaker_failures: 5,
            service_breaker_open_ms: 2000,
            log_filter: "info".to_owned(),
            otlp_endpoint: None,
            otlp_sample_ratio: 1.0,
            shutdown_grace_secs: 20,
        }
    }
}

/// The keys read from `SCALESHOP_*` variables (others with that prefix are ignored).
const ENV_KEYS: &[&str] = &[
    "http_addr",
    "data_dir",
    "database_url",
    "read_replica_urls",
    "shard_urls",
    "shards",
    "replica_max_lag_ms",
    "replica_wait_ms",
    "projection_wait_ms",
    "search_enabled",
    "admin_email",
    "admin_password",
    "smtp_url",
    "jwt_secret",
    "token_ttl_secs",
    "key_refresh_secs",
    "db_max_connections",
    "db_min_connections",
    "db_idle_timeout_secs",
    "db_acquire_timeout_ms",
    "db_statement_timeout_ms",
    "request_timeout_ms",
    "http_header_read_timeout_ms",
    "http_idle_timeout_ms",
    "http_max_connections",
    "login_rate_per_address",
    "login_rate_per_email",
    "signup_rate_per_address",
    "password_hash_concurrency",
    "password_hash_queue_ms",
    "smtp_from",
    "smtp_timeout_ms",
    "event_max_attempts",
    "event_min_backoff_ms",
    "event_max_backoff_ms",
    "event_lease_ms",
    "event_lease_renew_ms",
    "event_poll_ms",
    "job_lease_ms",
    "job_lease_renew_ms",
    "job_poll_ms",
    "job_min_backoff_ms",
    "job_max_backoff_ms",
    "email_concurrency",
    "order_concurrency",
    "order_max_attempts",
    "payments_sandbox_lost_answer_percent",
    "images_concurrency",
    "image_storage_timeout_ms",
    "image_dir",
    "s3_bucket",
    "s3_endpoint",
    "s3_region",
    "s3_access_key_id",
    "s3_secret_access_key",
    "s3_allow_http",
    "redis_url",
    "redis_timeout_ms",
    "nats_url",
    "nats_timeout_ms",
    "nats_replicas",
    "nats_ack_wait_ms",
    "nats_duplicate_window_secs",
    "nats_max_age_secs",
    "cache_enabled",
    "cache_l1_ttl_secs",
    "cache_l1_capacity",
    "cache_l2_ttl_secs",
    "cache_negative_ttl_secs",
    "session_cache_ttl_secs",
    "service_url_users",
    "service_url_inventory",
    "service_url_catalog",
    "service_url_payments",
    "service_url_orders",
    "service_url_notifications",
    "service_url_media",
    "service_timeout_ms",
    "service_retries",
    "service_breaker_failures",
    "service_breaker_open_ms",
    "log_filter",
    "otlp_endpoint",
    "otlp_sample_ratio",
    "shutdown_grace_secs",
];

/// The URLs of a comma list (blanks dropped).
fn url_list(list: Option<&Secret>) -> Vec<String> {
    list.map(|list| {
        list.expose()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    })
    .unwrap_or_default()
}

/// A configuration that cannot start the server.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Layers the sources; `overrides` (from flags) win.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        let config: Config = figment
            .merge(Env::prefixed("SCALESHOP_").only(ENV_KEYS))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|e| ConfigError(describe(&e)))?;
        config.validate()?;
        Ok(config)
    }

    /// The configured address of `service` (`service_url_<name>`), if any.
    pub fn service_url(&self, service: crate::modules::Service) -> Option<&str> {
        self.service_url_slot(service).as_deref()
    }

    /// Sets the address of `service` (`service_url_<name>`), as a deployment that
    /// builds its configuration in code does.
    pub fn set_service_url(&mut self, service: crate::modules::Service, url: impl Into<String>) {
        *self.service_url_slot_mut(service) = Some(url.into());
    }

    fn service_url_slot(&self, service: crate::modules::Service) -> &Option<String> {
        use crate::modules::Service;
        match service {
            Service::Users => &self.service_url_users,
            Service::Inventory => &self.service_url_inventory,
            Service::Catalog => &self.service_url_catalog,
            Service::Payments => &self.service_url_payments,
            Service::Orders => &self.service_url_orders,
            Service::Notifications => &self.service_url_notifications,
            Service::Media => &self.service_url_media,
        }
    }

    fn service_url_slot_mut(&mut self, service: crate::modules::Service) -> &mut Option<String> {
        use crate::modules::Service;
        match service {
            Service::Users => &mut self.service_url_users,
            Service::Inventory => &mut self.service_url_inventory,
            Service::Catalog => &mut self.service_url_catalog,
            Service::Payments => &mut self.service_url_payments,
            Service::Orders => &mut self.service_url_orders,
            Service::Notifications => &mut self.service_url_notifications,
            Service::Media => &mut self.service_url_media,
        }
    }

    /// Rules beyond types; each message names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        if let Some(url) = &self.redis_url {
            let url = url.expose();
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return bad("redis_url", "expected redis://... or rediss://...");
            }
        }
        if let Some(url) = &self.nats_url {
            let url = url.expose();
            if !["nats://", "tls://", "ws://", "wss://"]
                .iter()
                .any(|scheme| url.starts_with(scheme))
            {
                return bad(
                    "nats_url",
                    "expected nats://host:port (or tls://, ws://, wss://)",
                );
            }
        }
        if !(1..=5).contains(&self.nats_replicas) {
            return bad("nats_replicas", "must be between 1 and 5");
        }
        if self.nats_duplicate_window_secs > self.nats_max_age_secs {
            return bad(
                "nats_duplicate_window_secs",
                "must not exceed nats_max_age_secs",
            );
        }
        for (key, value) in [
            ("redis_timeout_ms", self.redis_timeout_ms),
            ("nats_timeout_ms", self.nats_timeout_ms),
            ("nats_ack_wait_ms", self.nats_ack_wait_ms),
            (
                "nats_duplicate_window_secs",
                self.nats_duplicate_window_secs,
            ),
            ("nats_max_age_secs", self.nats_max_age_secs),
            ("cache_l1_ttl_secs", self.cache_l1_ttl_secs),
            ("cache_l1_capacity", self.cache_l1_capacity),
            ("cache_l2_ttl_secs", self.cache_l2_ttl_secs),
            ("cache_negative_ttl_secs", self.cache_negative_ttl_secs),
            ("session_cache_ttl_secs", self.session_cache_ttl_secs),
        ] {
            if value == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        for service in crate::modules::Service::ALL {
            if let Some(url) = self.service_url(service)
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                return bad(
                    service.url_key(),
                    "expected http://host:port or https://...",
                );
            }
        }
        for (key, value) in [
            ("service_timeout_ms", self.service_timeout_ms),
            ("service_breaker_open_ms", self.service_breaker_open_ms),
            (
                "service_breaker_failures",
                u64::from(self.service_breaker_failures),
            ),
        ] {
            if value == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        if self.listen_addr().is_err() {
            return bad(
                "http_addr",
                "expected HOST:PORT or :PORT, such as 127.0.0.1:8080",
            );
        }
        if let Some(url) = &self.database_url {
            let url = url.expose();
            if !(url.starts_with("postgres://")
                || url.starts_with("postgresql://")
                || url.starts_with("sqlite:"))
            {
                return bad(
                    "database_url",
                    "expected postgres://..., postgresql://... or sqlite:...",
                );
            }
        }
        // More PostgreSQL databases beside a PostgreSQL primary.
        let postgres = |u: &str| u.starts_with("postgres://") || u.starts_with("postgresql://");
        let primary_is_postgres = self
            .database_url
            .as_ref()
            .is_some_and(|u| postgres(u.expose()));
        for (key, urls) in [
            ("read_replica_urls", self.replica_urls()),
            ("shard_urls", self.shard_urls()),
        ] {
            if urls.is_empty() {
                continue;
            }
            if !primary_is_postgres {
                return bad(key, "needs a postgres:// database_url");
            }
            if urls.iter().any(|u| !postgres(u)) {
                return bad(key, "expected a comma list of postgres://... URLs");
            }
        }
        let shards = self.shard_urls();
        if !shards.is_empty() && self.shards != 0 {
            return bad(
                "shards",
                "embedded shards (a count) and shard_urls do not go together",
            );
        }
        if self.shards != 0 && self.database_url.is_some() {
            return bad(
                "shards",
                "embedded shards are SQLite files: with a database_url, list shard_urls",
            );
        }
        if self.shards > 64 {
            return bad("shards", "at most 64 embedded shards");
        }
        if self.nats_url.is_some() && (self.shards != 0 || !shards.is_empty()) {
            return bad(
                "nats_url",
                "shards deliver their logs through the database: NATS does not carry them yet",
            );
        }
        if self.replica_max_lag_ms == 0 {
            return bad("replica_max_lag_ms", "must be greater than 0");
        }
        if let Some(endpoint) = &self.otlp_endpoint
            && !endpoint.starts_with("http://")
        {
            return bad(
                "otlp_endpoint",
                "expected the collector's OTLP/HTTP address, http://host:4318",
            );
        }
        if !(0.0..=1.0).contains(&self.otlp_sample_ratio) {
            return bad("otlp_sample_ratio", "must be between 0 and 1");
        }
        if let Some(url) = &self.smtp_url {
            let url = url.expose();
            if !(url.starts_with("smtp://") || url.starts_with("smtps://")) {
                return bad("smtp_url", "expected smtp://... or smtps://...");
            }
        }
        if self.admin_email.is_some() != self.admin_password.is_some() {
            return bad("admin_email", "admin_email and admin_password go together");
        }
        if let Some(password) = &self.admin_password {
            let length = password.expose().chars().count();
            if !(8..=128).contains(&length) {
                return bad("admin_password", "must be 8..=128 characters");
            }
        }
        if self
            .jwt_secret
            .as_ref()
            .is_some_and(|s| s.expose().len() < 32)
        {
            return bad("jwt_secret", "must be at least 32 characters");
        }
        if self.payments_sandbox_lost_answer_percent > 100 {
            return bad("payments_sandbox_lost_answer_percent", "must be 0..=100");
        }
        if self.db_max_connections == 0 {
            return bad("db_max_connections", "must be at least 1");
        }
        if self.db_min_connections > self.db_max_connections {
            return bad("db_min_connections", "must not exceed db_max_connections");
        }
        for (key, value) in [
            ("token_ttl_secs", self.token_ttl_secs),
            ("key_refresh_secs", self.key_refresh_secs),
            ("db_acquire_timeout_ms", self.db_acquire_timeout_ms),
            ("db_statement_timeout_ms", self.db_statement_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            (
                "http_header_read_timeout_ms",
                self.http_header_read_timeout_ms,
            ),
            ("http_idle_timeout_ms", self.http_idle_timeout_ms),
            ("http_max_connections", u64::from(self.http_max_connections)),
            (
                "login_rate_per_address",
                u64::from(self.login_rate_per_address),
            ),
            ("login_rate_per_email", u64::from(self.login_rate_per_email)),
            (
                "signup_rate_per_address",
                u64::from(self.signup_rate_per_address.unwrap_or(1)),
            ),
            (
                "password_hash_concurrency",
                u64::from(self.password_hash_concurrency.unwrap_or(1)),
            ),
            ("password_hash_queue_ms", self.password_hash_queue_ms),
            ("smtp_timeout_ms", self.smtp_timeout_ms),
            ("event_max_attempts", u64::from(self.event_max_attempts)),
            ("event_min_backoff_ms", self.event_min_backoff_ms),
            ("event_lease_ms", self.event_lease_ms),
            ("event_poll_ms", self.event_poll_ms),
            ("job_lease_ms", self.job_lease_ms),
            ("job_poll_ms", self.job_poll_ms),
            ("job_min_backoff_ms", self.job_min_backoff_ms),
            ("email_concurrency", u64::from(self.email_concurrency)),
            ("order_concurrency", u64::from(self.order_concurrency)),
            ("order_max_attempts", u64::from(self.order_max_attempts)),
            ("images_concurrency", u64::from(self.images_concurrency)),
            ("image_storage_timeout_ms", self.image_storage_timeout_ms),
        ] {
            if value == 0 {
                return bad(key, "must be greater than 0");
            }
        }
        if self.password_hash_queue_ms >= self.request_timeout_ms {
            return bad(
                "password_hash_queue_ms",
                "must be less than request_timeout_ms",
            );
        }
        for (key, renew, lease, lease_key) in [
            (
                "event_lease_renew_ms",
                self.event_lease_renew_ms,
                self.event_lease_ms,
                "event_lease_ms",
            ),
            (
                "job_lease_renew_ms",
                self.job_lease_renew_ms,
                self.job_lease_ms,
                "job_lease_ms",
            ),
        ] {
            match renew {
                Some(0) => return bad(key, "must be greater than 0"),
                Some(renew) if renew >= lease => {
                    return bad(key, &format!("must be less than {lease_key} ({lease})"));
                }
                _ => {}
            }
        }
        self.validate_s3()
    }

    /// A lease's renewal interval: as configured, or a quarter of the lease.
    /// `renew_ms`, or the `1/parts` of the lease.
    fn renew_every(renew_ms: Option<u64>, lease_ms: u64, parts: u64) -> Duration {
        Duration::from_millis(renew_ms.unwrap_or(lease_ms / parts).max(1))
    }

    fn validate_s3(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: &str| Err(ConfigError(format!("{key}: {why}")));
        let Some(bucket) = &self.s3_bucket else {
            for (key, set) in [
                ("s3_endpoint", self.s3_endpoint.is_some()),
                ("s3_access_key_id", self.s3_access_key_id.is_some()),
                ("s3_secret_access_key", self.s3_secret_access_key.is_some()),
            ] {
                if set {
                    return bad(key, "is used only with s3_bucket, which is unset");
                }
            }
            return Ok(());
        };
        if bucket.trim().is_empty() {
            return bad("s3_bucket", "must not be empty");
        }
        if self.s3_region.trim().is_empty() {
            return bad("s3_region", "must not be empty");
        }
        if let Some(endpoint) = &self.s3_endpoint {
            if endpoint.starts_with("http://") {
                if !self.s3_allow_http {
                    return bad(
                        "s3_endpoint",
                        "is plain http: set s3_allow_http = true to allow it",
                    );
                }
            } else if !endpoint.starts_with("https://") {
                return bad("s3_endpoint", "expected https://... or http://...");
            }
        }
        if self.s3_access_key_id.is_some() != self.s3_secret_access_key.is_some() {
            return bad(
                "s3_access_key_id",
                "s3_access_key_id and s3_secret_access_key go together",
            );
        }
        Ok(())
    }

    /// Where the search projection keeps its index (`data_dir/search/products`).
    pub fn search_dir(&self) -> PathBuf {
        self.data_dir.join("search").join("products")
    }

    /// Where image files go: the S3 bucket when set, else `data_dir/images`.
    pub fn image_storage(&self) -> scaleshop_media::StorageSettings {
        match &self.s3_bucket {
            Some(bucket) => scaleshop_media::StorageSettings::S3(scaleshop_media::S3Settings {
                bucket: bucket.clone(),
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
                access_key_id: self.s3_access_key_id.clone(),
                secret_access_key: self
                    .s3_secret_access_key
                    .as_ref()
                    .map(|s| s.expose().to_owned()),
                allow_http: self.s3_allow_http,
            }),
            None => scaleshop_media::StorageSettings::Local(
                self.image_dir
                    .clone()
                    .unwrap_or_else(|| self.data_dir.join("images")),
            ),
        }
    }

    /// The socket address to bind.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        let raw = self.http_addr.trim();
        let full = if raw.starts_with(':') {
            format!("0.0.0.0{raw}")
        } else {
            raw.to_owned()
        };
        full.parse()
            .map_err(|_| ConfigError(format!("http_addr: cannot parse {raw:?}")))
    }

    /// Where this process sends its traces, if anywhere: `service.name` is
    /// `scaleshop` for the whole system, `scaleshop-<services>` for a part.
    pub fn trace_settings(
        &self,
        target: crate::Target,
    ) -> Option<scaleshop_telemetry::TraceSettings> {
        let endpoint = self.otlp_endpoint.clone()?;
        let service_name = if target.is_all() {
            "scaleshop".to_owned()
        } else {
            format!("scaleshop-{}", target.to_string().replace(',', "+"))
        };
        Some(scaleshop_telemetry::TraceSettings {
            endpoint,
            sample_ratio: self.otlp_sample_ratio,
            service_name,
        })
    }

    pub fn cache_settings(&self) -> scaleshop_cache::CacheSettings {
        scaleshop_cache::CacheSettings {
            enabled: self.cache_enabled,
            l1_ttl: Duration::from_secs(self.cache_l1_ttl_secs),
            l1_capacity: self.cache_l1_capacity,
            l2_ttl: Duration::from_secs(self.cache_l2_ttl_secs),
            negative_ttl: Duration::from_secs(self.cache_negative_ttl_secs),
            ..scaleshop_cache::CacheSettings::default()
        }
    }

    pub(crate) fn http_limits(&self) -> crate::listener::Limits {
        crate::listener::Limits {
            header_read_timeout: Duration::from_millis(self.http_header_read_timeout_ms),
            idle_timeout: Duration::from_millis(self.http_idle_timeout_ms),
            max_connections: usize::try_from(self.http_max_connections).unwrap_or(usize::MAX),
            request_timeout: Duration::from_millis(self.request_timeout_ms),
        }
    }

    /// The sessions cache: in-process only, entries kept `session_cache_ttl_secs`.
    pub fn session_cache_settings(&self) -> scaleshop_cache::CacheSettings {
        scaleshop_cache::CacheSettings {
            // Session state stays cached with `cache_enabled = false`: that key
            // is about the read cache of the data, not about authentication.
            enabled: true,
            l1_ttl: Duration::from_secs(self.session_cache_ttl_secs),
            ..self.cache_settings()
        }
    }

    /// The read replicas' URLs (empty when none).
    pub fn replica_urls(&self) -> Vec<String> {
        url_list(self.read_replica_urls.as_ref())
    }

    /// The shard databases' URLs (empty when none).
    pub fn shard_urls(&self) -> Vec<String> {
        url_list(self.shard_urls.as_ref())
    }

    /// Whether users live in shards (embedded files or `shard_urls`).
    pub fn sharded(&self) -> bool {
        self.shards != 0
            || self
                .shard_urls
                .as_ref()
                .is_some_and(|u| !u.expose().trim().is_empty())
    }

    pub fn replica_settings(&self) -> scaleshop_db::ReplicaSettings {
        scaleshop_db::ReplicaSettings {
            max_lag: Duration::from_millis(self.replica_max_lag_ms),
            wait: Duration::from_millis(self.replica_wait_ms),
            ..scaleshop_db::ReplicaSettings::default()
        }
    }

    pub fn pool_settings(&self) -> scaleshop_db::PoolSettings {
        scaleshop_db::PoolSettings {
            max_connections: self.db_max_connections,
            min_connections: self.db_min_connections,
            idle_timeout: Duration::from_secs(self.db_idle_timeout_secs),
            acquire_timeout: Duration::from_millis(self.db_acquire_timeout_ms),
            statement_timeout: Duration::from_millis(self.db_statement_timeout_ms),
        }
    }

    pub fn dispatcher_settings(&self) -> scaleshop_events::DispatcherSettings {
        scaleshop_events::DispatcherSettings {
            max_attempts: self.event_max_attempts,
            min_backoff: Duration::from_millis(self.event_min_backoff_ms),
            max_backoff: Duration::from_millis(
                self.event_max_backoff_ms.max(self.event_min_backoff_ms),
            ),
            lease: Duration::from_millis(self.event_lease_ms),
            // The only renewal an idle process makes: a third of the lease keeps
            // it to one tiny UPDATE every 2 s by default, with 4 s of slack.
            renew: Self::renew_every(self.event_lease_renew_ms, self.event_lease_ms, 3),
            poll: Duration::from_millis(self.event_poll_ms),
            ..scaleshop_events::DispatcherSettings::default()
        }
    }

    /// The NATS transport of the log, when `nats_url` is set.
    pub fn nats_settings(&self) -> Option<scaleshop_events::nats::NatsSettings> {
        let url = self.nats_url.as_ref()?;
        let mut settings = scaleshop_events::nats::NatsSettings::new(url.expose());
        settings.timeout = Duration::from_millis(self.nats_timeout_ms);
        settings.replicas = usize::try_from(self.nats_replicas).unwrap_or(1);
        settings.ack_wait = Duration::from_millis(self.nats_ack_wait_ms);
        settings.duplicate_window = Duration::from_secs(self.nats_duplicate_window_secs);
        settings.max_age = Duration::from_secs(self.nats_max_age_secs);
        Some(settings)
    }

    pub fn worker_settings(&self) -> scaleshop_jobs::WorkerSettings {
        scaleshop_jobs::WorkerSettings {
            lease: Duration::from_millis(self.job_lease_ms),
            renew: Self::renew_every(self.job_lease_renew_ms, self.job_lease_ms, 4),
            poll: Duration::from_millis(self.job_poll_ms),
            min_backoff: Duration::from_millis(self.job_min_backoff_ms),
            max_backoff: Duration::from_millis(
                self.job_max_backoff_ms.max(self.job_min_backoff_ms),
            ),
            drain: Duration::from_secs(self.shutdown_grace_secs),
        }
    }

    pub fn login_limits(&self) -> scaleshop_users::http::LoginLimits {
        let nz = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        scaleshop_users::http::LoginLimits {
            per_address_per_minute: nz(self.login_rate_per_address),
            per_email_per_minute: nz(self.login_rate_per_email),
            signup_per_address_per_minute: nz(self
                .signup_rate_per_address
                .unwrap_or(self.login_rate_per_address)),
        }
    }

    /// Password hashing: slots from `password_hash_concurrency` (else the cores),
    /// and the queue wait.
    pub fn password_hashing(&self) -> scaleshop_users::hashing::HashSettings {
        let cores = scaleshop_users::hashing::HashSettings::from_cores();
        scaleshop_users::hashing::HashSettings {
            concurrency: self
                .password_hash_concurrency
                .and_then(|n| std::num::NonZeroUsize::new(usize::try_from(n).ok()?))
                .unwrap_or(cores.concurrency),
            queue_wait: Duration::from_millis(self.password_hash_queue_ms),
            arena_keep: cores.arena_keep,
        }
    }
}

/// figment's message, which names the key and the source (file or variable).
fn describe(error: &figment::Error) -> String {
    error
        .clone()
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let source = e
                .metadata
                .as_ref()
                .map(|m| m.name.to_string())
                .unwrap_or_default();
            let kind = e.kind.to_string();
            match (key.is_empty(), source.is_empty()) {
                (false, false) => format!("{key}: {kind} (from {source})"),
                (false, true) => format!("{key}: {kind}"),
                _ => kind,
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Values given as command-line flags; `None` leaves the lower layers' value.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_filter: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_contract() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.listen_addr().unwrap().to_string(), "127.0.0.1:8080");
        let p = c.pool_settings();
        assert_eq!((p.max_connections, p.min_connections), (20, 5));
        assert_eq!(p.idle_timeout, Duration::from_secs(30));
        assert_eq!(p.acquire_timeout, Duration::from_secs(2));
    }

    #[test]
    fn password_hashing_keys() {
        let c = Config {
            login_rate_per_address: 7,
            ..Config::default()
        };
        assert_eq!(c.login_limits().signup_per_address_per_minute.get(), 7);
        let hashing = c.password_hashing();
        assert_eq!(
            hashing.concurrency,
            std::thread::available_parallelism().unwrap()
        );
        assert_eq!(hashing.queue_wait, Duration::from_secs(2));
        let c = Config {
            signup_rate_per_address: Some(3),
            password_hash_concurrency: Some(5),
            ..Config::default()
        };
        assert_eq!(c.login_limits().signup_per_address_per_minute.get(), 3);
        assert_eq!(c.password_hashing().concurrency.get(), 5);
        for bad in [
            Config {
                password_hash_queue_ms: 15_000,
                ..Config::default()
            },
            Config {
                password_hash_concurrency: Some(0),
                ..Config::default()
            },
            Config {
                signup_rate_per_address: Some(0),
                ..Config::default()
            },
        ] {
            assert!(bad.validate().is_err());
        }
    }

    #[test]
    fn lease_renewal_must_be_inside_the_lease() {
        let c = Config::default();
        assert_eq!(c.dispatcher_settings().renew, Duration::from_secs(2));
        assert_eq!(c.worker_settings().renew, Duration::from_secs(1));
        let c = Config {
            job_lease_renew_ms: Some(4000),
            ..Config::default()
        };
        let error = c.validate().unwrap_err().to_string();
        assert!(
            error.contains("job_lease_renew_ms: must be less than job_lease_ms"),
            "{error}"
        );
        let c = Config {
            event_lease_ms: 1500,
            event_lease_renew_ms: Some(500),
            ..Config::default()
        };
        c.validate().unwrap();
        assert_eq!(c.dispatcher_settings().renew, Duration::from_millis(500));
        let c = Config {
            event_lease_renew_ms: Some(0),
            ..Config::default()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn colon_port_means_every_interface() {
        let c = Config {
            http_addr: ":0".into(),
            ..Config::default()
        };
        assert_eq!(c.listen_addr().unwrap().to_string(), "0.0.0.0:0");
    }

    #[test]
    fn file_then_flags_and_unknown_keys_named() {
        let dir = std::env::temp_dir().join(format!("scaleshop-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "http_addr = \"127.0.0.1:9000\"\ndb_max_connections = 7\n",
        )
        .unwrap();
        let c = Config::load(Some(&file), &Overrides::default()).unwrap();
        assert_eq!(
            (c.http_addr.as_str(), c.db_max_connections),
            ("127.0.0.1:9000", 7)
        );
        let flags = Overrides {
            http_addr: Some("127.0.0.1:9001".into()),
            ..Overrides::default()
        };
        assert_eq!(
            Config::load(Some(&file), &flags).unwrap().http_addr,
            "127.0.0.1:9001"
        );

        std::fs::write(&file, "db_max_conections = 7\n").unwrap();
        let e = Config::load(Some(&file), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("db_max_conections"), "{e}");
        std::fs::write(&file, "db_max_connections = \"many\"\n").unwrap();
        let e = Config::load(Some(&file), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("db_max_connections"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rules_name_the_key() {
        let c = Config {
            db_min_connections: 30,
            ..Config::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("db_min_connections")
        );
        let c = Config {
            jwt_secret: Some(Secret::new("short")),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("jwt_secret"));
        let c = Config {
            payments_sandbox_lost_answer_percent: 101,
            ..Config::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("payments_sandbox_lost_answer_percent")
        );
        let c = Config {
            database_url: Some(Secret::new("mysql://x")),
            ..Config::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("database_url")
        );
        assert_eq!(format!("{:?}", Secret::new("pw")), "\"***\"");
    }

    #[test]
    fn image_settings() {
        let c = Config::default();
        assert_eq!(c.images_concurrency, 2);
        assert!(matches!(
            c.image_storage(),
            scaleshop_media::StorageSettings::Local(dir) if dir.ends_with("images")
        ));
        let s3 = Config {
            s3_bucket: Some("images".into()),
            s3_endpoint: Some("http://127.0.0.1:9000".into()),
            s3_access_key_id: Some("key".into()),
            s3_secret_access_key: Some(Secret::new("secret-value")),
            ..Config::default()
        };
        let e = s3.validate().unwrap_err().to_string();
        assert!(e.contains("s3_allow_http"), "{e}");
        let s3 = Config {
            s3_allow_http: true,
            ..s3
        };
        s3.validate().unwrap();
        assert!(!format!("{s3:?}").contains("secret-value"));
        assert!(!format!("{:?}", s3.image_storage()).contains("secret-value"));
        let lonely = Config {
            s3_endpoint: Some("https://s3.example.com".into()),
            ..Config::default()
        };
        assert!(
            lonely
                .validate()
                .unwrap_err()
                .to_string()
                .contains("s3_endpoint")
        );
        let half = Config {
            s3_bucket: Some("b".into()),
            s3_access_key_id: Some("key".into()),
            ..Config::default()
        };
        assert!(
            half.validate()
                .unwrap_err()
                .to_string()
                .contains("s3_access_key_id")
        );
        let zero = Config {
            images_concurrency: 0,
            ..Config::default()
        };
        assert!(
            zero.validate()
                .unwrap_err()
                .to_string()
                .contains("images_concurrency")
        );
    }

    #[test]
    fn the_fetch_test_seam_is_not_a_key() {
        let dir = std::env::temp_dir().join(format!("scaleshop-seam-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "[image_fetch_test_hosts]\n\"x.test\" = \"127.0.0.1\"\n",
        )
        .unwrap();
        let e = Config::load(Some(&file), &Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("image_fetch_test_hosts"), "{e}");
        std::fs::write(&file, "images_concurrency = 3\n").unwrap();
        let c = Config::load(Some(&file), &Overrides::default()).unwrap();
        assert!(c.image_fetch_test_hosts.is_empty());
        assert_eq!(c.images_concurrency, 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
