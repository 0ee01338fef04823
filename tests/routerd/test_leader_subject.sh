#!/usr/bin/env bash
# routerd_leader_subject: kvr.route.leader (DESIGN.md 4). Three routers in Raft, two workers,
# two frontends (one asking the leader first, the default; one with --no-route-leader-first).
#  1. only the leader answers kvr.route.leader: the default frontend's requests are all
#     decided by the router that leads (followers decide none), with no fallback;
#  2. --no-route-leader-first spreads over the queue group kvr.route (followers decide some);
#  3. the leader SIGKILLed: requests keep being answered by a router (no local fallback once a
#     new leader is elected), and the new leader alone answers the leader subject;
#  4. a follower never subscribes to kvr.route.leader (/v1/state raft.leader_subject); six
#     planned hand-overs (POST /admin/raft/transfer) under load move both leader subjects with
#     no failed, fallen-back or timed-out request (run before 3, which kills the leader);
#  5. route events go to the leader too (kvr.route.leader.event): with the default frontend no
#     follower forwards a command to the leader (its forward-hop count stays), every booking
#     is freed, and only the leader subscribes to the event subject; --no-route-leader-first
#     sends them to the queue group, where followers take and forward some.
source "$(dirname "$0")/../lib/testenv.sh"
source "$(dirname "$0")/rd_lib.sh"
kvr_test_init routerd_leader_subject
kvr_need_bins kvr-routerd kvr-worker kvr-frontend
kvr_start_nats
read -r A1 A2 A3 <<<"$(rd_raft_ports 3)"
[ -n "$A3" ] || kvr_fail "no free raft ports"
PEERS="1@$A1,2@$A2,3@$A3"
declare -A HP RA
RA[1]=$A1; RA[2]=$A2; RA[3]=$A3
port() { rd_port_avoiding "$A1" "$A2" "$A3"; }
rd_secret "$KVR_TMP/secret"
for i in 1 2 3; do
    HP[$i]=$(port)
    rd_start "r$i" "$i" "${HP[$i]}" "$KVR_TMP/r$i" --raft-addr "${RA[$i]}" --peers "$PEERS" \
        --cluster-secret-file "$KVR_TMP/secret" --namespace default
done
for w in 1 2; do
    wp=$(port)
    kvr_spawn "w$w" "$KVR_BIN/kvr-worker" --listen "127.0.0.1:$wp" --nats "$NATS_URL" \
        --namespace default --model m1 --id "$w" --speedup 50
done
for i in 1 2 3; do kvr_wait_http "http://127.0.0.1:${HP[$i]}/ready" 30; done
L=$(rd_common_leader "${HP[1]}" "${HP[2]}" "${HP[3]}")
[ -n "$L" ] || kvr_fail "no Raft leader"
for i in 1 2 3; do rd_wait_workers_up "${HP[$i]}" 2 20 || kvr_fail "router $i: workers not up"; done
subj() { rd_q "${HP[$1]}" .raft.leader_subject; }
leader_answers() { [ "$(subj "$1")" = true ]; }
kvr_wait_for 5 leader_answers "$L" || kvr_fail "leader $L does not answer kvr.route.leader"

F1P=$(port)
F2P=$(port)
kvr_spawn fe1 "$KVR_BIN/kvr-frontend" --listen "127.0.0.1:$F1P" --nats "$NATS_URL" --id 5 \
    --router-mode kv --route-timeout 500ms --route-tries 3
kvr_spawn fe2 "$KVR_BIN/kvr-frontend" --listen "127.0.0.1:$F2P" --nats "$NATS_URL" --id 6 \
    --router-mode kv --route-timeout 500ms --route-tries 3 --no-route-leader-first
for f in $F1P $F2P; do kvr_wait_http "http://127.0.0.1:$f/health" 10; done
fworkers() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^kvr_frontend_live_workers / {exit !($2==2)}'; }
for f in $F1P $F2P; do kvr_wait_for 10 fworkers "$f" || kvr_fail "frontend $f never saw both workers"; done
forwards() { # router: commands it forwarded to the leader (route events, on a follower)
    curl -s --max-time 2 "http://127.0.0.1:${HP[$1]}/metrics" |
        awk '$1 == "kvr_routerd_raft_hop_seconds_count{hop=\"forward\"}" {s += $2} END {printf "%d\n", s}'
}
evsubj() { rd_q "${HP[$1]}" .raft.leader_event_subject; }
all_freed() { for i in "$@"; do [ "$(rd_q "${HP[$i]}" .bookings)" = 0 ] || return 1; done; }
decided() { # router: its route decisions (all modes)
    curl -s --max-time 2 "http://127.0.0.1:${HP[$1]}/metrics" |
        awk 'index($1, "kvr_routerd_route_decisions_total") == 1 {s += $2} END {printf "%d\n", s}'
}
fallbacks() { curl -s "http://127.0.0.1:$1/metrics" | awk '/^kvr_frontend_route_fallback_total/ {s+=$2} END {printf "%d\n", s}'; }
send() { # frontend-port n tag
    local k r
    for ((k = 0; k < $2; k++)); do
        r=$(curl -s --max-time 10 -d "{\"model\":\"m1\",\"prompt\":\"$3 $k\",\"max_tokens\":2}" \
            "http://127.0.0.1:$1/v1/completions")
        [ "$(jq -r .usage.completion_tokens <<<"$r")" = 2 ] || kvr_fail "$3 request $k: $r"
    done
}

# 1. the default frontend: every decision on the leader
declare -A D0 FW0
for i in 1 2 3; do D0[$i]=$(decided $i); FW0[$i]=$(forwards $i); done
send "$F1P" 12 leader-first
kvr_wait_for 10 all_freed 1 2 3 || kvr_fail "bookings left after the leader-first requests: $(
    for i in 1 2 3; do echo -n "r$i=$(rd_q "${HP[$i]}" .bookings) "; done)"
for i in 1 2 3; do
    d=$(($(decided $i) - ${D0[$i]}))
    if [ "$i" = "$L" ]; then
        kvr_assert_eq "$d" 12 "decisions on the leader (router $i)"
        kvr_assert_eq "$(evsubj $i)" true "the leader takes kvr.route.leader.event"
    else
        kvr_assert_eq "$d" 0 "decisions on follower $i"
        kvr_assert_eq "$(subj $i)" false "follower $i answers kvr.route.leader"
        kvr_assert_eq "$(evsubj $i)" false "follower $i takes kvr.route.leader.event"
        kvr_assert_eq "$(($(forwards $i) - ${FW0[$i]}))" 0 \
            "commands follower $i forwarded (the 24 route events went to the leader)"
    fi
done
kvr_assert_eq "$(fallbacks "$F1P")" 0 "local fallbacks (leader first)"
kvr_log "ok: leader first: the leader (router $L) decided all 12 and took their 24 events"

# 2. --no-route-leader-first: the queue group spreads them
for i in 1 2 3; do D0[$i]=$(decided $i); FW0[$i]=$(forwards $i); done
send "$F2P" 24 any-router
fol=0 fw=0
for i in 1 2 3; do
    [ "$i" = "$L" ] && continue
    fol=$((fol + $(decided $i) - ${D0[$i]}))
    fw=$((fw + $(forwards $i) - ${FW0[$i]}))
done
((fol > 0)) || kvr_fail "no follower decided any of 24 requests sent to kvr.route"
((fw > 0)) || kvr_fail "no follower forwarded anything for 24 requests sent to kvr.route"
kvr_wait_for 10 all_freed 1 2 3 || kvr_fail "bookings left after the any-router requests"
kvr_log "ok: any router: followers decided $fol of 24 and forwarded $fw commands"

# 4. a planned hand-over (POST /admin/raft/transfer, admin token only) while requests flow
#    through the leader-first frontend: the leadership and both leader subjects move, no request
#    fails, none falls back, none waits out its 500 ms route timeout (the deposed leader drains
#    its subjects and forwards what the server had already sent it), every booking is freed
code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -X POST \
    "http://127.0.0.1:${HP[$L]}/admin/raft/transfer")
kvr_assert_eq "$code" 401 "transfer without the admin token"
kvr_assert_eq "$(rd_q "${HP[$L]}" .raft.leader)" "$L" "leader after a refused transfer"
slow() { # route decisions of the leader-first frontend over 500 ms: those that waited out a try's timeout
    curl -s "http://127.0.0.1:$F1P/metrics" | awk '
        $1 == "kvr_frontend_route_seconds_count" {c = $2}
        $1 == "kvr_frontend_route_seconds_bucket{le=\"0.5\"}" {b = $2}
        END {printf "%d\n", c - b}'
}
slow0=$(slow)
fb0=$(fallbacks "$F1P")
load() {
    local k r
    for ((k = 0; k < 2000; k++)); do
        [ -e "$KVR_TMP/load.stop" ] && return
        r=$(curl -s --max-time 10 -d "{\"model\":\"m1\",\"prompt\":\"load $1 $k\",\"max_tokens\":2}" \
            "http://127.0.0.1:$F1P/v1/completions")
        [ "$(jq -r .usage.completion_tokens <<<"$r" 2>/dev/null)" = 2 ] ||
            echo "load $1 request $k: $r" >>"$KVR_TMP/load.err"
    done
}
LOADS=()
for j in 1 2 3 4; do
    load $j &
    LOADS+=($!)
done
stop_load() { touch "$KVR_TMP/load.stop"; wait "${LOADS[@]}"; } # not the cluster's processes
LT=$L
moved() { # every router names one leader other than $1, and it takes the leader subject
    local n
    n=$(rd_q "${HP[1]}" .raft.leader)
    [ -n "$n" ] && [ "$n" != 0 ] && [ "$n" != null ] && [ "$n" != "$1" ] || return 1
    for i in 2 3; do [ "$(rd_q "${HP[$i]}" .raft.leader)" = "$n" ] || return 1; done
    leader_answers "$n" && [ "$(evsubj "$n")" = true ] || return 1
    NL=$n
}
for t in 1 2 3 4 5 6; do
    for try in 1 2 3; do # "try again": the transfer timed out (a target still catching up)
        r=$(rd_post "${HP[$LT]}" /admin/raft/transfer)
        [ "$(jq -r .ok <<<"$r" 2>/dev/null)" = true ] && break
        sleep 0.3
    done
    [ "$(jq -r .ok <<<"$r" 2>/dev/null)" = true ] || { stop_load; kvr_fail "transfer $t from router $LT: $r"; }
    kvr_wait_for 10 moved "$LT" || { stop_load; kvr_fail "transfer $t: the leadership or the leader subjects did not move from $LT"; }
    LT=$NL
    sleep 0.3
done
stop_load
[ ! -s "$KVR_TMP/load.err" ] || kvr_fail "requests failed during the transfers: $(head -3 "$KVR_TMP/load.err")"
kvr_assert_eq "$(fallbacks "$F1P")" "$fb0" "local fallbacks during the transfers"
kvr_assert_eq "$(($(slow) - slow0))" 0 "route decisions that waited out a timeout during the transfers"
for i in 1 2 3; do
    [ "$i" = "$LT" ] && continue
    kvr_assert_eq "$(subj $i)" false "follower $i answers kvr.route.leader after the transfers"
done
kvr_wait_for 10 all_freed 1 2 3 || kvr_fail "bookings left after the transfers"
L=$LT
kvr_log "ok: 6 transfers under load, leader now router $L, no request slowed to a timeout"

# 3. the leader dies: a new one takes the leader subject; requests keep being routed
kvr_kill9 "r$L"
left=()
for i in 1 2 3; do [ "$i" = "$L" ] || left+=("$i"); done
new_leader() { # both survivors name the same leader, not the dead one
    L2=$(rd_q "${HP[${left[0]}]}" .raft.leader)
    [ -n "$L2" ] && [ "$L2" != 0 ] && [ "$L2" != null ] && [ "$L2" != "$L" ] &&
        [ "$(rd_q "${HP[${left[1]}]}" .raft.leader)" = "$L2" ]
}
kvr_wait_for 15 new_leader || kvr_fail "no new leader after killing $L (got '$L2')"
kvr_wait_for 5 leader_answers "$L2" || kvr_fail "new leader $L2 does not answer kvr.route.leader"
fb0=$(fallbacks "$F1P")
for i in "${left[@]}"; do D0[$i]=$(decided $i); done
send "$F1P" 12 after-failover
kvr_assert_eq "$(fallbacks "$F1P")" "$fb0" "local fallbacks after the new leader"
for i in "${left[@]}"; do
    d=$(($(decided $i) - ${D0[$i]}))
    if [ "$i" = "$L2" ]; then kvr_assert_eq "$d" 12 "decisions on the new leader $i"
    else kvr_assert_eq "$d" 0 "decisions on follower $i after failover"; fi
done
kvr_log "ok: leader $L killed, router $L2 leads and answers kvr.route.leader"
# the loops' turn times are measured (kvr_loop_stat): what a message waits before it is read
turns() { curl -s --max-time 2 "$1/metrics" | awk -v k="$2" '$1 == k {print int($2); exit}'; }
for i in "${left[@]}"; do
    n=$(turns "http://127.0.0.1:${HP[$i]}" kvr_routerd_loop_busy_seconds_count)
    ((${n:-0} > 0)) || kvr_fail "router $i: no loop turns measured (${n:-none})"
done
n=$(turns "http://127.0.0.1:$F1P" kvr_frontend_loop_busy_seconds_count)
((${n:-0} > 0)) || kvr_fail "frontend: no loop turns measured (${n:-none})"
kvr_pass
