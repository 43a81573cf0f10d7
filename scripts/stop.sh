#!/usr/bin/env bash
# Stops what scripts/run.sh started (the monitor and the services first, then the relay, then the broker).
set -euo pipefail
cd "$(dirname "$0")/.."
for name in saga-monitor order-service inventory-service payment-service payment-gateway outbox-relay broker; do
    pidfile=.run/pids/$name.pid
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
        echo "stopped $name"
    fi
    rm -f "$pidfile"
done
