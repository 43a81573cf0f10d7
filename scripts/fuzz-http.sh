#!/usr/bin/env bash
# Fuzzes the services' HTTP APIs (orders, inventory, payments, the saga monitor) from their own /openapi.json with schemathesis (PyPI, pinned,
# installed once in a venv under ~/.cache/order-saga) against the running local stack
# (scripts/run.sh's; started here if none runs). Passes when no response is a 5xx other than 503,
# no process exited, and `saga audit` then finds nothing. Prints how many requests each service
# answered (from its own http_requests_total) and how each answered.
#
# Usage: scripts/fuzz-http.sh [MAX_EXAMPLES]
#   MAX_EXAMPLES per operation and phase: 30 (default) is the short run of scripts/test.sh;
#   1500 makes well over 10,000 requests per service.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

MAX_EXAMPLES="${1:-30}"
SCHEMATHESIS_VERSION=4.32.5
VENV="$CACHE_DIR/schemathesis-$SCHEMATHESIS_VERSION"

if [ ! -x "$VENV/bin/schemathesis" ]; then
    say "installing schemathesis $SCHEMATHESIS_VERSION from PyPI (once, into $VENV)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q "schemathesis==$SCHEMATHESIS_VERSION"
fi

if ! curl -fsS http://127.0.0.1:8080/readyz >/dev/null 2>&1; then
    say "starting the local stack (scripts/run.sh)"
    trap 'say "stopping the local stack"; scripts/stop.sh >&2 || true' EXIT
    scripts/run.sh >/dev/null
fi

# Requests answered so far by the service at $1, in total and by status class.
answered() {
    curl -fsS "$1/metrics" | awk -v class="${2:-}" '
        /^http_requests_total\{/ {
            if (class == "" || index($0, "status=\"" class) > 0) total += $NF
        }
        END { printf "%d", total }'
}

status=0
for service in order-service=http://127.0.0.1:8080 inventory-service=http://127.0.0.1:8081 \
    payment-service=http://127.0.0.1:8083 saga-monitor=http://127.0.0.1:8085; do
    name="${service%%=*}"
    url="${service#*=}"
    before=$(answered "$url")
    before_5xx=$(answered "$url" 5)
    before_503=$(answered "$url" 503)
    say "fuzzing $name from $url/openapi.json (up to $MAX_EXAMPLES examples per operation and phase)"
    # From the cache directory: schemathesis keeps a .schemathesis folder in its working directory.
    if ! (cd "$CACHE_DIR" && "$VENV/bin/schemathesis" run "$url/openapi.json" --checks not_a_server_error \
        --max-examples "$MAX_EXAMPLES" --no-color --request-timeout 30 >"$CACHE_DIR/fuzz-$name.log" 2>&1); then
        say "schemathesis found problems in $name; see $CACHE_DIR/fuzz-$name.log"
        tail -40 "$CACHE_DIR/fuzz-$name.log" >&2
        status=1
    fi
    requests=$(($(answered "$url") - before))
    errors=$(($(answered "$url" 5) - before_5xx))
    unavailable=$(($(answered "$url" 503) - before_503))
    printf '%s: %d requests answered, %d with 503, %d with another 5xx\n' \
        "$name" "$requests" "$unavailable" "$((errors - unavailable))"
    if [ "$((errors - unavailable))" -ne 0 ]; then
        status=1
    fi
    curl -fsS "$url/metrics" | grep '^http_requests_total{' | sed 's/^/    /' >&2
done

for url in http://127.0.0.1:8080 http://127.0.0.1:8081 http://127.0.0.1:8082 http://127.0.0.1:8083 \
    http://127.0.0.1:8084 http://127.0.0.1:8085; do
    if ! curl -fsS "$url/readyz" >/dev/null; then
        say "$url is not ready after the fuzzing"
        status=1
    fi
done

say "auditing the saga after the fuzzing (saga audit, 60 s grace for sagas still in flight)"
# The saga tool of the builds the stack runs (scripts/run.sh builds release by default).
if ! "target/${SAGA_PROFILE:-release}/saga" audit --grace 60s; then
    status=1
fi
exit "$status"
