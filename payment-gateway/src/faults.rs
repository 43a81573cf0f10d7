//! The fault knobs (`PUT /faults`), for demos and tests: the processor answers every charge and
//! refund with 503 (`error`), or not at all (`hang`: the request waits until the client gives up
//! or the server's request timeout answers for it), or fails a share of them (`error_rate`), and
//! answers `latency_ms` late.
//!
//! `error` and `hang` act before anything is recorded: nothing is charged. Latency is added after
//! the charge or refund is recorded, as a slow processor does: a client that gives up before the
//! answer comes does not know that it happened, and must ask again with the same key.
//!
//! The knobs live in the process: a restart sets them back to `ok`.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use service_kit::http::Problem;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Ok,
    Error,
    Hang,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    pub mode: Mode,
    #[serde(default)]
    pub latency_ms: u64,
    /// The share of charges and refunds answered 503 in mode `ok`, from 0 to 1.
    #[serde(default)]
    pub error_rate: f64,
}

/// The longest latency the knob takes: a minute is longer than any client waits.
pub const MAX_LATENCY_MS: u64 = 60_000;

impl Faults {
    pub fn validate(&self) -> Result<(), Problem> {
        if self.latency_ms > MAX_LATENCY_MS {
            return Err(Problem::unprocessable(format!(
                "latency_ms must be at most {MAX_LATENCY_MS}, got {}",
                self.latency_ms
            )));
        }
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err(Problem::unprocessable(format!(
                "error_rate must be between 0 and 1, got {}",
                self.error_rate
            )));
        }
        Ok(())
    }
}

/// The knobs now, shared by the routes.
#[derive(Debug, Clone, Default)]
pub struct Knobs(Arc<RwLock<Faults>>);

impl Knobs {
    pub fn get(&self) -> Faults {
        *self.0.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set(&self, faults: Faults) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = faults;
    }
}

/// The middleware in front of `/charges` and `/refunds`.
pub async fn inject(State(knobs): State<Knobs>, request: Request, next: Next) -> Response {
    let faults = knobs.get();
    let unavailable = match faults.mode {
        Mode::Ok => faults.error_rate > 0.0 && rand::random::<f64>() < faults.error_rate,
        Mode::Error => true,
        Mode::Hang => {
            metrics::counter!("gateway_faults_injected_total", "fault" => "hang").increment(1);
            return std::future::pending().await;
        }
    };
    if unavailable {
        metrics::counter!("gateway_faults_injected_total", "fault" => "error").increment(1);
        let mut response = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the processor is unavailable (an injected fault: PUT /faults)",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
    let response = next.run(request).await;
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    response
}
