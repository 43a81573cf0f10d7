#!/usr/bin/env bash
# Runs the whole system locally in the background: Postgres (installed and started if needed), the
# Tansu broker on 127.0.0.1:9092, order-service (:8080), inventory-service (:8081), payment-service
# (:8083), the stand-in card processor payment-gateway (:8084), outbox-relay (metrics on :8082) and
# saga-monitor (:8085, pages at /ui). Seeds a few products. Logs and pids go to .run/. Stop it with scripts/stop.sh.
# Release builds (the first build takes about 10 minutes on 2 cores); SAGA_PROFILE=debug runs the
# debug builds instead (quicker to build, several times slower under load: scripts/test.sh uses them).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

RUN_DIR=.run
mkdir -p "$RUN_DIR/logs" "$RUN_DIR/pids"
BROKER=127.0.0.1:9092
PG_URL="postgres://postgres@$PG_HOST:$PG_PORT"

ensure_curl
ensure_postgres
ensure_tansu
PROFILE=${SAGA_PROFILE:-release}
case "$PROFILE" in
    release)
        say "building the services (release; the first build takes about 10 minutes on 2 cores)"
        cargo build --release --workspace --bins ;;
    debug)
        say "building the services (debug)"
        cargo build --workspace --bins ;;
    *) die "SAGA_PROFILE must be release or debug, not $PROFILE" ;;
esac
BIN=target/$PROFILE

start() {  # name, command...
    local name=$1; shift
    local pidfile="$RUN_DIR/pids/$name.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        say "$name already runs (pid $(cat "$pidfile"))"
        return
    fi
    "$@" >>"$RUN_DIR/logs/$name.log" 2>&1 &
    echo $! >"$pidfile"
    say "started $name (pid $!, log $RUN_DIR/logs/$name.log)"
}

wait_ready() {  # name, url
    for _ in $(seq 1 120); do
        curl -fsS "$2" >/dev/null 2>&1 && return
        sleep 0.5
    done
    die "$1 is not ready at $2; see $RUN_DIR/logs/$1.log"
}

if port_open 127.0.0.1 9092 && [ ! -f "$RUN_DIR/pids/broker.pid" ]; then
    say "a broker already listens on $BROKER; using it"
else
    running() { [ -f "$RUN_DIR/pids/$1.pid" ] && kill -0 "$(cat "$RUN_DIR/pids/$1.pid")" 2>/dev/null; }
    if ! running broker && ! running order-service && ! running inventory-service && ! running payment-service; then
        # The broker keeps its topics in memory, so it starts empty: so do the databases, or their
        # orders would refer to events no topic holds any more (and `saga audit` would say so).
        # The stand-in processor's ledger (gateway) goes too: `saga audit` reconciles it with the
        # payments, and charges for payments no database holds any more would be findings. So
        # does the monitor's projection (monitor): its checkpoints are offsets of the old topics.
        say "starting from empty databases orders, inventory, payments, gateway and monitor (the in-memory broker starts empty too)"
        for db in orders inventory payments gateway monitor; do
            psql -q "$PG_URL/postgres" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null
        done
    fi
    # Tansu logs every request's spans at info; warn keeps its log readable.
    RUST_LOG="${BROKER_LOG:-warn}" start broker "$TANSU_BIN" broker --listener-url "tcp://$BROKER" --advertised-listener-url "tcp://$BROKER" \
        --storage-engine memory://tansu/
    for _ in $(seq 1 60); do port_open 127.0.0.1 9092 && break; sleep 0.5; done
fi

export RUST_LOG="${RUST_LOG:-info}"
start order-service "$BIN/order-service" --database-url "$PG_URL/orders" --kafka-bootstrap-servers "$BROKER"
start inventory-service "$BIN/inventory-service" --database-url "$PG_URL/inventory" --kafka-bootstrap-servers "$BROKER"
start payment-gateway "$BIN/payment-gateway" --database-url "$PG_URL/gateway"
start payment-service "$BIN/payment-service" --database-url "$PG_URL/payments" --kafka-bootstrap-servers "$BROKER" \
    --gateway-url http://127.0.0.1:8084
wait_ready order-service http://127.0.0.1:8080/readyz
wait_ready inventory-service http://127.0.0.1:8081/readyz
wait_ready payment-gateway http://127.0.0.1:8084/readyz
wait_ready payment-service http://127.0.0.1:8083/readyz
start outbox-relay "$BIN/outbox-relay" --source "orders=$PG_URL/orders" --source "inventory=$PG_URL/inventory" \
    --source "payments=$PG_URL/payments" --kafka-bootstrap-servers "$BROKER"
wait_ready outbox-relay http://127.0.0.1:8082/readyz
start saga-monitor "$BIN/saga-monitor" --database-url "$PG_URL/monitor" --kafka-bootstrap-servers "$BROKER" \
    --trace-url-template "${TRACE_URL_TEMPLATE:-http://localhost:16686/trace/{trace_id}}"
wait_ready saga-monitor http://127.0.0.1:8085/readyz

say "seeding products"
for p in "WIDGET-1 Widget 250 100" "GADGET-2 Gadget 1299 20" "GIZMO-3 Gizmo 99 5"; do
    set -- $p
    curl -fsS -X PUT "http://127.0.0.1:8081/products/$1" -H 'content-type: application/json' \
        -d "{\"name\":\"$2\",\"price_cents\":$3,\"available\":$4}" >/dev/null
done

cat <<MSG

The order saga is running.
  order-service      http://127.0.0.1:8080   (POST /orders, GET /orders/{id}, /openapi.json, /metrics)
  inventory-service  http://127.0.0.1:8081   (GET /products, PUT /products/{sku}, GET /reservations)
  payment-service    http://127.0.0.1:8083   (GET /payments?order_id=, GET /payments/{id})
  payment-gateway    http://127.0.0.1:8084   (a stand-in card processor: GET /ledger?payment_id=, PUT /faults)
  outbox-relay       http://127.0.0.1:8082/metrics
  saga-monitor       http://127.0.0.1:8085/ui   (every saga step by step; GET /sagas?stuck=true, GET /sagas/{order_id})
  Kafka broker       $BROKER (Tansu, in memory)   Postgres $PG_URL (databases orders, inventory, payments, gateway, monitor)
  logs               $RUN_DIR/logs/
  tools              $BIN/saga (topics as JSON, dead letters), scripts/kcat.sh
  traces             exported when OTEL_EXPORTER_OTLP_ENDPOINT is set (e.g. http://localhost:4318, a Jaeger)
  dashboards         deploy/grafana (Prometheus config and alerts in deploy/prometheus); docker compose up --wait runs them all

Try:
  curl -s -X POST http://127.0.0.1:8080/orders -H 'content-type: application/json' \\
    -d '{"customer_id":"7f1d0c1e-58c5-4f0e-9a55-0b0d2a4c6f10","items":[{"sku":"WIDGET-1","quantity":2}]}'

Stop everything with: scripts/stop.sh
MSG
