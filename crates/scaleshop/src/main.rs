//! `scaleshop`: one binary, every role. With no arguments it serves the whole
//! system (`serve --target all`) on embedded parts.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use scaleshop_app::{Config, Overrides, Target};

// mimalloc: a request allocates many small short-lived objects on one worker
// thread and often frees them on another, which glibc's arenas handle slowly.
// (The bare baseline uses the same allocator, so comparisons stay fair.)
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "scaleshop",
    version,
    about = "A scalable commerce backend: users, catalog, inventory, orders, payments, notifications, images.",
    long_about = "A scalable commerce backend in one binary. With no arguments it runs `serve`: the whole \
                  system in one process on embedded parts (SQLite in ./data). Configuration (a TOML file, \
                  SCALESHOP_* variables, flags; later ones win) moves parts onto real engines."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, Args, Clone, Default)]
struct Common {
    /// TOML configuration file (keys as in README's configuration table).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Folder for embedded state: SQLite database, mail files, image files.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// postgres://... to keep every service's data in PostgreSQL (default: SQLite).
    #[arg(long, global = true, value_name = "URL")]
    database_url: Option<String>,
    /// Log filter, such as `info` or `scaleshop_users=debug` (RUST_LOG wins).
    #[arg(long, global = true, value_name = "FILTER")]
    log_filter: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API (the default): start the modules of a target, listen, and
    /// drain in-flight requests on SIGTERM/SIGINT before exiting 0.
    Serve {
        /// Which services this process runs: `all`, one service (users, inventory,
        /// catalog, payments, orders, notifications, media) or a comma list of them.
        /// A service it calls but does not run needs its address
        /// (SCALESHOP_SERVICE_URL_<SERVICE>).
        #[arg(long, default_value = "all", value_parser = parse_target)]
        target: Target,
        /// Listen address, HOST:PORT or :PORT (`:0` picks a free port and logs it).
        #[arg(long, value_name = "ADDR")]
        http_addr: Option<String>,
    },
    /// Apply the database migrations of every module, then exit.
    Migrate {
        /// Whose tables to migrate: `all`, a service or a comma list of services.
        #[arg(long, default_value = "all", value_parser = parse_target)]
        target: Target,
    },
    /// Manage the signing keys in the database (tokens, cursors, consistency
    /// tokens), shared by every instance. Not with `jwt_secret` set.
    Keys {
        #[command(subcommand)]
        action: KeysAction,
    },
    /// The shards users live in (`shards` or `shard_urls`): the map in the
    /// main database and each shard database.
    Shards {
        #[command(subcommand)]
        action: ShardsAction,
        /// The instance to ask, one that runs the users service (default:
        /// this configuration's `http_addr`).
        #[arg(long, global = true, value_name = "URL")]
        url: Option<String>,
    },
    /// The read models (projections) of a running instance, over its admin API
    /// (signs in with SCALESHOP_ADMIN_EMAIL / SCALESHOP_ADMIN_PASSWORD).
    Projections {
        #[command(subcommand)]
        action: ProjectionsAction,
        /// The instance to ask (default: this configuration's `http_addr`).
        #[arg(long, global = true, value_name = "URL")]
        url: Option<String>,
    },
    /// Load a running scaleshop API: open-loop arrivals at a rate, latency from
    /// each scheduled time (coordinated omission corrected), HDR histograms, a
    /// live progress line, terminal/JSON/HTML reports; --find-max; `lab`.
    Loadtest(Box<scaleshop_loadtest::LoadtestArgs>),
}

#[derive(Debug, Subcommand)]
enum ProjectionsAction {
    /// Each projection's state, log position, lag, documents and digest.
    Status,
    /// Build a projection again from the whole log and wait until it serves:
    /// the search index is built beside the old one, which serves meanwhile,
    /// then swapped; a table projection is emptied and refilled while the
    /// command side answers its reads.
    Rebuild {
        /// The projection: `product-search`, `product-listing` or
        /// `order-history`.
        #[arg(default_value = "product-search")]
        name: String,
        /// How long to wait for the rebuild, in seconds.
        #[arg(long, default_value_t = 600)]
        wait_secs: u64,
    },
}

#[derive(Debug, Subcommand)]
enum ShardsAction {
    /// The map's epoch and slot ranges, each shard's slots and users, and the
    /// move in progress.
    Status,
    /// Move slots to a shard online: copy, catch up, fence writes for
    /// milliseconds, flip the map (a new epoch), delete the source's rows.
    Move {
        /// Slots and ranges of slots (0 to 1023), such as `0-99,200`.
        slots: String,
        /// The shard that takes them (`shard-K`, see `status`).
        #[arg(long)]
        to: String,
    },
    /// Move slots so that every shard holds an even share (a shard added to
    /// the end of `shard_urls`, or to `shards`, gets slots from the others).
    Rebalance,
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Add a new key that signs from now on (running instances pick it up within
    /// `key_refresh_secs`); older keys keep verifying until what they signed has
    /// expired, then this command prunes them.
    Rotate,
    /// List the keys: id, generation, created, retired, active (never a secret).
    List,
}

fn parse_target(s: &str) -> Result<Target, String> {
    s.parse()
}

fn load(common: &Common, http_addr: Option<String>) -> Result<Config, String> {
    let overrides = Overrides {
        http_addr,
        data_dir: common.data_dir.clone(),
        database_url: common.database_url.clone(),
        log_filter: common.log_filter.clone(),
    };
    Config::load(common.config.as_deref(), &overrides).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve {
        target: Target::ALL,
        http_addr: None,
    });
    let http_addr = match command {
        Command::Serve { ref http_addr, .. } => http_addr.clone(),
        Command::Migrate { .. }
        | Command::Keys { .. }
        | Command::Shards { .. }
        | Command::Projections { .. } => None,
        // A client of the API: no server configuration, no data folder.
        Command::Loadtest(args) => return loadtest(*args),
    };
    let config = match load(&cli.common, http_addr) {
        Ok(config) => config,
        Err(message) => {
            eprintln!("scaleshop: {message}");
            return ExitCode::from(2);
        }
    };
    let traced = match command {
        Command::Serve { target, .. } => config.trace_settings(target),
        _ => None,
    };
    if let Err(message) = scaleshop_telemetry::init_tracing(&config.log_filter, traced.as_ref()) {
        eprintln!("scaleshop: {message}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("scaleshop: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Serve { target, .. } => {
                let listener = scaleshop_app::bind(&config).await?;
                scaleshop_app::serve(&config, target, listener, scaleshop_app::shutdown_signal()).await
            }
            Command::Migrate { target } => {
                let _lock = scaleshop_app::DataDirLock::for_config(&config)
                    .map_err(scaleshop_app::StartError::from)?;
                let db = scaleshop_app::open_database(&config, target).await?;
                if let Some(shards) = scaleshop_app::shards::open(&config, &db).await? {
                    shards.close().await;
                }
                db.close().await;
                tracing::info!(migrate_target = %target, backend = ?db.backend(), "migrations applied");
                Ok(())
            }
            Command::Keys { action: KeysAction::Rotate } => {
                let (key, pruned) = scaleshop_app::keys::rotate(&config).await?;
                println!("rotated: {} signs from now on", key.kid);
                for kid in pruned {
                    println!("pruned: {kid}");
                }
                Ok(())
            }
            Command::Loadtest(_) => Ok(()),
            Command::Shards { action: ShardsAction::Status, url } => {
                let status = scaleshop_app::shards::status(&config, url.as_deref()).await?;
                println!("{status:#}");
                Ok(())
            }
            Command::Shards { action: ShardsAction::Move { slots, to }, url } => {
                let done =
                    scaleshop_app::shards::run_moves(&config, url.as_deref(), Some((&slots, &to))).await?;
                println!("{done:#}");
                Ok(())
            }
            Command::Shards { action: ShardsAction::Rebalance, url } => {
                let done = scaleshop_app::shards::run_moves(&config, url.as_deref(), None).await?;
                println!("{done:#}");
                Ok(())
            }
            Command::Projections { action: ProjectionsAction::Status, url } => {
                for projection in scaleshop_app::projections::status(&config, url.as_deref()).await? {
                    println!("{projection}");
                }
                Ok(())
            }
            Command::Projections {
                action: ProjectionsAction::Rebuild { name, wait_secs },
                url,
            } => {
                let done = scaleshop_app::projections::rebuild(
                    &config,
                    url.as_deref(),
                    &name,
                    std::time::Duration::from_secs(wait_secs),
                )
                .await?;
                println!("{done}");
                Ok(())
            }
            Command::Keys { action: KeysAction::List } => {
                let keys = scaleshop_app::keys::list(&config).await?;
                println!("{:<16}  {:>10}  {:<27}  {:<27}  active", "kid", "generation", "created", "retired");
                for key in keys {
                    let retired = key.retired_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".to_owned());
                    println!(
                        "{:<16}  {:>10}  {:<27}  {:<27}  {}{}",
                        key.kid,
                        key.generation,
                        key.created_at.to_rfc3339(),
                        retired,
                        if key.active() { "yes" } else { "no" },
                        if key.legacy { " (imported)" } else { "" }
                    );
                }
                Ok(())
            }
        }
    });
    // Spans still buffered leave before the process does.
    scaleshop_telemetry::trace::flush();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "scaleshop stopped with an error");
            eprintln!("scaleshop: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `scaleshop loadtest`: exit 0 when the run or search completed, 2 for a usage
/// error, 1 when the target could not be prepared or a report not written.
fn loadtest(args: scaleshop_loadtest::LoadtestArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("scaleshop loadtest: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(scaleshop_loadtest::main(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scaleshop loadtest: {e}");
            match e {
                scaleshop_loadtest::Error::Usage(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
