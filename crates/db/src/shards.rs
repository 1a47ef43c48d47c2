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
//! - A shard configured after the map was made joins it holding no slot (moving
//!   slots to it is the resharding's job).
//!
//! This module knows nothing of what is sharded: the stores that keep rows by
//! user ask [`Shards::for_key`] for the database of a key.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use uuid::Uuid;

use crate::clock::now_micros;
use crate::{Database, Migrations, StoreError, with_pool, with_tx};

/// How many hash slots the key space has. Fixed for the life of the data: a
/// different count would put every key in another slot.
pub const SLOTS: u16 = 1024;

/// The hash slot of a key.
pub fn slot_of(key: Uuid) -> u16 {
    // The remainder is below `SLOTS`, which fits in a u16.
    (crc32fast::hash(key.as_bytes()) % u32::from(SLOTS)) as u16
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
        let moved = map.epoch() != self.map().epoch();
        match self.inner.map.write() {
            Ok(mut current) => *current = Arc::new(map),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(map),
        }
        Ok(moved)
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
