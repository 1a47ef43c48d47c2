//! `bench-hash [--runs N]`: times argon2id password hashing through the product's
//! own code path, `scaleshop_users::service::Hasher` (which runs on tokio's
//! blocking pool with the product's parameters), as sign-up (hash) and sign-in
//! (verify) pay it. A few untimed warm-up pairs, then N timed hash + verify pairs; prints
//! the median and p90 of each, in milliseconds, as a markdown table.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use scaleshop_bench::{median, percentile, show};
use scaleshop_users::domain::Password;
use scaleshop_users::service::Hasher;

#[derive(Debug, Parser)]
#[command(
    name = "bench-hash",
    about = "Median and p90 of argon2id hash and verify through scaleshop_users::service::Hasher."
)]
struct Args {
    /// Timed hash + verify pairs.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    runs: u32,
    /// Untimed hash + verify pairs first. The first pairs of a process are slower
    /// (fresh memory for the 19 MiB each hash fills); a running server is past them.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(0..=1000))]
    warmup: u32,
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1000.0
}

async fn run(args: Args) -> Result<(), String> {
    let hasher = Hasher;
    let password = Password::parse("correct horse battery staple").map_err(|e| e.to_string())?;
    let warm = hasher.hash(&password).await.map_err(|e| e.to_string())?;
    for _ in 0..args.warmup {
        let hash = hasher.hash(&password).await.map_err(|e| e.to_string())?;
        hasher
            .verify(password.expose(), &hash)
            .await
            .map_err(|e| e.to_string())?;
    }
    // The PHC prefix names the algorithm and parameters actually used.
    let params: String = warm.0.split('$').take(4).collect::<Vec<_>>().join("$");
    let (mut hash_ms, mut verify_ms, mut both_ms) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.runs {
        let start = Instant::now();
        let hash = hasher.hash(&password).await.map_err(|e| e.to_string())?;
        let hashed = ms(start);
        let start = Instant::now();
        let ok = hasher
            .verify(password.expose(), &hash)
            .await
            .map_err(|e| e.to_string())?;
        let verified = ms(start);
        if !ok {
            return Err("verify refused the password it had just hashed".to_owned());
        }
        hash_ms.push(hashed);
        verify_ms.push(verified);
        both_ms.push(hashed + verified);
    }
    println!(
        "### argon2id through scaleshop_users::service::Hasher ({} runs after {} untimed, parameters `{params}`)",
        args.runs, args.warmup
    );
    println!();
    println!("| operation | median ms | p90 ms | min ms | max ms |");
    println!("|---|---:|---:|---:|---:|");
    for (name, values) in [
        ("hash (sign-up)", &hash_ms),
        ("verify (sign-in)", &verify_ms),
        ("hash + verify", &both_ms),
    ] {
        let min = values.iter().copied().reduce(f64::min);
        let max = values.iter().copied().reduce(f64::max);
        println!(
            "| {name} | {} | {} | {} | {} |",
            show(median(values), 1),
            show(percentile(values, 90.0), 1),
            show(min, 1),
            show(max, 1)
        );
    }
    let per_run: Vec<String> = both_ms.iter().map(|v| format!("{v:.1}")).collect();
    println!();
    println!("hash + verify per run (ms): {}", per_run.join(", "));
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
