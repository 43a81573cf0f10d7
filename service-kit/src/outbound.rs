//! Calls to an outside HTTP API (a card processor): connect and request timeouts, the answer
//! read within a size bound, every failure sorted into the classes the rest of the system uses,
//! an `Idempotency-Key` on every call that changes something, `traceparent` injected so that the
//! outside service's spans join the order's trace, and metrics per call.
//!
//! The classes ([`CallError`]):
//! - **Transient**: no usable answer (the connection was refused, cut or timed out; a 5xx; a 2xx
//!   whose body is not what the API promises). Worth repeating as it is, with the same
//!   idempotency key: [`CallError::outcome_unknown`] says whether the request may have reached
//!   the server, in which case the repeat is how to learn what it did.
//! - **Retryable**: the server said "not now" (429, or 503 with `Retry-After`): try again after
//!   the delay it gave.
//! - **Permanent**: the server refused the request itself (any other 4xx): repeating it cannot
//!   help.
//!
//! Every answer is hostile until read: bodies are capped at [`MAX_ANSWER_BYTES`], and what is
//! echoed into errors is bounded.

use std::time::{Duration, Instant};

use metrics::{counter, histogram};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The most bytes of an answer read; a longer one is a transient failure (not what the API
/// promises).
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// The longest `Retry-After` honoured; a longer one is cut to this.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// Timeouts of an outside API's client.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// To open the TCP connection.
    pub connect: Duration,
    /// For the whole call, the answer's body included.
    pub request: Duration,
}

/// Why a call did not give a usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// No usable answer; repeat the call as it is (same idempotency key).
    #[error("{reason}")]
    Transient {
        reason: String,
        /// Whether the request may have reached the server (it timed out or was cut after it was
        /// sent, or the server answered 5xx or nonsense): what it did is not known.
        outcome_unknown: bool,
    },
    /// The server said "not now": try again after `after`.
    #[error("{reason} (again in {after:?})")]
    Retryable { reason: String, after: Duration },
    /// The server refused the request; repeating it cannot help.
    #[error("{reason}")]
    Permanent { status: u16, reason: String },
}

impl CallError {
    /// Whether the call may have had an effect that its answer did not report.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            CallError::Transient {
                outcome_unknown: true,
                ..
            }
        )
    }

    /// The metric label of the class: `transient`, `retryable` or `permanent`.
    pub fn class(&self) -> &'static str {
        match self {
            CallError::Transient { .. } => "transient",
            CallError::Retryable { .. } => "retryable",
            CallError::Permanent { .. } => "permanent",
        }
    }
}

/// What a failed call means to the job that made it ([`crate::jobs`]): no usable answer is a
/// failed attempt (repeated with backoff and the same idempotency key), "not now" waits without
/// spending one, a refusal gives the job up.
impl From<CallError> for crate::jobs::JobError {
    fn from(e: CallError) -> Self {
        use crate::jobs::JobError;
        match e {
            CallError::Transient { .. } => JobError::Failed(e.into()),
            CallError::Retryable { reason, after } => JobError::Later { after, why: reason },
            CallError::Permanent { reason, .. } => JobError::Permanent(reason),
        }
    }
}

/// A client of one outside API.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    /// The `service` label of the metrics, e.g. `payment-gateway`.
    service: &'static str,
    base: String,
    /// `base` as logs and spans show it: a password in it replaced by `***`.
    shown: String,
    /// `Authorization: Bearer …` on every call, when the API wants a credential.
    authorization: Option<HeaderValue>,
    timeouts: Timeouts,
}

impl Client {
    /// A client of the API at `base_url` (`http://host:port`, no trailing slash needed).
    pub fn new(
        service: &'static str,
        base_url: &str,
        timeouts: Timeouts,
    ) -> anyhow::Result<Client> {
        anyhow::ensure!(
            base_url.starts_with("http://") || base_url.starts_with("https://"),
            "the URL of {service} must start with http:// or https://, got {base_url:?}"
        );
        let http = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .timeout(timeouts.request)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let base = base_url.trim_end_matches('/').to_owned();
        Ok(Client {
            http,
            service,
            shown: crate::db::redacted(&base),
            base,
            authorization: None,
            timeouts,
        })
    }

    /// Sends `Authorization: Bearer {token}` with every call (kept out of logs and spans).
    pub fn with_bearer_token(mut self, token: &str) -> anyhow::Result<Client> {
        let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            anyhow::anyhow!(
                "the credential of {} is not a valid header value",
                self.service
            )
        })?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
    }

    /// The API's address as logs show it (a password in it replaced by `***`).
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    /// `POST {base}{path}` with `body` as JSON and `Idempotency-Key: idempotency_key`; the
    /// answer's JSON on a 2xx. `route` names the call in metrics and spans (e.g.
    /// `/charges/{id}/refunds`; never the path itself, which holds ids).
    pub async fn post<B: Serialize, A: DeserializeOwned>(
        &self,
        route: &'static str,
        path: &str,
        body: &B,
        idempotency_key: &str,
    ) -> Result<A, CallError> {
        let request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("idempotency-key", idempotency_key)
            .json(body);
        self.call("POST", route, request).await
    }

    /// `GET {base}{path}`; the answer's JSON on a 2xx.
    pub async fn get<A: DeserializeOwned>(
        &self,
        route: &'static str,
        path: &str,
    ) -> Result<A, CallError> {
        let request = self.http.get(format!("{}{path}", self.base));
        self.call("GET", route, request).await
    }

    async fn call<A: DeserializeOwned>(
        &self,
        method: &'static str,
        route: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<A, CallError> {
        let span = tracing::info_span!("call",
            otel.name = %format!("{method} {route}"),
            otel.kind = "client",
            http.request.method = method,
            http.route = route,
            server.address = %self.shown,
            trace_id = tracing::field::Empty,
        );
        // A child of the current span (the job's): its traceparent goes to the server.
        crate::trace_context::continue_from(&span, None);
        let traceparent = crate::trace_context::of(&span);
        let request = match &self.authorization {
            Some(value) => request.header(reqwest::header::AUTHORIZATION, value.clone()),
            None => request,
        };
        let started = Instant::now();
        let answer = async {
            let response = request
                .header("traceparent", traceparent)
                .send()
                .await
                .map_err(|e| self.unanswered(e))?;
            let status = response.status();
            let retry_after = retry_after(response.headers());
            let body = read_bounded(response)
                .await
                .map_err(|e| self.unanswered(e))?
                .ok_or_else(|| CallError::Transient {
                    reason: format!(
                        "{} answered {status} with more than {MAX_ANSWER_BYTES} bytes",
                        self.service
                    ),
                    outcome_unknown: true,
                })?;
            let body = classify(status, retry_after, body)?;
            serde_json::from_slice(&body).map_err(|e| CallError::Transient {
                reason: bounded(format!(
                    "{} answered {route} with a body that is not what its API promises: {e}",
                    self.service
                )),
                outcome_unknown: true,
            })
        }
        .await;
        let outcome = match &answer {
            Ok(_) => "success",
            Err(e) => e.class(),
        };
        counter!("outbound_calls_total", "service" => self.service, "route" => route, "outcome" => outcome)
            .increment(1);
        histogram!("outbound_call_duration_seconds", "service" => self.service, "route" => route)
            .record(started.elapsed().as_secs_f64());
        if let Err(e) = &answer {
            let _entered = span.enter();
            tracing::warn!(service = self.service, route, class = e.class(), error = %e, "an outside call failed");
        }
        answer
    }

    /// A call that got no answer: refused before it was sent, or cut or timed out after. The
    /// error's text leaves out the URL (it may hold a credential).
    fn unanswered(&self, e: reqwest::Error) -> CallError {
        let e = e.without_url();
        let sent = !e.is_connect() && !e.is_builder();
        let what = if e.is_timeout() {
            format!(
                "no answer within {:?} (connect {:?})",
                self.timeouts.request, self.timeouts.connect
            )
        } else if e.is_connect() {
            "could not connect".to_owned()
        } else {
            "the connection failed".to_owned()
        };
        CallError::Transient {
            reason: bounded(format!("{}: {what}: {}", self.service, error_chain(&e))),
            outcome_unknown: sent,
        }
    }
}

/// What a status says: the body of a 2xx, or the class of the failure.
fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: Vec<u8>,
) -> Result<Vec<u8>, CallError> {
    if status.is_success() {
        return Ok(body);
    }
    let reason = format!(
        "answered {status}: {}",
        bounded(String::from_utf8_lossy(&body))
    );
    match (status, retry_after) {
        (StatusCode::TOO_MANY_REQUESTS, after) => Err(CallError::Retryable {
            reason,
            after: after.unwrap_or(Duration::from_secs(1)),
        }),
        (StatusCode::SERVICE_UNAVAILABLE, Some(after)) => {
            Err(CallError::Retryable { reason, after })
        }
        (s, _) if s.is_server_error() => Err(CallError::Transient {
            reason,
            outcome_unknown: true,
        }),
        (s, _) if s.is_client_error() => Err(CallError::Permanent {
            status: s.as_u16(),
            reason,
        }),
        // 1xx and 3xx (redirects are not followed): not an answer this API gives.
        (_, _) => Err(CallError::Transient {
            reason,
            outcome_unknown: true,
        }),
    }
}

/// `Retry-After` in seconds (the HTTP-date form is not honoured), at most [`MAX_RETRY_AFTER`].
fn retry_after(headers: &HeaderMap<HeaderValue>) -> Option<Duration> {
    let seconds: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// The answer's body; `None` once it passes [`MAX_ANSWER_BYTES`] (the rest is not read).
async fn read_bounded(mut response: reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn bounded(text: impl Into<String>) -> String {
    crate::text::truncate_chars(text, 300)
}

/// Describes the outside calls' metrics.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_histogram};
    describe_counter!(
        "outbound_calls_total",
        "Calls to outside APIs by service, route and outcome: success, transient (no usable answer: refused, cut, timed out, 5xx), retryable (429, 503 with Retry-After), permanent (other 4xx)"
    );
    describe_histogram!(
        "outbound_call_duration_seconds",
        Unit::Seconds,
        "Time a call to an outside API took, answer included, by service and route"
    );
}
