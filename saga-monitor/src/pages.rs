//! The pages: `GET /ui` (counts by outcome, stuck sagas per step, the newest sagas, filters) and
//! `GET /ui/sagas/{order_id}` (one lane per service, each step where it happened, an arrow from
//! each cause to its effects, compensations, retries and dead letters marked, the time between
//! steps, a link to each trace). Plain HTML and CSS rendered here, and a few lines of JavaScript
//! for the live refresh; every text that comes from a record is escaped.

use std::collections::HashMap;
use std::fmt::Write as _;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::http::{AppState, ListQuery, filter_of, order_id_of};
use crate::step::Kind;
use crate::store::{self, SagaView, StepView};
use crate::summary::{Outcome, Waiting};

pub fn routes(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/ui", get(list_page))
        .route("/ui/", get(list_page))
        .route("/ui/sagas/{order_id}", get(saga_page))
        .with_state(state)
}

/// Text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The trace link for `trace_id` from a template with `{trace_id}` in it, when there is a
/// template. The trace id is 32 hex digits ([`crate::step`] keeps no other), so it needs no
/// encoding.
pub fn trace_link(template: Option<&str>, trace_id: &str) -> Option<String> {
    template.map(|t| t.replace("{trace_id}", trace_id))
}

const STYLE: &str = r#"
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2430; }
a { color: #1f5fbf; }
h1 { font-size: 1.4em; margin: 0 0 .6em; }
table { border-collapse: collapse; margin-top: 1em; }
th, td { padding: .3em .7em; border-bottom: 1px solid #dde2ea; text-align: left; white-space: nowrap; }
th { background: #f3f5f8; }
.cards { display: flex; gap: .8em; flex-wrap: wrap; }
.card { border: 1px solid #dde2ea; border-radius: 6px; padding: .5em .9em; min-width: 7em; }
.card b { display: block; font-size: 1.5em; }
.outcome-confirmed { color: #1c7c3a; } .outcome-rejected { color: #8a5a00; }
.outcome-cancelled { color: #7a3db8; } .outcome-in_progress { color: #1f5fbf; }
.stuck { background: #c62828; color: #fff; border-radius: 3px; padding: 0 .4em; }
form { margin: 1em 0; display: flex; gap: 1em; align-items: center; }
svg text { font: 12px system-ui, sans-serif; }
.step rect { fill: #eef3fb; stroke: #7d97c4; }
.step.compensation rect { fill: #f4ecfb; stroke: #7a3db8; }
.step.retry rect { fill: #fff7e0; stroke: #b58100; stroke-dasharray: 4 3; }
.step.dead_letter rect { fill: #fdecec; stroke: #c62828; stroke-width: 2; }
.step.undecodable rect { fill: #fdecec; stroke: #c62828; stroke-dasharray: 2 2; }
.lane-title { font-weight: 600; }
.lane { fill: #fafbfc; stroke: #e3e7ee; }
.arrow { stroke: #5a6b85; fill: none; marker-end: url(#head); }
.delta { fill: #6b778a; }
.legend span { margin-right: 1em; }
"#;

fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>{}</title><style>{STYLE}</style></head>\n<body>\n{body}\n{LIVE_SCRIPT}</body></html>\n",
        escape(title)
    )
}

/// Reloads the page every 3 s while "live" is ticked (remembered across reloads).
const LIVE_SCRIPT: &str = r#"<script>
(function () {
  var box = document.getElementById('live');
  if (!box) return;
  box.checked = localStorage.getItem('saga-monitor-live') === '1';
  box.addEventListener('change', function () {
    localStorage.setItem('saga-monitor-live', box.checked ? '1' : '0');
    if (box.checked) location.reload();
  });
  setInterval(function () { if (box.checked) location.reload(); }, 3000);
})();
</script>
"#;

fn problem_page(status: StatusCode, detail: &str) -> Response {
    let body = format!(
        "<h1>{}</h1><p id=\"problem\">{}</p><p><a href=\"/ui\">All sagas</a></p>",
        status.as_u16(),
        escape(detail)
    );
    (status, Html(page("saga-monitor", &body))).into_response()
}

fn internal(e: sqlx::Error) -> Response {
    tracing::warn!(error = %e, "a page could not be read from the database");
    problem_page(
        StatusCode::SERVICE_UNAVAILABLE,
        "the projection's database did not answer; try again",
    )
}

fn duration_text(ms: i64) -> String {
    match ms {
        ms if ms < 1_000 => format!("{ms} ms"),
        ms if ms < 60_000 && ms % 1_000 == 0 => format!("{} s", ms / 1_000),
        ms if ms < 60_000 => format!("{:.1} s", ms as f64 / 1_000.0),
        ms => format!("{}m {:02}s", ms / 60_000, (ms % 60_000) / 1_000),
    }
}

fn time_text(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

async fn list_page(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let query = match query {
        Ok(Query(q)) => q,
        Err(e) => return problem_page(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let filter = match filter_of(&query) {
        Ok(f) => f,
        Err(p) => return problem_page(StatusCode::BAD_REQUEST, &p.detail),
    };
    let (outcomes, stuck) = match store::counts(&state.pool, &state.allowances).await {
        Ok(c) => c,
        Err(e) => return internal(e),
    };
    let sagas = match store::list(&state.pool, &state.allowances, &filter).await {
        Ok(s) => s,
        Err(e) => return internal(e),
    };
    let mut body = String::from("<h1>Sagas</h1>\n<div class=\"cards\" id=\"outcomes\">");
    for outcome in Outcome::ALL {
        let n = outcomes.get(&outcome).copied().unwrap_or(0);
        let _ = write!(
            body,
            "<a class=\"card outcome-{o}\" href=\"/ui?outcome={o}\" data-outcome=\"{o}\"><b>{n}</b>{o}</a>",
            o = outcome.as_str()
        );
    }
    body.push_str("</div>\n<div class=\"cards\" id=\"stuck-steps\">");
    for step in Waiting::ALL {
        let n = stuck.get(&step).copied().unwrap_or(0);
        let _ = write!(
            body,
            "<div class=\"card\" data-step=\"{s}\"><b>{n}</b>stuck on {s} (allowance {a})</div>",
            s = step.as_str(),
            a = duration_text(state.allowances.of(step).as_millis() as i64)
        );
    }
    body.push_str("</div>\n<form method=\"get\" action=\"/ui\">Outcome <select name=\"outcome\"><option value=\"\">any</option>");
    for outcome in Outcome::ALL {
        let selected = if filter.outcome == Some(outcome) {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option{selected}>{}</option>", outcome.as_str());
    }
    let checked = if filter.stuck == Some(true) {
        " checked"
    } else {
        ""
    };
    let _ = writeln!(
        body,
        "</select><label><input type=\"checkbox\" name=\"stuck\" value=\"true\"{checked}> stuck only</label>\
         <input type=\"hidden\" name=\"limit\" value=\"{}\"><button type=\"submit\">Filter</button>\
         <label><input type=\"checkbox\" id=\"live\"> live</label></form>",
        filter.limit
    );
    let _ = write!(
        body,
        "<p>{} newest sagas shown{}.</p>",
        sagas.len(),
        match (filter.outcome, filter.stuck) {
            (None, None) => String::new(),
            (o, s) => format!(
                " ({}{})",
                o.map(|o| o.as_str()).unwrap_or("any outcome"),
                match s {
                    Some(true) => ", stuck",
                    Some(false) => ", not stuck",
                    None => "",
                }
            ),
        }
    );
    body.push_str(
        "<table id=\"sagas\"><tr><th>Order</th><th>Status</th><th>Outcome</th><th>Started</th>\
         <th>Duration</th><th>Waiting for</th><th>Compensations</th><th>Retries</th><th>Dead letters</th></tr>\n",
    );
    for saga in &sagas {
        body.push_str(&saga_row(saga));
    }
    body.push_str("</table>\n");
    Html(page("Sagas · saga-monitor", &body)).into_response()
}

/// What a saga waits for and since when, marked when it is stuck (HTML).
fn waiting_text(saga: &SagaView) -> Option<String> {
    let (step, since) = saga.waiting_for.zip(saga.waiting_since)?;
    let stuck = if saga.stuck {
        " <span class=\"stuck\">stuck</span>"
    } else {
        ""
    };
    Some(format!(
        "{} since {}{stuck}",
        step.as_str(),
        time_text(&since)
    ))
}

fn saga_row(saga: &SagaView) -> String {
    let waiting = waiting_text(saga).unwrap_or_default();
    format!(
        "<tr class=\"saga\" data-order-id=\"{id}\" data-stuck=\"{stuck}\"><td><a href=\"/ui/sagas/{id}\">{id}</a></td>\
         <td>{status}</td><td class=\"outcome-{o}\">{o}</td><td>{started}</td><td>{duration}</td>\
         <td>{waiting}</td><td>{c}</td><td>{r}</td><td>{d}</td></tr>\n",
        id = saga.order_id,
        stuck = saga.stuck,
        status = escape(saga.status.as_deref().unwrap_or("—")),
        o = saga.outcome.as_str(),
        started = time_text(&saga.started_at),
        duration = saga.duration_ms.map(duration_text).unwrap_or_default(),
        c = saga.compensations,
        r = saga.retries,
        d = saga.dead_letters,
    )
}

/// The lanes of a saga's page: the saga's own services first, in the order of the flow, then
/// any other in the order it first appears.
fn lanes(steps: &[StepView]) -> Vec<String> {
    let mut lanes: Vec<String> = ["order-service", "inventory-service", "payment-service"]
        .iter()
        .filter(|l| steps.iter().any(|s| s.step.service == **l))
        .map(|l| (*l).to_owned())
        .collect();
    for s in steps {
        if !lanes.contains(&s.step.service) {
            lanes.push(s.step.service.clone());
        }
    }
    lanes
}

const LANE_WIDTH: usize = 230;
const ROW_HEIGHT: usize = 58;
const BOX_WIDTH: usize = 200;
const BOX_HEIGHT: usize = 42;
const TOP: usize = 40;
const LEFT: usize = 90;

async fn saga_page(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let order_id = match order_id_of(&id) {
        Ok(id) => id,
        Err(p) => return problem_page(StatusCode::BAD_REQUEST, &p.detail),
    };
    let (saga, steps) = match store::get(&state.pool, &state.allowances, order_id).await {
        Ok(Some(found)) => found,
        Ok(None) => {
            return problem_page(
                StatusCode::NOT_FOUND,
                &format!("no saga of order {order_id} has been seen"),
            );
        }
        Err(e) => return internal(e),
    };
    let template = state.trace_url_template.as_deref();
    let mut body = format!(
        "<p><a href=\"/ui\">All sagas</a></p><h1>Saga of order {order_id}</h1>\n<table id=\"summary\">\
         <tr><th>Status</th><td>{status}</td></tr>\
         <tr><th>Outcome</th><td class=\"outcome-{o}\" id=\"outcome\">{o}</td></tr>\
         <tr><th>Started</th><td>{started}</td></tr><tr><th>Ended</th><td>{ended}</td></tr>\
         <tr><th>Duration</th><td>{duration}</td></tr><tr><th>Waiting for</th><td id=\"waiting\">{waiting}</td></tr>\
         <tr><th>Compensations</th><td>{c}</td></tr><tr><th>Retries</th><td>{r}</td></tr>\
         <tr><th>Dead letters</th><td>{d}</td></tr>",
        status = escape(saga.status.as_deref().unwrap_or("—")),
        o = saga.outcome.as_str(),
        started = time_text(&saga.started_at),
        ended = saga.ended_at.as_ref().map(time_text).unwrap_or_default(),
        duration = saga.duration_ms.map(duration_text).unwrap_or_default(),
        waiting = waiting_text(&saga).unwrap_or_else(|| "nothing".to_owned()),
        c = saga.compensations,
        r = saga.retries,
        d = saga.dead_letters,
    );
    if let Some(trace) = &saga.trace_id {
        let _ = write!(
            body,
            "<tr><th>Trace</th><td>{}</td></tr>",
            trace_cell(template, trace)
        );
    }
    body.push_str("</table>\n<p class=\"legend\"><span>▭ event</span><span style=\"color:#7a3db8\">▭ compensation</span>\
                   <span style=\"color:#b58100\">┅ retry</span><span style=\"color:#c62828\">▭ dead letter</span>\
                   <label><input type=\"checkbox\" id=\"live\"> live</label></p>\n");
    body.push_str(&timeline_svg(&steps));
    body.push_str(&steps_table(&steps, template));
    Html(page(&format!("Saga {order_id} · saga-monitor"), &body)).into_response()
}

fn trace_cell(template: Option<&str>, trace: &str) -> String {
    match trace_link(template, trace) {
        Some(url) => format!(
            "<a class=\"trace\" href=\"{}\">{}</a>",
            escape(&url),
            escape(trace)
        ),
        None => escape(trace),
    }
}

/// One lane per service, one row per step in causal order, an arrow from each cause to its
/// effects, and the time since the step before on the left.
fn timeline_svg(steps: &[StepView]) -> String {
    let lanes = lanes(steps);
    let lane_of: HashMap<&str, usize> = lanes
        .iter()
        .enumerate()
        .map(|(i, l)| (l.as_str(), i))
        .collect();
    let width = LEFT + lanes.len().max(1) * LANE_WIDTH;
    let height = TOP + steps.len() * ROW_HEIGHT + 10;
    let mut svg = format!(
        "<svg id=\"timeline\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" role=\"img\" \
         aria-label=\"the saga's steps by service\"><defs><marker id=\"head\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" \
         markerWidth=\"7\" markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#5a6b85\"/></marker></defs>\n"
    );
    for (i, lane) in lanes.iter().enumerate() {
        let x = LEFT + i * LANE_WIDTH;
        let _ = writeln!(
            svg,
            "<g class=\"lane-group\" data-service=\"{name}\"><rect class=\"lane\" x=\"{x}\" y=\"0\" width=\"{w}\" height=\"{height}\"/>\
             <text class=\"lane-title\" x=\"{tx}\" y=\"22\">{name}</text></g>",
            name = escape(lane),
            w = LANE_WIDTH - 10,
            tx = x + 10,
        );
    }
    let position = |row: usize, step: &StepView| {
        let lane = lane_of
            .get(step.step.service.as_str())
            .copied()
            .unwrap_or(0);
        (LEFT + lane * LANE_WIDTH + 10, TOP + row * ROW_HEIGHT)
    };
    // The row of each event, by message id: what arrows start from.
    let mut event_row: HashMap<uuid::Uuid, usize> = HashMap::new();
    for (row, s) in steps.iter().enumerate() {
        if let (Kind::Event, Some(id)) = (s.step.kind, s.step.message_id) {
            event_row.entry(id).or_insert(row);
        }
    }
    for (row, s) in steps.iter().enumerate() {
        let Some(cause_row) = s.step.causation_id.and_then(|c| event_row.get(&c).copied()) else {
            continue;
        };
        if cause_row >= row {
            continue;
        }
        let (cx, cy) = position(cause_row, &steps[cause_row]);
        let (ex, ey) = position(row, s);
        let (x1, y1) = (cx + BOX_WIDTH / 2, cy + BOX_HEIGHT);
        let (x2, y2) = (ex + BOX_WIDTH / 2, ey);
        let _ = writeln!(
            svg,
            "<path class=\"arrow\" data-from=\"{}\" data-to=\"{}\" d=\"M{x1},{y1} C{x1},{m} {x2},{m} {x2},{y2}\"/>",
            steps[cause_row].seq,
            s.seq,
            m = (y1 + y2) / 2
        );
    }
    let mut previous: Option<i64> = None;
    for (row, s) in steps.iter().enumerate() {
        let (x, y) = position(row, s);
        let mut classes = vec!["step", s.step.kind.as_str()];
        if s.compensation {
            classes.push("compensation");
        }
        if !s.step.decoded {
            classes.push("undecodable");
        }
        let label = s.step.event_type.as_deref().unwrap_or("(no event type)");
        let what = match (s.step.kind, s.step.decoded) {
            (Kind::Event, true) => String::new(),
            (Kind::Event, false) => "undecodable".to_owned(),
            (Kind::Retry, _) => format!("retry · {}", s.step.topic),
            (Kind::DeadLetter, _) => "dead letter".to_owned(),
        };
        // A service whose clock is behind can stamp an effect before its cause.
        let delta = previous.map(|p| match s.step.at_ms - p {
            d if d < 0 => format!("−{}", duration_text(-d)),
            d => format!("+{}", duration_text(d)),
        });
        previous = Some(s.step.at_ms);
        let _ = writeln!(
            svg,
            "<g class=\"{classes}\" data-seq=\"{seq}\" data-service=\"{service}\" data-kind=\"{kind}\" \
             data-compensation=\"{comp}\"><title>{title}</title><rect x=\"{x}\" y=\"{y}\" width=\"{BOX_WIDTH}\" \
             height=\"{BOX_HEIGHT}\" rx=\"5\"/><text x=\"{tx}\" y=\"{ty1}\">{seq}. {label}</text>\
             <text x=\"{tx}\" y=\"{ty2}\" class=\"delta\">{what}</text></g>\
             <text class=\"delta\" x=\"8\" y=\"{ty1}\">{delta}</text>",
            classes = classes.join(" "),
            seq = s.seq,
            service = escape(&s.step.service),
            kind = s.step.kind.as_str(),
            comp = s.compensation,
            title = escape(&format!(
                "{} · {} [{}] @{} · {}{}",
                label,
                s.step.topic,
                s.step.partition,
                s.step.offset,
                time_text(&s.at),
                s.step
                    .note
                    .as_deref()
                    .map(|n| format!(" · {n}"))
                    .unwrap_or_default()
            )),
            tx = x + 8,
            ty1 = y + 17,
            ty2 = y + 34,
            label = escape(&schemas::limits::truncate_chars(label, 28)),
            what = escape(&schemas::limits::truncate_chars(what, 32)),
            delta = delta.unwrap_or_default(),
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Every step with all it carries.
fn steps_table(steps: &[StepView], template: Option<&str>) -> String {
    let mut table = String::from(
        "<table id=\"steps\"><tr><th>#</th><th>At</th><th>Service</th><th>Event</th><th>Kind</th>\
         <th>Topic [partition] @offset</th><th>Message id</th><th>Caused by</th><th>Trace</th><th>Note</th></tr>\n",
    );
    let seq_of: HashMap<uuid::Uuid, usize> = steps
        .iter()
        .filter(|s| s.step.kind == Kind::Event)
        .filter_map(|s| s.step.message_id.map(|id| (id, s.seq)))
        .collect();
    for s in steps {
        let cause = match s.step.causation_id {
            None => String::new(),
            Some(c) => match seq_of.get(&c) {
                Some(seq) => format!("#{seq}"),
                None => format!("{c} (outside this saga)"),
            },
        };
        let _ = writeln!(
            table,
            "<tr class=\"step-row\" data-seq=\"{seq}\"><td>{seq}</td><td>{at}</td><td>{service}</td><td>{event}</td>\
             <td>{kind}{comp}</td><td>{topic} [{partition}] @{offset}</td><td>{message}</td><td>{cause}</td>\
             <td>{trace}</td><td>{note}</td></tr>",
            seq = s.seq,
            at = time_text(&s.at),
            service = escape(&s.step.service),
            event = escape(s.step.event_type.as_deref().unwrap_or("—")),
            kind = s.step.kind.as_str(),
            comp = if s.compensation {
                " (compensation)"
            } else {
                ""
            },
            topic = escape(&s.step.topic),
            partition = s.step.partition,
            offset = s.step.offset,
            message = s.step.message_id.map(|m| m.to_string()).unwrap_or_default(),
            trace = s
                .step
                .trace_id
                .as_deref()
                .map(|t| trace_cell(template, t))
                .unwrap_or_default(),
            note = escape(s.step.note.as_deref().unwrap_or("")),
        );
    }
    table.push_str("</table>\n");
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_from_records_is_escaped() {
        assert_eq!(
            escape(r#"<script>alert("x&y")</script>'"#),
            "&lt;script&gt;alert(&quot;x&amp;y&quot;)&lt;/script&gt;&#39;"
        );
    }

    #[test]
    fn a_trace_link_fills_the_template() {
        assert_eq!(
            trace_link(Some("http://localhost:16686/trace/{trace_id}"), "ab12").as_deref(),
            Some("http://localhost:16686/trace/ab12")
        );
        assert_eq!(trace_link(None, "ab12"), None);
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(duration_text(85), "85 ms");
        assert_eq!(duration_text(1_300), "1.3 s");
        assert_eq!(duration_text(10_000), "10 s");
        assert_eq!(duration_text(125_000), "2m 05s");
    }
}
