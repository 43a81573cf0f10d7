//! HTTP pieces every process shares: RFC 9457 problem responses, a JSON body extractor whose
//! rejections are problems too, the operational routes (`/healthz`, `/readyz`, `/metrics`) and
//! the request metrics middleware.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, MatchedPath, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument as _;

/// An RFC 9457 problem: served as `application/problem+json`.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
}

impl Problem {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Problem {
        Problem {
            kind: "about:blank".to_owned(),
            title: status.canonical_reason().unwrap_or("Error").to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
        }
    }

    pub fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, detail)
    }

    pub fn unprocessable(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }

    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, detail)
    }

    /// A 500 that logs the cause and tells the client nothing internal.
    pub fn internal(err: impl std::fmt::Display) -> Problem {
        tracing::error!(error = %err, "request failed");
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the service log",
        )
    }
}

impl From<sqlx::Error> for Problem {
    fn from(err: sqlx::Error) -> Problem {
        if crate::db::is_transient(&err) {
            tracing::warn!(error = %err, "database unavailable");
            Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database unavailable; retry later",
            )
        } else {
            Problem::internal(err)
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        // Every 503 is "busy or briefly unavailable": say when to come back.
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// `Json<T>` whose rejections (wrong content type, malformed JSON, unknown or missing fields)
/// are problem responses that name the problem.
pub struct ValidJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ValidJson<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ValidJson(value)),
            Err(rejection) => Err(json_problem(rejection)),
        }
    }
}

fn json_problem(rejection: JsonRejection) -> Problem {
    let status = rejection.status();
    let detail = match &rejection {
        JsonRejection::MissingJsonContentType(_) => {
            "expected a request body with content-type application/json".to_owned()
        }
        JsonRejection::JsonSyntaxError(_) => format!("malformed JSON: {}", inner(&rejection)),
        JsonRejection::JsonDataError(_) => format!("invalid request body: {}", inner(&rejection)),
        _ => rejection.body_text(),
    };
    Problem::new(status, detail)
}

fn inner(rejection: &JsonRejection) -> String {
    use std::error::Error;
    let mut source: Option<&dyn Error> = rejection.source();
    let mut last = rejection.body_text();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last
}

/// Whether the process is ready to serve (database migrated, topics in place, consumer running).
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// `/healthz` (the process answers), `/readyz` (ready to serve) and `/metrics` (Prometheus text).
pub fn ops_routes(readiness: Readiness, metrics: PrometheusHandle) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = readiness.is_ready();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n").into_response()
                    } else {
                        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "starting: not ready yet")
                            .into_response()
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let body = metrics.render();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .fallback(|| async { Problem::not_found("no such route") })
}

/// Traces, counts and times every request: an OpenTelemetry server span (`GET /orders/{id}`),
/// and `http_requests_total{method, route, status}` and
/// `http_request_duration_seconds{method, route}`. `route` is the route's pattern
/// (`/orders/{id}`), never the raw path, so ids do not become label values; requests that match
/// no route are `route="unmatched"`. Add it with `Router::layer(from_fn(track_requests))`.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    // The label takes the standard methods only: any other string a client sends would be a new
    // series.
    let method = match request.method().as_str() {
        m @ ("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "PATCH" | "OPTIONS") => m.to_owned(),
        _ => "other".to_owned(),
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    // The server span of the request, continuing the caller's trace when it sent a traceparent.
    let span = tracing::info_span!("http request",
        otel.name = %format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    crate::trace_context::continue_from(
        &span,
        request
            .headers()
            .get("traceparent")
            .and_then(|v| v.to_str().ok()),
    );
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    let status = response.status().as_u16().to_string();
    metrics::counter!("http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("http_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// The `limit` of a list endpoint's query: `default` when absent or empty, else a number from 1
/// to `max` (anything else is a 400 that quotes what was sent, cut short).
pub fn list_limit(text: Option<&str>, default: i64, max: i64) -> Result<i64, Problem> {
    match text {
        None | Some("") => Ok(default),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| {
                Problem::bad_request(format!(
                    "limit must be between 1 and {max}, got {:?}",
                    crate::text::truncate_chars(s, 32)
                ))
            }),
    }
}

/// The longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 200;

/// The request's `Idempotency-Key`, when it has one: visible ASCII, 1 to
/// [`MAX_IDEMPOTENCY_KEY_LEN`] characters once trimmed.
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<String>, Problem> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| Problem::bad_request("Idempotency-Key must be visible ASCII"))?
        .trim();
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
        return Err(Problem::bad_request(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} characters"
        )));
    }
    Ok(Some(key.to_owned()))
}

/// The bearer token that operator-only routes require, when one is configured
/// (`ADMIN_TOKEN` or `--admin-token-file`). `None`: those routes are open (the local stack).
#[derive(Clone, Default)]
pub struct AdminToken(Option<Arc<str>>);

/// The shortest admin token accepted: a guessable one protects nothing.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

impl AdminToken {
    /// From the `ADMIN_TOKEN` environment variable, or the first line of `file` (which wins);
    /// a token shorter than [`MIN_ADMIN_TOKEN_LEN`] is refused. Never from a flag, so that it
    /// does not show in `ps`.
    pub fn from_env_or_file(file: Option<&std::path::Path>) -> anyhow::Result<AdminToken> {
        let token = match file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        anyhow::anyhow!("reading the admin token file {}: {e}", path.display())
                    })?
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            ),
            None => std::env::var("ADMIN_TOKEN").ok().filter(|t| !t.is_empty()),
        };
        match token {
            None => Ok(AdminToken(None)),
            Some(t) if t.len() < MIN_ADMIN_TOKEN_LEN => {
                anyhow::bail!("the admin token must have at least {MIN_ADMIN_TOKEN_LEN} characters")
            }
            Some(t) => Ok(AdminToken(Some(t.into()))),
        }
    }

    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// Whether `presented` is the token, compared in time independent of where they differ.
    fn accepts(&self, presented: &str) -> bool {
        let Some(token) = &self.0 else {
            return true;
        };
        let (a, b) = (token.as_bytes(), presented.as_bytes());
        let mut diff = a.len() ^ b.len();
        for (i, x) in a.iter().enumerate() {
            diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
        }
        diff == 0
    }
}

/// An extractor for operator-only handlers: passes when no token is configured or the request
/// carries `Authorization: Bearer <token>`; otherwise 401 (no credentials, with
/// `WWW-Authenticate: Bearer`) or 403 (a wrong token), as problem+json.
pub struct Admin;

impl<S> axum::extract::FromRequestParts<S> for Admin
where
    AdminToken: axum::extract::FromRef<S>,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let token = <AdminToken as axum::extract::FromRef<S>>::from_ref(state);
        if !token.is_set() {
            return Ok(Admin);
        }
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match presented {
            None => {
                let mut response = Problem::new(
                    StatusCode::UNAUTHORIZED,
                    "this operation needs an admin token: Authorization: Bearer <token>",
                )
                .into_response();
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                Err(response)
            }
            Some(t) if token.accepts(t.trim()) => Ok(Admin),
            Some(_) => {
                tracing::warn!("an operator-only request with a wrong admin token was refused");
                Err(
                    Problem::new(StatusCode::FORBIDDEN, "the admin token is not valid")
                        .into_response(),
                )
            }
        }
    }
}

/// Describes the HTTP servers' metrics.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        "http_requests_total",
        "HTTP requests answered, by method, route pattern and status code"
    );
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by method and route pattern"
    );
    describe_counter!(
        "http_requests_shed_total",
        "HTTP requests answered 503 at once because --http-max-in-flight requests were in progress"
    );
    describe_counter!(
        "http_requests_timed_out_total",
        "HTTP requests answered 503 because they took longer than --http-request-timeout"
    );
}
