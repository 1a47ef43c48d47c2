//! Start-up and lifecycle: configuration -> platform parts -> the modules of the
//! target -> one router -> a listener that drains on SIGTERM/SIGINT.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
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
    #[error("routes: {0}")]
    Routes(String),
}

/// The routes of the documentation (Swagger UI at `/docs`, the document at
/// `/openapi.json`), which the document does not list.
const DOCS_ROUTES: [&str; 4] = ["/docs", "/docs/", "/docs/{*rest}", "/openapi.json"];

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
    dispatcher: Option<Dispatcher>,
    workers: Option<Workers>,
    forget_idle: Vec<Box<dyn Fn() + Send + Sync>>,
    /// Housekeeping run every so often (e.g. expired idempotency keys).
    periodic: Vec<(Duration, Collector)>,
    redis: Option<scaleshop_cache::Redis>,
    keys: Arc<Keys>,
    key_refresh: Duration,
    users_cache: Arc<TieredCache<scaleshop_users::domain::User>>,
    products_cache: Arc<TieredCache<scaleshop_catalog::ProductView>>,
    sessions_cache: Arc<TieredCache<scaleshop_users::domain::SessionState>>,
    /// The data folder's lock (SQLite), held as long as the application lives.
    _data_dir_lock: Option<crate::lock::DataDirLock>,
}

impl App {
    /// Builds every module of `target`.
    pub async fn build(config: &Config, target: Target) -> Result<Self, StartError> {
        config.validate()?;
        let modules = target.resolve();
        let data_dir_lock = crate::lock::DataDirLock::for_config(config)?;
        let db = open_database(config, target).await?;
        if data_dir_lock.is_some() {
            crate::recovery::take_back(&db, &modules)
                .await
                .map_err(StartError::Background)?;
        }
        let keys = crate::keys::http_keys(config, &db).await?;
        let mut api = OpenApiRouter::with_openapi(ApiDoc::openapi());
        // Every API route, also as (template, method router) for the observe layer.
        let mut routes = Vec::new();
        let mut dispatcher = modules
            .contains(&Module::Events)
            .then(|| Dispatcher::new(db.clone(), config.dispatcher_settings()));
        let mut workers = modules
            .contains(&Module::Jobs)
            .then(|| Workers::new(db.clone(), config.worker_settings()));
        let mut forget_idle: Vec<Box<dyn Fn() + Send + Sync>> = Vec::new();
        let mut periodic: Vec<(Duration, Collector)> = Vec::new();
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
        // In-process APIs of the services others call (cheap handles on the pool).
        let inventory = scaleshop_inventory::Inventory::new(db.clone());
        let catalog = scaleshop_catalog::Catalog::new(db.clone(), inventory.clone())
            .with_cache(products_cache.clone());
        let payments = scaleshop_payments::Payments::new(
            db.clone(),
            Arc::new(
                scaleshop_payments::SandboxGateway::new(db.clone())
                    .with_lost_answers(config.payments_sandbox_lost_answer_percent),
            ),
        );

        for module in &modules {
            match module {
                Module::Database => {}
                // Built last, once every module has registered its consumers and queues.
                Module::Operations => {}
                Module::Events => {
                    let log = scaleshop_events::EventLog::new(db.clone());
                    let dead = scaleshop_events::dispatch::DeadEvents::new(db.clone());
                    api = scaleshop_events::http::router(log, dead).merge_into(api, &mut routes);
                }
                Module::Jobs => {
                    api = scaleshop_jobs::http::router(scaleshop_jobs::JobQueue::new(db.clone()))
                        .merge_into(api, &mut routes);
                }
                Module::Users => {
                    let users = scaleshop_users::Users::new(scaleshop_users::store::store_for(&db))
                        .with_cache(users_cache.clone())
                        .with_sessions_cache(sessions_cache.clone())
                        .with_hasher(scaleshop_users::hashing::Hasher::new(
                            config.password_hashing(),
                        ));
                    let sessions = users.sessions();
                    session_check = Some(Arc::new(sessions.clone()));
                    periodic.push((
                        Duration::from_secs(600),
                        clean_up("expired signed-out sessions", move || {
                            let sessions = sessions.clone();
                            async move { sessions.clean_up().await }
                        }),
                    ));
                    if let (Some(email), Some(password)) =
                        (&config.admin_email, &config.admin_password)
                    {
                        ensure_admin(&users, email, password.expose()).await?;
                    }
                    let (router, forget) =
                        scaleshop_users::http::router(users, config.login_limits());
                    api = router.merge_into(api, &mut routes);
                    forget_idle.push(Box::new(forget));
                }
                Module::Inventory => {
                    if let Some(dispatcher) = dispatcher.as_mut() {
                        dispatcher.subscribe(Arc::new(scaleshop_inventory::InventoryConsumer));
                    }
                    api = scaleshop_inventory::http::router(inventory.clone())
                        .merge_into(api, &mut routes);
                }
                Module::Catalog => {
                    api = scaleshop_catalog::http::router(catalog.clone())
                        .merge_into(api, &mut routes);
                }
                Module::Payments => {
                    api = scaleshop_payments::http::router(payments.clone())
                        .merge_into(api, &mut routes);
                }
                Module::Orders => {
                    let mut orders = scaleshop_orders::Orders::new(
                        db.clone(),
                        catalog.clone(),
                        payments.clone(),
                    );
                    // A key whose request died is taken over once that request
                    // cannot be running any more.
                    orders.idempotency = orders.idempotency.abandoned_after(
                        Duration::from_millis(config.request_timeout_ms) + Duration::from_secs(2),
                    );
                    if let Some(dispatcher) = dispatcher.as_mut() {
                        let processor = scaleshop_orders::OrderProcessor {
                            max_attempts: config.order_max_attempts,
                        };
                        dispatcher.subscribe(Arc::new(processor));
                    }
                    if let Some(workers) = workers.as_mut() {
                        let saga = scaleshop_orders::OrderSaga::new(
                            db.clone(),
                            inventory.clone(),
                            payments.clone(),
                        );
                        let concurrency = usize::try_from(config.order_concurrency).unwrap_or(1);
                        workers.register(scaleshop_orders::SAGA_QUEUE, concurrency, Arc::new(saga));
                    }
                    if db.backend() == scaleshop_db::Backend::Postgres {
                        // Other processes take this one's in-flight keys over as soon
                        // as it stops renewing (like its consumer leases).
                        let (keys, events) =
                            (orders.idempotency.clone(), config.dispatcher_settings());
                        periodic.push((
                            events.renew,
                            Arc::new(move || {
                                let keys = keys.clone();
                                Box::pin(async move {
                                    if let Err(e) = keys.heartbeat(events.lease).await {
                                        tracing::warn!(error = %e, "idempotency heartbeat failed");
                                    }
                                })
                            }),
                        ));
                    }
                    let keys = orders.idempotency.clone();
                    periodic.push((
                        Duration::from_secs(600),
                        clean_up("expired idempotency keys", move || {
                            let keys = keys.clone();
                            async move { keys.clean_up().await }
                        }),
                    ));
                    api = scaleshop_orders::http::router(orders).merge_into(api, &mut routes);
                }
                Module::Notifications => {
                    let mailer = Arc::new(mailer(config)?);
                    if let Some(dispatcher) = dispatcher.as_mut() {
                        dispatcher
                            .subscribe(Arc::new(scaleshop_notifications::NotificationConsumer));
                    }
                    if let Some(workers) = workers.as_mut() {
                        let handler = scaleshop_notifications::EmailJob::new(db.clone(), mailer);
                        let concurrency = usize::try_from(config.email_concurrency).unwrap_or(1);
                        workers.register(
                            scaleshop_notifications::EMAIL_QUEUE,
                            concurrency,
                            Arc::new(handler),
                        );
                    }
                    let store = scaleshop_notifications::NotificationStore::new(db.clone());
                    api = scaleshop_notifications::http::router(store).merge_into(api, &mut routes);
                }
                Module::Media => {
                    let media = media(config, &db, &catalog)?;
                    // The catalog lists a product's images through the media service.
                    catalog.set_images(Arc::new(media.clone()));
                    if let Some(workers) = workers.as_mut() {
                        let concurrency = usize::try_from(config.images_concurrency).unwrap_or(1);
                        workers.register(
                            scaleshop_media::IMAGES_QUEUE,
                            concurrency,
                            Arc::new(scaleshop_media::ImageJob::new(media.clone())),
                        );
                    }
                    api = scaleshop_media::http::router(media).merge_into(api, &mut routes);
                }
            }
        }
        if modules.contains(&Module::Operations) {
            let mut collectors = Vec::new();
            collectors.extend(dispatcher.as_ref().map(Dispatcher::collector));
            collectors.extend(workers.as_ref().map(Workers::collector));
            let probes = Probes {
                db: Some(db.clone()),
                cache: redis.clone(),
                bus: dispatcher.as_ref().map(Dispatcher::heartbeat),
                jobs: workers.as_ref().map(Workers::heartbeat),
                collectors,
            };
            api = crate::ops::router(probes).merge_into(api, &mut routes);
        }
        tracing::info!(
            serve_target = %target,
            modules = ?modules.iter().map(|m| m.name()).collect::<Vec<_>>(),
            backend = ?db.backend(),
            "modules built"
        );

        let (router, mut openapi) = api.split_for_parts();
        scaleshop_web::openapi::apply_conventions(&mut openapi);
        // The layer knows every route: the API's (with their method routers) and
        // the documentation's.
        let documentation = DOCS_ROUTES.iter().map(|r| (*r).to_owned());
        let observe = ObserveLayer::new(
            ObserveSettings {
                request_timeout: Duration::from_millis(config.request_timeout_ms),
            },
            routes,
            documentation,
            match session_check {
                Some(check) => RequestScope::new(keys.clone())
                    .with_sessions(check)
                    .with_database(db.clone()),
                None => RequestScope::new(keys.clone()).with_database(db.clone()),
            },
        )
        .map_err(StartError::Routes)?;
        let router = router
            .merge(
                SwaggerUi::new("/docs")
                    .url("/openapi.json", openapi)
                    // No call to the public validator: the page works offline.
                    .config(utoipa_swagger_ui::Config::from("/openapi.json").validator_url("none")),
            )
            .fallback(|| async { ApiError::not_found().detail("no such route") });
        Ok(Self {
            router,
            observe,
            db,
            dispatcher,
            workers,
            forget_idle,
            periodic,
            redis,
            keys,
            key_refresh: Duration::from_secs(config.key_refresh_secs),
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
    /// allocations per layer.
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
        let (users, products) = (self.users_cache.clone(), self.products_cache.clone());
        let sessions = self.sessions_cache.clone();
        tasks.push(scaleshop_events::tail::spawn_tail(
            self.db.clone(),
            Duration::from_millis(500),
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

/// A periodic deletion of `what` (`delete` answers how many rows went).
fn clean_up<F, Fut>(what: &'static str, delete: F) -> Collector
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<u64, scaleshop_db::StoreError>> + Send + 'static,
{
    let delete = Arc::new(delete);
    Arc::new(move || {
        let delete = delete.clone();
        Box::pin(async move {
            match delete().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, "{what} removed"),
                Err(e) => tracing::warn!(error = %e, "clean-up of {what} failed"),
            }
        })
    })
}

fn mailer(config: &Config) -> Result<scaleshop_notifications::Mailer, StartError> {
    use scaleshop_notifications::Mailer;
    let mailer = match &config.smtp_url {
        Some(url) => Mailer::smtp(
            url.expose(),
            &config.smtp_from,
            Duration::from_millis(config.smtp_timeout_ms),
        ),
        None => Mailer::files(config.data_dir.join("mail"), &config.smtp_from),
    };
    mailer.map_err(|e| StartError::Mail(e.to_string()))
}

fn media(
    config: &Config,
    db: &Database,
    catalog: &scaleshop_catalog::Catalog,
) -> Result<scaleshop_media::Media, StartError> {
    let fail = |e: &dyn std::fmt::Display| StartError::Media(e.to_string());
    let storage = scaleshop_media::Storage::open(
        &config.image_storage(),
        Duration::from_millis(config.image_storage_timeout_ms),
    )
    .map_err(|e| fail(&e))?;
    // Production configuration leaves the overrides empty: every SSRF rule applies.
    let fetcher = scaleshop_media::Fetcher::with_overrides(config.image_fetch_test_hosts.clone())
        .map_err(|e| fail(&e))?;
    Ok(scaleshop_media::Media::new(
        db.clone(),
        catalog.clone(),
        storage,
        fetcher,
    ))
}

async fn ensure_admin(
    users: &scaleshop_users::Users,
    email: &str,
    password: &str,
) -> Result<(), StartError> {
    use scaleshop_users::domain::{Email, Password};
    let email = Email::parse(email).map_err(|e| StartError::Admin(format!("admin_email {e}")))?;
    let password =
        Password::parse(password).map_err(|e| StartError::Admin(format!("admin_password {e}")))?;
    let admin = users
        .ensure_admin(email, password)
        .await
        .map_err(|e| StartError::Admin(e.to_string()))?;
    tracing::info!(user_id = %admin.id, "admin account ensured");
    Ok(())
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
