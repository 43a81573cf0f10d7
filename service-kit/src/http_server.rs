//! The HTTP server every process runs, with the limits a server facing the open network needs
//! (`axum::serve` has none of them: no header-read timeout, no connection limit):
//!
//! - a **header-read timeout** ([`HttpLimits::header_read_timeout`]): a client that does not send
//!   a whole request head in time (slowloris) is disconnected; on a keep-alive connection the same
//!   clock bounds the wait for the next request;
//! - a **connection cap** ([`HttpLimits::max_connections`]): beyond it, new connections wait in the
//!   kernel's accept queue until one closes, so sockets and memory stay bounded;
//! - a **connection lifetime** ([`HttpLimits::max_connection_age`]): a connection is closed
//!   gracefully after it, so a client cannot hold a permit for ever by trickling requests;
//! - an **in-flight cap** ([`HttpLimits::max_in_flight`]): a request beyond it is answered at once
//!   with 503 and `Retry-After` (load shedding) instead of queueing without bound;
//! - a **request timeout** ([`HttpLimits::request_timeout`]): a request not done in time (a slow
//!   body, a database that hangs) is answered with 503 and `Retry-After`, and its transaction is
//!   rolled back;
//! - a **body limit** ([`HttpLimits::max_body_bytes`]): a larger body is refused with 413.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::http::Problem;
use crate::shutdown::Shutdown;

/// Where a process's HTTP server listens (`--listen-addr`, `--metrics-addr`): an address to bind,
/// or `stdin`, the listening socket the process was started with as its standard input (inetd's
/// convention; systemd's `StandardInput=socket` with one socket and `Accept=no`). A supervisor
/// that holds the socket keeps the port through restarts of the process and nobody can take it
/// meanwhile; the end-to-end tests start every process that way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenAddr {
    Bind(SocketAddr),
    Stdin,
}

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "stdin" {
            return Ok(ListenAddr::Stdin);
        }
        s.parse().map(ListenAddr::Bind).map_err(|_| {
            format!("{s:?} is neither an address (HOST:PORT) nor `stdin` (a listening socket on standard input)")
        })
    }
}

impl ListenAddr {
    /// The listener: bound now, or taken from standard input, which must be a listening TCP
    /// socket.
    pub async fn listen(self) -> anyhow::Result<TcpListener> {
        match self {
            ListenAddr::Bind(addr) => TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}")),
            ListenAddr::Stdin => {
                let fd = std::io::stdin()
                    .as_fd()
                    .try_clone_to_owned()
                    .context("taking the socket on standard input")?;
                let socket = socket2::Socket::from(fd);
                let listening = socket.is_listener().context(
                    "--listen-addr stdin: standard input is not a socket (start the process with a listening socket as its standard input)",
                )?;
                anyhow::ensure!(
                    listening,
                    "--listen-addr stdin: the socket on standard input is not listening (an inetd `wait`/systemd `Accept=no` socket is needed, not a connection)"
                );
                socket.set_nonblocking(true)?;
                Ok(TcpListener::from_std(socket.into())?)
            }
        }
    }
}

/// The server's limits; every process takes them from the same flags.
#[derive(Debug, Clone, clap::Args)]
pub struct HttpLimits {
    /// Most open HTTP connections; more wait in the accept queue.
    #[arg(long, env = "HTTP_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    /// Most requests handled at once; more are answered 503 with Retry-After.
    #[arg(long, env = "HTTP_MAX_IN_FLIGHT", default_value_t = 128)]
    pub max_in_flight: usize,
    /// How long a client may take to send a request's head (and, on a keep-alive connection,
    /// to start its next request).
    #[arg(long, env = "HTTP_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = crate::duration::parse)]
    pub header_read_timeout: Duration,
    /// How long one request may take, body included; then 503 with Retry-After.
    #[arg(long, env = "HTTP_REQUEST_TIMEOUT", default_value = "30s", value_parser = crate::duration::parse)]
    pub request_timeout: Duration,
    /// After this, a connection is closed once its current request is answered.
    #[arg(long, env = "HTTP_MAX_CONNECTION_AGE", default_value = "5m", value_parser = crate::duration::parse)]
    pub max_connection_age: Duration,
    /// Largest request body in bytes; larger gets 413.
    #[arg(long, env = "HTTP_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub max_body_bytes: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 512,
            max_in_flight: 128,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            max_connection_age: Duration::from_secs(300),
            max_body_bytes: 64 * 1024,
        }
    }
}

impl HttpLimits {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.max_connections > 0,
            "--http-max-connections must be at least 1"
        );
        anyhow::ensure!(
            self.max_in_flight > 0,
            "--http-max-in-flight must be at least 1"
        );
        for (name, d) in [
            ("--http-header-read-timeout", self.header_read_timeout),
            ("--http-request-timeout", self.request_timeout),
            ("--http-max-connection-age", self.max_connection_age),
        ] {
            anyhow::ensure!(!d.is_zero(), "{name} must be longer than 0");
        }
        Ok(())
    }

    /// `app` with the request-level limits: body size, in-flight cap and request timeout.
    pub fn apply(&self, app: axum::Router) -> axum::Router {
        let in_flight = Arc::new(Semaphore::new(self.max_in_flight));
        let timeout = self.request_timeout;
        app.layer(axum::middleware::from_fn(
            move |request: Request, next: Next| {
                let in_flight = in_flight.clone();
                async move { shed_or_run(&in_flight, timeout, request, next).await }
            },
        ))
        .layer(DefaultBodyLimit::max(self.max_body_bytes))
    }
}

/// What a request past the in-flight cap, or past its time, is told: come back in a second.
fn unavailable(detail: String) -> Response {
    Problem::new(StatusCode::SERVICE_UNAVAILABLE, detail).into_response()
}

async fn shed_or_run(
    in_flight: &Semaphore,
    timeout: Duration,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_permit) = in_flight.try_acquire() else {
        metrics::counter!("http_requests_shed_total").increment(1);
        return unavailable("too many requests in progress; retry later".to_owned());
    };
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            metrics::counter!("http_requests_timed_out_total").increment(1);
            unavailable(format!(
                "the request did not complete within {timeout:?}; retry later"
            ))
        }
    }
}

/// Serves `app` on `listener` with `limits` until `shutdown` fires; then stops accepting, lets
/// the requests in progress finish (at most `limits.request_timeout`) and returns.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: HttpLimits,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    let app = limits.apply(app);
    // Rare: exported at 0 from the start, so that a rate over them has a series to read.
    metrics::counter!("http_requests_shed_total").absolute(0);
    metrics::counter!("http_requests_timed_out_total").absolute(0);
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(64);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(limits.header_read_timeout))
        .keep_alive_timeout(limits.header_read_timeout)
        .max_concurrent_streams(64);
    let builder = Arc::new(builder);
    loop {
        let permit = tokio::select! {
            permit = connections.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
            _ = shutdown.wait() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before it was accepted.
                    tracing::warn!(error = %e, "could not accept an HTTP connection; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let builder = builder.clone();
        let shutdown = shutdown.clone();
        let age = limits.max_connection_age;
        let first_byte_within = limits.header_read_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            // hyper's own header-read clock starts only once the first bytes are read (they tell
            // HTTP/1 from HTTP/2): a client that sends nothing at all is timed out here.
            let mut first = [0u8; 1];
            match tokio::time::timeout(first_byte_within, stream.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => {
                    tracing::debug!(%peer, "HTTP connection sent nothing in time, or closed; dropped");
                    return;
                }
            }
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = tokio::time::sleep(age) => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
                _ = shutdown.wait() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                // Timeouts and clients that go away are routine: debug level only.
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
        });
    }
    tracing::info!("HTTP server stops accepting; finishing the requests in progress");
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.request_timeout, connections.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            "HTTP connections still open after {:?}; closing them",
            limits.request_timeout
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listen_address_is_host_and_port_or_stdin() {
        assert_eq!(
            "127.0.0.1:8080".parse::<ListenAddr>(),
            Ok(ListenAddr::Bind("127.0.0.1:8080".parse().unwrap()))
        );
        assert_eq!("stdin".parse::<ListenAddr>(), Ok(ListenAddr::Stdin));
        for bad in ["", "STDIN", "localhost", "127.0.0.1", "fd:3"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad:?}");
        }
    }
}
