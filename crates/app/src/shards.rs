//! The shard databases of a configuration (`shards` embedded files, or
//! `shard_urls`): opened, migrated with the tables that live in every shard
//! (the users', the event log's, the shard identity), and matched against the
//! shard map in the main database ([`scaleshop_db::shards`]); and the
//! `scaleshop shards status` command.

use scaleshop_db::Database;
use scaleshop_db::shards::{Shards, SlotRange, shard_name};

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

/// One shard in `scaleshop shards status`.
#[derive(Debug, Clone)]
pub struct ShardStatus {
    pub name: String,
    pub slots: usize,
    pub users: i64,
}

/// `scaleshop shards status`: the map's epoch, its slot ranges, and each
/// shard's slots and users.
#[derive(Debug, Clone)]
pub struct Status {
    pub epoch: i64,
    pub ranges: Vec<SlotRange>,
    pub shards: Vec<ShardStatus>,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "epoch {}", self.epoch)?;
        writeln!(f, "{:<10}  {:>6}  {:>8}", "shard", "slots", "users")?;
        for shard in &self.shards {
            writeln!(
                f,
                "{:<10}  {:>6}  {:>8}",
                shard.name, shard.slots, shard.users
            )?;
        }
        writeln!(f, "slot ranges:")?;
        for range in &self.ranges {
            writeln!(
                f,
                "  {:>4}..={:<4}  {}",
                range.first, range.last, range.shard
            )?;
        }
        Ok(())
    }
}

pub async fn status(config: &Config) -> Result<Status, StartError> {
    config.validate()?;
    if !config.sharded() {
        return Err(StartError::Shards(
            "no shards are configured (set shards, or shard_urls)".into(),
        ));
    }
    let _lock = crate::lock::DataDirLock::for_config(config)?;
    let main = Database::connect(
        config.database_url.as_ref().map(|s| s.expose()),
        &config.data_dir,
        &config.pool_settings(),
    )
    .await?;
    let result = async {
        let shards = open(config, &main)
            .await?
            .ok_or_else(|| StartError::Shards("no shards".into()))?;
        let map = shards.map();
        let counts = map.slot_counts();
        let mut rows = Vec::new();
        for shard in shards.all() {
            let users = scaleshop_users::store::count(shard.db())
                .await
                .map_err(StartError::Background)?;
            rows.push(ShardStatus {
                name: shard.name().to_owned(),
                slots: counts.get(shard.name()).copied().unwrap_or(0),
                users,
            });
        }
        shards.close().await;
        Ok(Status {
            epoch: map.epoch(),
            ranges: map.ranges(),
            shards: rows,
        })
    }
    .await;
    main.close().await;
    result
}
