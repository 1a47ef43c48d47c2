//! Start-up and lifecycle: configuration -> platform parts -> the modules of the
//! target -> one router -> a listener that drains on SIGTERM/SIGINT.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use scaleshop_db::shards::Shards;
use scaleshop_db::{Database, Migrations};
use scaleshop_events::Dispatcher;
use scaleshop_jobs::Workers;
use scaleshop_web::observe::{Observe, ObserveLayer, ObserveSettings};
use scaleshop_web::{ApiError, Keys, RequestScope};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower::Layer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::config::Config;
use crate::modules::{Module, Target};
use crate::ops::Probes;
use scaleshop_cache::{Invalidate, TieredCache, dispatch_invalidation};
use scaleshop_telemetry::Collector;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cache: {0}")]
    Cache(String),
    #[error(transparent)]
    Database(#[from] scaleshop_db::ConnectError),
    #[error(transparent)]
    DataDir(#[from] crate::lock::LockError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("signing secret: {0}")]
    Secret(String),
    #[error("admin account: {0}")]
    Admin(String),
    #[error("mail: {0}")]
    Mail(String),
    #[error("images: {0}")]
    Media(String),
    #[error("background task: {0}")]
    Background(scaleshop_db::StoreError),
    #[error("server: {0}")]
    Serve(std::io::Error),
    #[error("{0}")]
    Target(String),
    #[error("API document: {0}")]
    ApiDoc(String),
    #[error("shards: {0}")]
    Shards(String),
}

#[derive(OpenApi)]
#[openapi(
    info(title = "scaleshop", description = "A scalable commerce backend. The contract is api.md."),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Merges a module's routes into the API, refusing two different schemas
/// under one component name: utoipa keeps the last one silently, and the
/// published document would then describe one module's type with another's.
fn merge_api(api: OpenApiRouter, router: OpenApiRouter) -> Result<OpenApiRouter, StartError> {
    if let (Some(have), Some(add)) = (
        api.get_openapi().components.as_ref(),
        router.get_openapi().components.as_ref(),
    ) {
        for (name, schema) in &add.schemas {
            if have
                .schemas
                .get(name)
                .is_some_and(|existing| existing != schema)
            {
                return Err(StartError::ApiDoc(format!(
                    "two modules publish different schemas named {name}; \
                     give one a distinct name with #[schema(as = ...)]"
                )));
            }
        }
    }
    Ok(api.merge(router))
}

/// The events that shards' logs carry (the users service's): a consumer that
/// wants one of them follows every shard's log too.
fn shard_events() -> impl Iterator<Item = &'static str> {
    use scaleshop_contracts::Contract;
    use scaleshop_contracts::users::{SessionEnded, UserCreated, UserUpdated};
    [UserCreated::NAME, UserUpdated::NAME, SessionEnded::NAME].into_iter()
}

/// The migrations of every module that owns tables.
fn migrations_of(modules: &[Module]) -> Vec<Migrations> {
    modules
        .iter()
        .filter_map(|m| match m {
            Module::Events => Some(scaleshop_events::migrations()),
            Module::Jobs => Some(scaleshop_jobs::migrations()),
            Module::Users => Some(scaleshop_users::store::migrations()),
            Module::Notifications => Some(scaleshop_notifications::migrations()),
            Module::Inventory => Some(scaleshop_inventory::migrations()),
            Module::Catalog => Some(scaleshop_catalog::migrations()),
            Module::Payments => Some(scaleshop_payments::migrations()),
            Module::Orders => Some(scaleshop_orders::migrations()),
            Module::Media => Some(scaleshop_media::migrations()),
            Module::Database => Some(scaleshop_keys::migrations()),
            Module::Operations => None,
        })
        .collect()
}

/// Opens the database and applies the migrations of every module of the target.
pub async fn open_database(config: &Config, target: Target) -> Result<Database, StartError> {
    let url = config.database_url.as_ref().map(|s| s.expose());
    let db = Database::connect(url, &config.data_dir, &config.pool_settings())
        .await?
        .with_replicas(
            &config.replica_urls(),
            &config.pool_settings(),
            config.replica_settings(),
        )?;
    for migrations in migrations_of(&target.resolve()) {
        db.migrate(&migrations).await?;
    }
    Ok(db)
}

/// A built application: the router, and the background parts that start with
/// [`serve`].
pub struct App {
    router: Router,
    observe: ObserveLayer,
    pub db: Database,
    /// The shard databases, when configured: their commit listeners and the
    /// cache-invalidating tail of their logs run with the background parts.
    shards: Option<scaleshop_db::shards::Shards>,
    dispatcher: Option<Dispatcher>,
    workers: Option<Workers>,
    forget_idle: Vec<Box<dyn Fn() + Send + Sync>>,
    /// Housekeeping run every so often (e.g. expired idempotency keys).
    periodic: Vec<(Duration, Collector)>,
    /// The services' own loops (the search projection's follower).
    background: Vec<crate::registry::Background>,
    redis: Option<scaleshop_cache::Redis>,
    keys: Arc<Keys>,
    key_refresh: Duration,
    /// The cache-invalidating tail's safety-net poll (`event_poll_ms`).
    tail_poll: Duration,
    users_cache: Arc<TieredCache<scaleshop_users::domain::User>>,
    products_cache: Arc<TieredCache<scaleshop_catalog::ProductView>>,
    sessions_cache: Arc<TieredCache<scaleshop_users::domain::SessionState>>,
    /// The data folder's lock (SQLite), held as long as the application lives.
    _data_dir_lock: Option<crate::lock::DataDirLock>,
}

impl App {
    /// Builds the modules of `target`: the platform parts, then each service's
    /// registration (`crate::registry`), in order.
    pub async fn build(config: &Config, target: Target) -> Result<Self, StartError> {
        config.validate()?;
        crate::registry::check(target, config)?;
        let modules = target.resolve();
        let data_dir_lock = crate::lock::DataDirLock::for_config(config)?;
        let db = open_database(config, target).await?;
        if data_dir_lock.is_some() {
            crate::recovery::take_back(&db, &modules)
                .await
                .map_err(StartError::Background)?;
        }
        let keys = crate::keys::http_keys(config, &db).await?;
        let shards = crate::shards::open(config, &db).await?;
        let mut api = OpenApiRouter::with_openapi(ApiDoc::openapi());
        let mut dispatcher = modules.contains(&Module::Events).then(|| {
            let dispatcher = Dispatcher::new(db.clone(), config.dispatcher_settings());
            match config.nats_settings() {
                Some(nats) => dispatcher.with_nats(nats),
                None => dispatcher,
            }
        });
        let mut workers = modules
            .contains(&Module::Jobs)
            .then(|| Workers::new(db.clone(), config.worker_settings()));
        if modules.contains(&Module::Events) {
            let log = scaleshop_events::EventLog::new(db.clone());
            let dead = scaleshop_events::dispatch::DeadEvents::new(db.clone());
            api = merge_api(api, scaleshop_events::http::router(log, dead))?;
        }
        if modules.contains(&Module::Jobs) {
            api = merge_api(
                api,
                scaleshop_jobs::http::router(scaleshop_jobs::JobQueue::new(db.clone())),
            )?;
        }
        let mut forget_idle: Vec<Box<dyn Fn() + Send + Sync>> = Vec::new();
        let mut periodic: Vec<(Duration, Collector)> = Vec::new();
        let mut background: Vec<crate::registry::Background> = Vec::new();
        // The shared cache tier, when configured (a lazy connection: the process
        // starts even while Redis is down).
        let redis = match &config.redis_url {
            Some(url) => Some(
                scaleshop_cache::Redis::connect(
                    url.expose(),
                    Duration::from_millis(config.redis_timeout_ms),
                )
                .map_err(|e| StartError::Cache(e.to_string()))?,
            ),
            None => None,
        };
        let users_cache = Arc::new(TieredCache::new(
            "users",
            redis.clone(),
            config.cache_settings(),
        ));
        let products_cache = Arc::new(TieredCache::new(
            "products",
            redis.clone(),
            config.cache_settings(),
        ));
        // In-process only: see `scaleshop_users::Sessions::with_cache`.
        let sessions_cache = Arc::new(TieredCache::new(
            scaleshop_users::sessions::CACHE_NAME,
            None,
            config.session_cache_settings(),
        ));
        // What the `Caller` extractor asks whether a token's session is live.
        let mut session_check: Option<Arc<dyn scaleshop_web::SessionCheck>> = None;
        let mut cx = crate::registry::Context {
            config,
            target,
            db: db.clone(),
            shards: shards.clone(),
            users_cache: users_cache.clone(),
            products_cache: products_cache.clone(),
            sessions_cache: sessions_cache.clone(),
            shared_limits: redis.clone().map(|redis| {
                Arc::new(crate::ratelimit::RedisLimits(redis))
                    as Arc<dyn scaleshop_web::ratelimit::SharedLimiter>
            }),
            clients: crate::clients::Clients::new(config, keys.clone()),
            users: None,
            inventory: None,
            catalog: None,
            payments: None,
        };
        let mut read_models = crate::read_models::ReadModels {
            db: db.clone(),
            settings: config.dispatcher_settings(),
            index: None,
            tables: Vec::new(),
        };
        for service in target.services() {
            let registration = crate::registry::register(service, &mut cx).await?;
            for router in registration.routes {
                api = merge_api(api, router)?;
            }
            if let Some(dispatcher) = dispatcher.as_mut() {
                for consumer in registration.consumers {
                    // The users' events are in their shards' logs.
                    if let Some(shards) = &shards
                        && shard_events().any(|kind| consumer.wants(kind))
                    {
                        for shard in shards.all() {
                            dispatcher.follow(shard.name(), shard.db().clone(), consumer.clone());
                        }
                    }
                    dispatcher.subscribe(consumer);
                }
                for projection in &registration.projections {
                    dispatcher.subscribe_projection(projection.clone());
                }
            }
            read_models.tables.extend(registration.projections);
            read_models.index = read_models.index.or(registration.index);
            if let Some(workers) = workers.as_mut() {
                for job in registration.jobs {
                    workers.register(job.queue, job.concurrency, job.handler);
                }
            }
            periodic.extend(registration.periodic);
            background.extend(registration.background);
            forget_idle.extend(registration.forget_idle);
            session_check = session_check.or(registration.session_check);
        }
        if session_check.is_none() {
            session_check = crate::clients::remote_session_check(&cx)?;
        }
        if read_models.index.is_some() || !read_models.tables.is_empty() {
            api = merge_api(api, crate::read_models::router(read_models))?;
        }
        if modules.contains(&Module::Operations) {
            let mut collectors = Vec::new();
            collectors.extend(dispatcher.as_ref().map(Dispatcher::collector));
            collectors.extend(workers.as_ref().map(Workers::collector));
            collectors.extend(shards.as_ref().map(Shards::collector));
            let probes = Probes {
                db: Some(db.clone()),
                shards: shards.clone(),
                cache: redis.clone(),
                bus: dispatcher.as_ref().map(Dispatcher::heartbeat),
                jobs: workers.as_ref().map(Workers::heartbeat),
                collectors,
            };
            api = merge_api(api, crate::ops::router(probes))?;
        }
        tracing::info!(
            serve_target = %target,
            modules = ?modules.iter().map(|m| m.name()).collect::<Vec<_>>(),
            backend = ?db.backend(),
            "modules built"
        );

        let (router, mut openapi) = api.split_for_parts();
        scaleshop_web::openapi::apply_conventions(&mut openapi);
        let observe = ObserveLayer::new(
            ObserveSettings {
                request_timeout: Duration::from_millis(config.request_timeout_ms),
            },
            match session_check {
                Some(check) => RequestScope::new(keys.clone())
                    .with_sessions(check)
                    .with_database(db.clone()),
                None => RequestScope::new(keys.clone()).with_database(db.clone()),
            },
        );
        let router = router
            .merge(
                SwaggerUi::new("/docs")
                    .url("/openapi.json", openapi)
                    // No call to the public validator: the page works offline.
                    .config(utoipa_swagger_ui::Config::from("/openapi.json").validator_url("none")),
            )
            // The storefront and the operations console: static pages, clients of
            // the API above, served by every process.
            .merge(scaleshop_ui::router())
            .fallback(|| async { ApiError::not_found().detail("no such route") });
        Ok(Self {
            router,
            observe,
            db,
            shards,
            dispatcher,
            workers,
            forget_idle,
            periodic,
            background,
            redis,
            keys,
            key_refresh: Duration::from_secs(config.key_refresh_secs),
            tail_poll: Duration::from_millis(config.event_poll_ms),
            users_cache,
            products_cache,
            sessions_cache,
            _data_dir_lock: data_dir_lock,
        })
    }

    /// The service every connection gets a copy of: the router inside the one
    /// layer every request goes through, observe (which also turns panics into
    /// 500s and sets the request's scope: signing keys, client address). It wraps
    /// the router once, outside it: a layer added with `Router::layer` is copied
    /// into every route and called per route, which costs each request a few
    /// allocations per layer. Inside, every route gets only the small layer that
    /// tells observe the route's template (`MatchedPath`); the fallback gets none,
    /// so what reaches it is labelled `unmatched`.
    fn http_service(&self) -> Observe {
        self.observe.layer(self.router.clone())
    }

    /// Starts the background parts; they stop when `shutdown` turns true. The
    /// handles end once each part has drained.
    async fn start_background(
        &mut self,
        shutdown: &watch::Receiver<bool>,
    ) -> Result<Vec<JoinHandle<()>>, StartError> {
        let mut tasks = Vec::new();
        tasks.extend(self.db.spawn_commit_listener(shutdown.clone()));
        tasks.extend(self.db.spawn_replica_monitor(shutdown.clone()));
        tasks.extend(self.keys.spawn_refresh(self.key_refresh, shutdown.clone()));
        // Cache invalidation, two paths: Redis pub/sub (fast) and the event log
        // (heals a lost message).
        let caches: Vec<Arc<dyn Invalidate>> =
            vec![self.users_cache.clone(), self.products_cache.clone()];
        if let Some(redis) = self.redis.clone() {
            let stop = shutdown.clone();
            let caches = caches.clone();
            tasks.push(tokio::spawn(async move {
                redis
                    .subscribe(move |message| dispatch_invalidation(&caches, message), stop)
                    .await;
            }));
        }
        let logs = std::iter::once(self.db.clone()).chain(
            self.shards
                .iter()
                .flat_map(|shards| shards.all().iter().map(|shard| shard.db().clone())),
        );
        if let Some(shards) = &self.shards {
            tasks.push(shards.spawn_watcher(shutdown.clone()));
        }
        for log in logs {
            if !log.same_as(&self.db) {
                tasks.extend(log.spawn_commit_listener(shutdown.clone()));
            }
            let (users, products) = (self.users_cache.clone(), self.products_cache.clone());
            let sessions = self.sessions_cache.clone();
            tasks.push(scaleshop_events::tail::spawn_tail(
                log,
                self.tail_poll,
                move |event| {
                    let caches = crate::invalidation::Caches {
                        users: users.as_ref(),
                        products: products.as_ref(),
                        sessions: sessions.as_ref(),
                    };
                    crate::invalidation::on_event(event, &caches)
                },
                shutdown.clone(),
            ));
        }
        if let Some(dispatcher) = self.dispatcher.take() {
            tasks.push(
                dispatcher
                    .start(shutdown.clone())
                    .await
                    .map_err(StartError::Background)?,
            );
        }
        if let Some(workers) = self.workers.take() {
            tasks.push(workers.start(shutdown.clone()));
        }
        for start in std::mem::take(&mut self.background) {
            tasks.push(start(shutdown.clone()));
        }
        for (every, task) in std::mem::take(&mut self.periodic) {
            let mut stop = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = tick.tick() => task().await,
                        _ = stop.changed() => return,
                    }
                }
            }));
        }
        // The recorder keeps histogram samples until they are folded into buckets;
        // fold them on a timer too, so memory stays flat without scrapes.
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let metrics = scaleshop_telemetry::metrics_handle();
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => metrics.run_upkeep(),
                    _ = stop.changed() => return,
                }
            }
        }));
        let forget_idle = std::mem::take(&mut self.forget_idle);
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = tick.tick() => forget_idle.iter().for_each(|forget| forget()),
                    _ = stop.changed() => return,
                }
            }
        }));
        Ok(tasks)
    }
}

/// Serves until `shutdown` resolves, then drains: stops accepting, lets in-flight
/// requests and running jobs finish (bounded by the grace period), hands consumer
/// leases over, and closes the pools.
pub async fn serve(
    config: &Config,
    target: Target,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let mut app = App::build(config, target).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let background = app.start_background(&stop_rx).await?;
    let addr = listener.local_addr().map_err(StartError::Serve)?;
    tracing::info!(%addr, "listening on http://{addr}");
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let server = crate::listener::run(
        listener,
        app.http_service(),
        config.http_limits(),
        stop_rx.clone(),
    );
    let server = tokio::spawn(server);
    shutdown.await;
    tracing::info!("shutting down: draining in-flight requests and jobs");
    let _ = stop_tx.send(true);
    let drained = async {
        let served = server.await;
        for task in background {
            let _ = task.await;
        }
        served
    };
    let result = match tokio::time::timeout(grace, drained).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(join)) => Err(StartError::Serve(std::io::Error::other(join.to_string()))),
        Err(_) => {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "grace period over; dropping the rest"
            );
            Ok(())
        }
    };
    if let Some(shards) = &app.shards {
        shards.close().await;
    }
    app.db.close().await;
    tracing::info!("stopped");
    result
}

/// Binds the configured address.
pub async fn bind(config: &Config) -> Result<TcpListener, StartError> {
    let addr = config.listen_addr()?;
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {},
                    _ = terminate.recv() => {},
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
