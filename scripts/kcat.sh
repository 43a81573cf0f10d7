#!/usr/bin/env bash
# kcat that works against the local Tansu broker (see ensure_kcat in lib.sh). Arguments go to kcat;
# without -b, the broker is 127.0.0.1:9092. Examples are in the README.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
ensure_kcat
args=("$@")
case " $* " in *" -b "*) ;; *) args=(-b "${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:9092}" "${args[@]}") ;; esac
LD_LIBRARY_PATH="$KCAT_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec kcat "${args[@]}"
