#!/usr/bin/env bash
# kvr-routerd --best-effort (the broadcast scheme kvr-bench raft measures against Raft): three
# routers without peers each book on their own state and broadcast it; after route requests
# spread over them, every router holds every booking; frees reach every router too; a garbled
# broadcast is refused and changes nothing; --best-effort with --peers is refused.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_best_effort
[ -x "$KVR_BIN/kvr-routerd" ] || kvr_fail "no kvr-routerd"
kvr_start_nats
declare -A HP
for i in 1 2 3; do HP[$i]=$(kvr_free_port); done
rd_beat beat1 ns1 1
rd_beat beat2 ns1 2
for i in 1 2 3; do rd_start "r$i" "$i" "${HP[$i]}" "$KVR_TMP/r$i" --best-effort; done
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${HP[$i]}/ready" 20; done
for i in 1 2 3; do
    kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[$i]}/v1/state | jq '[.workers[] | select(.up)] | length')\" = 2 ]" ||
        kvr_fail "router $i: workers not up"
done

N=60
for ((k = 1; k <= N; k++)); do printf 'route m1 ns1 %d 128 be-%04d\n' $((k % 3)) "$k"; done |
    "$PUB" --nats "$NATS_URL" >"$KVR_TMP/routes.out" || kvr_fail "route requests"
kvr_assert_eq "$(grep -c '^route ok=1 .*mode=local' "$KVR_TMP/routes.out")" "$N" "answered in local mode"
routers=$(sed -n 's/.* router=\([0-9]*\).*/\1/p' "$KVR_TMP/routes.out" | sort -u | wc -l)
[ "$routers" -ge 2 ] || kvr_fail "only $routers router(s) answered: the queue group did not spread"
for i in 1 2 3; do
    kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[$i]}/v1/state | jq .bookings)\" = $N ]" ||
        kvr_fail "router $i holds $(rd_q "${HP[$i]}" .bookings) bookings, want all $N (broadcast lost)"
done
# every router booked each request on the worker the deciding router chose
w1=$(curl -s "http://127.0.0.1:${HP[1]}/v1/state" | jq -c '[.workers[] | {id, bookings}] | sort_by(.id)')
for i in 2 3; do
    kvr_assert_eq "$(curl -s "http://127.0.0.1:${HP[$i]}/v1/state" | jq -c '[.workers[] | {id, bookings}] | sort_by(.id)')" \
        "$w1" "router $i's per-worker bookings"
done

# Garbled broadcasts are refused and change nothing. Each garbled frame below would free
# be-0002 if a router took it (so "nothing changed" can fail): a frame of 3 elements around a
# valid FREE, a FREE under command version 2; plus two frames of plain garbage. They are
# followed, on the same connection (NATS keeps its order), by one valid FREE of be-0001 from a
# router id nobody uses: once a router applied that, it has read every frame before it, and
# the only change must be that one booking.
rid_hex() { printf '%s' "$1" | od -An -tx1 | tr -d ' \n' | sed -e :a -e 's/^.\{1,31\}$/&0/;ta'; }
free_cmd() { printf '019203c410%s' "$(rid_hex "$1")"; } # version 1, [FREE=3, bin16 request_id]
printf '%s\n' \
    "raw kvr.route.bcast 9363c415$(free_cmd be-0002)00" \
    "raw kvr.route.bcast 9263c415$(free_cmd be-0002 | sed 's/^01/02/')" \
    "raw kvr.route.bcast 92cd0001c403ffffff" "raw kvr.route.bcast c1" \
    "raw kvr.route.bcast 9263c415$(free_cmd be-0001)" |
    "$PUB" --nats "$NATS_URL" --core >/dev/null || kvr_fail "publishing garbage"
bcast_rejected() { curl -s "http://127.0.0.1:${HP[$1]}/metrics" |
    awk '$1 == "kvr_routerd_booking_broadcasts_rejected_total" {print $2}'; }
settled() { [ "$(bcast_rejected "$1")" = 4 ] && [ "$(rd_q "${HP[$1]}" .bookings)" = $((N - 1)) ]; }
for i in 1 2 3; do
    kvr_wait_for 10 settled "$i" ||
        kvr_fail "router $i: $(bcast_rejected "$i") garbled broadcasts refused (want 4)," \
            "$(rd_q "${HP[$i]}" .bookings) bookings (want $((N - 1)): only the valid free applied)"
    kvr_alive "r$i" || kvr_fail "router $i died on a garbled broadcast"
done
grep -q "bad booking broadcast" "$KVR_TMP"/r*.log || kvr_fail "no log line for the garbled broadcast"

for ((k = 2; k <= N; k++)); do printf 'rev be-%04d free\n' "$k"; done |
    "$PUB" --nats "$NATS_URL" >/dev/null || kvr_fail "frees"
for i in 1 2 3; do
    kvr_wait_for 10 bash -c "[ \"\$(curl -s http://127.0.0.1:${HP[$i]}/v1/state | jq .bookings)\" = 0 ]" ||
        kvr_fail "router $i still holds $(rd_q "${HP[$i]}" .bookings) bookings after every free"
done

"$KVR_BIN/kvr-routerd" --id 9 --nats "$NATS_URL" --http 127.0.0.1:1 --data-dir "$KVR_TMP/r9" \
    --best-effort --raft-addr 127.0.0.1:2 --peers 9@127.0.0.1:2 >"$KVR_TMP/r9.out" 2>&1
kvr_assert_eq "$?" 2 "--best-effort with --peers"
grep -q "best-effort" "$KVR_TMP/r9.out" || kvr_fail "no error message for --best-effort with --peers"
kvr_pass
