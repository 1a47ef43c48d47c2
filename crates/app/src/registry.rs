//! The service registry: one registration per service, in one place, saying
//! everything a process needs to start it — its routes, its event consumers, its
//! job queues (with their concurrency), its periodic tasks, and the services it
//! calls, each either in the same process only or also over HTTP. `App::build`
//! is a loop over the registrations of the target's services; a target that
//! calls a service it neither runs nor has an address for is refused at start.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use scaleshop_cache::TieredCache;
use scaleshop_db::Database;
use scaleshop_events::Consumer;
use scaleshop_jobs::JobHandler;
use scaleshop_telemetry::Collector;
use utoipa_axum::router::OpenApiRouter;

use crate::config::Config;
use crate::modules::{Service, Target};
use crate::server::StartError;

/// How a service may reach one it calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// Only in the same process (its in-process API).
    SameProcess,
    /// In the same process, or over HTTP at `service_url_<name>`.
    SameProcessOrHttp,
}

/// A service another one calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub service: Service,
    pub reach: Reach,
}

const fn http(service: Service) -> Need {
    Need {
        service,
        reach: Reach::SameProcessOrHttp,
    }
}

const fn local(service: Service) -> Need {
    Need {
        service,
        reach: Reach::SameProcess,
    }
}

// Every service checks its callers' sessions with the users service.
const CHECKS_SESSIONS: &[Need] = &[http(Service::Users)];
const CATALOG_NEEDS: &[Need] = &[local(Service::Inventory), http(Service::Users)];
const ORDERS_NEEDS: &[Need] = &[
    http(Service::Users),
    http(Service::Catalog),
    http(Service::Inventory),
    http(Service::Payments),
];
const MEDIA_NEEDS: &[Need] = &[local(Service::Catalog), http(Service::Users)];

/// The services `service` calls.
pub fn needs(service: Service) -> &'static [Need] {
    match service {
        Service::Users => &[],
        // Each checks the sessions of its callers' tokens.
        Service::Inventory | Service::Payments | Service::Notifications => CHECKS_SESSIONS,
        // `available` comes from the inventory's in-process API.
        Service::Catalog => CATALOG_NEEDS,
        // The order checks the user, prices the lines, reserves and charges.
        Service::Orders => ORDERS_NEEDS,
        // An image belongs to a product the catalog knows.
        Service::Media => MEDIA_NEEDS,
    }
}

/// Where a needed service is: here, or at an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Here,
    At(String),
}

/// Checks that every service the target calls is either in it or has an address
/// (when it may be reached over HTTP); the error names the configuration key.
/// A target other than `all` shares the event log and the job queue with the other
/// processes, so it needs a shared database (PostgreSQL).
pub fn check(target: Target, config: &Config) -> Result<(), StartError> {
    for service in target.services() {
        for need in needs(service) {
            if target.contains(need.service) {
                continue;
            }
            let (dependency, key, env) = (
                need.service.name(),
                need.service.url_key(),
                need.service.url_env(),
            );
            match need.reach {
                Reach::SameProcess => {
                    return Err(StartError::Target(format!(
                        "target {target}: {service} calls {dependency} in-process; add it to the \
                         target (--target {target},{dependency})"
                    )));
                }
                Reach::SameProcessOrHttp if config.service_url(need.service).is_none() => {
                    return Err(StartError::Target(format!(
                        "target {target}: {service} calls {dependency}, which this process does \
                         not run: set its address with {key} ({env}=http://host:port) or add it \
                         to the target (--target {target},{dependency})"
                    )));
                }
                Reach::SameProcessOrHttp => {}
            }
        }
    }
    let shared = config
        .database_url
        .as_ref()
        .is_some_and(|url| url.expose().starts_with("postgres"));
    if !target.is_all() && !shared {
        return Err(StartError::Target(format!(
            "target {target} runs only part of the system, so it must share the event log and \
             the job queue with the processes that run the rest: set database_url \
             (SCALESHOP_DATABASE_URL) to a PostgreSQL database they share"
        )));
    }
    Ok(())
}

/// Where `need` is for this process (after [`check`]).
pub fn locate(target: Target, config: &Config, need: Service) -> Location {
    match config.service_url(need) {
        Some(url) if !target.contains(need) => Location::At(url.trim_end_matches('/').to_owned()),
        _ => Location::Here,
    }
}

/// A job queue a service works.
pub struct JobQueueSpec {
    pub queue: &'static str,
    pub concurrency: usize,
    pub handler: Arc<dyn JobHandler>,
}

/// Everything a service brings to a process.
#[derive(Default)]
pub struct Registration {
    pub routes: Vec<OpenApiRouter>,
    pub consumers: Vec<Arc<dyn Consumer>>,
    pub jobs: Vec<JobQueueSpec>,
    pub periodic: Vec<(Duration, Collector)>,
    /// Dropped every minute: per-key state of idle clients (rate limits).
    pub forget_idle: Vec<Box<dyn Fn() + Send + Sync>>,
    /// What decides whether a token's session is live (the users service).
    pub session_check: Option<Arc<dyn scaleshop_web::SessionCheck>>,
    /// Loops the service runs until shutdown (a projection's follower).
    pub background: Vec<Background>,
    /// Read models in tables: delivered the log like `consumers`, and listed and
    /// rebuilt by `/v1/projections`.
    pub projections: Vec<Arc<dyn scaleshop_events::Projection>>,
    /// The search index this process keeps (also listed by `/v1/projections`).
    pub index: Option<scaleshop_search::ProductSearch>,
}

/// A loop started with the process's shutdown signal.
pub type Background =
    Box<dyn FnOnce(tokio::sync::watch::Receiver<bool>) -> tokio::task::JoinHandle<()> + Send>;

/// The platform parts and the in-process APIs of the services registered so far.
pub struct Context<'a> {
    pub config: &'a Config,
    pub target: Target,
    pub db: Database,
    /// The shard databases users live in, when configured.
    pub shards: Option<scaleshop_db::shards::Shards>,
    pub users_cache: Arc<TieredCache<scaleshop_users::domain::User>>,
    pub products_cache: Arc<TieredCache<scaleshop_catalog::ProductView>>,
    pub sessions_cache: Arc<TieredCache<scaleshop_users::domain::SessionState>>,
    /// Where rate limits shared by every process live (Redis, when configured).
    pub shared_limits: Option<Arc<dyn scaleshop_web::ratelimit::SharedLimiter>>,
    pub clients: crate::clients::Clients,
    pub users: Option<scaleshop_users::Users>,
    pub inventory: Option<scaleshop_inventory::Inventory>,
    pub catalog: Option<scaleshop_catalog::Catalog>,
    pub payments: Option<scaleshop_payments::Payments>,
}

impl Context<'_> {
    fn missing(&self, service: Service) -> StartError {
        StartError::Target(format!(
            "target {}: {service} is not in this process",
            self.target
        ))
    }
}

/// Starts `service`'s part of this process.
pub async fn register(service: Service, cx: &mut Context<'_>) -> Result<Registration, StartError> {
    match service {
        Service::Users => users(cx).await,
        Service::Inventory => Ok(inventory(cx)),
        Service::Catalog => catalog(cx),
        Service::Payments => Ok(payments(cx)),
        Service::Orders => orders(cx),
        Service::Notifications => notifications(cx),
        Service::Media => media(cx),
    }
}

async fn users(cx: &mut Context<'_>) -> Result<Registration, StartError> {
    let config = cx.config;
    let users = scaleshop_users::Users::new(scaleshop_users::store::store_for(
        &cx.db,
        cx.shards.as_ref(),
    ))
    .with_cache(cx.users_cache.clone())
    .with_sessions_cache(cx.sessions_cache.clone())
    .with_hasher(scaleshop_users::hashing::Hasher::new(
        config.password_hashing(),
    ));
    let sessions = users.sessions();
    let mut reg = Registration {
        session_check: Some(Arc::new(sessions.clone())),
        ..Registration::default()
    };
    reg.periodic.push((
        Duration::from_secs(600),
        clean_up("expired signed-out sessions", move || {
            let sessions = sessions.clone();
            async move { sessions.clean_up().await }
        }),
    ));
    if let (Some(email), Some(password)) = (&config.admin_email, &config.admin_password) {
        ensure_admin(&users, email, password.expose()).await?;
    }
    let (router, forget) = scaleshop_users::http::router(
        users.clone(),
        config.login_limits(),
        cx.shared_limits.clone(),
    );
    reg.routes.push(router);
    reg.routes
        .push(scaleshop_users::http::internal_router(users.clone()));
    reg.forget_idle.push(Box::new(forget));
    if let Some(shards) = &cx.shards {
        // The users' rows are what the shards hold: their moves run here.
        let admin = crate::shards::ShardAdmin::new(shards.clone(), cx.db.clone());
        reg.routes.push(crate::shards::router(admin.clone()));
        reg.background
            .push(Box::new(move |shutdown| admin.spawn_resumer(shutdown)));
    }
    cx.users = Some(users);
    Ok(reg)
}

fn inventory(cx: &mut Context<'_>) -> Registration {
    let inventory = scaleshop_inventory::Inventory::new(cx.db.clone());
    cx.inventory = Some(inventory.clone());
    Registration {
        consumers: vec![Arc::new(scaleshop_inventory::InventoryConsumer)],
        routes: vec![
            scaleshop_inventory::http::router(inventory.clone()),
            scaleshop_inventory::http::internal_router(inventory),
        ],
        ..Registration::default()
    }
}

fn catalog(cx: &mut Context<'_>) -> Result<Registration, StartError> {
    let inventory = cx
        .inventory
        .clone()
        .ok_or_else(|| cx.missing(Service::Inventory))?;
    let mut catalog = scaleshop_catalog::Catalog::new(cx.db.clone(), inventory)
        .with_cache(cx.products_cache.clone());
    let mut routes = Vec::new();
    let mut background: Vec<Background> = Vec::new();
    // The query side: the search projection in this process's data folder. A
    // folder it cannot open (another process holds it) leaves searches to the
    // products table, and says so.
    let search = cx
        .config
        .search_enabled
        .then(|| scaleshop_search::ProductSearch::open(&cx.config.search_dir()))
        .and_then(|opened| {
            opened
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "no search projection here: searches read the products table");
                })
                .ok()
        });
    if let Some(index) = search.clone() {
        catalog = catalog.with_search(scaleshop_catalog::query::SearchSide {
            index: index.clone(),
            log: scaleshop_events::EventLog::new(cx.db.clone()),
            wait: Duration::from_millis(cx.config.projection_wait_ms),
        });
        let (db, poll) = (
            cx.db.clone(),
            Duration::from_millis(cx.config.event_poll_ms),
        );
        background.push(Box::new(move |shutdown| index.spawn(db, poll, shutdown)));
    }
    // The listing projection: pages of products and of search results.
    let catalog = catalog.with_listing(scaleshop_catalog::listing::ProductListing::new(
        cx.db.clone(),
        Duration::from_millis(cx.config.projection_wait_ms),
    ));
    cx.catalog = Some(catalog.clone());
    let mut consumers: Vec<Arc<dyn Consumer>> = Vec::new();
    if cx.config.redis_url.is_some() {
        // Stock and images change elsewhere: their events drop the shared copy.
        consumers.push(Arc::new(crate::invalidation::ProductCacheConsumer {
            cache: cx.products_cache.clone(),
        }));
    }
    routes.push(scaleshop_catalog::http::router(catalog));
    Ok(Registration {
        routes,
        consumers,
        background,
        projections: vec![Arc::new(
            scaleshop_catalog::listing::ProductListingProjection::default(),
        )],
        index: search,
        ..Registration::default()
    })
}

fn payments(cx: &mut Context<'_>) -> Registration {
    let payments = scaleshop_payments::Payments::new(
        cx.db.clone(),
        Arc::new(
            scaleshop_payments::SandboxGateway::new(cx.db.clone())
                .with_lost_answers(cx.config.payments_sandbox_lost_answer_percent),
        ),
    );
    cx.payments = Some(payments.clone());
    Registration {
        routes: vec![
            scaleshop_payments::http::router(payments.clone()),
            scaleshop_payments::http::internal_router(payments),
        ],
        ..Registration::default()
    }
}

fn orders(cx: &mut Context<'_>) -> Result<Registration, StartError> {
    let config = cx.config;
    let ports = crate::clients::order_ports(cx)?;
    let mut orders = scaleshop_orders::Orders::new(
        cx.db.clone(),
        ports.users,
        ports.catalog,
        ports.payments.clone(),
    );
    // A key whose request died is taken over once that request cannot be running
    // any more.
    orders.idempotency = orders
        .idempotency
        .abandoned_after(Duration::from_millis(config.request_timeout_ms) + Duration::from_secs(2));
    // The read side: the order-history projection, fed by its own consumer.
    let orders = orders.with_history(scaleshop_orders::history::OrderHistory::new(
        cx.db.clone(),
        Duration::from_millis(config.projection_wait_ms),
    ));
    let mut reg = Registration::default();
    reg.projections.push(Arc::new(
        scaleshop_orders::history::OrderHistoryProjection::default(),
    ));
    reg.consumers
        .push(Arc::new(scaleshop_orders::OrderProcessor {
            max_attempts: config.order_max_attempts,
        }));
    reg.jobs.push(JobQueueSpec {
        queue: scaleshop_orders::SAGA_QUEUE,
        concurrency: usize::try_from(config.order_concurrency).unwrap_or(1),
        handler: Arc::new(scaleshop_orders::OrderSaga::new(
            cx.db.clone(),
            ports.inventory,
            ports.payments,
        )),
    });
    if cx.db.backend() == scaleshop_db::Backend::Postgres {
        // Other processes take this one's in-flight keys over as soon as it stops
        // renewing (like its consumer leases).
        let (keys, events) = (orders.idempotency.clone(), config.dispatcher_settings());
        reg.periodic.push((
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
    reg.periodic.push((
        Duration::from_secs(600),
        clean_up("expired idempotency keys", move || {
            let keys = keys.clone();
            async move { keys.clean_up().await }
        }),
    ));
    reg.routes.push(scaleshop_orders::http::router(orders));
    Ok(reg)
}

fn notifications(cx: &mut Context<'_>) -> Result<Registration, StartError> {
    let mailer = Arc::new(mailer(cx.config)?);
    let notifications = scaleshop_notifications::Notifications::new(cx.db.clone());
    Ok(Registration {
        consumers: vec![Arc::new(scaleshop_notifications::NotificationConsumer)],
        jobs: vec![JobQueueSpec {
            queue: scaleshop_notifications::EMAIL_QUEUE,
            concurrency: usize::try_from(cx.config.email_concurrency).unwrap_or(1),
            handler: Arc::new(scaleshop_notifications::EmailJob::new(
                cx.db.clone(),
                mailer,
            )),
        }],
        routes: vec![scaleshop_notifications::http::router(notifications)],
        ..Registration::default()
    })
}

fn media(cx: &mut Context<'_>) -> Result<Registration, StartError> {
    let config = cx.config;
    let catalog = cx
        .catalog
        .clone()
        .ok_or_else(|| cx.missing(Service::Catalog))?;
    let fail = |e: &dyn std::fmt::Display| StartError::Media(e.to_string());
    let storage = scaleshop_media::Storage::open(
        &config.image_storage(),
        Duration::from_millis(config.image_storage_timeout_ms),
    )
    .map_err(|e| fail(&e))?;
    // Production configuration leaves the overrides empty: every SSRF rule applies.
    let fetcher = scaleshop_media::Fetcher::with_overrides(config.image_fetch_test_hosts.clone())
        .map_err(|e| fail(&e))?;
    let media = scaleshop_media::Media::new(cx.db.clone(), catalog.directory(), storage, fetcher);
    // The catalog lists a product's images through the media service.
    catalog.set_images(Arc::new(media.clone()));
    Ok(Registration {
        jobs: vec![JobQueueSpec {
            queue: scaleshop_media::IMAGES_QUEUE,
            concurrency: usize::try_from(config.images_concurrency).unwrap_or(1),
            handler: Arc::new(scaleshop_media::ImageJob::new(media.clone())),
        }],
        routes: vec![scaleshop_media::http::router(media)],
        ..Registration::default()
    })
}

/// A periodic deletion of `what` (`delete` answers how many rows went).
pub(crate) fn clean_up<F, Fut>(what: &'static str, delete: F) -> Collector
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

#[cfg(test)]
mod tests {
    use super::*;

    fn postgres() -> Config {
        Config {
            database_url: Some(crate::config::Secret::new("postgres://db/x")),
            ..Config::default()
        }
    }

    #[test]
    fn every_target_of_one_service_calling_only_users_passes_with_its_address() {
        check(Target::only(Service::Users), &postgres()).unwrap();
        let mut with_users = postgres();
        with_users.service_url_users = Some("http://127.0.0.1:1".into());
        for service in [
            Service::Inventory,
            Service::Payments,
            Service::Notifications,
        ] {
            // Sessions are checked with the users service: its address is needed.
            let err = check(Target::only(service), &postgres())
                .unwrap_err()
                .to_string();
            assert!(err.contains("SCALESHOP_SERVICE_URL_USERS"), "{err}");
            check(Target::only(service), &with_users).unwrap();
        }
        check(Target::ALL, &Config::default()).unwrap();
    }

    #[test]
    fn a_missing_address_is_refused_naming_the_key() {
        let err = check("orders".parse().unwrap(), &postgres())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("service_url_users") && err.contains("SCALESHOP_SERVICE_URL_USERS"),
            "{err}"
        );
        let mut config = postgres();
        config.service_url_users = Some("http://127.0.0.1:1".into());
        config.service_url_catalog = Some("http://127.0.0.1:1".into());
        config.service_url_payments = Some("http://127.0.0.1:1".into());
        let err = check("orders".parse().unwrap(), &config)
            .unwrap_err()
            .to_string();
        assert!(err.contains("SCALESHOP_SERVICE_URL_INVENTORY"), "{err}");
        // In the target instead of at an address: fine.
        check("orders,inventory".parse().unwrap(), &config).unwrap();
        config.service_url_inventory = Some("http://127.0.0.1:1".into());
        check("orders".parse().unwrap(), &config).unwrap();
        assert_eq!(
            locate("orders".parse().unwrap(), &config, Service::Users),
            Location::At("http://127.0.0.1:1".into())
        );
        assert_eq!(
            locate("orders,users".parse().unwrap(), &config, Service::Users),
            Location::Here
        );
    }

    #[test]
    fn an_in_process_need_is_refused_without_the_service() {
        let err = check("media".parse().unwrap(), &postgres())
            .unwrap_err()
            .to_string();
        assert!(err.contains("media calls catalog in-process"), "{err}");
        check(
            "media,catalog,inventory,users".parse().unwrap(),
            &postgres(),
        )
        .unwrap();
    }

    #[test]
    fn a_part_of_the_system_needs_a_shared_database() {
        let err = check("users".parse().unwrap(), &Config::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("SCALESHOP_DATABASE_URL"), "{err}");
    }
}
