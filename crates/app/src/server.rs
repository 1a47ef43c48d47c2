//! Start-up and lifecycle: configuration -> platform parts -> the modules of the
//! target -> one router -> a listener that drains on SIGTERM/SIGINT.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware::{from_fn, from_fn_with_state};
use scaleshop_db::{Database, Migrations};
use scaleshop_web::observe::{ObserveSettings, observe, record_route};
use scaleshop_web::{ApiError, Keys};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::config::Config;
use crate::modules::{Module, Target};

/// Request bodies over this are refused with 413.
pub const BODY_LIMIT: usize = 1024 * 1024;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Database(#[from] scaleshop_db::ConnectError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("signing secret: {0}")]
    Secret(String),
    #[error("admin account: {0}")]
    Admin(String),
    #[error("server: {0}")]
    Serve(std::io::Error),
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

/// The migrations of every module that owns tables.
fn migrations_of(modules: &[Module]) -> Vec<Migrations> {
    modules
        .iter()
        .filter_map(|m| match m {
            Module::Events => Some(scaleshop_events::migrations()),
            Module::Users => Some(scaleshop_users::store::migrations()),
            Module::Database | Module::Operations => None,
        })
        .collect()
}

/// Opens the database and applies the migrations of every module of the target.
pub async fn open_database(config: &Config, target: Target) -> Result<Database, StartError> {
    let url = config.database_url.as_ref().map(|s| s.expose());
    let db = Database::connect(url, &config.data_dir, &config.pool_settings()).await?;
    for migrations in migrations_of(&target.resolve()) {
        db.migrate(&migrations).await?;
    }
    Ok(db)
}

/// The signing secret: configured, or generated once and kept in the data folder.
fn signing_secret(config: &Config) -> Result<Vec<u8>, StartError> {
    if let Some(secret) = &config.jwt_secret {
        return Ok(secret.expose().as_bytes().to_vec());
    }
    load_or_create_secret(&config.data_dir.join("signing.key"))
}

fn load_or_create_secret(path: &Path) -> Result<Vec<u8>, StartError> {
    use std::io::Write;
    let fail = |e: std::io::Error| StartError::Secret(format!("{}: {e}", path.display()));
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let bytes = hex::decode(text.trim())
                .map_err(|e| StartError::Secret(format!("{}: {e}", path.display())))?;
            if bytes.len() < 32 {
                return Err(StartError::Secret(format!(
                    "{}: shorter than 32 bytes",
                    path.display()
                )));
            }
            Ok(bytes)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(fail)?;
            }
            let mut bytes = vec![0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            match options.open(path) {
                Ok(mut file) => {
                    file.write_all(hex::encode(&bytes).as_bytes())
                        .map_err(fail)?;
                    file.sync_all().map_err(fail)?;
                    Ok(bytes)
                }
                // Another process created it first: use theirs.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    load_or_create_secret(path)
                }
                Err(e) => Err(fail(e)),
            }
        }
        Err(e) => Err(fail(e)),
    }
}

/// A built application: the router and what must be stopped with it.
pub struct App {
    pub router: Router,
    pub db: Database,
    background: Vec<JoinHandle<()>>,
}

impl App {
    /// Builds every module of `target`.
    pub async fn build(config: &Config, target: Target) -> Result<Self, StartError> {
        config.validate()?;
        let modules = target.resolve();
        let db = open_database(config, target).await?;
        let keys = Keys::new(
            &signing_secret(config)?,
            Duration::from_secs(config.token_ttl_secs),
        );
        let mut api = OpenApiRouter::with_openapi(ApiDoc::openapi());
        let mut background = Vec::new();

        for module in &modules {
            match module {
                Module::Database => {}
                Module::Operations => api = api.merge(crate::ops::router(Some(db.clone()))),
                Module::Events => {
                    api = api.merge(scaleshop_events::http::router(
                        scaleshop_events::EventLog::new(db.clone()),
                    ));
                }
                Module::Users => {
                    let users = scaleshop_users::Users::new(scaleshop_users::store::store_for(&db));
                    if let (Some(email), Some(password)) =
                        (&config.admin_email, &config.admin_password)
                    {
                        ensure_admin(&users, email, password.expose()).await?;
                    }
                    let (router, forget_idle) =
                        scaleshop_users::http::router(users, config.login_limits());
                    api = api.merge(router);
                    background.push(tokio::spawn(async move {
                        let mut tick = tokio::time::interval(Duration::from_secs(60));
                        loop {
                            tick.tick().await;
                            forget_idle();
                        }
                    }));
                }
            }
        }
        tracing::info!(serve_target = %target, modules = ?modules.iter().map(|m| m.name()).collect::<Vec<_>>(), backend = ?db.backend(), "modules built");

        let (router, openapi) = api.split_for_parts();
        let settings = Arc::new(ObserveSettings {
            request_timeout: Duration::from_millis(config.request_timeout_ms),
        });
        let router = router
            .merge(SwaggerUi::new("/docs").url("/openapi.json", openapi))
            .route_layer(from_fn(record_route))
            .fallback(|| async { ApiError::not_found().detail("no such route") })
            .layer(axum::Extension(keys))
            .layer(DefaultBodyLimit::max(BODY_LIMIT))
            .layer(CatchPanicLayer::new())
            .layer(from_fn_with_state(settings, observe));
        Ok(Self {
            router,
            db,
            background,
        })
    }
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

/// Serves until `shutdown` resolves, then drains in-flight requests (bounded by the
/// configured grace period) and closes the pools.
pub async fn serve(
    config: &Config,
    target: Target,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let app = App::build(config, target).await?;
    let addr = listener.local_addr().map_err(StartError::Serve)?;
    tracing::info!(%addr, "listening on http://{addr}");
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(
        listener,
        app.router
            .into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown({
        let mut stop_rx = stop_rx.clone();
        async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        }
    });
    let server = tokio::spawn(async move { server.await });
    shutdown.await;
    tracing::info!("shutting down: draining in-flight requests");
    let _ = stop_tx.send(true);
    let result = match tokio::time::timeout(grace, server).await {
        Ok(Ok(result)) => result.map_err(StartError::Serve),
        Ok(Err(join)) => Err(StartError::Serve(std::io::Error::other(join.to_string()))),
        Err(_) => {
            tracing::warn!(
                grace_secs = grace.as_secs(),
                "grace period over; dropping the rest"
            );
            Ok(())
        }
    };
    for task in app.background {
        task.abort();
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
