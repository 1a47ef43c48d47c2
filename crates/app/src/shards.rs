//! The shard databases of a configuration (`shards` embedded files, or
//! `shard_urls`): opened, migrated with the tables that live in every shard
//! (the users', the event log's, the shard identity), and matched against the
//! shard map in the main database ([`scaleshop_db::shards`]); the admin routes
//! of the map and of slot moves (`GET /v1/shards`, `POST /v1/shards/moves`,
//! `POST /v1/shards/rebalance`), run by the processes of the users service,
//! which own what the shards hold; and the `scaleshop shards` commands, clients
//! of those routes.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use scaleshop_db::Database;
use scaleshop_db::shards::{
    LogDrain, MoveError, MoveReport, Mover, Request, Shard, Shards, shard_name,
};
use scaleshop_web::{ApiError, Caller, Fields, JsonObject, Problem};
use serde::Serialize;
use serde_json::{Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::Config;
use crate::server::StartError;

/// The tables every shard database holds.
fn shard_migrations() -> [scaleshop_db::Migrations; 3] {
    [
        scaleshop_db::shards::migrations(),
        scaleshop_events::migrations(),
        scaleshop_users::store::migrations(),
    ]
}

/// Opens the configured shards (none: `None`), migrates them, and reads or
/// makes the shard map in `main`.
pub async fn open(config: &Config, main: &Database) -> Result<Option<Shards>, StartError> {
    if !config.sharded() {
        return Ok(None);
    }
    let settings = config.pool_settings();
    let mut dbs = Vec::new();
    let urls = config.shard_urls();
    if urls.is_empty() {
        let folder = config.data_dir.join("shards");
        for position in 0..config.shards as usize {
            let file = folder.join(format!("{}.db", shard_name(position)));
            dbs.push(Database::open_sqlite_file(&file, &settings).await?);
        }
    } else {
        for url in &urls {
            dbs.push(Database::connect(Some(url), &config.data_dir, &settings).await?);
        }
    }
    for db in &dbs {
        for migrations in shard_migrations() {
            db.migrate(&migrations).await?;
        }
    }
    main.migrate(&scaleshop_db::shards::migrations()).await?;
    main.migrate(&scaleshop_users::store::migrations()).await?;
    // Users made before shards were configured stay in the main database,
    // where a sharded process would never look: refused rather than hidden.
    let unsharded = scaleshop_users::store::count(main)
        .await
        .map_err(StartError::Background)?;
    if unsharded > 0 {
        return Err(StartError::Shards(format!(
            "the main database holds {unsharded} users from before shards were configured; \
             moving them into shards is not supported yet (start without shards, or on a new database)"
        )));
    }
    if urls.is_empty() {
        // Embedded: this process holds the data folder, so a move's mover is
        // dead; its move is resumed at once.
        scaleshop_db::shards::release_move_lease(main)
            .await
            .map_err(StartError::Background)?;
    }
    let shards = Shards::open(main.clone(), dbs)
        .await
        .map_err(|e| StartError::Shards(e.to_string()))?;
    tracing::info!(
        shards = shards.all().len(),
        epoch = shards.map().epoch(),
        "shards opened"
    );
    Ok(Some(shards))
}

/// The flip's wait for the source's log: the consumers that follow it in the
/// main database.
struct FollowersDrain {
    main: Database,
}

#[async_trait::async_trait]
impl LogDrain for FollowersDrain {
    async fn drained(
        &self,
        shard: &Shard,
        within: Duration,
    ) -> Result<bool, scaleshop_db::StoreError> {
        scaleshop_events::dispatch::followers_caught_up(
            &self.main,
            shard.name(),
            shard.db(),
            within,
        )
        .await
    }
}

/// The mover of this process.
pub struct ShardAdmin {
    mover: Mover,
    /// Whether this process runs a request now.
    busy: std::sync::atomic::AtomicBool,
}

/// How a request ended, as `GET /v1/shards` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
struct Outcome {
    /// The moves it made, one per source shard.
    moves: Vec<MoveDone>,
    /// Why it stopped, when it did not finish.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
struct MoveDone {
    slots: usize,
    source: String,
    target: String,
    rows: u64,
    /// How long writes to the slots were refused.
    fenced_ms: u64,
    /// Whether it took over a move that a mover left unfinished.
    resumed: bool,
}

impl From<&MoveReport> for MoveDone {
    fn from(r: &MoveReport) -> Self {
        Self {
            slots: r.slots,
            source: r.source.clone(),
            target: r.target.clone(),
            rows: r.rows,
            fenced_ms: r.fenced_ms,
            resumed: r.resumed,
        }
    }
}

/// The outcome's text, kept in the main database.
fn describe(result: &Result<Vec<MoveReport>, MoveError>) -> String {
    let outcome = match result {
        Ok(reports) => Outcome {
            moves: reports.iter().map(MoveDone::from).collect(),
            error: None,
        },
        Err(e) => Outcome {
            moves: Vec::new(),
            error: Some(e.to_string()),
        },
    };
    serde_json::to_string(&outcome).unwrap_or_default()
}

impl ShardAdmin {
    pub fn new(shards: Shards, main: Database) -> Arc<Self> {
        let rows: Vec<Arc<dyn scaleshop_db::shards::SlotRows>> =
            vec![Arc::new(scaleshop_users::store::UserSlotRows)];
        Arc::new(Self {
            mover: Mover::new(shards, rows, Arc::new(FollowersDrain { main })),
            busy: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Runs the request that is `running` (this process's, or one whose
    /// runner died) unless this process runs one now; then a move left
    /// unfinished without a request.
    async fn run_pending(&self) {
        use std::sync::atomic::Ordering;
        if self.busy.swap(true, Ordering::SeqCst) {
            return;
        }
        match self.mover.run_request(describe).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                if matches!(self.mover.current().await, Ok(Some(_))) {
                    match self.mover.resume().await {
                        Ok(_) | Err(MoveError::Leased) => {}
                        Err(e) => tracing::warn!(error = %e, "unfinished slot move not resumed"),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "resharding request not run"),
        }
        self.busy.store(false, Ordering::SeqCst);
    }

    /// Records `request` and runs it in the background.
    async fn ask(self: &Arc<Self>, request: Request) -> Result<(), ApiError> {
        match self.mover.ask(&request).await {
            Ok(()) => {}
            Err(MoveError::Asked(other)) => {
                return Err(ApiError::conflict(format!("{other} runs already")));
            }
            Err(MoveError::Store(e)) => return Err(e.into()),
            Err(e) => return Err(ApiError::internal(e)),
        }
        let admin = self.clone();
        tokio::spawn(async move { admin.run_pending().await });
        Ok(())
    }

    /// Every 5 s, runs a request or a move whose runner died (its lease ran
    /// out; a live runner elsewhere keeps it), until `shutdown`.
    pub fn spawn_resumer(
        self: &Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let admin = self.clone();
        tokio::spawn(async move {
            while !*shutdown.borrow() {
                tokio::select! {
                    () = admin.run_pending() => {}
                    _ = shutdown.changed() => return,
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = shutdown.changed() => {}
                }
            }
        })
    }
}

pub fn router(admin: Arc<ShardAdmin>) -> OpenApiRouter {
    OpenApiRouter::new()
        .routes(routes!(shards_status))
        .routes(routes!(move_slots))
        .routes(routes!(rebalance))
        .with_state(admin)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ShardState {
    name: String,
    slots: usize,
    users: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Range {
    first: u16,
    last: u16,
    shard: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Moving {
    slots: usize,
    source: String,
    target: String,
    /// `copying`, `fenced` or `flipped`.
    state: String,
}

/// The shard map and the moves.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ShardsStatus {
    /// Raised by every change of the map.
    epoch: i64,
    shards: Vec<ShardState>,
    ranges: Vec<Range>,
    /// The move in progress (run by any process), if any.
    moving: Option<Moving>,
    /// The last resharding request, from any process.
    request: Option<RequestState>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct RequestState {
    /// What was asked (`move 100 slots to shard-2`, `rebalance`).
    request: String,
    /// `running`, `done` or `failed`.
    state: String,
    /// How it ended.
    outcome: Option<Outcome>,
    /// When it was asked and ended (µs since the epoch).
    asked_at: i64,
    ended_at: Option<i64>,
}

async fn status_of(admin: &ShardAdmin) -> Result<ShardsStatus, ApiError> {
    let shards = admin.mover.shards();
    shards
        .reload()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let map = shards.map();
    let counts = map.slot_counts();
    let mut states = Vec::new();
    for shard in shards.all() {
        states.push(ShardState {
            name: shard.name().to_owned(),
            slots: counts.get(shard.name()).copied().unwrap_or(0),
            users: scaleshop_users::store::count_held(shard.db()).await?,
        });
    }
    let moving = admin.mover.current().await?.map(|m| Moving {
        slots: m.slots.len(),
        source: m.source,
        target: m.target,
        state: m.state,
    });
    Ok(ShardsStatus {
        epoch: map.epoch(),
        shards: states,
        ranges: map
            .ranges()
            .into_iter()
            .map(|r| Range {
                first: r.first,
                last: r.last,
                shard: r.shard,
            })
            .collect(),
        moving,
        request: admin.mover.request().await?.map(|r| RequestState {
            request: r.request,
            state: r.state,
            outcome: r.result.and_then(|text| serde_json::from_str(&text).ok()),
            asked_at: r.asked_at,
            ended_at: r.ended_at,
        }),
    })
}

#[utoipa::path(
    get, path = "/v1/shards", tag = "shards", security(("bearer" = [])),
    responses(
        (status = 200, description = "The shard map, each shard's slots and users, the move in progress", body = ShardsStatus),
        (status = 401, description = "Not signed in", body = Problem),
        (status = 403, description = "Not an admin", body = Problem),
    )
)]
async fn shards_status(
    State(admin): State<Arc<ShardAdmin>>,
    caller: Caller,
) -> Result<Json<ShardsStatus>, ApiError> {
    caller.require_admin()?;
    Ok(Json(status_of(&admin).await?))
}

/// `{"slots": "0-99,200", "to": "shard-2"}`
#[derive(Debug, utoipa::ToSchema)]
#[allow(dead_code, reason = "the request's schema, for the API document")]
struct MoveRequest {
    /// Slots and ranges of slots (0 to 1023), such as `0-99,200`.
    slots: String,
    /// The shard that takes them (`shard-K`).
    to: String,
}

#[utoipa::path(
    post, path = "/v1/shards/moves", tag = "shards", security(("bearer" = [])),
    request_body = MoveRequest,
    responses(
        (status = 202, description = "The move runs; `GET /v1/shards` follows it", body = ShardsStatus),
        (status = 403, description = "Not an admin", body = Problem),
        (status = 409, description = "A resharding request runs already", body = Problem),
        (status = 422, description = "No such slots or shard", body = Problem),
    )
)]
async fn move_slots(
    State(admin): State<Arc<ShardAdmin>>,
    caller: Caller,
    body: JsonObject,
) -> Result<(StatusCode, Json<ShardsStatus>), ApiError> {
    caller.require_admin()?;
    let mut f = Fields::new(body);
    let slots = f.required("slots", |s: String| scaleshop_db::shards::parse_slots(&s));
    let names: Vec<String> = admin
        .mover
        .shards()
        .all()
        .iter()
        .map(|s| s.name().to_owned())
        .collect();
    let to = f.required("to", |t: String| {
        if names.contains(&t) {
            Ok(t)
        } else {
            Err(format!(
                "no such shard; the shards are {}",
                names.join(", ")
            ))
        }
    });
    f.finish()?;
    let (Some(slots), Some(to)) = (slots, to) else {
        return Err(ApiError::internal("fields checked but missing"));
    };
    admin.ask(Request::Move { slots, target: to }).await?;
    Ok((StatusCode::ACCEPTED, Json(status_of(&admin).await?)))
}

#[utoipa::path(
    post, path = "/v1/shards/rebalance", tag = "shards", security(("bearer" = [])),
    responses(
        (status = 202, description = "The moves run; `GET /v1/shards` follows them", body = ShardsStatus),
        (status = 403, description = "Not an admin", body = Problem),
        (status = 409, description = "A resharding request runs already", body = Problem),
    )
)]
async fn rebalance(
    State(admin): State<Arc<ShardAdmin>>,
    caller: Caller,
) -> Result<(StatusCode, Json<ShardsStatus>), ApiError> {
    caller.require_admin()?;
    admin.ask(Request::Rebalance).await?;
    Ok((StatusCode::ACCEPTED, Json(status_of(&admin).await?)))
}

/// How long `scaleshop shards move|rebalance` waits for the moves.
const MOVE_WAIT: Duration = Duration::from_secs(600);

fn cli_error(message: impl std::fmt::Display) -> StartError {
    StartError::Shards(message.to_string())
}

/// `scaleshop shards status`: the map of the instance at `url`.
pub async fn status(config: &Config, url: Option<&str>) -> Result<Value, StartError> {
    let admin = crate::projections::AdminClient::sign_in(config, url).await?;
    admin
        .call_with(reqwest::Method::GET, "/v1/shards", None)
        .await
}

/// `scaleshop shards move SLOTS --to SHARD` and `scaleshop shards rebalance`:
/// asks the instance at `url` (one that runs the users service), then waits
/// until it has finished; returns how it ended.
pub async fn run_moves(
    config: &Config,
    url: Option<&str>,
    request: Option<(&str, &str)>,
) -> Result<Value, StartError> {
    let admin = crate::projections::AdminClient::sign_in(config, url).await?;
    match request {
        Some((slots, to)) => {
            let body = json!({"slots": slots, "to": to});
            admin
                .call_with(reqwest::Method::POST, "/v1/shards/moves", Some(&body))
                .await?
        }
        None => {
            admin
                .call_with(reqwest::Method::POST, "/v1/shards/rebalance", None)
                .await?
        }
    };
    let deadline = tokio::time::Instant::now() + MOVE_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = admin
            .call_with(reqwest::Method::GET, "/v1/shards", None)
            .await?;
        if now["request"]["state"] != "running" {
            if let Some(error) = now["request"]["outcome"]["error"].as_str() {
                return Err(cli_error(error));
            }
            return Ok(now);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(cli_error(format!(
                "still moving after {} s: {}",
                MOVE_WAIT.as_secs(),
                now["moving"]
            )));
        }
    }
}
