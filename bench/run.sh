#!/usr/bin/env bash
# Sluice benchmark: the same load sent straight to the simulated upstream and through the
# gateway (default config, every feature on, every feature on with Redis), side by side,
# with CPU and memory per target, streams held open, start to ready, a soak, and the
# issue's targets checked. See bench/README.md for what each figure means.
#
#   bench/run.sh                          # defaults: about 17 minutes after the build
#   RATE=1000 DURATION=20s SOAK=10m bench/run.sh
#
# Knobs (environment):
#   RATE=500        fixed-rate runs: requests per second (open loop)
#   DURATION=10s    recorded window of every load run
#   WARMUP=2s       unrecorded warm-up before each run
#   CONNS=32        closed-loop runs with many connections (the throughput figure)
#   STREAM=1        fixed-rate streaming (SSE) runs, with time to first byte; 0 skips them
#   STREAMS=1000    streams held open at once for the memory figure (0 skips)
#   HOLD=5s         how long they are held once all are open
#   STREAM_TPS=1    chunks per second of the slow mock behind the held streams
#   SOAK=60s        fixed-rate load on the full-feature gateway, RSS sampled every
#                   SAMPLE_EVERY (this is also the "after a 60 s load" figure);
#                   SOAK=10m for a real soak, SOAK=0 skips it
#   SOAK_RATE=$RATE requests per second of the soak
#   SAMPLE_EVERY=10 seconds between RSS samples in the soak
#   READY_RUNS=5    starts of `sluice serve` timed to /readyz 200 (0 skips)
#   ROUNDS=5        extra fixed-rate rounds at RATE, alternating direct and the default
#                   gateway (DURATION each), for issue #2's added p50: the median of
#                   the rounds' differences, steadier on a noisy machine than one pair
#                   of runs (0 skips)
#   TPUT_ROUNDS=3   extra closed-loop runs at CONNS connections for every gateway target,
#                   each right after one straight to the mock (DURATION each): the
#                   throughput verdict is the median of these pairs' ratios, each
#                   measured within seconds, where the single direct run minutes earlier
#                   moves with the VM by a quarter (0: the verdict uses the single runs)
#   FLOOR=1         also measure a byte pump (socat, placed like the gateway) between
#                   loadgen and the mock, in the fixed-rate, 1-connection and round runs:
#                   what any proxy process costs on this machine for the extra hop and
#                   its wake-ups, the floor under every "added" figure (0 skips; skipped
#                   too without socat)
#   CACHE_MB=16     [cache] memory_bytes of the full-feature gateway (its RSS bound)
#   REDIS_URL=redis://127.0.0.1:6379   the full-feature gateway again with limits and
#                   cache on Redis (a random key prefix, deleted on exit); REDIS_URL=
#                   (empty) skips it; skipped too when Redis does not answer
#   REDIS_SYNC=50ms the full-redis gateway once more with `[redis] sync` at this
#                   interval (full-redis-sync: limits and budgets counted locally,
#                   reconciled with Redis every interval); REDIS_SYNC= (empty) skips it
#   PIN=1           1 pins with taskset: loadgen + mocks on CPU 0, gateway on CPU 1
#                   (only when there are at least 2 CPUs); 0 leaves placement to Linux
#   LATENCY_CPU=shared  with PIN=1, where the gateway (and the floor) run for the
#                   latency scenarios (fixed rate, streaming, 1 connection, cache hit,
#                   the rounds): shared = CPU 0, with loadgen and the mock, as the direct
#                   run has them (every hop a same-CPU wake-up in both runs, and the
#                   gateway's work all on the client's path); own = CPU 1, by itself
#                   (every hop crosses CPUs). Throughput, held streams and the soak give
#                   the gateway CPU 1 either way. See bench/README.md, "Placement"
#   LOG_LEVEL=warn  the gateways' [telemetry] log_level (info logs one line per request)
#   GATEWAY_ENV=    extra VAR=value words for the gateways' environment, e.g.
#                   GATEWAY_ENV=MIMALLOC_ARENA_EAGER_COMMIT=0 to compare allocator settings
#   SLUICE_BIN=     use this prebuilt `sluice` binary instead of building the workspace's
#                   (only the load generator is built then)
#   OUT=            directory to keep the JSON results, configs and logs in (default: a
#                   temp dir, removed on exit)
#
# Everything listens on 127.0.0.1 only, every run is bounded, and every process this
# script starts is stopped on exit.
# shellcheck disable=SC2317  # cleanup and the config writers are called indirectly
set -euo pipefail

RATE=${RATE:-500}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNS=${CONNS:-32}
STREAM=${STREAM:-1}
STREAMS=${STREAMS:-1000}
HOLD=${HOLD:-5s}
STREAM_TPS=${STREAM_TPS:-1}
SOAK=${SOAK:-60s}
SOAK_RATE=${SOAK_RATE:-$RATE}
SAMPLE_EVERY=${SAMPLE_EVERY:-10}
READY_RUNS=${READY_RUNS:-5}
ROUNDS=${ROUNDS:-5}
TPUT_ROUNDS=${TPUT_ROUNDS:-3}
FLOOR=${FLOOR:-1}
CACHE_MB=${CACHE_MB:-16}
REDIS_URL=${REDIS_URL-redis://127.0.0.1:6379}
REDIS_SYNC=${REDIS_SYNC-50ms}
PIN=${PIN:-1}
LATENCY_CPU=${LATENCY_CPU:-shared}
LOG_LEVEL=${LOG_LEVEL:-warn}
GATEWAY_ENV=${GATEWAY_ENV:-}
OUT=${OUT:-}
SLUICE_BIN=${SLUICE_BIN:-}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

for tool in cargo curl jq ss awk; do
  command -v "$tool" >/dev/null || { echo "run.sh: needs $tool" >&2; exit 2; }
done

COMMAND="${SLUICE_BIN:+SLUICE_BIN=$SLUICE_BIN }${GATEWAY_ENV:+GATEWAY_ENV=\"$GATEWAY_ENV\" }RATE=$RATE DURATION=$DURATION WARMUP=$WARMUP CONNS=$CONNS STREAM=$STREAM STREAMS=$STREAMS HOLD=$HOLD SOAK=$SOAK ROUNDS=$ROUNDS TPUT_ROUNDS=$TPUT_ROUNDS FLOOR=$FLOOR PIN=$PIN LATENCY_CPU=$LATENCY_CPU LOG_LEVEL=$LOG_LEVEL bench/run.sh"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
KEEP=$WORK
if [[ -n $OUT ]]; then
  mkdir -p "$OUT"
  KEEP=$(cd "$OUT" && pwd)
fi
# A random prefix, so this run's Redis keys never touch anyone else's.
REDIS_PREFIX="sluice_bench_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n'):"
REDIS_USED=0
PIDS=()
FLOOR_PID=
cleanup() {
  local pid
  # socat forks a child per connection: the floor runs in its own process group.
  if [[ -n $FLOOR_PID ]]; then kill -- "-$FLOOR_PID" 2>/dev/null || true; fi
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [[ $REDIS_USED == 1 ]] && command -v redis-cli >/dev/null; then
    redis-cli -u "$REDIS_URL" --scan --pattern "${REDIS_PREFIX}*" 2>/dev/null |
      xargs -r -n 500 redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
  fi
  if [[ -n $OUT ]]; then
    local d
    for d in "$WORK"/*/; do
      [[ -d $d ]] || continue
      mkdir -p "$KEEP/$(basename "$d")"
      cp "$d"/*.log "$d"/sluice.toml "$KEEP/$(basename "$d")"/ 2>/dev/null || true
    done
    cp "$WORK"/*.log "$KEEP"/ 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== build (release)" >&2
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
LOADGEN=$TARGET_DIR/release/loadgen
if [[ -n $SLUICE_BIN ]]; then
  cargo build --release -p sluice-loadgen >&2
  SLUICE=$SLUICE_BIN
else
  cargo build --release -p sluice -p sluice-loadgen >&2
  SLUICE=$TARGET_DIR/release/sluice
fi

# CPU placement. With 2+ CPUs the generator shares CPU 0 with the mock, so the direct
# and gateway runs load CPU 0 the same way. The gateway starts on CPU 1; for the latency
# scenarios it moves to LATENCY_CPU's CPU (`place`), for throughput back to CPU 1.
case $LATENCY_CPU in shared | own) ;; *) echo "run.sh: LATENCY_CPU is shared or own" >&2; exit 2 ;; esac
CPUS=$(nproc)
PIN_GEN=() PIN_MOCK=() PIN_GW=() PIN_LAT=() LAT_CPU= OWN_CPU=
if [[ $PIN == 1 && $CPUS -ge 2 ]] && command -v taskset >/dev/null; then
  PIN_GEN=(taskset -c 0) PIN_MOCK=(taskset -c 0) PIN_GW=(taskset -c 1)
  OWN_CPU=1 LAT_CPU=1
  [[ $LATENCY_CPU == shared ]] && LAT_CPU=0
  PIN_LAT=(taskset -c "$LAT_CPU")
  if [[ $LATENCY_CPU == shared ]]; then
    PLACEMENT="pinned with taskset: loadgen + mocks on CPU 0; the gateway (and the floor) on CPU 0 too for the latency scenarios (fixed rate, streaming, 1 connection, cache hit, rounds), on CPU 1 by itself for throughput, held streams and the soak (LATENCY_CPU=shared)"
  else
    PLACEMENT="pinned with taskset: loadgen + mocks on CPU 0, gateway (and the floor) on CPU 1 (LATENCY_CPU=own)"
  fi
else
  PLACEMENT="not pinned (Linux scheduler places all processes)"
fi
# Move every thread of a running gateway to the latency CPU or back to its own.
place() { # pid latency|own
  [[ -n $OWN_CPU ]] || return 0
  local cpu=$OWN_CPU
  [[ $2 == latency ]] && cpu=$LAT_CPU
  taskset -a -p -c "$cpu" "$1" >/dev/null
}
# No key or config from the environment may leak into the benchmark's gateways.
GW_ENV=(env -u SLUICE_MASTER_KEY -u SLUICE_CONFIG -u SLUICE_LISTEN -u OPENAI_API_KEY
  -u ANTHROPIC_API_KEY -u OPENAI_BASE_URL -u ANTHROPIC_BASE_URL)
if [[ -n $GATEWAY_ENV ]]; then
  read -ra extra_env <<<"$GATEWAY_ENV"
  GW_ENV+=("${extra_env[@]}")
fi
# Held streams need a socket each on the client side and two in the gateway.
if ((STREAMS > 0)); then
  ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
  if (($(ulimit -n) < 2 * STREAMS + 256)); then
    echo "run.sh: warning: open-file limit $(ulimit -n) is low for STREAMS=$STREAMS" >&2
  fi
fi
CLK_TCK=$(getconf CLK_TCK)

# Listening ports come from below the kernel's ephemeral range: a port there may be the
# local end of an open or TIME_WAIT connection (1000 held streams leave many), and a
# listener cannot bind it.
USED_PORTS=" "
read -r EPHEMERAL_LOW _ </proc/sys/net/ipv4/ip_local_port_range
PORT_LOW=10000
PORT_SPAN=$((EPHEMERAL_LOW > PORT_LOW + 1000 ? EPHEMERAL_LOW - PORT_LOW : 20000))
free_port() {
  local port
  for _ in $(seq 50); do
    port=$((PORT_LOW + RANDOM % PORT_SPAN))
    if [[ $USED_PORTS != *" $port "* ]] && ! ss -Htan "sport = :$port" | grep -q .; then
      USED_PORTS+="$port "
      echo "$port"
      return
    fi
  done
  echo "run.sh: no free port found" >&2
  return 1
}

wait_ready() { # url name pid log
  for _ in $(seq 200); do
    kill -0 "$3" 2>/dev/null || { echo "run.sh: $2 exited; its log:" >&2; cat "$4" >&2; return 1; }
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  echo "run.sh: $2 not ready after 10 s; its log:" >&2
  cat "$4" >&2
  return 1
}

# Process figures, from /proc: CPU time (user + system) in seconds, resident set in KiB.
cpu_s() { # pid
  # Fields after the `(comm)`: state is the 1st, utime the 12th, stime the 13th.
  awk -v tck="$CLK_TCK" '{ sub(/^.*\) /, ""); split($0, f, " "); printf "%.2f\n", (f[12] + f[13]) / tck }' "/proc/$1/stat"
}
# The Redis server's CPU time (user + system, every thread) in seconds: full-redis's
# requests cost it as well as the gateway.
redis_cpu_s() {
  redis-cli -u "$REDIS_URL" info cpu 2>/dev/null |
    awk -F: '/^used_cpu_(user|sys):/ { s += $2 } END { printf "%.2f\n", s }'
}
# The gateway's combined Redis calls so far, from its /metrics: {"kind": [calls, jobs]}
# (`sluice_redis_calls_total`, `sluice_redis_call_jobs_total`; {} when it has none).
redis_calls() {
  curl -fsS "$GW_URL/metrics" 2>/dev/null | awk '
    /^sluice_redis_call(s|_jobs)_total\{/ {
      match($0, /call="[^"]*"/); k = substr($0, RSTART + 6, RLENGTH - 7)
      if ($1 ~ /^sluice_redis_calls_total/) c[k] = $NF; else j[k] = $NF
    }
    END { printf "{"; n = 0; for (k in c) printf "%s\"%s\":[%s,%s]", (n++ ? "," : ""), k, c[k], j[k] + 0; print "}" }'
}
rss_kb() { # pid
  awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"
}

# Figures are only comparable on an otherwise idle machine: measure how busy it is
# (over one second, before anything of ours runs) and say so when it is not idle.
cpu_busy() { # percent of all CPUs busy over the next second
  local a b
  read -ra a < <(head -1 /proc/stat) && sleep 1 && read -ra b < <(head -1 /proc/stat)
  local idle=$(((b[4] + b[5]) - (a[4] + a[5]))) total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
  echo $((total > 0 ? 100 * (total - idle) / total : 0))
}
BUSY_BEFORE=$(cpu_busy)
if ((BUSY_BEFORE > 10)); then
  echo "run.sh: warning: the CPUs are already ${BUSY_BEFORE}% busy; other work on this machine will skew the figures" >&2
fi

RESULTS=$KEEP/results.jsonl
: >"$RESULTS"
FAILED=0
note() { # JSON object: one fact (memory, soak, start to ready) into results.jsonl
  jq -c . <<<"$1" >>"$RESULTS"
}

# ---- the upstreams: a fast mock for every load run, a slow one for held streams ----
MOCK_PORT=$(free_port)
"${PIN_MOCK[@]}" "$SLUICE" mock --listen "127.0.0.1:$MOCK_PORT" >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
MOCK_PID=$!
wait_ready "http://127.0.0.1:$MOCK_PORT/healthz" mock "$MOCK_PID" "$WORK/mock.log"
SLOW_PORT=$(free_port)
"${PIN_MOCK[@]}" "$SLUICE" mock --listen "127.0.0.1:$SLOW_PORT" --tokens-per-sec "$STREAM_TPS" \
  >"$WORK/slow-mock.log" 2>&1 &
PIDS+=($!)
wait_ready "http://127.0.0.1:$SLOW_PORT/healthz" slow-mock "$!" "$WORK/slow-mock.log"

# ---- gateway configs ----
# Common to both: the mock as the provider, and a slow model for the held streams.
providers() {
  cat <<EOF
[[providers]]
name = "mock"
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"

[[providers]]
name = "slow"
kind = "openai"
base_url = "http://127.0.0.1:$SLOW_PORT/v1"
EOF
}

# What every gateway here has: its address, log level, request log and the providers.
common_config() { # port dir [extra [server] line]
  cat <<EOF
[server]
listen = "127.0.0.1:$1"
${3:+$3
}shutdown_grace = "2s"

[telemetry]
log_level = "$LOG_LEVEL"

[storage]
path = "$2/sluice.db"

$(providers)
EOF
}

default_config() { # port dir
  cat <<EOF
$(common_config "$1" "$2")

[[models]]
name = "gpt-4o-mini"
provider = "mock"

[[models]]
name = "gpt-4o-mini-slow"
provider = "slow"
upstream = "gpt-4o-mini"
EOF
}

# Every feature a request can touch, set so that the load is never refused: a virtual
# key, tier limits per key, per end user and in total, input guard detectors and an
# output rule, budgets, the response cache, prices (cost accounting), the SQLite
# request log; /metrics is always on.
MASTER_KEY="sk-bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
BIG=1000000000
full_config() { # port dir [redis|redis-sync]
  local price='prices = { input = 0.15, output = 0.60, cached_input = 0.075 }'
  cat <<EOF
$(common_config "$1" "$2" "master_key = \"$MASTER_KEY\"")

[[models]]
name = "gpt-4o-mini"
provider = "mock"
$price

[[models]]
name = "gpt-4o-mini-slow"
provider = "slow"
upstream = "gpt-4o-mini"
$price

[guard.input]
injection = "flag"
sql = "flag"
code = "flag"
pii = "flag"

[[guard.output.rules]]
validators = [{ max_words = 10000 }, { not_contains = ["statistics show"] }]
on_fail = "flag"

[limits]
default_tier = "bench"

[[tiers]]
name = "bench"
per_key = { requests_per_minute = $BIG, tokens_per_minute = ${BIG}000 }
per_user = { requests_per_minute = $BIG, tokens_per_minute = ${BIG}000, tokens_per_day = ${BIG}000, concurrent = $BIG }
total = { requests_per_minute = $BIG, tokens_per_minute = ${BIG}000 }

[[budgets.rules]]
name = "bench-global"
scope = "global"
period = "day"
limit_usd = 1000000.0
on_exceeded = "block"

[[budgets.rules]]
name = "bench-user"
scope = "user"
period = "day"
limit_usd = 1000000.0
on_exceeded = "block"

[cache]
enabled = true
memory_bytes = "${CACHE_MB}MiB"
only_deterministic = false
EOF
  if [[ ${3:-} == redis* ]]; then
    cat <<EOF

[redis]
url = "$REDIS_URL"
prefix = "$REDIS_PREFIX"
on_failure = "closed"
$([[ ${3:-} == redis-sync ]] && echo "sync = \"$REDIS_SYNC\"")
EOF
  fi
}

GW_PID=
GW_URL=
start_gateway() { # name config-function [arg]
  local name=$1 make=$2 extra=${3:-} port dir
  port=$(free_port)
  dir=$WORK/$name
  mkdir -p "$dir"
  "$make" "$port" "$dir" "$extra" >"$dir/sluice.toml"
  API_KEY=
  if [[ $make == full_config ]]; then
    # A virtual key, as an app would hold one (the master key skips nothing, but an app
    # would not use it).
    API_KEY=$(cd "$dir" && "${GW_ENV[@]}" "$SLUICE" keys create --config "$dir/sluice.toml" \
      --owner bench --tier bench --json 2>>"$dir/gateway.log" | jq -r .key)
  fi
  # It runs in its own temp dir, so whatever it writes goes away with it.
  (cd "$dir" && exec "${GW_ENV[@]}" "${PIN_GW[@]}" "$SLUICE" serve --config "$dir/sluice.toml") \
    >"$dir/gateway.log" 2>&1 &
  GW_PID=$!
  PIDS+=("$GW_PID")
  GW_URL=http://127.0.0.1:$port
  wait_ready "$GW_URL/readyz" "$name" "$GW_PID" "$dir/gateway.log"
}

# A process that has ended leaves the list, so cleanup never signals a reused PID.
forget() { # pid
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

stop_gateway() {
  kill "$GW_PID" 2>/dev/null || true
  wait "$GW_PID" 2>/dev/null || true
  forget "$GW_PID"
}

# One loadgen run against the process `pid`; its JSON line, with the target, the
# scenario and the server's CPU time added, goes to results.jsonl.
load() { # scenario target url pid loadgen-args...
  local scenario=$1 target=$2 url=$3 pid=$4
  shift 4
  echo "== $scenario / $target" >&2
  local line cpu0 cpu1 redis0=0 redis1=0 calls0='{}' calls1='{}'
  cpu0=$(cpu_s "$pid")
  [[ $target == full-redis* ]] && redis0=$(redis_cpu_s) && calls0=$(redis_calls)
  if line=$("${PIN_GEN[@]}" "$LOADGEN" --json --label "$scenario/$target" --url "$url" \
    --duration "$DURATION" --warmup "$WARMUP" "$@"); then :; else
    FAILED=1
    echo "   (more than 1% errors)" >&2
  fi
  cpu1=$(cpu_s "$pid")
  [[ $target == full-redis* ]] && redis1=$(redis_cpu_s) && calls1=$(redis_calls)
  if [[ -n $line ]]; then
    # Jobs a Redis call carried in this run, per kind of combined call (exact mode).
    jq -c --arg s "$scenario" --arg t "$target" --argjson c0 "$cpu0" --argjson c1 "$cpu1" \
      --argjson r0 "$redis0" --argjson r1 "$redis1" --argjson k0 "$calls0" --argjson k1 "$calls1" \
      '. + {scenario: $s, target: $t, server_cpu_s: (($c1 - $c0) * 100 | round / 100)}
         + (if ($t | startswith("full-redis")) then {redis_cpu_s: (($r1 - $r0) * 100 | round / 100)} else {} end)
         + (if ($k1 | length) > 0 then {redis_jobs_per_call: ($k1 | with_entries(
             .value = ((.value[0] - ($k0[.key][0] // 0)) as $calls | (.value[1] - ($k0[.key][1] // 0)) as $jobs
               | if $calls > 0 then ($jobs / $calls * 10 | round / 10) else null end)))} else {} end)' \
      <<<"$line" >>"$RESULTS"
    jq -r '"   \(.requests) ok, \(.errors) errors, \(.rps) req/s, p50 \(.latency.p50_us) µs, p99 \(.latency.p99_us) µs"' <<<"$line" >&2
  fi
}

# Every request is distinct (a numbered prompt: the cache misses) and names an end user.
COMMON=(--unique-prompt --user bench-user-1)
scenarios() { # target url pid loadgen-args...
  local target=$1 url=$2 pid=$3
  shift 3
  load rate "$target" "$url" "$pid" --rate "$RATE" "${COMMON[@]}" "$@"
  if [[ $STREAM == 1 ]]; then load stream "$target" "$url" "$pid" --rate "$RATE" --stream "${COMMON[@]}" "$@"; fi
  load c1 "$target" "$url" "$pid" --connections 1 "${COMMON[@]}" "$@"
  [[ $target != direct ]] && place "$pid" own
  load cN "$target" "$url" "$pid" --connections "$CONNS" "${COMMON[@]}" "$@"
  [[ $target != direct ]] && place "$pid" latency
  return 0
}

# STREAMS streams open at once on the slow model; the gateway's RSS sampled while they
# are all open (the largest of three samples, 0.5 s apart).
hold() { # target pid loadgen-args...
  local target=$1 pid=$2
  shift 2
  ((STREAMS > 0)) || return 0
  echo "== hold $STREAMS streams / $target" >&2
  local err=$WORK/hold-$target.err out=$WORK/hold-$target.json rss=0 s before
  before=$(rss_kb "$pid")
  "${PIN_GEN[@]}" "$LOADGEN" --json --label "hold/$target" --url "$GW_URL/v1/chat/completions" \
    --model gpt-4o-mini-slow --hold "$STREAMS" --duration "$HOLD" --timeout 30s \
    "${COMMON[@]}" "$@" >"$out" 2>"$err" &
  local lg=$!
  PIDS+=("$lg")
  while kill -0 "$lg" 2>/dev/null && ! grep -q 'holding' "$err"; do sleep 0.1; done
  for _ in 1 2 3; do
    s=$(rss_kb "$pid")
    ((s > rss)) && rss=$s
    sleep 0.5
  done
  wait "$lg" || { FAILED=1; echo "   (not every stream opened)" >&2; }
  forget "$lg"
  cat "$err" >&2
  if [[ -s $out ]]; then
    jq -c --arg t "$target" --argjson rss "$rss" --argjson before "$before" \
      '. + {target: $t, scenario: "hold", rss_kb: $rss, rss_before_kb: $before}' "$out" >>"$RESULTS"
    jq -r '"   opened \(.opened)/\(.streams) in \(.ramp_ms) ms, open during the samples \(.open_at_start)..\(.open_at_end)"' "$out" >&2
    echo "   gateway RSS with them open: $((rss / 1024)) MiB (before: $((before / 1024)) MiB)" >&2
  fi
}

# The soak: fixed-rate load for SOAK, RSS sampled every SAMPLE_EVERY seconds.
soak() { # target pid loadgen-args...
  local target=$1 pid=$2
  shift 2
  echo "== soak $SOAK at $SOAK_RATE/s / $target (RSS every ${SAMPLE_EVERY}s)" >&2
  local out=$WORK/soak.json samples=() t0 next
  "${PIN_GEN[@]}" "$LOADGEN" --json --label "soak/$target" --url "$GW_URL/v1/chat/completions" \
    --rate "$SOAK_RATE" --duration "$SOAK" --warmup 0s "${COMMON[@]}" "$@" >"$out" &
  local lg=$!
  PIDS+=("$lg")
  t0=$(date +%s)
  next=$t0
  while kill -0 "$lg" 2>/dev/null; do
    if (($(date +%s) >= next)); then
      samples+=("$(rss_kb "$pid")")
      echo "   t=$((next - t0))s RSS $((samples[-1] / 1024)) MiB" >&2
      next=$((next + SAMPLE_EVERY))
    fi
    sleep 0.2
  done
  wait "$lg" || FAILED=1
  forget "$lg"
  samples+=("$(rss_kb "$pid")")
  jq -c --arg t "$target" --argjson every "$SAMPLE_EVERY" \
    --argjson rss "[$(IFS=,; echo "${samples[*]}")]" \
    '. + {target: $t, scenario: "soak", sample_every_s: $every, rss_kb: $rss}' "$out" >>"$RESULTS"
}

# ---- the targets, one after another (only one gateway runs at a time) ----
DIRECT=http://127.0.0.1:$MOCK_PORT/v1/chat/completions
scenarios direct "$DIRECT" "$MOCK_PID"

# ---- the floor: a byte pump where the gateway sits for latency, no HTTP work at all ----
FLOOR_URL=
FLOOR_NOTE="skipped (FLOOR=0)"
if [[ $FLOOR == 1 ]]; then
  if command -v socat >/dev/null && command -v setsid >/dev/null; then
    FLOOR_PORT=$(free_port)
    setsid "${PIN_LAT[@]}" socat "TCP-LISTEN:$FLOOR_PORT,bind=127.0.0.1,reuseaddr,fork,nodelay" \
      "TCP:127.0.0.1:$MOCK_PORT,nodelay" >"$WORK/floor.log" 2>&1 &
    FLOOR_PID=$!
    wait_ready "http://127.0.0.1:$FLOOR_PORT/healthz" floor "$FLOOR_PID" "$WORK/floor.log"
    FLOOR_URL=http://127.0.0.1:$FLOOR_PORT/v1/chat/completions
    FLOOR_NOTE="socat $(socat -V 2>/dev/null | awk '/socat version/ { print $3 }'), forking a child per connection, placed like the gateway"
    load rate floor "$FLOOR_URL" "$FLOOR_PID" --rate "$RATE" "${COMMON[@]}"
    load c1 floor "$FLOOR_URL" "$FLOOR_PID" --connections 1 "${COMMON[@]}"
  else
    FLOOR_NOTE="skipped (no socat or setsid)"
  fi
fi

run_gateway() { # target config-function [redis]
  local target=$1
  start_gateway "$@"
  sleep 1
  local idle started
  idle=$(rss_kb "$GW_PID")
  started=$(date +%s)
  local key=()
  if [[ -n $API_KEY ]]; then key=(--api-key "$API_KEY"); fi
  place "$GW_PID" latency
  scenarios "$target" "$GW_URL/v1/chat/completions" "$GW_PID" "${key[@]}"
  if [[ $target == default ]]; then
    local round
    for ((round = 1; round <= ROUNDS; round++)); do
      load "rate-round-$round" direct "$DIRECT" "$MOCK_PID" --rate "$RATE" "${COMMON[@]}"
      if [[ -n $FLOOR_URL ]]; then
        load "rate-round-$round" floor "$FLOOR_URL" "$FLOOR_PID" --rate "$RATE" "${COMMON[@]}"
      fi
      load "rate-round-$round" default "$GW_URL/v1/chat/completions" "$GW_PID" --rate "$RATE" "${COMMON[@]}"
    done
  fi
  # Throughput pairs: the mock alone, then this gateway, seconds apart (placed as in the
  # throughput run above).
  local pair
  for ((pair = 1; pair <= TPUT_ROUNDS; pair++)); do
    load "cN-pair:$target:$pair" direct "$DIRECT" "$MOCK_PID" --connections "$CONNS" "${COMMON[@]}"
    place "$GW_PID" own
    load "cN-pair:$target:$pair" "$target" "$GW_URL/v1/chat/completions" "$GW_PID" \
      --connections "$CONNS" "${COMMON[@]}" "${key[@]}"
    place "$GW_PID" latency
  done
  if [[ $target != default ]]; then
    # The same request every time: after the first, every one is a cache hit.
    load hit "$target" "$GW_URL/v1/chat/completions" "$GW_PID" --connections 1 \
      --user bench-user-1 "${key[@]}"
  fi
  local loaded=$(($(date +%s) - started)) after
  after=$(rss_kb "$GW_PID")
  place "$GW_PID" own
  hold "$target" "$GW_PID" "${key[@]}"
  local soaked=null
  if [[ $target == full && $SOAK != 0 && $SOAK != 0s ]]; then
    soak "$target" "$GW_PID" "${key[@]}"
    soaked=$(rss_kb "$GW_PID")
  fi
  local metrics
  metrics=$(curl -fsS "$GW_URL/metrics" | grep -c '^sluice_' || true)
  note "{\"scenario\":\"memory\",\"target\":\"$target\",\"rss_idle_kb\":$idle,\"rss_after_load_kb\":$after,\"load_s\":$loaded,\"rss_after_soak_kb\":$soaked,\"metric_series\":$metrics}"
  stop_gateway
}

run_gateway default default_config
run_gateway full full_config

REDIS_NOTE=
if [[ -z $REDIS_URL ]]; then
  REDIS_NOTE="skipped (REDIS_URL empty)"
elif ! command -v redis-cli >/dev/null; then
  REDIS_NOTE="skipped (no redis-cli to check and clean up Redis)"
elif [[ $(redis-cli -u "$REDIS_URL" ping 2>/dev/null) != PONG ]]; then
  REDIS_NOTE="skipped (no answer from $REDIS_URL)"
else
  REDIS_USED=1
  REDIS_NOTE="$REDIS_URL, key prefix \`$REDIS_PREFIX\` (deleted on exit)"
  # Which Redis, and where it runs: a Redis on the gateway's CPU or on the other one
  # moves the one-connection Redis figures by up to half (RESULTS.md, Run 37).
  redis_info=$(redis-cli -u "$REDIS_URL" info server 2>/dev/null | tr -d '\r')
  redis_version=$(awk -F: '$1 == "redis_version" { print $2 }' <<<"$redis_info")
  redis_pid=$(awk -F: '$1 == "process_id" { print $2 }' <<<"$redis_info")
  redis_cpus="(not a process on this machine)"
  # A Redis in a container reports the pid of its own namespace: only a redis process
  # under that pid here is the one.
  if [[ -n $redis_pid ]] && grep -qs redis "/proc/$redis_pid/comm" && command -v taskset >/dev/null; then
    redis_cpus="on CPUs $(taskset -pc "$redis_pid" 2>/dev/null | sed 's/.*: //') (its affinity)"
  fi
  REDIS_NOTE+="; Redis ${redis_version:-of unknown version} $redis_cpus"
  run_gateway full-redis full_config redis
  if [[ -n $REDIS_SYNC ]]; then
    run_gateway full-redis-sync full_config redis-sync
  fi
fi

# ---- start to ready: the embedded default, no config, a fresh temp dir each time ----
if ((READY_RUNS > 0)); then
  echo "== start to ready ($READY_RUNS runs)" >&2
  READY_PORT=$(free_port)
  if line=$("${GW_ENV[@]}" "$LOADGEN" ready --json --url "http://127.0.0.1:$READY_PORT/readyz" \
    --runs "$READY_RUNS" -- "${PIN_GW[@]}" "$SLUICE" serve --listen "127.0.0.1:$READY_PORT"); then
    jq -c '. + {scenario: "ready", target: "default"}' <<<"$line" >>"$RESULTS"
    jq -r '"   median \(.median_ms) ms of \(.ready_ms)"' <<<"$line" >&2
  else
    FAILED=1
  fi
fi

# ---- report ----
TARGETS=(direct default full)
[[ $REDIS_USED == 1 ]] && TARGETS+=(full-redis)
[[ $REDIS_USED == 1 && -n $REDIS_SYNC ]] && TARGETS+=(full-redis-sync)
# The floor has latency rows only (its CPU is in socat's children, not measured).
LAT_TARGETS=(direct)
[[ -n $FLOOR_URL ]] && LAT_TARGETS+=(floor)
LAT_TARGETS+=("${TARGETS[@]:1}")
r() { # jq filter over every result (slurped)
  jq -rs "$1" "$RESULTS"
}
one() { # scenario target: that run's JSON, or null
  r "map(select(.scenario == \"$1\" and .target == \"$2\"))[0]"
}
mib() { # KiB (or null) -> MiB with one decimal
  jq -rn --argjson k "${1:-null}" 'if $k == null then "–" else ($k / 1024 * 10 | round / 10 | tostring) end'
}

# jq helpers for runs that alternate direct and a target: `pairs(select-run; round;
# $t)` gives [direct run, target run] per round in which both ran; `median` of numbers.
JQ_PAIRS='
def median: sort as $s | ($s[(($s | length) - 1) / 2 | floor] + $s[($s | length) / 2 | floor]) / 2;
def pairs(f; round; $t):
  map(select(f)) | group_by(round)[]
  | (map(select(.target == "direct"))[0]) as $d
  | (map(select(.target == $t))[0]) as $g
  | select($d != null and $g != null) | [$d, $g];'

# Added p50 at RATE over the alternating rounds (direct, [floor,] default, ROUNDS times),
# for one target: its median and each round's.
rounds_summary() { # target
  jq -rs --arg rate "$RATE" --arg t "$1" "$JQ_PAIRS"'
    [ pairs(.scenario | startswith("rate-round-"); .scenario | ltrimstr("rate-round-") | tonumber; $t)
      | .[1].latency.p50_us - .[0].latency.p50_us ] as $added
    | if ($added | length) == 0 then empty else
      ($added | median) as $median
      | if $t == "default" then
          "Added p50 at \($rate)/s, default config, \($added | length) alternating rounds: median **\($median) µs** (rounds: \($added | map(tostring) | join(", ")) µs); issue #2 asks ≤ 200 µs."
        else
          "The floor (a byte pump in the gateway'"'"'s place) in the same rounds: median added p50 **\($median) µs** (rounds: \($added | map(tostring) | join(", ")) µs)."
        end
      end' "$RESULTS"
}

# Throughput over the pairs (direct, then the target, TPUT_ROUNDS times) for one target:
# "MEDIAN R1/R2/..." in percent of direct, or nothing without pairs.
pairs_ratio() { # target
  jq -rs --arg t "$1" "$JQ_PAIRS"'
    [ pairs((.scenario | split(":")) as $p | $p[0] == "cN-pair" and $p[1] == $t;
            .scenario | split(":")[2] | tonumber; $t)
      | select(.[0].rps > 0) | (.[1].rps / .[0].rps * 1000 | round / 10) ] as $ratios
    | if ($ratios | length) == 0 then empty else
      "\($ratios | median * 10 | round / 10) \($ratios | map(tostring) | join("/"))"
      end' "$RESULTS"
}

lat_rows() { # scenario title [base-scenario]
  local s=$1 title=$2 base=${3:-$1} t
  local d
  d=$(one "$base" direct)
  for t in "${LAT_TARGETS[@]}"; do
    [[ $s == hit && ($t == direct || $t == default) ]] && continue
    one "$s" "$t" | jq -r --argjson d "$d" --arg title "$title" --arg t "$t" '
      if . == null then empty else
      def added(f): if $d == null or $t == "direct" then "" else ((.latency[f] - $d.latency[f]) | tostring) end;
      "| \($title) | \($t) | \(.rps) | \(.latency.p50_us) | \(.latency.p90_us) | \(.latency.p99_us) | \(.latency.p999_us) | \(added("p50_us")) | \(added("p99_us")) | \(if $t == "floor" then "–" elif .requests_total > 0 then (.server_cpu_s / .requests_total * 1000 * 1000 | round / 1000 | tostring) + (if .redis_cpu_s then " + \(.redis_cpu_s / .requests_total * 1000 * 1000 | round / 1000) Redis" else "" end) else "–" end) | \(.errors) |"
      end'
  done
}

stream_rows() {
  local d t
  d=$(one stream direct)
  for t in "${TARGETS[@]}"; do
    one stream "$t" | jq -r --argjson d "$d" --arg t "$t" '
      if . == null then empty else
      def added(f): if $d == null or $t == "direct" then "" else ((.first_byte[f] - $d.first_byte[f]) | tostring) end;
      "| \($t) | \(.first_byte.p50_us) | \(.first_byte.p90_us) | \(.first_byte.p99_us) | \(added("p50_us")) | \(added("p99_us")) | \(.latency.p50_us) | \(.errors) |"
      end'
  done
}

verdict() { # ok(0/1) text
  if [[ $1 == 1 ]]; then echo "MET ($2)"; else echo "MISSED ($2)"; fi
}
le() { # a b -> 1 when a <= b (decimals allowed), 0 otherwise (also when a is missing)
  awk -v a="$1" -v b="$2" 'BEGIN { print (a != "" && a != "null" && a + 0 <= b + 0) ? 1 : 0 }'
}

targets_table() {
  local t c1d cNd ready soak
  c1d=$(one c1 direct)
  cNd=$(one cN direct)
  ready=$(r 'map(select(.scenario == "ready"))[0].median_ms // empty')
  soak=$(one soak full)
  echo "| target |$(for t in "${TARGETS[@]:1}"; do printf ' %s |' "$t"; done)"
  echo "|---|$(for _ in "${TARGETS[@]:1}"; do printf -- '---|'; done)"
  local line p50 p99 tput mem idle after streams
  line="| added latency at 1 conn: p50 ≤ 50 µs, p99 ≤ 500 µs |"
  for t in "${TARGETS[@]:1}"; do
    p50=$(one c1 "$t" | jq -r --argjson d "$c1d" 'if . == null or $d == null then "" else .latency.p50_us - $d.latency.p50_us end')
    p99=$(one c1 "$t" | jq -r --argjson d "$c1d" 'if . == null or $d == null then "" else .latency.p99_us - $d.latency.p99_us end')
    line+=" $(verdict "$(($(le "$p50" 50) * $(le "$p99" 500)))" "+$p50 / +$p99 µs") |"
  done
  echo "$line"
  line="| throughput at $CONNS conns ≥ 30% of direct |"
  local pairs
  for t in "${TARGETS[@]:1}"; do
    tput=$(one cN "$t" | jq -r --argjson d "$cNd" 'if . == null or $d == null or $d.rps == 0 then "" else (.rps / $d.rps * 1000 | round / 10) end')
    pairs=$(pairs_ratio "$t")
    if [[ -n $pairs ]]; then
      line+=" $(verdict "$(le 30 "${pairs%% *}")" "median ${pairs%% *}% of paired runs ${pairs#* }; single run $tput%") |"
    else
      line+=" $(verdict "$(le 30 "${tput:-0}")" "$tput%") |"
    fi
  done
  echo "$line"
  line="| idle RSS ≤ 30 MB |"
  for t in "${TARGETS[@]:1}"; do
    idle=$(one memory "$t" | jq -r '.rss_idle_kb // ""')
    line+=" $(verdict "$(le "$idle" 30720)" "$(mib "$idle") MiB") |"
  done
  echo "$line"
  line="| RSS ≤ 60 MB after the load |"
  for t in "${TARGETS[@]:1}"; do
    mem=$(one memory "$t")
    after=$(jq -r '.rss_after_soak_kb // .rss_after_load_kb // ""' <<<"$mem")
    line+=" $(verdict "$(le "$after" 61440)" "$(mib "$after") MiB after $(jq -r 'if .rss_after_soak_kb != null then "the runs + soak" else "\(.load_s) s of runs" end' <<<"$mem")") |"
  done
  echo "$line"
  if ((STREAMS > 0)); then
    line="| RSS ≤ 150 MB with $STREAMS open streams |"
    for t in "${TARGETS[@]:1}"; do
      streams=$(one hold "$t")
      after=$(jq -r '.rss_kb // ""' <<<"$streams")
      line+=" $(verdict "$(($(le "$after" 153600) * $(jq -r 'if .open_at_start == .streams then 1 else 0 end' <<<"$streams")))" "$(mib "$after") MiB, $(jq -r '.open_at_start' <<<"$streams") open") |"
    done
    echo "$line"
  fi
  if [[ $soak != null ]]; then
    line="| no RSS growth over the soak ($SOAK) |"
    for t in "${TARGETS[@]:1}"; do
      if [[ $t == full ]]; then
        line+=" $(jq -r 'if .grew then "MISSED" else "MET" end + " (\(if .growth_mib >= 0 then "+" else "" end)\(.growth_mib) MiB; cache bound '"$CACHE_MB"' MiB)"' <<<"$(soak_growth)") |"
      else line+=" – |"; fi
    done
    echo "$line"
  fi
  if [[ -n $ready ]]; then
    line="| start to ready ≤ 100 ms (embedded default) |"
    for t in "${TARGETS[@]:1}"; do
      if [[ $t == default ]]; then line+=" $(verdict "$(le "$ready" 100)" "median $ready ms") |"; else line+=" – |"; fi
    done
    echo "$line"
  fi
}

# Growth over the soak. The t=0 sample still shows the phase before (the held streams
# being freed), so it is left out; of the rest, the largest sample of the last third
# against the largest of the first third: "grew" when up by more than 5% and 1 MiB.
soak_growth() {
  one soak full | jq -c '
    (if (.rss_kb | length) > 2 then .rss_kb[1:] else .rss_kb end) as $s
    | ($s | length) as $n | (if $n >= 3 then ($n / 3 | floor) else 1 end) as $k
    | ($s[:$k] | max) as $first | ($s[($n - $k):] | max) as $last
    | {first_kb: $first, last_kb: $last, growth_mib: (($last - $first) / 1024 * 10 | round / 10),
       grew: (($last - $first) > ($first * 0.05) and ($last - $first) > 1024)}'
}

CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
BUSY_AFTER=$(cpu_busy)
{
  echo
  echo "## Sluice benchmark — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "- command: \`$COMMAND\`"
  echo "- machine: $CPUS CPU(s), ${CPU_MODEL:-unknown CPU}, Linux $(uname -r)"
  echo "- toolchain: $(rustc --version)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "- placement: $PLACEMENT"
  echo "- CPU busy before the runs (other work, 1 s sample): ${BUSY_BEFORE}%; after: ${BUSY_AFTER}%"
  echo "- upstream: \`sluice mock\` (no added latency); gateway log level: $LOG_LEVEL${GATEWAY_ENV:+; gateway environment: \`$GATEWAY_ENV\`}"
  echo "- targets: **direct** = the mock itself; **default** = sluice, one provider, no auth;"
  echo "  **full** = API key, tier limits per key / per user / total, input guard detectors,"
  echo "  output rule, budgets, prices, response cache (${CACHE_MB} MiB), SQLite request log,"
  echo "  metrics; **full-redis** = full with limits and cache on Redis: ${REDIS_NOTE}"
  if [[ $REDIS_USED == 1 && -n $REDIS_SYNC ]]; then
    echo "  **full-redis-sync** = full-redis with \`[redis] sync = \"$REDIS_SYNC\"\`: each"
    echo "  instance counts limits and budgets itself and reconciles with Redis every $REDIS_SYNC"
  fi
  echo "- **floor** = $FLOOR_NOTE: what any proxy process costs here for the extra"
  echo "  loopback hop and its wake-ups, with no HTTP work at all"
  echo "- every request is distinct (numbered prompt: the cache misses) and sends \`user\`;"
  echo "  \"cache hit\" repeats one request"
  echo
  echo "Latency in µs (open loop: from the scheduled send time). \"added\" = target minus direct."
  echo "CPU = the server's user + system CPU seconds per 1,000 requests (warm-up included;"
  echo "for direct, the mock's own)."
  echo
  echo "| scenario | target | req/s | p50 | p90 | p99 | p99.9 | added p50 | added p99 | CPU s / 1k req | errors |"
  echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  lat_rows rate "fixed rate $RATE/s"
  lat_rows c1 "closed loop, 1 conn"
  lat_rows cN "closed loop, $CONNS conns"
  lat_rows hit "cache hit, 1 conn" c1
  # shellcheck disable=SC2016  # the backticks are Markdown, for jq to print
  combined=$(one cN full-redis | jq -r '.redis_jobs_per_call // empty | to_entries | sort_by(.key)
    | map("\(.key) \(.value)") | join(", ")')
  if [[ -n $combined ]]; then
    echo
    echo "Redis calls combined, full-redis at $CONNS connections (jobs a call, from \`/metrics\`): $combined."
  fi
  rounds_line=$(rounds_summary default)
  if [[ -n $rounds_line ]]; then
    echo
    echo "$rounds_line"
    rounds_line=$(rounds_summary floor)
    if [[ -n $rounds_line ]]; then echo "$rounds_line"; fi
  fi
  if [[ $STREAM == 1 ]]; then
    echo
    echo "Streaming at $RATE/s (SSE): time to first byte, µs."
    echo
    echo "| target | TTFB p50 | TTFB p90 | TTFB p99 | added p50 | added p99 | full p50 | errors |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|"
    stream_rows
  fi
  echo
  echo "Gateway memory (RSS, MiB). \"after load\" = after the target's load runs above."
  echo
  echo "| target | idle | after load | with $STREAMS open streams (+ over just before) | streams open (start..end of hold) | first byte p50 / p99 µs (while opening) | metric series |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  for t in "${TARGETS[@]:1}"; do
    mem=$(one memory "$t")
    hold_json=$(one hold "$t")
    echo "| $t | $(mib "$(jq -r .rss_idle_kb <<<"$mem")") | $(mib "$(jq -r .rss_after_load_kb <<<"$mem")") ($(jq -r .load_s <<<"$mem") s) | $(mib "$(jq -r '.rss_kb // null' <<<"$hold_json")") ($(jq -r 'if . == null then "–" else "+\((.rss_kb - .rss_before_kb) / 1024 * 10 | round / 10)" end' <<<"$hold_json")) | $(jq -r 'if . == null then "–" else "\(.open_at_start)..\(.open_at_end) of \(.streams)" end' <<<"$hold_json") | $(jq -r 'if . == null then "–" else "\(.first_byte.p50_us) / \(.first_byte.p99_us)" end' <<<"$hold_json") | $(jq -r .metric_series <<<"$mem") |"
  done
  if [[ $(one soak full) != null ]]; then
    echo
    echo "Soak: $SOAK at $SOAK_RATE/s on full, RSS every ${SAMPLE_EVERY} s (MiB):"
    one soak full | jq -r '[.rss_kb[] | . / 1024 * 10 | round / 10 | tostring] | join(", ")'
    echo "— $(one soak full | jq -r '"\(.requests) ok, \(.errors) errors, p50 \(.latency.p50_us) µs, p99 \(.latency.p99_us) µs"'); $(soak_growth | jq -r 'if .grew then "grew" else "flat" end + ": last third max \(.last_kb / 1024 * 10 | round / 10) vs first third max \(.first_kb / 1024 * 10 | round / 10) MiB (t=0 left out)"')"
  fi
  # shellcheck disable=SC2016  # the backticks are Markdown, for jq to print
  ready_line=$(r 'map(select(.scenario == "ready"))[0] // empty | "Start to ready (`sluice serve --listen`, embedded default, fresh dir): median \(.median_ms) ms over \(.runs) runs (\(.ready_ms | map(tostring) | join(", ")) ms)."')
  if [[ -n $ready_line ]]; then
    echo
    echo "$ready_line"
  fi
  echo
  echo "Targets (issue #11):"
  echo
  targets_table
  if [[ -n $OUT ]]; then echo; echo "Raw results: $RESULTS"; fi
} | tee "$WORK/summary.md"
if [[ -n $OUT ]]; then cp "$WORK/summary.md" "$KEEP/summary.md"; fi
exit "$FAILED"
