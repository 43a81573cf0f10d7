//! The HTTP server's limits, over real TCP connections: slow and idle clients are disconnected,
//! connections are capped, requests past the in-flight cap or their time get 503 with
//! Retry-After, and large bodies get 413.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use service_kit::http::ValidJson;
use service_kit::http_server::{HttpLimits, serve};
use service_kit::shutdown::{Shutdown, Trigger};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

struct Server {
    addr: SocketAddr,
    /// Lets the `/slow` route finish.
    release: Arc<Notify>,
    _stop: Trigger,
}

async fn start(limits: HttpLimits) -> Server {
    let release = Arc::new(Notify::new());
    let waiting = release.clone();
    let app = axum::Router::new()
        .route("/fast", get(|| async { "ok" }))
        .route(
            "/slow",
            get(move || {
                let waiting = waiting.clone();
                async move {
                    waiting.notified().await;
                    "done"
                }
            }),
        )
        .route(
            "/echo",
            post(|ValidJson(body): ValidJson<serde_json::Value>| async move { body.to_string() }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, shutdown) = Shutdown::new();
    tokio::spawn(serve(listener, app, limits, shutdown));
    Server {
        addr,
        release,
        _stop: stop,
    }
}

/// Reads until the peer closes or `within` passes; returns what came and whether it closed.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (String, bool) {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

/// One request on its own connection (`Connection: close`); the whole answer.
async fn request(addr: SocketAddr, head: &str, body: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let raw = format!(
        "{head}\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(raw.as_bytes()).await.unwrap();
    read_until_closed(&mut stream, Duration::from_secs(30))
        .await
        .0
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_head_is_disconnected() {
    let server = start(HttpLimits {
        header_read_timeout: Duration::from_millis(300),
        ..HttpLimits::default()
    })
    .await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /fast HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        .await
        .unwrap();
    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(10)).await;
    assert!(closed, "a half-sent request head keeps its socket open");

    // Nothing sent at all: the same.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let (_, closed) = read_until_closed(&mut silent, Duration::from_secs(10)).await;
    assert!(closed, "a silent connection keeps its socket open");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let server = start(HttpLimits {
        header_read_timeout: Duration::from_millis(300),
        max_connection_age: Duration::from_secs(60),
        ..HttpLimits::default()
    })
    .await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /fast HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let (answer, closed) = read_until_closed(&mut idle, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(closed, "an idle keep-alive connection stays open for good");
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let server = start(HttpLimits {
        max_connections: 2,
        header_read_timeout: Duration::from_secs(30),
        ..HttpLimits::default()
    })
    .await;
    let first = TcpStream::connect(server.addr).await.unwrap();
    let _second = TcpStream::connect(server.addr).await.unwrap();
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    third
        .write_all(b"GET /fast HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut third, Duration::from_millis(500)).await;
    assert_eq!(answer, "", "served beyond the cap of 2 connections");
    drop(first);
    let (answer, closed) = read_until_closed(&mut third, Duration::from_secs(10)).await;
    assert!(answer.starts_with("HTTP/1.1 200") && closed, "{answer:?}");
}

#[tokio::test]
async fn requests_beyond_the_in_flight_cap_get_503_with_retry_after() {
    let server = start(HttpLimits {
        max_in_flight: 1,
        ..HttpLimits::default()
    })
    .await;
    let addr = server.addr;
    let slow = tokio::spawn(async move { request(addr, "GET /slow HTTP/1.1", "").await });
    // Once the slow request holds the only slot, the next one is shed.
    let shed = loop {
        let answer = request(addr, "GET /fast HTTP/1.1", "").await;
        if answer.starts_with("HTTP/1.1 503") {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let lower = shed.to_ascii_lowercase();
    assert!(lower.contains("retry-after: 1"), "{shed}");
    assert!(
        lower.contains("content-type: application/problem+json"),
        "{shed}"
    );
    assert!(shed.contains("too many requests in progress"), "{shed}");
    server.release.notify_one();
    assert!(slow.await.unwrap().starts_with("HTTP/1.1 200"));
    assert!(
        request(addr, "GET /fast HTTP/1.1", "")
            .await
            .starts_with("HTTP/1.1 200")
    );
}

#[tokio::test]
async fn a_request_past_its_time_gets_503_and_a_large_body_413() {
    let server = start(HttpLimits {
        request_timeout: Duration::from_millis(300),
        max_body_bytes: 1024,
        ..HttpLimits::default()
    })
    .await;
    let answer = request(server.addr, "GET /slow HTTP/1.1", "").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(answer.contains("did not complete within 300ms"), "{answer}");

    let big = format!("{{\"x\":\"{}\"}}", "a".repeat(2048));
    let answer = request(
        server.addr,
        "POST /echo HTTP/1.1\r\nContent-Type: application/json",
        &big,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let small = "{\"x\":1}";
    let answer = request(
        server.addr,
        "POST /echo HTTP/1.1\r\nContent-Type: application/json",
        small,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}
