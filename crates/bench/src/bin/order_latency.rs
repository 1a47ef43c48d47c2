//! `order-latency --base http://ADDR --token JWT --product ID [--orders N]`: places
//! N orders one at a time through `POST /v1/orders` and, for each, polls
//! `GET /v1/orders/{id}` every `--poll-ms` until its status is `completed`.
//! Prints the median, p90, p99 and max of (first `completed` seen − 202 received),
//! in milliseconds, as a markdown table row. The resolution is the poll interval
//! plus one GET round trip.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use scaleshop_bench::{median, percentile, show};

#[derive(Debug, Parser)]
#[command(
    name = "order-latency",
    about = "Latency from POST /v1/orders's 202 to the order being seen `completed`."
)]
struct Args {
    /// Base URL of a running `scaleshop serve`, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    base: String,
    /// Bearer token of the customer placing the orders.
    #[arg(long)]
    token: String,
    /// Product to order (quantity 1 per order).
    #[arg(long)]
    product: String,
    /// Orders to place, one at a time.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    orders: u32,
    /// Untimed orders first.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=10_000))]
    warmup: u32,
    /// Poll interval in milliseconds.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=1000))]
    poll_ms: u64,
    /// Give up on one order after this many seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=600))]
    timeout_secs: u64,
    /// Label printed in the first column.
    #[arg(long, default_value = "scaleshop")]
    label: String,
}

#[derive(Debug, serde::Deserialize)]
struct Order {
    id: String,
    status: String,
    failure_reason: Option<String>,
}

/// Places one order and returns the milliseconds from its 202 to `completed`.
async fn one(client: &reqwest::Client, args: &Args) -> Result<f64, String> {
    let body = serde_json::json!({
        "items": [{"product_id": args.product, "quantity": 1}],
        "payment_method": "pm_card_visa",
    });
    let response = client
        .post(format!("{}/v1/orders", args.base))
        .bearer_auth(&args.token)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("POST /v1/orders: {e}"))?;
    let status = response.status();
    let text = response.text().await.map_err(|e| e.to_string())?;
    let accepted = Instant::now();
    if status.as_u16() != 202 {
        return Err(format!("POST /v1/orders answered {status}: {text}"));
    }
    let order: Order = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    let url = format!("{}/v1/orders/{}", args.base, order.id);
    let deadline = accepted + Duration::from_secs(args.timeout_secs);
    let mut poll = tokio::time::interval(Duration::from_millis(args.poll_ms));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while Instant::now() < deadline {
        poll.tick().await;
        let response = client
            .get(&url)
            .bearer_auth(&args.token)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status();
        let text = response.text().await.map_err(|e| e.to_string())?;
        if status.as_u16() != 200 {
            return Err(format!("GET {url} answered {status}: {text}"));
        }
        let seen: Order = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        match seen.status.as_str() {
            "completed" => return Ok(accepted.elapsed().as_secs_f64() * 1000.0),
            "pending" => {}
            other => {
                return Err(format!(
                    "order {} ended {other} ({:?})",
                    seen.id, seen.failure_reason
                ));
            }
        }
    }
    Err(format!(
        "order {} not completed within {} s",
        order.id, args.timeout_secs
    ))
}

async fn run(args: Args) -> Result<(), String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    for _ in 0..args.warmup {
        one(&client, &args).await?;
    }
    let mut values = Vec::with_capacity(args.orders as usize);
    for _ in 0..args.orders {
        values.push(one(&client, &args).await?);
    }
    let max = values.iter().copied().reduce(f64::max);
    println!(
        "| {} | {} | {} | {} | {} | {} |",
        args.label,
        values.len(),
        show(median(&values), 1),
        show(percentile(&values, 90.0), 1),
        show(percentile(&values, 99.0), 1),
        show(max, 1),
    );
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("order-latency: {e}");
            ExitCode::FAILURE
        }
    }
}
