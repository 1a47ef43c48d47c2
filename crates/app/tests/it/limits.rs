//! The HTTP server's bounds: header read timeout, idle timeout, maximum
//! connections. These are about connections, not storage: SQLite only.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{Backend, TestApp, test_config};

fn addr(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes the connection (EOF or reset), within `bound`.
/// Returns what arrived, or `None` if the connection was still open at the bound.
async fn until_closed(stream: &mut TcpStream, bound: Duration) -> Option<Vec<u8>> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(seen),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_closed_while_requests_are_answered() {
    let mut config = test_config(Backend::Sqlite).await;
    config.http_idle_timeout_ms = 1_000;
    config.http_header_read_timeout_ms = 2_000;
    let app = TestApp::spawn_with(config, Backend::Sqlite).await;
    let addr = addr(&app);

    // 100 connections that send nothing, 100 that send part of a request head
    // and then one more byte every 200 ms (never idle, never complete).
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(&addr).await.unwrap());
    }
    let mut dripping = Vec::new();
    for _ in 0..100 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        dripping.push(stream);
    }
    let drippers: Vec<_> = dripping
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                // At most 50 drops (10 s); stop once the server closes.
                for _ in 0..50 {
                    if stream.write_all(b"x").await.is_err() {
                        return true;
                    }
                    match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf))
                        .await
                    {
                        Ok(Ok(0) | Err(_)) => return true,
                        Ok(Ok(_)) => return true, // an error answer, then the close
                        Err(_) => {}
                    }
                }
                false
            })
        })
        .collect();

    // Meanwhile, normal requests are answered (a new connection each, so none
    // of them rides on a connection the idle timeout may close).
    let answered = tokio::spawn({
        let url = app.url("/healthz");
        async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let mut ok = 0;
            for _ in 0..30 {
                let status = client.get(&url).send().await.unwrap().status();
                assert_eq!(status, StatusCode::OK);
                ok += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            ok
        }
    });

    for (i, stream) in silent.iter_mut().enumerate() {
        let closed = until_closed(stream, Duration::from_secs(10)).await;
        assert!(
            closed.is_some_and(|bytes| bytes.is_empty()),
            "silent connection {i} still open 10 s after the idle timeout of 1 s"
        );
    }
    for (i, dripper) in drippers.into_iter().enumerate() {
        assert!(
            dripper.await.unwrap(),
            "half-sent connection {i} still open 10 s in (header read timeout 2 s)"
        );
    }
    assert_eq!(answered.await.unwrap(), 30);
    // The server closed them, not the end of the test: the silent ones were
    // idle for the idle timeout at least.
    assert!(started.elapsed() >= Duration::from_secs(1));
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_is_closed_after_the_idle_timeout() {
    let mut config = test_config(Backend::Sqlite).await;
    config.http_idle_timeout_ms = 500;
    let app = TestApp::spawn_with(config, Backend::Sqlite).await;
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = until_closed(&mut stream, Duration::from_secs(10))
        .await
        .expect("closed after the idle timeout");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    app.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_maximum_wait_until_one_closes() {
    let mut config = test_config(Backend::Sqlite).await;
    config.http_max_connections = 2;
    config.http_idle_timeout_ms = 4_000;
    config.http_header_read_timeout_ms = 60_000;
    let app = TestApp::spawn_with(config, Backend::Sqlite).await;
    let addr = addr(&app);
    // The readiness wait's kept-alive connection closes after the idle timeout.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    // Two kept-alive connections, each answered once: both slots are taken.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("answered")
            .unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(stream);
    }
    // A third connection is accepted by the kernel but not served.
    let mut third = TcpStream::connect(&addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    assert!(
        tokio::time::timeout(Duration::from_secs(1), third.read(&mut buf))
            .await
            .is_err(),
        "a connection past the maximum was served"
    );
    // One closes: the third is served.
    drop(held.pop());
    let answer = until_closed(&mut third, Duration::from_secs(10))
        .await
        .expect("served once a slot was free");
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    drop(held);
    app.stop().await.unwrap();
}

/// An answer given before the request's body was read (a 413 for a JSON body
/// over the limit) reaches a client that is still sending: the server reads and
/// drops the rest (a lingering close) instead of closing on unread bytes, which
/// would reset the connection and lose the answer on the client's side. Behind
/// a gateway, the gateway is that client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_reaches_a_client_still_sending_its_body() {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let addr = addr(&app);
    let admin = app.admin_token().await;
    const BODY: usize = 8 << 20;
    for round in 0..10 {
        let stream = TcpStream::connect(&addr).await.unwrap();
        let (mut reader, mut writer) = stream.into_split();
        let head = format!(
            "POST /v1/products HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {admin}\r\n\
             content-type: application/json\r\ncontent-length: {BODY}\r\n\r\n"
        );
        let sender = tokio::spawn(async move {
            writer.write_all(head.as_bytes()).await?;
            let chunk = vec![b' '; 64 * 1024];
            for _ in 0..BODY / chunk.len() {
                writer.write_all(&chunk).await?;
            }
            writer.shutdown().await
        });
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("the server closed the connection");
        let text = String::from_utf8_lossy(&seen);
        assert!(
            text.starts_with("HTTP/1.1 413"),
            "round {round}: {read:?}, got {text:?}"
        );
        assert!(text.contains("payload-too-large"), "round {round}: {text}");
        let _ = sender.await;
    }
}
