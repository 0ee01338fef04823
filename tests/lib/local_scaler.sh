# tests/lib/local_scaler.sh: the environment of scripts/kvr-local-scaler for a test whose
# routers run it (--scaler exec:scripts/kvr-local-scaler), and the cleanup of the workers it
# starts (they run in their own sessions, out of kvr_cleanup's reach).
#   kvr_local_scaler_env DELAY_S [WORKER_ARGS]   after kvr_start_nats: exports KVR_SCALER_*
#       (state in $KVR_TMP/scaler, a "model load" of DELAY_S seconds), and sets the EXIT trap
#       that SIGKILLs those workers before kvr_cleanup
#   stop_workers        SIGKILLs every worker the scaler started
#   workers_running     prints how many of them run
stop_workers() {
    local pf
    for pf in "$KVR_SCALER_DIR"/pool-*/*.pid; do
        [ -e "$pf" ] && kill -KILL "$(cat "$pf")" 2>/dev/null
    done
    return 0
}
workers_running() {
    local n=0 pf
    for pf in "$KVR_SCALER_DIR"/pool-*/*.pid; do
        [ -e "$pf" ] && kill -0 "$(cat "$pf")" 2>/dev/null && n=$((n + 1))
    done
    echo $n
}
kvr_local_scaler_env() {
    export KVR_SCALER_DIR="$KVR_TMP/scaler" KVR_SCALER_NATS="$NATS_URL" KVR_WORKER_BIN="$KVR_BIN/kvr-worker"
    export KVR_SCALER_DELAY=$1 KVR_SCALER_ARGS="${2:---speedup 50}"
    mkdir -p "$KVR_SCALER_DIR"
    trap 'rc=$?; stop_workers; (exit $rc); kvr_cleanup' EXIT
}
