#!/usr/bin/env bash
# deploy/nats per-role permissions on a real nats-server, NKEY users made here:
#  1. a worker credential cannot publish another worker's KV events or heartbeats, a route
#     event, a route request, a Raft broadcast or a JetStream API call; a frontend credential
#     cannot publish KV events, heartbeats or another frontend's lease; neither may publish on
#     a router-only subject (the quorum beacon kvr.routers.quorum, the best-effort broadcast
#     kvr.route.bcast, JetStream API and flow control, a KV event subject as the leader does
#     for a down worker's AllBlocksCleared), which the router credential may; an unlisted key
#     cannot connect (checked with an independent raw client, nats_pub_check.py); neither a
#     worker nor a frontend may subscribe to a route subject (in a queue group, as one would
#     to take the routers' share), a router-only subject or another's, which a router may;
#     each role reads only replies under its own inbox prefix (_INBOX.frontend.ID, ...);
#  2. a cluster started with these credentials (kvr-routerd, two kvr-workers, kvr-frontend,
#     all with --nats-nkey) routes requests end to end through the router, and none of them
#     hit a permissions violation;
#  3. credentials in a --nats URL never reach a log line (every binary's startup line).
source "$(dirname "$0")/../lib/testenv.sh"
HERE=$(cd "$(dirname "$0")" && pwd)
kvr_test_init nats_roles
K="$KVR_TMP/keys"
mkdir -p "$K"
for n in router fe5 w1 w2 stranger; do python3 "$HERE/nkeys.py" user "$K" $n; done
pub() { cat "$K/$1.pub"; }
"$HERE/../../deploy/nats/kvr-nats-auth.sh" router="$(pub router)" frontend:5="$(pub fe5)" \
    worker:default:1="$(pub w1)" worker:default:2="$(pub w2)" >"$K/auth.conf" ||
    kvr_fail "kvr-nats-auth.sh"
KVR_NATS_EXTRA_CONF="$(cat "$K/auth.conf")" kvr_start_nats
port=$KVR_NATS_PORT

# --- 1. permissions
check() { # check SEED_NAME allowed|denied SUBJECT...
    local who=$1 want=$2
    shift 2
    local out
    out=$(python3 "$HERE/nats_pub_check.py" 127.0.0.1 "$port" "$K/$who.seed" "$@") ||
        kvr_fail "$who could not connect: $out"
    local s
    for s in "$@"; do
        grep -qx "$want $s" <<<"$out" || kvr_fail "$who: $s should be $want, got: $out"
    done
}
# what only routers publish (routerd/*.c: every kvr_nats_publish / js_publish there)
ROUTER_ONLY=(kvr.routers.quorum kvr.route.bcast '$JS.API.STREAM.INFO.KVR_EVENTS'
    '$JS.FC.KVR_EVENTS.x.y' kvr.kv.default.7)
check w1 allowed kvr.kv.default.1 kvr.workers.default.1
# the pool commands (issue 16 item 4): only a frontend asks them, a worker cannot
check w1 denied kvr.pools.set kvr.pools.list
check fe5 allowed kvr.pools.set kvr.pools.list
check w1 denied kvr.kv.default.2 kvr.workers.default.2 kvr.route.event kvr.route kvr.route.leader \
    kvr.route.leader.event \
    kvr.route.bcast kvr.frontends.5 '$JS.API.STREAM.DELETE.KVR_EVENTS' kvr.kv.other.1 \
    "${ROUTER_ONLY[@]}"
check fe5 allowed kvr.route.event kvr.route.leader kvr.route.leader.event kvr.frontends.5
check fe5 denied kvr.kv.default.1 kvr.workers.default.1 kvr.frontends.6 kvr.route.bcast \
    '$JS.API.STREAM.PURGE.KVR_EVENTS' "${ROUTER_ONLY[@]}"
check router allowed "${ROUTER_ONLY[@]}" kvr.kv.other.1 kvr.route.event
check router denied kvr.workers.default.1 kvr.frontends.5 kvr.route kvr.route.leader \
    kvr.route.leader.event kvr.pools.set
# subscribing: a credential that could join the routers' queue groups would take its share of
# the route requests (the callers time out) and of the route events (their bookings stay held
# until --max-request-age), or read what only routers are told
ROUTER_SUBS=(sub:kvr.route sub:kvr.route.leader sub:kvr.route.event sub:kvr.route.leader.event
    sub:kvr.route.bcast sub:kvr.routers.quorum sub:kvr.pools.set sub:kvr.pools.list)
check w1 denied "${ROUTER_SUBS[@]}" sub:kvr.kv.default.2 sub:kvr.workers.default.2 \
    sub:kvr.frontends.5 sub:kvr.route.\> sub:\> sub:'$JS.API.>'
check fe5 denied "${ROUTER_SUBS[@]}" sub:kvr.kv.default.1 sub:kvr.frontends.6 sub:kvr.\>
check fe5 allowed sub:kvr.workers.default.1
# replies: each credential reads only its own inbox prefix (net/kvr_nats.h kvr_nats_role_inbox);
# step 2's processes live under these prefixes (a wrong one: the frontend gets no answers)
check w1 allowed sub:_INBOX.worker.default.1.x
check w1 denied sub:_INBOX.\> sub:_INBOX.x sub:_INBOX.worker.default.2.x sub:_INBOX.worker.\> \
    sub:_INBOX.frontend.5.x sub:_INBOX.router.x
check fe5 allowed sub:_INBOX.frontend.5.x sub:_INBOX.frontend.5.\>
check fe5 denied sub:_INBOX.\> sub:_INBOX.frontend.6.x sub:_INBOX.frontend.\> sub:_INBOX.router.x \
    sub:_INBOX.worker.default.1.x
check router allowed "${ROUTER_SUBS[@]}" sub:kvr.workers.default.1 sub:kvr.frontends.5 \
    sub:_INBOX.router.x
check router denied sub:_INBOX.frontend.5.x sub:_INBOX.worker.default.1.x
python3 "$HERE/nats_pub_check.py" 127.0.0.1 "$port" "$K/stranger.seed" kvr.kv.default.1 &&
    kvr_fail "an unlisted NKEY connected"
kvr_log "permissions: worker and frontend confined (publish and subscribe)"

# --- 2. a cluster on these credentials routes end to end
declare -A WPORT
for i in 1 2; do
    WPORT[$i]=$(kvr_free_port)
    kvr_spawn "worker$i" "$KVR_BIN/kvr-worker" --listen 127.0.0.1:${WPORT[$i]} --nats "$NATS_URL" \
        --namespace default --model m1 --id "$i" --speedup 10 --nats-nkey "$K/w$i.seed"
done
rport=$(kvr_free_port)
mkdir -p "$KVR_TMP/r1"
# with a pool (it stays awake: its workers are live) so the router serves kvr.pools.* and the
# frontend's /proxy/ API asks them, both under their roles' permissions
echo '{"pools": [{"namespace": "default", "model": "m1", "target": "m1"}]}' >"$KVR_TMP/pools.json"
echo '{"models": [{"id": "m1", "namespace": "default", "model": "m1"}]}' >"$KVR_TMP/catalogue.json"
echo "proxy-key-$$" >"$KVR_TMP/proxy.key"
kvr_spawn router1 "$KVR_BIN/kvr-routerd" --id 1 --nats "$NATS_URL" --http 127.0.0.1:$rport \
    --data-dir "$KVR_TMP/r1" --nats-nkey "$K/router.seed" \
    --pools-file "$KVR_TMP/pools.json" --scaler exec:/bin/true
fport=$(kvr_free_port)
kvr_spawn fe "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fport --nats "$NATS_URL" --id 5 \
    --router-mode kv --route-timeout 500ms --route-tries 3 --nats-nkey "$K/fe5.seed" \
    --model-catalogue "$KVR_TMP/catalogue.json" --proxy-api-key-file "$KVR_TMP/proxy.key"
F=http://127.0.0.1:$fport
kvr_wait_http "$F/health" 15
kvr_wait_http "http://127.0.0.1:$rport/health" 15
rworkers() { curl -s --max-time 2 "http://127.0.0.1:$rport/v1/state" | jq -e '.workers|length==2' >/dev/null; }
kvr_wait_for 20 rworkers || kvr_fail "the router never saw both workers"
fworkers() { curl -s "$F/metrics" | awk '/^kvr_frontend_live_workers / {exit !($2==2)}'; }
kvr_wait_for 15 fworkers || kvr_fail "the frontend never saw both workers"
fmetric() { curl -s "$F/metrics" | awk -v k="$1" 'index($1, k) == 1 {s+=$2} END {printf "%d\n", s}'; }
for i in 1 2 3; do
    r=$(curl -s -d '{"model":"m1","prompt":"route me with credentials","max_tokens":4}' "$F/v1/completions")
    kvr_assert_eq "$(echo "$r" | jq -r .usage.completion_tokens)" 4 "request $i"
done
kvr_assert_eq "$(fmetric kvr_frontend_routed_total)" 3 "requests routed by the router"
kvr_assert_eq "$(fmetric kvr_frontend_route_fallback_total)" 0 "no local fallback"
# KV events reached the router through JetStream under the worker's permissions
kvevents() { curl -s --max-time 2 "http://127.0.0.1:$rport/metrics" | awk '/^kvr_router_kv_events_total|^kvr_routerd_events_applied_total/ {s+=$2} END {exit !(s>0)}'; }
kvr_wait_for 10 kvevents || kvr_log "note: no KV-event counter found on the router metrics"
pxa=(-s --max-time 10 -H "Authorization: Bearer proxy-key-$$")
running() { curl "${pxa[@]}" "$F/proxy/models/running" | jq -e '[.models[].id] == ["m1"]' >/dev/null; }
kvr_wait_for 10 running || kvr_fail "/proxy/models/running under credentials: $(curl "${pxa[@]}" "$F/proxy/models/running")"
r=$(curl "${pxa[@]}" -d '{"model_id":"m1"}' "$F/proxy/operations/start")
kvr_assert_eq "$(jq -r '.pool.ok' <<<"$r")" true "kvr.pools.set under credentials: $r"
for p in worker1 worker2 router1 fe; do
    if grep -q "Permissions Violation" "$KVR_TMP/$p.log"; then
        grep "Permissions Violation" "$KVR_TMP/$p.log" | head -3 >&2
        kvr_fail "$p hit a permissions violation: its role lacks a subject it needs"
    fi
done
kvr_log "cluster on per-role NKEY credentials: routed end to end"

# --- 3. credentials in URLs are redacted in every log line
SECRET=pw-must-not-leak-42
U="nats://kvruser:$SECRET@127.0.0.1:$port"
wp=$(kvr_free_port)
kvr_spawn wred "$KVR_BIN/kvr-worker" --listen 127.0.0.1:$wp --nats "$U" --namespace default \
    --model m1 --id 9
rp=$(kvr_free_port)
mkdir -p "$KVR_TMP/rred"
kvr_spawn rred "$KVR_BIN/kvr-routerd" --id 9 --nats "$U" --http 127.0.0.1:$rp --data-dir "$KVR_TMP/rred"
fp=$(kvr_free_port)
kvr_spawn fred "$KVR_BIN/kvr-frontend" --listen 127.0.0.1:$fp --nats "$U" --id 9
for p in wred rred fred; do
    started() { grep -qE 'msg="(listening|started)"' "$KVR_TMP/$1.log"; }
    kvr_wait_for 15 started $p || kvr_fail "$p never logged its startup line"
    grep -E 'msg="(listening|started)"' "$KVR_TMP/$p.log" | grep -q 'nats=nats://\*\*\*@127.0.0.1' ||
        kvr_fail "$p: startup line does not show the redacted URL"
done
# the server refuses this user: the failed attempts are logged too, and must not show it
refused() { grep -q 'nats connect failed' "$KVR_TMP/wred.log"; }
kvr_wait_for 15 refused || kvr_fail "the worker never logged a refused connection"
for p in wred rred fred; do
    grep -q "$SECRET" "$KVR_TMP/$p.log" && kvr_fail "$p logged the password: $(grep "$SECRET" "$KVR_TMP/$p.log" | head -1)"
done
kvr_pass
