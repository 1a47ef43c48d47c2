//! Sharding: rows keyed by a user live in one of [`SLOTS`] hash slots, and the
//! slots are spread over N shard databases (the Vitess, Citus and Redis Cluster
//! model: many slots on few shards, so a shard is added by moving slots, never
//! by hashing again).
//!
//! - `slot = crc32(key's 16 bytes) mod SLOTS` ([`slot_of`]): stable across
//!   builds, platforms and languages, and even over random and time-ordered ids.
//! - The shard map (slot ranges → shard, and an epoch that every change of the
//!   map raises) is kept in the main database (`shard_map`, `shard_ranges`,
//!   `shard_databases`). The first start over a set of shards spreads the slots
//!   evenly over them; later starts read the map, whatever the order of the
//!   configured list: each shard database records which shard it is
//!   (`shard_identity`), and a list that names them in another order, or lacks
//!   one that holds slots, is refused at start.
//! - A shard configured after the map was made joins it holding no slot;
//!   [`Mover`] moves slots to it online.
//! - Each shard database lists the slots it holds (`owned_slots`: `serving`, or
//!   `fenced` while a move takes the slot away). A write checks, in its own
//!   transaction, that its shard serves the key's slot (`FOR SHARE` on
//!   PostgreSQL, so a fence waits for writes in flight), and a read checks after
//!   it that the shard still holds the slot; a refused one reads the map again
//!   and goes to the new shard ([`Shards::refused`]). So a process with a stale
//!   map can never write to, or read from, a shard that gave the slot away.
//!
//! This module knows nothing of what is sharded: the stores that keep rows by
//! user ask [`Shards::for_key`] for the database of a key.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use uuid::Uuid;

use crate::clock::now_micros;
use crate::{Database, Migrations, StoreError, Topic, Tx, with_pool, with_tx};

/// How many hash slots the key space has. Fixed for the life of the data: a
/// different count would put every key in another slot.
pub const SLOTS: u16 = 1024;

/// The hash slot of a key.
pub fn slot_of(key: Uuid) -> u16 {
    // The remainder is below `SLOTS`, which fits in a u16.
    (crc32fast::hash(key.as_bytes()) % u32::from(SLOTS)) as u16
}

/// Reads a list of slots such as `0-99,200,300-310` (ranges inclusive).
pub fn parse_slots(text: &str) -> Result<Vec<u16>, String> {
    let mut slots = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (first, last) = part.split_once('-').unwrap_or((part, part));
        let read = |s: &str| -> Result<u16, String> {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|n| *n < SLOTS)
                .ok_or_else(|| format!("`{s}` is not a slot (0 to {})", SLOTS - 1))
        };
        let (first, last) = (read(first)?, read(last)?);
        if first > last {
            return Err(format!("`{part}`: a range goes up"));
        }
        slots.extend(first..=last);
    }
    if slots.is_empty() {
        return Err("no slot listed (such as 0-99,200)".into());
    }
    slots.sort_unstable();
    slots.dedup();
    Ok(slots)
}

/// The tables of the shard map (in the main database) and of a shard's identity
/// (in each shard database).
pub fn migrations() -> Migrations {
    static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/shards/sqlite");
    static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/shards/postgres");
    Migrations {
        owner: "shards",
        sqlite: &SQLITE,
        postgres: &POSTGRES,
    }
}

/// The name of the shard at `position` in the configured list when the map was
/// made (`shard-0`, `shard-1`, ...).
pub fn shard_name(position: usize) -> String {
    format!("shard-{position}")
}

/// One shard database.
#[derive(Debug, Clone)]
pub struct Shard {
    name: Arc<str>,
    db: Database,
}

impl Shard {
    pub fn new(name: impl Into<Arc<str>>, db: Database) -> Self {
        Self {
            name: name.into(),
            db,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn db(&self) -> &Database {
        &self.db
    }
}

/// A run of consecutive slots held by one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    pub first: u16,
    pub last: u16,
    pub shard: String,
}

/// Which shard holds each slot, as of an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMap {
    epoch: i64,
    /// `owners[slot]` is the index of the holding shard in [`Shards::all`].
    owners: Vec<usize>,
    names: Vec<String>,
}

impl ShardMap {
    /// Every slot spread evenly over `names`, in order (contiguous ranges).
    pub fn even(names: Vec<String>, epoch: i64) -> Self {
        let n = names.len().max(1);
        let owners = (0..usize::from(SLOTS))
            .map(|slot| slot * n / usize::from(SLOTS))
            .collect();
        Self {
            epoch,
            owners,
            names,
        }
    }

    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// The index (in the shard list) of the shard holding `slot`.
    pub fn owner(&self, slot: u16) -> usize {
        self.owners
            .get(usize::from(slot))
            .copied()
            .unwrap_or_default()
    }

    /// The map as ranges of consecutive slots, in slot order.
    pub fn ranges(&self) -> Vec<SlotRange> {
        let mut ranges: Vec<SlotRange> = Vec::new();
        for (slot, owner) in self.owners.iter().enumerate() {
            let slot = u16::try_from(slot).unwrap_or(u16::MAX);
            let name = self.names.get(*owner).cloned().unwrap_or_default();
            match ranges.last_mut() {
                Some(range) if range.shard == name && range.last + 1 == slot => range.last = slot,
                _ => ranges.push(SlotRange {
                    first: slot,
                    last: slot,
                    shard: name,
                }),
            }
        }
        ranges
    }

    /// The slots `shard` (an index into the shard list) holds.
    pub fn slots_of(&self, shard: usize) -> Vec<u16> {
        self.owners
            .iter()
            .enumerate()
            .filter(|(_, owner)| **owner == shard)
            .filter_map(|(slot, _)| u16::try_from(slot).ok())
            .collect()
    }

    /// The index of the shard named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// How many slots each shard holds, by shard name (shards without any
    /// slot included, with 0).
    pub fn slot_counts(&self) -> BTreeMap<String, usize> {
        let mut counts: BTreeMap<String, usize> =
            self.names.iter().map(|name| (name.clone(), 0)).collect();
        for owner in &self.owners {
            if let Some(name) = self.names.get(*owner) {
                *counts.entry(name.clone()).or_default() += 1;
            }
        }
        counts
    }
}

/// Why the configured shards do not fit the map in the main database.
#[derive(Debug, thiserror::Error)]
pub enum ShardSetupError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error(
        "the shard database at position {position} of the list is {found}, not {expected}: list the shards in the order they were added"
    )]
    Reordered {
        position: usize,
        expected: String,
        found: String,
    },
    #[error(
        "the shard map gives slots to {0}, which the configured list lacks (the list may only grow)"
    )]
    Missing(String),
    #[error("the shard map in the main database is not whole: {0}")]
    Corrupt(String),
}

struct Inner {
    main: Database,
    shards: Vec<Shard>,
    map: RwLock<Arc<ShardMap>>,
}

/// The shard databases and the current map: where a key's rows live.
#[derive(Clone)]
pub struct Shards {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field(
                "shards",
                &self
                    .inner
                    .shards
                    .iter()
                    .map(Shard::name)
                    .collect::<Vec<_>>(),
            )
            .field("epoch", &self.map().epoch())
            .finish_non_exhaustive()
    }
}

impl Shards {
    /// Takes the shard databases in the configured order (each already
    /// migrated with [`migrations`] and the sharded services' tables; `main`
    /// with [`migrations`]): checks or records each one's identity, makes the
    /// map on the first start (every slot spread evenly) and adds shards the map
    /// does not know yet (holding no slot), then reads it.
    pub async fn open(main: Database, dbs: Vec<Database>) -> Result<Self, ShardSetupError> {
        let mut shards = Vec::with_capacity(dbs.len());
        for (position, db) in dbs.into_iter().enumerate() {
            let expected = shard_name(position);
            let found = claim_identity(&db, &expected).await?;
            if found != expected {
                return Err(ShardSetupError::Reordered {
                    position,
                    expected,
                    found,
                });
            }
            shards.push(Shard::new(expected, db));
        }
        let names: Vec<String> = shards.iter().map(|s| s.name().to_owned()).collect();
        make_map_once(&main, &names).await?;
        add_unknown(&main, &names).await?;
        let map = read_map(&main, &names).await?;
        // A shard holds its first slots once, as the first map gave them: only
        // while no slot ever moved (epoch 1, read after the look for a move).
        if current_move(&main).await?.is_none() && read_epoch(&main).await? == Some(1) {
            for (index, shard) in shards.iter().enumerate() {
                hold_first_slots(shard.db(), &map.slots_of(index)).await?;
            }
        }
        Ok(Self {
            inner: Arc::new(Inner {
                main,
                shards,
                map: RwLock::new(Arc::new(map)),
            }),
        })
    }

    /// Every shard, in the configured order.
    pub fn all(&self) -> &[Shard] {
        &self.inner.shards
    }

    /// The map as this process knows it.
    pub fn map(&self) -> Arc<ShardMap> {
        match self.inner.map.read() {
            Ok(map) => map.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The shard that holds `key`'s rows.
    pub fn for_key(&self, key: Uuid) -> &Shard {
        let owner = self.map().owner(slot_of(key));
        // `open` made every owner an index into `shards`, which is never empty.
        &self.inner.shards[owner.min(self.inner.shards.len() - 1)]
    }

    /// Reads the map from the main database again; true when its epoch moved.
    pub async fn reload(&self) -> Result<bool, ShardSetupError> {
        let names: Vec<String> = self.all().iter().map(|s| s.name().to_owned()).collect();
        let map = read_map(&self.inner.main, &names).await?;
        let mut current = match self.inner.map.write() {
            Ok(current) => current,
            Err(poisoned) => poisoned.into_inner(),
        };
        // Two reloads may finish out of order: the map only moves forward.
        if map.epoch() <= current.epoch() {
            return Ok(false);
        }
        *current = Arc::new(map);
        Ok(true)
    }

    /// The shard named `name`.
    pub fn by_name(&self, name: &str) -> Option<&Shard> {
        self.all().iter().find(|s| s.name() == name)
    }

    /// Whether a read just made on `shard` for `slot` was the truth: the shard
    /// serves the slot, or holds it fenced (a move is taking it) and the map in
    /// the main database has not moved on yet (after the flip, the target may
    /// have taken writes that the fenced copy lacks).
    pub async fn read_was_current(&self, shard: &Database, slot: u16) -> Result<bool, StoreError> {
        match held(shard, slot).await?.as_deref() {
            Some("serving") => Ok(true),
            Some(_) => match self.reload().await {
                Ok(moved) => Ok(!moved && self.map().owner(slot) == self.index_of_db(shard)),
                Err(ShardSetupError::Store(e)) => Err(e),
                Err(e) => Err(StoreError::Other(e.to_string())),
            },
            None => Ok(false),
        }
    }

    fn index_of_db(&self, db: &Database) -> usize {
        self.all()
            .iter()
            .position(|s| s.db().same_as(db))
            .unwrap_or(usize::MAX)
    }

    /// `shard_slots{shard}` and `shard_map_epoch` of the map as this process
    /// knows it (the watcher and refused requests keep it current), computed
    /// when scraped.
    pub fn collector(&self) -> scaleshop_telemetry::Collector {
        let shards = self.clone();
        Arc::new(move || {
            let shards = shards.clone();
            Box::pin(async move {
                let map = shards.map();
                for (name, slots) in map.slot_counts() {
                    metrics::gauge!(scaleshop_telemetry::names::SHARD_SLOTS, "shard" => name)
                        .set(slots as f64);
                }
                metrics::gauge!(scaleshop_telemetry::names::SHARD_MAP_EPOCH)
                    .set(map.epoch() as f64);
            })
        })
    }

    /// After a shard refused a key's slot: reads the map again; when it has
    /// not moved yet (a move between its fence and its flip), waits a moment
    /// before the caller tries again.
    pub async fn refused(&self) -> Result<(), StoreError> {
        metrics::counter!(scaleshop_telemetry::names::SHARD_REFUSALS).increment(1);
        match self.reload().await {
            Ok(true) => Ok(()),
            Ok(false) => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(())
            }
            Err(ShardSetupError::Store(e)) => Err(e),
            Err(e) => Err(StoreError::Other(e.to_string())),
        }
    }

    /// Reads the map again whenever another process announces a flip (and
    /// every 5 s, should an announcement be lost), until `shutdown`.
    pub fn spawn_watcher(
        &self,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let shards = self.clone();
        tokio::spawn(async move {
            let signal = shards.inner.main.commit_signal(Topic::Shards);
            while !*shutdown.borrow() {
                let notified = signal.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Err(e) = shards.reload().await {
                    tracing::warn!(error = %e, "shard map not read");
                }
                tokio::select! {
                    () = &mut notified => {}
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = shutdown.changed() => {}
                }
            }
        })
    }

    /// Whether every shard answers within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        for shard in self.all() {
            if !shard.db().ping(timeout).await {
                return false;
            }
        }
        true
    }

    pub async fn close(&self) {
        for shard in self.all() {
            shard.db().close().await;
        }
    }
}

/// Records `name` as the shard database's identity unless it has one; returns
/// the identity it has.
async fn claim_identity(db: &Database, name: &str) -> Result<String, StoreError> {
    const CLAIM: &str =
        "INSERT INTO shard_identity (id, name) VALUES (1, $1) ON CONFLICT (id) DO NOTHING";
    const READ: &str = "SELECT name FROM shard_identity WHERE id = 1";
    let mut tx = db.begin().await?;
    let found: String = with_tx!(&mut tx, conn => {
        sqlx::query(CLAIM).bind(name).execute(&mut *conn).await?;
        sqlx::query_scalar(READ).fetch_one(conn).await?
    });
    tx.commit().await?;
    Ok(found)
}

/// Makes the map (epoch 1, every slot spread evenly over `names`) unless one
/// exists. Several processes starting at once: the first insert of the epoch
/// row wins, and the others' inserts wait for it and do nothing.
async fn make_map_once(main: &Database, names: &[String]) -> Result<(), StoreError> {
    const EPOCH: &str =
        "INSERT INTO shard_map (id, epoch) VALUES (1, 1) ON CONFLICT (id) DO NOTHING";
    const RANGE: &str =
        "INSERT INTO shard_ranges (first_slot, last_slot, shard) VALUES ($1, $2, $3)";
    const SHARD: &str =
        "INSERT INTO shard_databases (name, position, added_at) VALUES ($1, $2, $3)";
    let mut tx = main.begin().await?;
    let made = with_tx!(&mut tx, conn => {
        sqlx::query(EPOCH).execute(&mut *conn).await?.rows_affected()
    });
    if made == 1 {
        let map = ShardMap::even(names.to_vec(), 1);
        for range in map.ranges() {
            with_tx!(&mut tx, conn => {
                sqlx::query(RANGE)
                    .bind(i32::from(range.first))
                    .bind(i32::from(range.last))
                    .bind(&range.shard)
                    .execute(conn)
                    .await?;
            });
        }
        for (position, name) in names.iter().enumerate() {
            let position = i32::try_from(position).unwrap_or(i32::MAX);
            with_tx!(&mut tx, conn => {
                sqlx::query(SHARD).bind(name).bind(position).bind(now_micros()).execute(conn).await?;
            });
        }
    }
    tx.commit().await
}

/// Adds the configured shards the map does not know yet, holding no slot.
async fn add_unknown(main: &Database, names: &[String]) -> Result<(), StoreError> {
    const ADD: &str = "INSERT INTO shard_databases (name, position, added_at) VALUES ($1, $2, $3) \
                       ON CONFLICT (name) DO NOTHING";
    let mut tx = main.begin().await?;
    for (position, name) in names.iter().enumerate() {
        let position = i32::try_from(position).unwrap_or(i32::MAX);
        with_tx!(&mut tx, conn => {
            sqlx::query(ADD).bind(name).bind(position).bind(now_micros()).execute(conn).await?;
        });
    }
    tx.commit().await
}

async fn read_epoch(main: &Database) -> Result<Option<i64>, StoreError> {
    const EPOCH: &str = "SELECT epoch FROM shard_map WHERE id = 1";
    Ok(with_pool!(main, pool => sqlx::query_scalar(EPOCH).fetch_optional(pool).await?))
}

/// Reads the map, with `names` as the shard list its owners index.
async fn read_map(main: &Database, names: &[String]) -> Result<ShardMap, ShardSetupError> {
    const EPOCH: &str = "SELECT epoch FROM shard_map WHERE id = 1";
    const RANGES: &str =
        "SELECT first_slot, last_slot, shard FROM shard_ranges ORDER BY first_slot";
    let (epoch, ranges): (Option<i64>, Vec<(i32, i32, String)>) = with_pool!(main, pool => {
        (
            sqlx::query_scalar(EPOCH).fetch_optional(pool).await.map_err(StoreError::from)?,
            sqlx::query_as(RANGES).fetch_all(pool).await.map_err(StoreError::from)?,
        )
    });
    let epoch = epoch.ok_or_else(|| ShardSetupError::Corrupt("no epoch".into()))?;
    let mut owners = vec![usize::MAX; usize::from(SLOTS)];
    for (first, last, shard) in ranges {
        let owner = names
            .iter()
            .position(|name| *name == shard)
            .ok_or_else(|| ShardSetupError::Missing(shard.clone()))?;
        let (Ok(first), Ok(last)) = (usize::try_from(first), usize::try_from(last)) else {
            return Err(ShardSetupError::Corrupt(format!("range {first}..={last}")));
        };
        for slot in first..=last {
            match owners.get_mut(slot) {
                Some(o) => *o = owner,
                None => return Err(ShardSetupError::Corrupt(format!("slot {slot}"))),
            }
        }
    }
    if let Some(slot) = owners.iter().position(|o| *o == usize::MAX) {
        return Err(ShardSetupError::Corrupt(format!(
            "slot {slot} has no shard"
        )));
    }
    Ok(ShardMap {
        epoch,
        owners,
        names: names.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_stable_and_spread() {
        // The slot of a key never changes: this pins the hash.
        let key = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(
            slot_of(key),
            (crc32fast::hash(key.as_bytes()) % 1024) as u16
        );
        let mut per_slot = vec![0_u32; usize::from(SLOTS)];
        for _ in 0..102_400 {
            per_slot[usize::from(slot_of(Uuid::now_v7()))] += 1;
        }
        // 100 a slot on average: none empty, none more than twice that.
        assert!(per_slot.iter().all(|n| *n > 0 && *n < 200), "{per_slot:?}");
    }

    #[test]
    fn slot_lists_read_ranges_and_refuse_what_is_no_slot() {
        assert_eq!(parse_slots("3, 0-2,2").unwrap(), vec![0, 1, 2, 3]);
        assert_eq!(parse_slots("1020-1023").unwrap().len(), 4);
        assert!(parse_slots("1024").is_err());
        assert!(parse_slots("5-1").is_err());
        assert!(parse_slots("x").is_err());
        assert!(parse_slots("").is_err());
    }

    #[test]
    fn an_even_map_gives_each_shard_one_range_of_equal_size() {
        let names = vec![shard_name(0), shard_name(1), shard_name(2)];
        let map = ShardMap::even(names, 1);
        let ranges = map.ranges();
        assert_eq!(ranges.len(), 3);
        assert_eq!((ranges[0].first, ranges[2].last), (0, SLOTS - 1));
        let counts = map.slot_counts();
        assert_eq!(counts.values().sum::<usize>(), usize::from(SLOTS));
        assert!(
            counts.values().all(|n| (341..=342).contains(n)),
            "{counts:?}"
        );
        assert_eq!(map.owner(0), 0);
        assert_eq!(map.owner(SLOTS - 1), 2);
    }
}

/// Whether the shard of `tx` serves `slot` (holds it, not fenced): the first
/// statement of a write to a shard. On PostgreSQL it locks the slot's row in
/// share mode until `tx` ends, so a fence waits for the writes in flight.
pub async fn serving(tx: &mut Tx, slot: u16) -> Result<bool, StoreError> {
    const SQLITE: &str = "SELECT state FROM owned_slots WHERE slot = $1";
    const POSTGRES: &str = "SELECT state FROM owned_slots WHERE slot = $1 FOR SHARE";
    let state: Option<String> = match tx {
        Tx::Sqlite(tx, _) => {
            sqlx::query_scalar(SQLITE)
                .bind(i32::from(slot))
                .fetch_optional(&mut **tx)
                .await?
        }
        Tx::Postgres(tx, _) => {
            sqlx::query_scalar(POSTGRES)
                .bind(i32::from(slot))
                .fetch_optional(&mut **tx)
                .await?
        }
    };
    Ok(state.as_deref() == Some("serving"))
}

/// How `db` holds `slot`: checked after a read, whose rows were the truth if
/// the shard still serves the slot, or holds it fenced while the map has not
/// moved ([`Shards::read_was_current`]).
pub async fn held(db: &Database, slot: u16) -> Result<Option<String>, StoreError> {
    const Q: &str = "SELECT state FROM owned_slots WHERE slot = $1";
    Ok(with_pool!(db, pool => {
        sqlx::query_scalar(Q).bind(i32::from(slot)).fetch_optional(pool).await?
    }))
}

/// The first start over a shard: it holds `slots` (its share of the new
/// map), unless it already holds any slot.
async fn hold_first_slots(db: &Database, slots: &[u16]) -> Result<(), StoreError> {
    const ANY: &str = "SELECT COUNT(*) FROM owned_slots";
    let held: i64 = with_pool!(db, pool => sqlx::query_scalar(ANY).fetch_one(pool).await?);
    if held > 0 || slots.is_empty() {
        return Ok(());
    }
    set_slots(db, slots, Some("serving")).await
}

/// Sets `slots` in `db`'s `owned_slots` to `state` (`None`: not held), in
/// one statement (the slots are numbers below [`SLOTS`], written into it).
async fn set_slots(db: &Database, slots: &[u16], state: Option<&str>) -> Result<(), StoreError> {
    if slots.is_empty() {
        return Ok(());
    }
    let sql = match state {
        Some(state) => {
            let state = if state == "serving" {
                "serving"
            } else {
                "fenced"
            };
            let rows: Vec<String> = slots.iter().map(|s| format!("({s}, '{state}')")).collect();
            format!(
                "INSERT INTO owned_slots (slot, state) VALUES {} \
                 ON CONFLICT (slot) DO UPDATE SET state = excluded.state",
                rows.join(", ")
            )
        }
        None => {
            let list: Vec<String> = slots.iter().map(u16::to_string).collect();
            format!(
                "DELETE FROM owned_slots WHERE slot IN ({})",
                list.join(", ")
            )
        }
    };
    let mut tx = db.begin().await?;
    with_tx!(&mut tx, conn => {
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(conn).await?;
    });
    tx.commit().await
}

/// The rows a service keeps by key in the shards, as a move copies them.
/// Each service whose rows live in shards implements it for its tables.
#[async_trait]
pub trait SlotRows: Send + Sync {
    /// Copies the rows of `slots` changed at or after `since` (µs since the
    /// epoch; 0: all) from `source` to `target`, overwriting what `target`
    /// has of them. Returns how many rows it copied.
    async fn copy(
        &self,
        source: &Database,
        target: &Database,
        slots: &[u16],
        since: i64,
    ) -> Result<u64, StoreError>;
    /// Deletes the rows of `slots` from `db` (a shard that no longer holds them).
    async fn delete(&self, db: &Database, slots: &[u16]) -> Result<u64, StoreError>;
}

/// What a flip waits for: every consumer of the source shard's log has
/// handled it up to its head (the fenced slots' last events), so that a key's
/// events written after the flip, to the target's log, never overtake them.
#[async_trait]
pub trait LogDrain: Send + Sync {
    async fn drained(&self, shard: &Shard, within: Duration) -> Result<bool, StoreError>;
}

/// A move as recorded in the main database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MoveRecord {
    pub slots: Vec<u16>,
    pub source: String,
    pub target: String,
    /// `copying`, `fenced` or `flipped`.
    pub state: String,
    pub copied_since: i64,
    pub started_at: i64,
}

/// A resharding request: slots to a shard, or an even share for every shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Move { slots: Vec<u16>, target: String },
    Rebalance,
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Move { slots, target } => write!(f, "move {} slots to {target}", slots.len()),
            Self::Rebalance => f.write_str("rebalance"),
        }
    }
}

/// The last request as recorded in the main database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// What was asked (`move 100 slots to shard-2`, `rebalance`).
    pub request: String,
    /// `running`, `done` or `failed`.
    pub state: String,
    /// What the runner wrote when it ended (the moves, or why it failed).
    pub result: Option<String>,
    pub asked_at: i64,
    pub ended_at: Option<i64>,
}

/// What a finished move did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MoveReport {
    pub slots: usize,
    pub source: String,
    pub target: String,
    /// Rows copied, over every pass.
    pub rows: u64,
    /// How long writes to the slots were refused (fence to the target serving).
    pub fenced_ms: u64,
    /// Whether it took over a move that a mover left unfinished.
    pub resumed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MoveError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("no shard is named {0}")]
    UnknownShard(String),
    #[error("slot {0} does not exist (slots are 0 to 1023)")]
    BadSlot(u16),
    #[error(
        "a move of {slots} slots from {source_shard} to {target} is in progress; it is resumed first"
    )]
    Busy {
        slots: usize,
        source_shard: String,
        target: String,
    },
    #[error("another process runs the move in progress")]
    Leased,
    #[error("a request runs already: {0}")]
    Asked(String),
    #[error("the consumers of {0}'s log did not catch up while its slots were fenced: try again")]
    NotDrained(String),
    #[error("{0}")]
    Map(String),
}

impl From<sqlx::Error> for MoveError {
    fn from(error: sqlx::Error) -> Self {
        Self::Store(error.into())
    }
}

impl From<ShardSetupError> for MoveError {
    fn from(error: ShardSetupError) -> Self {
        match error {
            ShardSetupError::Store(e) => Self::Store(e),
            other => Self::Map(other.to_string()),
        }
    }
}

/// The longest a move keeps writes to its slots refused while the consumers
/// of the source's log catch up; past it, the fence is lifted and the move
/// tries again (at most [`FENCE_TRIES`] times).
const DRAIN_WITHIN: Duration = Duration::from_secs(2);
const FENCE_TRIES: u32 = 3;
/// How long a mover holds the move without renewing (it renews at each step
/// and each copy pass).
const MOVE_LEASE: Duration = Duration::from_secs(10);
/// A copy pass that copied at most this many rows is followed by the fence.
const QUIET_PASS: u64 = 50;
const MAX_PASSES: u32 = 8;
/// Clock skew allowed between processes: a pass copies from this long before
/// the previous pass began.
const SKEW_MICROS: i64 = 1_000_000;
/// How long before its commit a write may have stamped its row's `updated_at`
/// at most: a request is cut off (its transaction rolled back) long before.
/// The copy made under the fence takes every row changed since this long
/// before the move began, so no write that committed before the fence is
/// missed, whatever its stamp or the clocks' skew.
const STRAGGLER_MICROS: i64 = 300_000_000;

/// Where the copy under the fence starts.
fn last_copy_since(started_at: i64) -> i64 {
    started_at - STRAGGLER_MICROS
}

/// Moves slots between shards online: copy the slots' rows, copy again what
/// changed during the copy, fence writes to the slots on the source, copy the
/// last changes, wait for the source's log consumers, let the target serve,
/// flip the map (the epoch moves on, announced to every process), then drop
/// the source's hold and delete its rows. The move's state is kept in the main
/// database (`shard_moves`), so a mover killed at any step is resumed by the
/// next one: every step can run again.
pub struct Mover {
    shards: Shards,
    rows: Vec<Arc<dyn SlotRows>>,
    drain: Arc<dyn LogDrain>,
    owner: String,
}

impl Mover {
    pub fn new(shards: Shards, rows: Vec<Arc<dyn SlotRows>>, drain: Arc<dyn LogDrain>) -> Self {
        Self {
            shards,
            rows,
            drain,
            owner: format!("{}-{}", std::process::id(), Uuid::now_v7().simple()),
        }
    }

    pub fn shards(&self) -> &Shards {
        &self.shards
    }

    /// The move in progress, if any.
    pub async fn current(&self) -> Result<Option<MoveRecord>, StoreError> {
        current_move(&self.shards.inner.main).await
    }

    /// Moves `slots` to the shard named `target`: one move per shard that
    /// holds some of them (slots already there are left). A move left
    /// unfinished is resumed first.
    pub async fn move_slots(
        &self,
        slots: &[u16],
        target: &str,
    ) -> Result<Vec<MoveReport>, MoveError> {
        let mut reports = Vec::new();
        if let Some(report) = self.resume().await? {
            reports.push(report);
        }
        self.shards.reload().await?;
        let to = self
            .shards
            .map()
            .index_of(target)
            .ok_or_else(|| MoveError::UnknownShard(target.to_owned()))?;
        let mut by_source: BTreeMap<usize, Vec<u16>> = BTreeMap::new();
        for &slot in slots {
            if slot >= SLOTS {
                return Err(MoveError::BadSlot(slot));
            }
            let from = self.shards.map().owner(slot);
            if from != to {
                by_source.entry(from).or_default().push(slot);
            }
        }
        for (from, mut slots) in by_source {
            slots.sort_unstable();
            slots.dedup();
            let source = self.shards.all()[from].name().to_owned();
            self.begin(&slots, &source, target).await?;
            reports.push(self.run(false).await?);
        }
        Ok(reports)
    }

    /// Moves slots so that every shard holds an even share (shards added to
    /// the list get slots from the others): the fewest slots move.
    pub async fn rebalance(&self) -> Result<Vec<MoveReport>, MoveError> {
        let mut reports = Vec::new();
        if let Some(report) = self.resume().await? {
            reports.push(report);
        }
        self.shards.reload().await?;
        let map = self.shards.map();
        let n = self.shards.all().len();
        let total = usize::from(SLOTS);
        // Shard i's share: total/n, the first total%n shards one more.
        let share = |i: usize| total / n + usize::from(i < total % n);
        let mut spare: Vec<u16> = Vec::new();
        for i in 0..n {
            let held = map.slots_of(i);
            // The highest slots leave, so what stays are whole ranges.
            spare.extend(held.iter().skip(share(i)));
        }
        spare.sort_unstable();
        let mut plan: Vec<(String, Vec<u16>)> = Vec::new();
        for i in 0..n {
            let lacking = share(i).saturating_sub(map.slots_of(i).len());
            if lacking == 0 {
                continue;
            }
            let given: Vec<u16> = spare.drain(..lacking.min(spare.len())).collect();
            plan.push((self.shards.all()[i].name().to_owned(), given));
        }
        for (target, slots) in plan {
            reports.extend(self.move_slots(&slots, &target).await?);
        }
        Ok(reports)
    }

    /// Records `request` as the one to run (refused while another runs),
    /// held by this mover: [`Mover::run_request`] runs it.
    pub async fn ask(&self, request: &Request) -> Result<(), MoveError> {
        const ASK: &str = "INSERT INTO shard_requests (id, request, slots, target, state, asked_at, \
                           lease_owner, lease_until) VALUES (1, $1, $2, $3, 'running', $4, $5, $6) \
                           ON CONFLICT (id) DO UPDATE SET request = excluded.request, slots = excluded.slots, \
                           target = excluded.target, state = 'running', result = NULL, \
                           asked_at = excluded.asked_at, ended_at = NULL, \
                           lease_owner = excluded.lease_owner, lease_until = excluded.lease_until \
                           WHERE shard_requests.state <> 'running'";
        let (slots, target) = match request {
            Request::Move { slots, target } => (
                Some(
                    slots
                        .iter()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(","),
                ),
                Some(target.clone()),
            ),
            Request::Rebalance => (None, None),
        };
        let at = now_micros();
        let asked = with_pool!(self.shards.inner.main, pool => {
            sqlx::query(ASK).bind(request.to_string()).bind(slots).bind(target).bind(at)
                .bind(&self.owner).bind(at + micros(MOVE_LEASE))
                .execute(pool).await.map_err(StoreError::from)?.rows_affected()
        });
        if asked == 1 {
            return Ok(());
        }
        let running = self.request().await?.map(|r| r.request).unwrap_or_default();
        Err(MoveError::Asked(running))
    }

    /// The last request, if any.
    pub async fn request(&self) -> Result<Option<RequestRecord>, StoreError> {
        const Q: &str =
            "SELECT request, state, result, asked_at, ended_at FROM shard_requests WHERE id = 1";
        type Row = (String, String, Option<String>, i64, Option<i64>);
        let row: Option<Row> = with_pool!(self.shards.inner.main, pool => sqlx::query_as(Q).fetch_optional(pool).await?);
        Ok(row.map(
            |(request, state, result, asked_at, ended_at)| RequestRecord {
                request,
                state,
                result,
                asked_at,
                ended_at,
            },
        ))
    }

    /// Runs the request that is `running` if this mover holds it or its
    /// runner's lease ran out (`None`: there is none to run here), and
    /// records how it ended with `describe`'s text of the outcome.
    pub async fn run_request(
        &self,
        describe: impl Fn(&Result<Vec<MoveReport>, MoveError>) -> String,
    ) -> Result<Option<Vec<MoveReport>>, StoreError> {
        const TAKE: &str = "UPDATE shard_requests SET lease_owner = $1, lease_until = $2 \
                            WHERE id = 1 AND state = 'running' \
                            AND (lease_owner IS NULL OR lease_owner = $1 OR lease_until < $3) \
                            RETURNING slots, target";
        const END: &str = "UPDATE shard_requests SET state = $1, result = $2, ended_at = $3, \
                           lease_owner = NULL, lease_until = NULL WHERE id = 1 AND lease_owner = $4";
        let at = now_micros();
        let taken: Option<(Option<String>, Option<String>)> = with_pool!(self.shards.inner.main, pool => {
            sqlx::query_as(TAKE).bind(&self.owner).bind(at + micros(MOVE_LEASE)).bind(at)
                .fetch_optional(pool).await?
        });
        let Some((slots, target)) = taken else {
            return Ok(None);
        };
        // The lease is renewed while the moves run (each step of a move
        // renews the move's own, this one alongside).
        let renew = self.renew_request();
        let work = async {
            match (slots, target) {
                (Some(slots), Some(target)) => {
                    let slots: Vec<u16> = slots.split(',').filter_map(|s| s.parse().ok()).collect();
                    self.move_slots(&slots, &target).await
                }
                _ => self.rebalance().await,
            }
        };
        let result = tokio::select! {
            result = work => result,
            () = renew => Err(MoveError::Leased),
        };
        let state = if result.is_ok() { "done" } else { "failed" };
        let text = describe(&result);
        with_pool!(self.shards.inner.main, pool => {
            sqlx::query(END).bind(state).bind(&text).bind(now_micros()).bind(&self.owner)
                .execute(pool).await?;
        });
        match result {
            Ok(reports) => Ok(Some(reports)),
            Err(MoveError::Store(e)) => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "resharding request failed");
                Ok(Some(Vec::new()))
            }
        }
    }

    /// Renews the request's lease every third of it; ends (never, unless the
    /// lease was lost) when another mover took it.
    async fn renew_request(&self) {
        const RENEW: &str =
            "UPDATE shard_requests SET lease_until = $1 WHERE id = 1 AND lease_owner = $2";
        loop {
            tokio::time::sleep(MOVE_LEASE / 3).await;
            let renewed = with_pool!(self.shards.inner.main, pool => {
                sqlx::query(RENEW).bind(now_micros() + micros(MOVE_LEASE)).bind(&self.owner)
                    .execute(pool).await.map(|r| r.rows_affected())
            });
            match renewed {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "request lease not renewed"),
            }
        }
    }

    /// Runs the move a mover left unfinished, if there is one.
    pub async fn resume(&self) -> Result<Option<MoveReport>, MoveError> {
        if self.current().await?.is_none() {
            return Ok(None);
        }
        Ok(Some(self.run(true).await?))
    }

    /// Records a new move (refused while another is in progress).
    async fn begin(&self, slots: &[u16], source: &str, target: &str) -> Result<(), MoveError> {
        const BEGIN: &str = "INSERT INTO shard_moves (id, slots, source, target, state, copied_since, \
                             started_at, lease_owner, lease_until) \
                             VALUES (1, $1, $2, $3, 'copying', 0, $4, $5, $6) ON CONFLICT (id) DO NOTHING";
        let list = slots
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let at = now_micros();
        let lease = at + micros(MOVE_LEASE);
        let begun = with_pool!(self.shards.inner.main, pool => {
            sqlx::query(BEGIN).bind(&list).bind(source).bind(target).bind(at)
                .bind(&self.owner).bind(lease).execute(pool).await.map_err(StoreError::from)?
                .rows_affected()
        });
        if begun == 1 {
            return Ok(());
        }
        match self.current().await? {
            Some(other) => Err(MoveError::Busy {
                slots: other.slots.len(),
                source_shard: other.source,
                target: other.target,
            }),
            None => Err(MoveError::Leased),
        }
    }

    /// Takes (or keeps) the move's lease; false when another live mover has it.
    async fn lease(&self) -> Result<bool, StoreError> {
        const TAKE: &str = "UPDATE shard_moves SET lease_owner = $1, lease_until = $2 \
                            WHERE id = 1 AND (lease_owner IS NULL OR lease_owner = $1 OR lease_until < $3)";
        let at = now_micros();
        let taken = with_pool!(self.shards.inner.main, pool => {
            sqlx::query(TAKE).bind(&self.owner).bind(at + micros(MOVE_LEASE)).bind(at)
                .execute(pool).await?.rows_affected()
        });
        Ok(taken == 1)
    }

    /// Records the move's next state (fenced by the lease).
    async fn advance(&self, state: &str, copied_since: i64) -> Result<(), MoveError> {
        const Q: &str = "UPDATE shard_moves SET state = $1, copied_since = $2, lease_until = $3 \
                         WHERE id = 1 AND lease_owner = $4";
        let moved = with_pool!(self.shards.inner.main, pool => {
            sqlx::query(Q).bind(state).bind(copied_since).bind(now_micros() + micros(MOVE_LEASE))
                .bind(&self.owner).execute(pool).await.map_err(StoreError::from)?.rows_affected()
        });
        if moved == 1 {
            Ok(())
        } else {
            Err(MoveError::Leased)
        }
    }

    /// Runs the recorded move from its state to the end, under its lease,
    /// renewed all along; stops if
    /// another mover took it (only after this one failed to renew for a lease
    /// period: its steps can all run again).
    async fn run(&self, resumed: bool) -> Result<MoveReport, MoveError> {
        if !self.lease().await? {
            return Err(MoveError::Leased);
        }
        let renew = async {
            loop {
                tokio::time::sleep(MOVE_LEASE / 3).await;
                match self.lease().await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => tracing::warn!(error = %e, "move lease not renewed"),
                }
            }
        };
        tokio::select! {
            result = self.steps(resumed) => result,
            () = renew => Err(MoveError::Leased),
        }
    }

    async fn steps(&self, resumed: bool) -> Result<MoveReport, MoveError> {
        let Some(record) = self.current().await? else {
            return Ok(MoveReport::default());
        };
        let source = self
            .shards
            .by_name(&record.source)
            .ok_or_else(|| MoveError::UnknownShard(record.source.clone()))?
            .clone();
        let target = self
            .shards
            .by_name(&record.target)
            .ok_or_else(|| MoveError::UnknownShard(record.target.clone()))?
            .clone();
        let slots = record.slots.clone();
        let mut report = MoveReport {
            slots: slots.len(),
            source: source.name().to_owned(),
            target: target.name().to_owned(),
            resumed,
            ..MoveReport::default()
        };
        tracing::info!(slots = slots.len(), source = source.name(), target = target.name(),
            state = %record.state, resumed, "slot move");
        if record.state == "copying" && record.copied_since == 0 {
            // Rows of these slots on the target are leftovers of a move that
            // was given up (the target does not hold the slots): gone first.
            for rows in &self.rows {
                rows.delete(target.db(), &slots).await?;
            }
        }
        let mut state = record.state.clone();
        let mut since = record.copied_since;
        let mut tries = 0;
        while state == "copying" {
            // Copy until a pass finds little that changed during the last.
            for _ in 0..MAX_PASSES {
                let began = now_micros();
                let copied = self.copy(&source, &target, &slots, since).await?;
                report.rows += copied;
                since = began - SKEW_MICROS;
                self.advance("copying", since).await?;
                if copied <= QUIET_PASS {
                    break;
                }
            }
            // The source's log consumers catch up before the fence, so that
            // the fence waits only for the events written since.
            self.drain.drained(&source, DRAIN_WITHIN * 5).await?;
            // Fence: writes in flight end first (PostgreSQL: the share locks),
            // later ones are refused.
            let fenced_at = std::time::Instant::now();
            set_slots(source.db(), &slots, Some("fenced")).await?;
            self.advance("fenced", since).await?;
            report.rows += self
                .copy(&source, &target, &slots, last_copy_since(record.started_at))
                .await?;
            if self.drain.drained(&source, DRAIN_WITHIN).await? {
                set_slots(target.db(), &slots, Some("serving")).await?;
                report.fenced_ms =
                    u64::try_from(fenced_at.elapsed().as_millis()).unwrap_or(u64::MAX);
                state = "fenced".to_owned();
                break;
            }
            // Writes may not wait longer: lift the fence and try again (the
            // record first: a mover resumed from `fenced` fences again).
            self.advance("copying", since).await?;
            set_slots(source.db(), &slots, Some("serving")).await?;
            tries += 1;
            if tries >= FENCE_TRIES {
                return Err(MoveError::NotDrained(source.name().to_owned()));
            }
        }
        if state == "fenced" {
            // Resumed here: the last copy and the target's hold may not have
            // happened; both can run again (the source takes no writes).
            if resumed && record.state == "fenced" {
                set_slots(source.db(), &slots, Some("fenced")).await?;
                report.rows += self
                    .copy(&source, &target, &slots, last_copy_since(record.started_at))
                    .await?;
                if !self.drain.drained(&source, DRAIN_WITHIN * 5).await? {
                    // Writes may not wait for it: back to copying, unfenced.
                    self.advance("copying", since).await?;
                    set_slots(source.db(), &slots, Some("serving")).await?;
                    return Err(MoveError::NotDrained(source.name().to_owned()));
                }
                set_slots(target.db(), &slots, Some("serving")).await?;
            }
            self.flip(&slots, target.name()).await?;
        }
        // Flipped: the source gives the slots up, then its rows go.
        set_slots(source.db(), &slots, None).await?;
        for rows in &self.rows {
            rows.delete(source.db(), &slots).await?;
        }
        self.finish().await?;
        tracing::info!(
            slots = slots.len(),
            source = source.name(),
            target = target.name(),
            rows = report.rows,
            fenced_ms = report.fenced_ms,
            "slot move done"
        );
        Ok(report)
    }

    async fn copy(
        &self,
        source: &Shard,
        target: &Shard,
        slots: &[u16],
        since: i64,
    ) -> Result<u64, StoreError> {
        let mut copied = 0;
        for rows in &self.rows {
            copied += rows.copy(source.db(), target.db(), slots, since).await?;
        }
        Ok(copied)
    }

    /// The map gives `slots` to `target`, the epoch moves on, and the move is
    /// `flipped`, in one transaction; then every process hears of it.
    async fn flip(&self, slots: &[u16], target: &str) -> Result<(), MoveError> {
        const CLEAR: &str = "DELETE FROM shard_ranges";
        const RANGE: &str =
            "INSERT INTO shard_ranges (first_slot, last_slot, shard) VALUES ($1, $2, $3)";
        const EPOCH: &str = "UPDATE shard_map SET epoch = epoch + 1 WHERE id = 1";
        const STATE: &str =
            "UPDATE shard_moves SET state = 'flipped' WHERE id = 1 AND lease_owner = $1";
        let names: Vec<String> = self
            .shards
            .all()
            .iter()
            .map(|s| s.name().to_owned())
            .collect();
        let main = &self.shards.inner.main;
        let mut map = read_map(main, &names).await?;
        let to = map
            .index_of(target)
            .ok_or_else(|| MoveError::UnknownShard(target.to_owned()))?;
        for slot in slots {
            if let Some(owner) = map.owners.get_mut(usize::from(*slot)) {
                *owner = to;
            }
        }
        let mut tx = main.begin().await?;
        tx.wake_everywhere_on_commit(Topic::Shards).await?;
        let flipped = with_tx!(&mut tx, conn => {
            sqlx::query(STATE).bind(&self.owner).execute(&mut *conn).await?.rows_affected()
        });
        if flipped != 1 {
            tx.rollback().await?;
            return Err(MoveError::Leased);
        }
        with_tx!(&mut tx, conn => {
            sqlx::query(CLEAR).execute(&mut *conn).await?;
            sqlx::query(EPOCH).execute(&mut *conn).await?;
        });
        for range in map.ranges() {
            with_tx!(&mut tx, conn => {
                sqlx::query(RANGE)
                    .bind(i32::from(range.first))
                    .bind(i32::from(range.last))
                    .bind(&range.shard)
                    .execute(conn)
                    .await?;
            });
        }
        tx.commit().await?;
        self.shards.reload().await?;
        Ok(())
    }

    async fn finish(&self) -> Result<(), StoreError> {
        const DONE: &str = "DELETE FROM shard_moves WHERE id = 1 AND lease_owner = $1";
        with_pool!(self.shards.inner.main, pool => {
            sqlx::query(DONE).bind(&self.owner).execute(pool).await?;
        });
        Ok(())
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Frees the lease of the move in progress, for a process that knows no other
/// process runs (the embedded data folder's lock): its holder is dead, so the
/// move is resumed at once rather than when the lease runs out.
pub async fn release_move_lease(main: &Database) -> Result<(), StoreError> {
    const MOVE: &str = "UPDATE shard_moves SET lease_owner = NULL, lease_until = NULL WHERE id = 1";
    const REQUEST: &str =
        "UPDATE shard_requests SET lease_owner = NULL, lease_until = NULL WHERE id = 1";
    with_pool!(main, pool => {
        sqlx::query(MOVE).execute(pool).await?;
        sqlx::query(REQUEST).execute(pool).await?;
    });
    Ok(())
}

/// The move in progress, if any.
async fn current_move(main: &Database) -> Result<Option<MoveRecord>, StoreError> {
    const Q: &str = "SELECT slots, source, target, state, copied_since, started_at FROM shard_moves WHERE id = 1";
    let row: Option<(String, String, String, String, i64, i64)> = with_pool!(main, pool => {
        sqlx::query_as(Q).fetch_optional(pool).await?
    });
    Ok(row.map(
        |(slots, source, target, state, copied_since, started_at)| MoveRecord {
            slots: slots.split(',').filter_map(|s| s.parse().ok()).collect(),
            source,
            target,
            state,
            copied_since,
            started_at,
        },
    ))
}
