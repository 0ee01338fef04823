#!/usr/bin/env bash
# routerd_edges (issue 18, defects 2, 4 and 10): the HTTP admin token (no token or a wrong one
# is refused with 401 and changes nothing; the right one, scheme in any case, works; a router
# without --admin-token-file refuses every POST), the worker URL allow-list (a heartbeat whose
# url is outside --worker-cidr is refused and counted), the worker table (1,100 one-shot fake
# heartbeats, then a real worker that gets routed) and loop stalls (router and heartbeat
# sources SIGSTOPped longer than the TTL together: no worker down, no lease expired).
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_edges
kvr_start_nats
P1=$(kvr_free_port)
P2=$(kvr_free_port)
while [ "$P2" = "$P1" ]; do P2=$(kvr_free_port); done
rd_beat beat1 ns1 1
rd_start r1 1 "$P1" "$KVR_TMP/r1" --heartbeat-misses 3 --frontend-timeout 3s
kvr_spawn r2 "$KVR_BIN/kvr-routerd" --id 2 --nats "$NATS_URL" --http "127.0.0.1:$P2" \
    --data-dir "$KVR_TMP/r2"
kvr_wait_http "http://127.0.0.1:$P1/ready" 15
kvr_wait_http "http://127.0.0.1:$P2/ready" 15
R1=http://127.0.0.1:$P1
rd_token >/dev/null # sets RD_AUTH in this shell
TOKEN=$(cat "$KVR_TMP/admin-token")
up_ids() { rd_q "$P1" '[.workers[] | select(.up) | .id] | sort | map(tostring) | join(",")'; }
kvr_wait_for 10 bash -c "[ \"\$(curl -s $R1/v1/state | jq -r '[.workers[] | select(.up)] | length')\" = 1 ]" ||
    kvr_fail "worker 1 never up"

# --- admin token ---
body=$("$PUB" tokens 7 128 | jq -c '. + {model:"m1",namespace:"ns1"}')
code() { curl -s -o "$KVR_TMP/body" -w '%{http_code}' --max-time 5 "$@"; }
kvr_assert_eq "$(code -X POST -d "$body" "$R1/v1/route")" 401 "route without a token"
grep -q "admin token required" "$KVR_TMP/body" || kvr_fail "401 body: $(cat "$KVR_TMP/body")"
kvr_assert_eq "$(code -X POST -H "Authorization: Bearer wrong-$TOKEN" -d "$body" "$R1/v1/route")" 401 \
    "route with a wrong token"
kvr_assert_eq "$(code -X POST -H "Authorization: Basic $TOKEN" -d "$body" "$R1/v1/route")" 401 \
    "route with another scheme"
kvr_assert_eq "$(code -X POST -d "$body" "$R1/v1/match")" 401 "match without a token"
kvr_assert_eq "$(code -X POST -d '{"id":4,"raft_addr":"127.0.0.1:9"}' "$R1/admin/raft/add")" 401 \
    "admin without a token"
kvr_assert_eq "$(code "$R1/admin/raft/add")" 401 "GET under /admin without a token"
kvr_assert_eq "$(rd_q "$P1" .bookings)" 0 "refused routes booked nothing"
kvr_assert_eq "$(rd_metric "$P1" kvr_routerd_http_unauthorized_total)" 6 "refusals counted"
kvr_assert_eq "$(code -X POST -H "authorization: bearer $TOKEN" -d "$body" "$R1/v1/route")" 200 \
    "route with the token (lower-case scheme)"
kvr_assert_eq "$(jq -r .worker_id "$KVR_TMP/body")" 1 "routed to worker 1"
kvr_assert_eq "$(rd_q "$P1" .bookings)" 1 "the authorized route booked"
kvr_assert_eq "$(code -X POST "${RD_AUTH[@]}" -d '{"id":4,"raft_addr":"127.0.0.1:9"}' "$R1/admin/raft/add")" \
    409 "admin with the token reaches the handler (no raft here)"
for p in /health /ready /metrics /v1/state; do
    kvr_assert_eq "$(code "$R1$p")" 200 "GET $p stays open"
done
# a router started without --admin-token-file refuses every POST
kvr_assert_eq "$(code -X POST -H "Authorization: Bearer $TOKEN" -d "$body" "http://127.0.0.1:$P2/v1/route")" \
    401 "route on a router without a token file"
grep -q "admin endpoints disabled" "$KVR_TMP/body" || kvr_fail "401 body: $(cat "$KVR_TMP/body")"
kvr_assert_eq "$(rd_q "$P2" .bookings)" 0 "nothing booked by the refused request"
kvr_term r2 # from here on every kvr.route request goes to r1

# --- worker URL allow-list (default: loopback and private ranges) ---
printf 'beat ns1 901 m1 http://8.8.8.8:8000 64 1000\nbeat ns1 902 m1 http://evil.example:80 64 1000\nbeat ns1 903 m3 http://10.9.8.7:80 64 1000\n' |
    "$PUB" --nats "$NATS_URL" --core >/dev/null
kvr_wait_for 5 bash -c "curl -s $R1/v1/state | jq -e '.workers[] | select(.id==903)' >/dev/null" ||
    kvr_fail "private-range worker 903 not admitted"
kvr_assert_eq "$(rd_q "$P1" '[.workers[] | select(.id==901 or .id==902)] | length')" 0 \
    "workers outside the allow-list admitted"
kvr_assert_eq "$(rd_metric "$P1" kvr_routerd_heartbeats_refused_url_total)" 2 "refused heartbeats counted"

# --- loop stall: router and every heartbeat source frozen 5 s (> 3 s TTL, > 3 s lease) ---
printf 'raw kvr.frontends.77 -\n' | "$PUB" --nats "$NATS_URL" --core >/dev/null
kvr_spawn lease77 bash -c "while :; do printf 'raw kvr.frontends.77 -\n' | '$PUB' --nats '$NATS_URL' --core >/dev/null; sleep 0.5; done"
route=$(printf 'route m1 ns1 7 320 req-stall\n' | "$PUB" --nats "$NATS_URL" | grep '^route')
case "$route" in "route ok=1 "*) ;; *) kvr_fail "route for the stall test: $route" ;; esac
kvr_wait_for 5 bash -c "[ \"\$(curl -s $R1/v1/state | jq -r .bookings)\" = 2 ]" || kvr_fail "booking of frontend 77"
kill -STOP "$(kvr_pid r1)" "$(kvr_pid beat1)"
kill -STOP -- -"$(kvr_pid lease77)"
sleep 5
kill -CONT "$(kvr_pid r1)"
sleep 0.4 # the router runs alone for a bit: without stall compensation its deadlines pass
kill -CONT "$(kvr_pid beat1)"
kill -CONT -- -"$(kvr_pid lease77)"
sleep 2
! grep -q "worker down.*worker=1 " "$KVR_TMP/r1.log" || kvr_fail "worker 1 declared down by a loop stall"
! grep -q "frontend lease expired" "$KVR_TMP/r1.log" || kvr_fail "lease expired by a loop stall"
kvr_assert_eq "$(rd_q "$P1" .bookings)" 2 "bookings kept through the stall"
[ "$(rd_metric "$P1" kvr_routerd_loop_stalls_total)" -ge 1 ] || kvr_fail "stall not counted"
kvr_term lease77

# --- worker table: 1,100 one-shot fake heartbeats, then a real worker ---
for i in $(seq 2000 3099); do echo "beat ns1 $i m1 http://127.0.0.1:1/f$i 64 1000"; done |
    "$PUB" --nats "$NATS_URL" --core >/dev/null
kvr_wait_for 10 bash -c "[ \"\$(curl -s $R1/v1/state | jq -r '.workers | length')\" -ge 1024 ]" ||
    kvr_fail "fake heartbeats did not fill the table"
kvr_spawn real "$PUB" --nats "$NATS_URL" beat-loop ns1 5000 m2 "http://127.0.0.1:2/real" 64 1000 200
kvr_wait_for 15 bash -c "curl -s $R1/v1/state | jq -e '.workers[] | select(.id==5000 and .up)' >/dev/null" ||
    kvr_fail "real worker 5000 never admitted after the flood"
body2=$("$PUB" tokens 9 128 | jq -c '. + {model:"m2",namespace:"ns1"}')
kvr_assert_eq "$(code -X POST "${RD_AUTH[@]}" -d "$body2" "$R1/v1/route")" 200 "route to the real worker"
kvr_assert_eq "$(jq -r .worker_id "$KVR_TMP/body")" 5000 "routed to the real worker"
[ "$(rd_metric "$P1" kvr_routerd_workers_evicted_total)" -ge 1 ] || kvr_fail "no eviction counted"
kvr_assert "router alive at the end" kvr_alive r1
kvr_pass
