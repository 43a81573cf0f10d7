//! The processor's API: `POST /charges`, `POST /refunds` (both with a required
//! `Idempotency-Key`), `GET /ledger?payment_id=` (or the whole ledger in pages), and the fault knobs `GET|PUT /faults`.

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{Json, middleware};
use schemas::limits::MAX_TOTAL_CENTS;
use serde::Deserialize;
use service_kit::http::{Admin, AdminToken, Problem, ValidJson};
use sqlx::PgPool;
use uuid::Uuid;

use crate::faults::{self, Faults, Knobs};
use crate::ledger::{
    self, Charge, ChargeRequest, DeclineRules, LedgerEntry, LedgerError, Refund, RefundRequest,
    Refused, Replay,
};

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub rules: std::sync::Arc<DeclineRules>,
    pub knobs: Knobs,
    /// Required on `PUT /faults` when set.
    pub admin_token: AdminToken,
}

impl axum::extract::FromRef<AppState> for AdminToken {
    fn from_ref(state: &AppState) -> AdminToken {
        state.admin_token.clone()
    }
}

pub fn routes(state: AppState) -> axum::Router {
    let money = axum::Router::new()
        .route("/charges", post(charge))
        .route("/refunds", post(refund))
        .route_layer(middleware::from_fn_with_state(
            state.knobs.clone(),
            faults::inject,
        ));
    axum::Router::new()
        .merge(money)
        .route("/ledger", get(ledger_of))
        .route("/faults", get(get_faults).put(put_faults))
        .with_state(state)
}

impl From<LedgerError> for Problem {
    fn from(e: LedgerError) -> Problem {
        match e {
            LedgerError::Refused(r @ Refused::UnknownCharge(_)) => {
                Problem::not_found(r.to_string())
            }
            LedgerError::Refused(r) => Problem::unprocessable(r.to_string()),
            LedgerError::Database(e) => e.into(),
        }
    }
}

fn required_key(headers: &HeaderMap) -> Result<String, Problem> {
    service_kit::http::idempotency_key(headers)?
        .ok_or_else(|| Problem::bad_request("an Idempotency-Key header is required"))
}

fn valid_amount(amount_cents: i64) -> Result<(), Problem> {
    if (1..=MAX_TOTAL_CENTS).contains(&amount_cents) {
        Ok(())
    } else {
        Err(Problem::unprocessable(format!(
            "amount_cents must be between 1 and {MAX_TOTAL_CENTS}, got {amount_cents}"
        )))
    }
}

async fn charge(
    State(state): State<AppState>,
    headers: HeaderMap,
    ValidJson(request): ValidJson<ChargeRequest>,
) -> Result<Json<Charge>, Problem> {
    let key = required_key(&headers)?;
    valid_amount(request.amount_cents)?;
    let (charge, replay) = ledger::charge(&state.pool, &state.rules, &key, &request).await?;
    if replay == Replay::No {
        let status = charge.status.as_str();
        metrics::counter!("gateway_charges_total", "status" => status).increment(1);
        if charge.status == ledger::ChargeStatus::Succeeded {
            metrics::counter!("gateway_charged_cents_total")
                .increment(charge.amount_cents.unsigned_abs());
        }
        tracing::info!(charge_id = %charge.charge_id, payment_id = %charge.payment_id,
            amount_cents = charge.amount_cents, status, decline_code = charge.decline_code.as_deref(), "charge");
    } else {
        metrics::counter!("gateway_replays_total", "route" => "charges").increment(1);
    }
    Ok(Json(charge))
}

async fn refund(
    State(state): State<AppState>,
    headers: HeaderMap,
    ValidJson(request): ValidJson<RefundRequest>,
) -> Result<Json<Refund>, Problem> {
    let key = required_key(&headers)?;
    valid_amount(request.amount_cents)?;
    let (refund, replay) = ledger::refund(&state.pool, &key, &request).await?;
    if replay == Replay::No {
        metrics::counter!("gateway_refunds_total").increment(1);
        metrics::counter!("gateway_refunded_cents_total")
            .increment(refund.amount_cents.unsigned_abs());
        tracing::info!(refund_id = %refund.refund_id, charge_id = %refund.charge_id,
            amount_cents = refund.amount_cents, "refund");
    } else {
        metrics::counter!("gateway_replays_total", "route" => "refunds").increment(1);
    }
    Ok(Json(refund))
}

/// `?payment_id=`: that payment's charges; else `?after=<charge_id>&limit=`: a page of the
/// whole ledger in charge id order (what `saga audit` reconciles against).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerQuery {
    payment_id: Option<Uuid>,
    after: Option<Uuid>,
    limit: Option<String>,
}

/// The most charges in one page of `GET /ledger`.
pub const MAX_LEDGER_PAGE: i64 = 1000;

async fn ledger_of(
    State(state): State<AppState>,
    query: Result<Query<LedgerQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<LedgerEntry>>, Problem> {
    let Query(query) = query.map_err(|e| {
        Problem::bad_request(format!(
            "expected ?payment_id=<uuid> or ?after=<charge uuid>&limit=<n>: {}",
            e.body_text()
        ))
    })?;
    let entries = match query {
        LedgerQuery {
            payment_id: Some(payment_id),
            after: None,
            limit: None,
        } => ledger::of_payment(&state.pool, payment_id).await?,
        LedgerQuery {
            payment_id: Some(_),
            ..
        } => {
            return Err(Problem::bad_request(
                "payment_id lists one payment's charges: it takes no after or limit",
            ));
        }
        LedgerQuery { after, limit, .. } => {
            let limit =
                service_kit::http::list_limit(limit.as_deref(), MAX_LEDGER_PAGE, MAX_LEDGER_PAGE)?;
            ledger::page(&state.pool, after, limit).await?
        }
    };
    Ok(Json(entries))
}

async fn get_faults(State(state): State<AppState>) -> Json<Faults> {
    Json(state.knobs.get())
}

async fn put_faults(
    _: Admin,
    State(state): State<AppState>,
    ValidJson(faults): ValidJson<Faults>,
) -> Result<Json<Faults>, Problem> {
    faults.validate()?;
    state.knobs.set(faults);
    tracing::warn!(?faults, "fault knobs set");
    Ok(Json(faults))
}

/// Describes the processor's metrics.
pub fn describe_metrics() {
    metrics::describe_counter!(
        "gateway_charges_total",
        "Charges made (not replays), by status: succeeded, declined"
    );
    metrics::describe_counter!(
        "gateway_charged_cents_total",
        "Cents charged by succeeded charges"
    );
    metrics::describe_counter!("gateway_refunds_total", "Refunds made (not replays)");
    metrics::describe_counter!("gateway_refunded_cents_total", "Cents refunded");
    metrics::describe_counter!(
        "gateway_replays_total",
        "Requests answered from the ledger because their Idempotency-Key was seen before, by route"
    );
    metrics::describe_counter!(
        "gateway_faults_injected_total",
        "Requests answered by a fault knob instead of the processor, by fault: error, hang"
    );
}
