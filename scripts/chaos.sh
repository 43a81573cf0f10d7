#!/usr/bin/env bash
# The fault-injection run on its own, for as long as you like: load on the whole system (its own
# broker, its own Postgres cluster) while every kind of fault is injected at random moments, then
# the checks (every order finished as its customer asked, saga audit 0 findings, no dead letters).
#
#   scripts/chaos.sh [SECONDS] [ORDERS_PER_SECOND]     (defaults: 600 s, 20 orders/s)
#
# CHAOS_SEED=<n> repeats a run's fault schedule (every run prints its seed). SAGA_PROFILE=release
# runs release builds (debug by default: they build faster; release holds higher rates). The test
# suite runs the same test for 75 s (every fault at least once). Process logs:
# target/<profile>/e2e-logs/chaos/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

export CHAOS_SECS="${1:-600}"
export CHAOS_RATE="${2:-20}"
PROFILE=${SAGA_PROFILE:-debug}
case "$PROFILE" in
    debug) profile_args=() ;;
    release) profile_args=(--release) ;;
    *) die "SAGA_PROFILE must be release or debug, not $PROFILE" ;;
esac
ensure_curl
ensure_postgres
ensure_tansu
say "building the binaries ($PROFILE)"
cargo build "${profile_args[@]}" --workspace --bins
ensure_kcat
export KCAT_LIB_DIR
say "fault-injection run: ${CHAOS_SECS} s of faults at ${CHAOS_RATE} orders/s (progress below)"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run "${profile_args[@]}" -p e2e --test chaos --no-capture --no-fail-fast
else
    cargo test "${profile_args[@]}" -p e2e --test chaos -- --nocapture
fi
