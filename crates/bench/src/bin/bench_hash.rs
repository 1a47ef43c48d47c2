//! `bench-hash [--runs N] [--warmup N] [--argon2-cli PATH]...`: times argon2id
//! (m = 19456 KiB, t = 2, p = 1) several ways, interleaved run by run so that the
//! machine's noise falls on all of them alike:
//!
//! - `Hasher`: the product's own path (`scaleshop_users::hashing::Hasher`: a
//!   hashing slot, the blocking pool, a reused working buffer), hash and verify;
//! - `argon2 crate, fresh memory`: `Argon2::hash_password` on this thread, which
//!   allocates (and zeroes) 19 MiB per call, as the product did before;
//! - `argon2 crate, reused memory`: `hash_password_into_with_memory` on this
//!   thread with one buffer, the floor of the crate;
//! - `argon2-rust`: the port of the reference implementation with SIMD picked at
//!   run time (its backend is named in the row), one-shot (fresh arena per hash)
//!   and through its pooled `Hasher` (one arena, wiped after each hash);
//! - each `--argon2-cli` command (default: `argon2`, Debian's build of the
//!   reference C implementation) as it reports its own time, when it runs. The
//!   tags of all ways are checked equal on every run.
//!
//! Prints the median, p90 and min of each, in milliseconds, as a markdown table.

use std::io::Write;
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use argon2::{Algorithm, Argon2, Block, Params, PasswordHasher, Version};
use clap::Parser;
use scaleshop_bench::{median, percentile, show};
use scaleshop_users::domain::Password;
use scaleshop_users::hashing::Hasher;

#[derive(Debug, Parser)]
#[command(
    name = "bench-hash",
    about = "Median, p90 and min of argon2id through the product's Hasher, the argon2 crate and the argon2 command."
)]
struct Args {
    /// Timed runs of each way.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// Untimed runs of each way first. The first hashes of a process are slower
    /// (fresh memory for the 19 MiB each hash fills); a running server is past them.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=1000))]
    warmup: u32,
    /// A command line of the reference implementation (`argon2 salt -id ...`,
    /// password on stdin); may be repeated; one that cannot run is skipped.
    #[arg(long, default_value = "argon2")]
    argon2_cli: Vec<String>,
}

// The server's allocator, so "fresh memory" costs what it costs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PASSWORD: &str = "correct horse battery staple";
const SALT: &[u8; 16] = b"bench-hash-salt!";

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

fn crate_argon2() -> Result<Argon2<'static>, String> {
    let params = Params::new(19_456, 2, 1, Some(32)).map_err(|e| e.to_string())?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// One run of the `argon2` command, in ms as it reports (`N.NNN seconds`).
fn cli_run(cli: &str) -> Result<f64, String> {
    let mut child = Command::new(cli)
        .args([
            "bench-hash-salt!",
            "-id",
            "-t",
            "2",
            "-k",
            "19456",
            "-p",
            "1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{cli}: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(PASSWORD.as_bytes())
        .map_err(|e| e.to_string())?;
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find_map(|line| line.strip_suffix(" seconds"))
        .and_then(|seconds| seconds.trim().parse::<f64>().ok())
        .map(|seconds| seconds * 1000.0)
        .ok_or_else(|| format!("{cli}: no time in its output"))
}

fn rust_argon2() -> Result<argon2_rust::Argon2, String> {
    let params = argon2_rust::Params::builder()
        .memory(argon2_rust::params::Memory::kib(19_456))
        .passes(2)
        .lanes(1)
        .tag_len(argon2_rust::params::TagLen::bytes(32))
        .build()
        .map_err(|e| e.to_string())?;
    Ok(argon2_rust::Argon2::new(
        argon2_rust::Algorithm::Argon2id,
        argon2_rust::Version::V0x13,
        params,
    ))
}

#[derive(Default)]
struct Samples {
    hasher_hash: Vec<f64>,
    hasher_verify: Vec<f64>,
    fresh: Vec<f64>,
    reused: Vec<f64>,
    rust_fresh: Vec<f64>,
    rust_pooled: Vec<f64>,
    cli: Vec<Vec<f64>>,
}

/// The other ways of one round, beside the product's `Hasher`.
struct Ways<'a> {
    memory: &'a mut [Block],
    rust_hasher: &'a mut argon2_rust::Hasher,
    clis: &'a [String],
}

async fn round(
    hasher: &Hasher,
    password: &Password,
    ways: &mut Ways<'_>,
    samples: &mut Samples,
) -> Result<(), String> {
    let argon2 = crate_argon2()?;
    let start = Instant::now();
    let hash = hasher.hash(password).await.map_err(|e| e.to_string())?;
    samples.hasher_hash.push(ms(start));
    let start = Instant::now();
    let ok = hasher
        .verify(password.expose(), &hash)
        .await
        .map_err(|e| e.to_string())?;
    samples.hasher_verify.push(ms(start));
    if !ok {
        return Err("verify refused the password it had just hashed".to_owned());
    }
    let start = Instant::now();
    argon2
        .hash_password(PASSWORD.as_bytes())
        .map_err(|e| e.to_string())?;
    samples.fresh.push(ms(start));
    let mut out = [0u8; 32];
    let start = Instant::now();
    argon2
        .hash_password_into_with_memory(PASSWORD.as_bytes(), SALT, &mut out, &mut *ways.memory)
        .map_err(|e| e.to_string())?;
    samples.reused.push(ms(start));
    let rust = rust_argon2()?;
    let mut rust_out = [0u8; 32];
    let start = Instant::now();
    rust.hash_into(PASSWORD.as_bytes(), SALT, &mut rust_out)
        .map_err(|e| e.to_string())?;
    samples.rust_fresh.push(ms(start));
    if rust_out != out {
        return Err("argon2-rust (one-shot) and the argon2 crate disagree".to_owned());
    }
    let start = Instant::now();
    ways.rust_hasher
        .hash_into(PASSWORD.as_bytes(), SALT, &mut rust_out)
        .map_err(|e| e.to_string())?;
    samples.rust_pooled.push(ms(start));
    if rust_out != out {
        return Err("argon2-rust (pooled) and the argon2 crate disagree".to_owned());
    }
    samples.cli.resize_with(ways.clis.len(), Vec::new);
    for (cli, times) in ways.clis.iter().zip(&mut samples.cli) {
        times.push(cli_run(cli)?);
    }
    Ok(())
}

async fn run(args: Args) -> Result<(), String> {
    let hasher = Hasher::default();
    let password = Password::parse(PASSWORD).map_err(|e| e.to_string())?;
    let warm = hasher.hash(&password).await.map_err(|e| e.to_string())?;
    let clis: Vec<String> = args
        .argon2_cli
        .iter()
        .filter(|cli| match cli_run(cli) {
            Ok(_) => true,
            Err(e) => {
                eprintln!("bench-hash: skipping {cli} ({e})");
                false
            }
        })
        .cloned()
        .collect();
    let blocks = crate_argon2()?.params().block_count();
    let mut memory = vec![Block::new(); blocks];
    let mut rust_hasher = rust_argon2()?.hasher();
    let mut ways = Ways {
        memory: &mut memory,
        rust_hasher: &mut rust_hasher,
        clis: &clis,
    };
    let mut discard = Samples::default();
    for _ in 0..args.warmup {
        round(&hasher, &password, &mut ways, &mut discard).await?;
    }
    let mut samples = Samples::default();
    for _ in 0..args.runs {
        round(&hasher, &password, &mut ways, &mut samples).await?;
    }
    // The PHC prefix names the algorithm and parameters actually used.
    let params: String = warm.0.split('$').take(4).collect::<Vec<_>>().join("$");
    println!(
        "### argon2id, parameters `{params}` ({} interleaved runs of each after {} untimed)",
        args.runs, args.warmup
    );
    println!();
    println!("| way | median ms | p90 ms | min ms |");
    println!("|---|---:|---:|---:|");
    let both: Vec<f64> = samples
        .hasher_hash
        .iter()
        .zip(&samples.hasher_verify)
        .map(|(h, v)| h + v)
        .collect();
    let backend = argon2_rust::detected_backend();
    let mut rows = vec![
        ("Hasher: hash (sign-up)".to_owned(), &samples.hasher_hash),
        (
            "Hasher: verify (sign-in)".to_owned(),
            &samples.hasher_verify,
        ),
        ("Hasher: hash + verify".to_owned(), &both),
        (
            "argon2 crate, fresh memory per hash".to_owned(),
            &samples.fresh,
        ),
        ("argon2 crate, reused memory".to_owned(), &samples.reused),
        (
            format!("argon2-rust ({backend}), one-shot"),
            &samples.rust_fresh,
        ),
        (
            format!("argon2-rust ({backend}), pooled Hasher"),
            &samples.rust_pooled,
        ),
    ];
    for (cli, times) in clis.iter().zip(&samples.cli) {
        rows.push((format!("`{cli}` (reference C, its own timer)"), times));
    }
    for (name, values) in rows {
        let min = values.iter().copied().reduce(f64::min);
        println!(
            "| {name} | {} | {} | {} |",
            show(median(values), 2),
            show(percentile(values, 90.0), 2),
            show(min, 2),
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("bench-hash: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-hash: {e}");
            ExitCode::FAILURE
        }
    }
}
