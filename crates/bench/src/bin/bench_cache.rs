//! `bench-cache --redis-url redis://127.0.0.1:PORT --dir DIR [--tasks 32]`: read
//! rates of `scaleshop_cache::TieredCache` with a Redis tier, in one run:
//!
//! - **l2**: one key per task, filled once; then each task loops
//!   `invalidate_local(key)` + `get_or_load(key)`, so every read misses L1 and is
//!   served from L2 (Redis). The loader counts its calls: `l2_loads` must be 0.
//! - **cold**: every read is a distinct, never-seen id: an L1 miss, an L2 miss
//!   (MGET), the load lease (SET NX), a real SQLite read (the loader), the L2
//!   write (a script) and the lease release.
//! - **raw**: the same SQLite read as the cold loader, on other ids, no cache:
//!   the baseline of **cold**.
//!
//! Prints `key=value` lines (rates per second) for scripts/bench-commerce.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use scaleshop_cache::{CacheSettings, Invalidate, Redis, TieredCache};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

#[derive(Debug, Parser)]
#[command(
    name = "bench-cache",
    about = "L2-hit, cold and raw read rates of scaleshop_cache::TieredCache with Redis."
)]
struct Args {
    /// Redis URL of the L2 tier.
    #[arg(long)]
    redis_url: String,
    /// Folder for the SQLite file of the loader (created if missing).
    #[arg(long)]
    dir: std::path::PathBuf,
    /// Concurrent tasks (as redis-benchmark's -c).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=1024))]
    tasks: u32,
    /// Total L2-hit reads.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    reads: u64,
    /// Cold reads (and as many raw reads).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    cold: u64,
    /// Redis call timeout in milliseconds (the product's default is 50).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    redis_timeout_ms: u64,
}

/// Shaped like a catalog product.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Product {
    id: String,
    sku: String,
    name: String,
    description: String,
    price_cents: i64,
    currency: String,
    available: i64,
}

async fn load(pool: &SqlitePool, id: &str) -> Result<Option<Product>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT id, sku, name, description, price_cents, currency, available FROM products WHERE id = ?1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(Product {
            id: r.try_get(0)?,
            sku: r.try_get(1)?,
            name: r.try_get(2)?,
            description: r.try_get(3)?,
            price_cents: r.try_get(4)?,
            currency: r.try_get(5)?,
            available: r.try_get(6)?,
        })
    })
    .transpose()
}

async fn database(dir: &std::path::Path, ids: &[String]) -> Result<SqlitePool, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let path = dir.join(format!("bench-cache-{}.db", uuid::Uuid::new_v4()));
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(5));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .map_err(|e| e.to_string())?;
    sqlx::query(
        "CREATE TABLE products (id TEXT PRIMARY KEY, sku TEXT NOT NULL, name TEXT NOT NULL, \
         description TEXT NOT NULL, price_cents INTEGER NOT NULL, currency TEXT NOT NULL, \
         available INTEGER NOT NULL)",
    )
    .execute(&pool)
    .await
    .map_err(|e| e.to_string())?;
    let mut tx = pool.begin().await.map_err(|e| e.to_string())?;
    for (i, id) in ids.iter().enumerate() {
        sqlx::query("INSERT INTO products VALUES (?1, ?2, ?3, ?4, ?5, 'EUR', 1000000)")
            .bind(id)
            .bind(format!("SKU-{i}"))
            .bind(format!("Bench product {i}"))
            .bind("A product of the cache benchmark, about as long as a real description.")
            .bind(1999_i64)
            .execute(&mut *tx)
            .await
            .map_err(|e| e.to_string())?;
    }
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(pool)
}

fn rate(count: u64, start: Instant) -> f64 {
    count as f64 / start.elapsed().as_secs_f64()
}

async fn join_all(handles: Vec<tokio::task::JoinHandle<Result<(), String>>>) -> Result<(), String> {
    for handle in handles {
        handle.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

async fn run(args: Args) -> Result<(), String> {
    let tasks = u64::from(args.tasks);
    let cold_ids: Vec<String> = (0..args.cold)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let raw_ids: Vec<String> = (0..args.cold)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let hot_ids: Vec<String> = (0..tasks)
        .map(|_| uuid::Uuid::new_v4().to_string())
        .collect();
    let all: Vec<String> = cold_ids
        .iter()
        .chain(&raw_ids)
        .chain(&hot_ids)
        .cloned()
        .collect();
    let pool = database(&args.dir, &all).await?;
    let redis = Redis::connect(
        &args.redis_url,
        Duration::from_millis(args.redis_timeout_ms),
    )
    .map_err(|e| e.to_string())?;
    if !redis.ping().await {
        return Err(format!("no answer from Redis at {}", args.redis_url));
    }
    let cache: Arc<TieredCache<Product>> = Arc::new(TieredCache::new(
        "bench",
        Some(redis),
        CacheSettings::default(),
    ));
    let loads = Arc::new(AtomicU64::new(0));

    // Fill L1 and L2 with the hot keys.
    for id in &hot_ids {
        let value = cache
            .get_or_load(id, None, || load(&pool, id))
            .await
            .map_err(|e| e.to_string())?;
        if value.is_none() {
            return Err(format!("hot key {id} did not load"));
        }
    }

    // l2: every read an L1 miss served from Redis.
    let per_task = args.reads / tasks;
    let start = Instant::now();
    let mut handles = Vec::new();
    for id in hot_ids.clone() {
        let (cache, pool, loads) = (cache.clone(), pool.clone(), loads.clone());
        handles.push(tokio::spawn(async move {
            for _ in 0..per_task {
                cache.invalidate_local(&id);
                let value = cache
                    .get_or_load(&id, None, || {
                        loads.fetch_add(1, Ordering::Relaxed);
                        load(&pool, &id)
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                if value.is_none() {
                    return Err(format!("hot key {id} read as missing"));
                }
            }
            Ok(())
        }));
    }
    join_all(handles).await?;
    println!("l2_reads={}", per_task * tasks);
    println!("l2_reads_per_s={:.0}", rate(per_task * tasks, start));
    println!("l2_loads={}", loads.load(Ordering::Relaxed));

    // cold: distinct never-seen ids, each a database load through both tiers.
    let cold_ids = Arc::new(cold_ids);
    let next = Arc::new(AtomicUsize::new(0));
    loads.store(0, Ordering::Relaxed);
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (cache, pool, loads, ids, next) = (
            cache.clone(),
            pool.clone(),
            loads.clone(),
            cold_ids.clone(),
            next.clone(),
        );
        handles.push(tokio::spawn(async move {
            while let Some(id) = ids.get(next.fetch_add(1, Ordering::Relaxed)) {
                let value = cache
                    .get_or_load(id, None, || {
                        loads.fetch_add(1, Ordering::Relaxed);
                        load(&pool, id)
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                if value.is_none() {
                    return Err(format!("cold key {id} read as missing"));
                }
            }
            Ok(())
        }));
    }
    join_all(handles).await?;
    println!("cold_reads={}", cold_ids.len());
    println!("cold_reads_per_s={:.0}", rate(cold_ids.len() as u64, start));
    println!("cold_loads={}", loads.load(Ordering::Relaxed));

    // raw: the loader alone, no cache.
    let raw_ids = Arc::new(raw_ids);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (pool, ids, next) = (pool.clone(), raw_ids.clone(), next.clone());
        handles.push(tokio::spawn(async move {
            while let Some(id) = ids.get(next.fetch_add(1, Ordering::Relaxed)) {
                if load(&pool, id).await.map_err(|e| e.to_string())?.is_none() {
                    return Err(format!("raw key {id} read as missing"));
                }
            }
            Ok(())
        }));
    }
    join_all(handles).await?;
    println!("raw_reads={}", raw_ids.len());
    println!("raw_reads_per_s={:.0}", rate(raw_ids.len() as u64, start));
    pool.close().await;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-cache: {e}");
            ExitCode::FAILURE
        }
    }
}
