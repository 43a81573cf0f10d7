//! The HTTP API (DESIGN.md): `GET /sagas?outcome=&stuck=&limit=` and `GET /sagas/{order_id}`.
//! It only reads the projection.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::{Deserialize, Serialize};
use service_kit::http::Problem;
use sqlx::PgPool;
use uuid::Uuid;

use crate::store::{self, Filter, SagaView, StepView};
use crate::summary::{Allowances, Outcome};

pub const DEFAULT_LIST_LIMIT: i64 = 50;
pub const MAX_LIST_LIMIT: i64 = 500;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub allowances: Arc<Allowances>,
    /// The link to a trace, with `{trace_id}` in it (the pages' trace links).
    pub trace_url_template: Option<Arc<str>>,
}

pub fn routes(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/sagas", get(list_sagas))
        .route("/sagas/{order_id}", get(get_saga))
        .route("/openapi.json", get(openapi))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    pub outcome: Option<String>,
    pub stuck: Option<String>,
    pub limit: Option<String>,
}

/// The filter a list query asks for; the problem says which parameter is wrong.
pub fn filter_of(query: &ListQuery) -> Result<Filter, Problem> {
    let bounded = |t: &str| schemas::limits::truncate_chars(t, 32);
    let outcome = match query.outcome.as_deref() {
        None | Some("") => None,
        Some(text) => Some(Outcome::parse(text).ok_or_else(|| {
            Problem::bad_request(format!(
                "outcome must be one of in_progress, confirmed, rejected, cancelled; got {:?}",
                bounded(text)
            ))
        })?),
    };
    let stuck = match query.stuck.as_deref() {
        None | Some("") => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(text) => {
            return Err(Problem::bad_request(format!(
                "stuck must be true or false; got {:?}",
                bounded(text)
            )));
        }
    };
    let limit =
        service_kit::http::list_limit(query.limit.as_deref(), DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)?;
    Ok(Filter {
        outcome,
        stuck,
        limit,
    })
}

/// The order id of a path, validated.
pub fn order_id_of(text: &str) -> Result<Uuid, Problem> {
    Uuid::parse_str(text).map_err(|_| {
        Problem::bad_request(format!(
            "order id {:?} is not a UUID",
            schemas::limits::truncate_chars(text, 64)
        ))
    })
}

async fn list_sagas(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<SagaView>>, Problem> {
    let Query(query) = query.map_err(|e| Problem::bad_request(e.body_text()))?;
    let filter = filter_of(&query)?;
    Ok(Json(
        store::list(&state.pool, &state.allowances, &filter).await?,
    ))
}

/// A saga with its steps.
#[derive(Debug, Serialize)]
pub struct SagaWithSteps {
    #[serde(flatten)]
    pub saga: SagaView,
    pub steps: Vec<StepView>,
}

async fn get_saga(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<SagaWithSteps>, Problem> {
    let order_id = order_id_of(&id)?;
    store::get(&state.pool, &state.allowances, order_id)
        .await?
        .map(|(saga, steps)| Json(SagaWithSteps { saga, steps }))
        .ok_or_else(|| Problem::not_found(format!("no saga of order {order_id} has been seen")))
}

async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("../openapi.json"),
    )
}

/// Describes the monitor's own metrics.
pub fn describe_metrics() {
    metrics::describe_counter!(
        "monitor_steps_projected_total",
        "Steps projected, by kind (event, retry, dead_letter); a record read again is counted again"
    );
    metrics::describe_counter!(
        "monitor_records_unattributed_total",
        "Records read that belong to no saga (no order id in payload, key or correlation-id), by topic"
    );
    metrics::describe_counter!(
        "monitor_offset_gaps_total",
        "Times a partition jumped past the next offset (records expired before they were projected, or a broker fault), by topic"
    );
    metrics::describe_counter!(
        "monitor_steps_left_out_total",
        "Steps left out because their saga already had the most one keeps (a flood under one order id); the records stay on the topics"
    );
    metrics::describe_counter!(
        "monitor_write_failures_total",
        "Failed writes of a batch to the projection's database (each is retried with the batch held)"
    );
    metrics::describe_gauge!(
        "monitor_projection_lag",
        "Records between the partition's high watermark and the projection's position, by topic and partition"
    );
    metrics::describe_gauge!("monitor_sagas", "Sagas in the projection, by outcome");
    metrics::describe_gauge!(
        "monitor_rebuild_running",
        "1 while a rebuild (saga-monitor rebuild) has its tables made and has not swapped them in"
    );
    metrics::describe_gauge!(
        "monitor_rebuild_behind_records",
        "Records a running rebuild still has to project to reach the live projection (0 when none runs)"
    );
    metrics::describe_gauge!(
        "monitor_stuck_sagas",
        "Sagas waiting for a step longer than its allowance, by step (reservation, payment, refund, release)"
    );
}
