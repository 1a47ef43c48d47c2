//! The shared GCRA rate limit against a real Redis (started per test on a free port).

use std::time::{Duration, Instant};

use scaleshop_cache::{RateDecision, Redis, RedisError};
use scaleshop_testkit::RedisServer;

fn redis(server: &RedisServer) -> Redis {
    Redis::connect(&server.url(), Duration::from_millis(200)).unwrap()
}

async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

fn wait_of(decision: RateDecision) -> Duration {
    match decision {
        RateDecision::Refused { wait } => wait,
        RateDecision::Admitted => panic!("admitted, expected a refusal"),
    }
}

#[tokio::test]
async fn admits_the_burst_then_refuses_with_the_time_to_the_next_admission() {
    let server = RedisServer::start();
    let redis = redis(&server);
    let interval = Duration::from_secs(20); // 3 per minute
    for i in 0..3 {
        assert_eq!(
            redis.rate_limit("t", "k", interval, 3).await.unwrap(),
            RateDecision::Admitted,
            "request {i} of the burst"
        );
    }
    let wait = wait_of(redis.rate_limit("t", "k", interval, 3).await.unwrap());
    // The first of the burst is paid back one interval after it was admitted.
    assert!(
        wait > Duration::from_secs(19) && wait <= interval,
        "wait {wait:?}"
    );
    // A refusal costs nothing: the wait does not grow.
    let again = wait_of(redis.rate_limit("t", "k", interval, 3).await.unwrap());
    assert!(again <= wait, "{again:?} after {wait:?}");
    // Other keys and other limiters are separate.
    assert_eq!(
        redis.rate_limit("t", "other", interval, 3).await.unwrap(),
        RateDecision::Admitted
    );
    assert_eq!(
        redis.rate_limit("u", "k", interval, 3).await.unwrap(),
        RateDecision::Admitted
    );
    // Stored under the namespace, the key as given.
    let mut conn = raw(&server).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("scaleshop:ratelimit:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut keys = keys;
    keys.sort();
    assert_eq!(
        keys,
        [
            "scaleshop:ratelimit:t:k",
            "scaleshop:ratelimit:t:other",
            "scaleshop:ratelimit:u:k"
        ]
    );
}

#[tokio::test]
async fn the_wait_is_honest_and_the_key_expires_when_it_no_longer_matters() {
    let server = RedisServer::start();
    let redis = redis(&server);
    let mut conn = raw(&server).await;
    let interval = Duration::from_millis(300);
    let key = "scaleshop:ratelimit:t:k";
    assert_eq!(
        redis.rate_limit("t", "k", interval, 2).await.unwrap(),
        RateDecision::Admitted
    );
    // Kept as long as the state differs from none: one interval.
    let ttl: i64 = redis::cmd("PTTL")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 300, "PTTL {ttl}");
    assert_eq!(
        redis.rate_limit("t", "k", interval, 2).await.unwrap(),
        RateDecision::Admitted
    );
    let wait = wait_of(redis.rate_limit("t", "k", interval, 2).await.unwrap());
    assert!(wait > Duration::ZERO && wait <= interval, "wait {wait:?}");
    // After the announced wait, one more is admitted (and only one).
    tokio::time::sleep(wait + Duration::from_millis(5)).await;
    assert_eq!(
        redis.rate_limit("t", "k", interval, 2).await.unwrap(),
        RateDecision::Admitted
    );
    wait_of(redis.rate_limit("t", "k", interval, 2).await.unwrap());
    // Once every request is paid back the key is gone, and a full burst is back.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let exists: i64 = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if exists == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the key never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..2 {
        assert_eq!(
            redis.rate_limit("t", "k", interval, 2).await.unwrap(),
            RateDecision::Admitted
        );
    }
    wait_of(redis.rate_limit("t", "k", interval, 2).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_checks_from_several_processes_admit_exactly_the_burst() {
    let server = RedisServer::start();
    // Three connections stand for three processes; 8 tasks on each.
    let processes: Vec<Redis> = (0..3).map(|_| redis(&server)).collect();
    let burst = 10;
    let mut tasks = Vec::new();
    for redis in &processes {
        for _ in 0..8 {
            let redis = redis.clone();
            tasks.push(tokio::spawn(async move {
                let mut admitted = 0;
                for _ in 0..5 {
                    if redis
                        .rate_limit("t", "k", Duration::from_secs(60), burst)
                        .await
                        .unwrap()
                        == RateDecision::Admitted
                    {
                        admitted += 1;
                    }
                }
                admitted
            }));
        }
    }
    let mut admitted = 0;
    for task in tasks {
        admitted += task.await.unwrap();
    }
    // 120 checks within far less than a minute: exactly the burst gets through.
    assert_eq!(admitted, burst);
}

#[tokio::test]
async fn a_dead_redis_is_an_error_the_caller_can_fall_back_on() {
    let server = RedisServer::start();
    let redis = redis(&server);
    assert_eq!(
        redis
            .rate_limit("t", "k", Duration::from_secs(1), 1)
            .await
            .unwrap(),
        RateDecision::Admitted
    );
    drop(server);
    let started = Instant::now();
    let error = redis
        .rate_limit("t", "k", Duration::from_secs(1), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(error, RedisError::Redis(_) | RedisError::Timeout),
        "{error}"
    );
    // Then the breaker skips Redis without waiting.
    assert!(matches!(
        redis
            .rate_limit("t", "k", Duration::from_secs(1), 1)
            .await
            .unwrap_err(),
        RedisError::Open
    ));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}
