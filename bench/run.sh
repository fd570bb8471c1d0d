#!/usr/bin/env bash
# Sluice latency benchmark: the same load sent straight to the simulated upstream and
# through the gateway, side by side. See bench/README.md for what each figure means.
#
#   bench/run.sh                          # defaults: about 80 s after the build
#   RATE=1000 DURATION=20s CONNS=32 bench/run.sh
#
# Knobs (environment):
#   RATE=500        fixed-rate runs: requests per second (open loop)
#   DURATION=10s    recorded window of every run
#   WARMUP=2s       unrecorded warm-up before each run
#   CONNS=16        closed-loop runs with many connections
#   STREAM=0        1 adds fixed-rate streaming (SSE) runs, with time to first byte
#   PIN=1           1 pins with taskset: loadgen + mock on CPU 0, gateway on CPU 1
#                   (only when there are at least 2 CPUs); 0 leaves placement to Linux
#   LOG_LEVEL=warn  the gateway's [telemetry] log_level (info logs one line per request)
#   SLUICE_BIN=     use this prebuilt `sluice` binary instead of building the workspace's
#                   (only the load generator is built then)
#   OUT=            directory to keep the JSON results and logs in (default: a temp dir,
#                   removed on exit)
#
# Everything listens on 127.0.0.1 only, every run is bounded, and every process this
# script starts is stopped on exit.
set -euo pipefail

RATE=${RATE:-500}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNS=${CONNS:-16}
STREAM=${STREAM:-0}
PIN=${PIN:-1}
LOG_LEVEL=${LOG_LEVEL:-warn}
OUT=${OUT:-}
SLUICE_BIN=${SLUICE_BIN:-}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

for tool in cargo curl jq ss; do
  command -v "$tool" >/dev/null || { echo "run.sh: needs $tool" >&2; exit 2; }
done

COMMAND="${SLUICE_BIN:+SLUICE_BIN=$SLUICE_BIN }RATE=$RATE DURATION=$DURATION WARMUP=$WARMUP CONNS=$CONNS STREAM=$STREAM PIN=$PIN LOG_LEVEL=$LOG_LEVEL bench/run.sh"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")
KEEP=$WORK
if [[ -n $OUT ]]; then
  mkdir -p "$OUT"
  KEEP=$(cd "$OUT" && pwd)
fi
PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n $OUT ]]; then cp "$WORK"/*.log "$WORK"/sluice.toml "$KEEP"/ 2>/dev/null || true; fi
  if [[ -f $WORK/gateway.log ]]; then
    local dropped
    dropped=$(grep -o '"dropped_total":[0-9]*' "$WORK/gateway.log" | tail -1 | cut -d: -f2 || true)
    if [[ -n $dropped ]]; then echo "run.sh: note: the gateway dropped $dropped request records (queue full)" >&2; fi
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

# CPU placement. With 2+ CPUs the gateway gets CPU 1 to itself and the generator shares
# CPU 0 with the mock, so the direct and gateway runs load CPU 0 the same way.
CPUS=$(nproc)
PIN_GEN=() PIN_MOCK=() PIN_GW=()
if [[ $PIN == 1 && $CPUS -ge 2 ]] && command -v taskset >/dev/null; then
  PIN_GEN=(taskset -c 0) PIN_MOCK=(taskset -c 0) PIN_GW=(taskset -c 1)
  PLACEMENT="pinned with taskset: loadgen + mock on CPU 0, gateway on CPU 1"
else
  PLACEMENT="not pinned (Linux scheduler places all three processes)"
fi

free_port() {
  local port
  for _ in $(seq 50); do
    port=$((20000 + RANDOM % 40000))
    if ! ss -Htln "sport = :$port" | grep -q .; then
      echo "$port"
      return
    fi
  done
  echo "run.sh: no free port found" >&2
  return 1
}

wait_healthy() { # url name pid
  for _ in $(seq 100); do
    kill -0 "$3" 2>/dev/null || { echo "run.sh: $2 exited; its log:" >&2; cat "$WORK/$2.log" >&2; return 1; }
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "run.sh: $2 not healthy after 10 s" >&2
  return 1
}

# Figures are only comparable on an otherwise idle machine: measure how busy it is
# (over one second, before anything of ours runs) and say so when it is not idle.
cpu_busy() { # percent of all CPUs busy over the next second
  local a b
  a=($(head -1 /proc/stat)) && sleep 1 && b=($(head -1 /proc/stat))
  local idle=$(( (b[4] + b[5]) - (a[4] + a[5]) )) total=0 i
  for i in 1 2 3 4 5 6 7 8; do total=$(( total + b[i] - a[i] )); done
  echo $(( total > 0 ? 100 * (total - idle) / total : 0 ))
}
BUSY_BEFORE=$(cpu_busy)
if (( BUSY_BEFORE > 10 )); then
  echo "run.sh: warning: the CPUs are already ${BUSY_BEFORE}% busy; other work on this machine will skew the figures" >&2
fi

MOCK_PORT=$(free_port)
"${PIN_MOCK[@]}" "$SLUICE" mock --listen "127.0.0.1:$MOCK_PORT" >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
wait_healthy "http://127.0.0.1:$MOCK_PORT/healthz" mock "${PIDS[-1]}"

GW_PORT=$(free_port)
while [[ $GW_PORT == "$MOCK_PORT" ]]; do GW_PORT=$(free_port); done
cat >"$WORK/sluice.toml" <<EOF
[server]
listen = "127.0.0.1:$GW_PORT"

[telemetry]
log_level = "$LOG_LEVEL"

[[providers]]
name = "mock"
kind = "openai"
base_url = "http://127.0.0.1:$MOCK_PORT/v1"

[[models]]
name = "gpt-4o-mini"
provider = "mock"
EOF
# No key from the environment may leak into the benchmark's gateway.
# It runs in the temp dir, so whatever it writes there (its SQLite request store,
# `sluice.db` by default) goes away with it rather than into the checkout.
(cd "$WORK" && exec env -u SLUICE_MASTER_KEY -u SLUICE_CONFIG -u SLUICE_LISTEN \
  "${PIN_GW[@]}" "$SLUICE" serve --config "$WORK/sluice.toml") >"$WORK/gateway.log" 2>&1 &
PIDS+=($!)
wait_healthy "http://127.0.0.1:$GW_PORT/healthz" gateway "${PIDS[-1]}"

DIRECT=http://127.0.0.1:$MOCK_PORT/v1/chat/completions
GATEWAY=http://127.0.0.1:$GW_PORT/v1/chat/completions
RESULTS=$KEEP/results.jsonl
: >"$RESULTS"
FAILED=0

# One loadgen run; its JSON line goes to results.jsonl, its verdict to stderr.
load() { # label url args...
  local label=$1 url=$2
  shift 2
  echo "== $label" >&2
  local line
  if line=$("${PIN_GEN[@]}" "$LOADGEN" --json --label "$label" --url "$url" \
    --duration "$DURATION" --warmup "$WARMUP" "$@"); then :; else
    FAILED=1
    echo "   (more than 1% errors)" >&2
  fi
  if [[ -n $line ]]; then
    echo "$line" >>"$RESULTS"
    jq -r '"   \(.requests) ok, \(.errors) errors, \(.rps) req/s, p50 \(.latency.p50_us) µs, p99 \(.latency.p99_us) µs"' <<<"$line" >&2
  fi
}

# Each scenario runs direct first, then through the gateway, back to back.
both() { # label-prefix loadgen-args...
  local prefix=$1
  shift
  load "$prefix-direct" "$DIRECT" "$@"
  load "$prefix-gateway" "$GATEWAY" "$@"
}
both rate --rate "$RATE"
if [[ $STREAM == 1 ]]; then both stream --rate "$RATE" --stream; fi
both c1 --connections 1
both cN --connections "$CONNS"

# ---- report ----
row() { # label-prefix title
  jq -rs --arg p "$1" --arg t "$2" '
    (map(select(.label == ($p + "-direct")))[0]) as $d
    | (map(select(.label == ($p + "-gateway")))[0]) as $g
    | if $d == null or $g == null then empty else
      "| \($t) | \($d.rps) | \($g.rps) | \($d.latency.p50_us) | \($g.latency.p50_us) | **\($g.latency.p50_us - $d.latency.p50_us)** | \($d.latency.p99_us) | \($g.latency.p99_us) | **\($g.latency.p99_us - $d.latency.p99_us)** | \($d.latency.p999_us) / \($g.latency.p999_us) | \($d.latency.max_us) / \($g.latency.max_us) | \($d.errors) / \($g.errors) |"
      end' "$RESULTS"
}

CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
  echo
  echo "## Sluice benchmark — $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "- command: \`$COMMAND\`"
  echo "- machine: $CPUS CPU(s), ${CPU_MODEL:-unknown CPU}, Linux $(uname -r)"
  echo "- toolchain: $(rustc --version)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ uncommitted changes)')"
  echo "- placement: $PLACEMENT"
  echo "- CPU busy before the runs (other work, 1 s sample): ${BUSY_BEFORE}%"
  echo "- gateway log level: $LOG_LEVEL; upstream: \`sluice mock\` (no added latency)"
  echo
  echo "Latency in µs (open loop: from the scheduled send time). \"added\" = through sluice minus direct."
  echo
  echo "| scenario | direct req/s | sluice req/s | direct p50 | sluice p50 | added p50 | direct p99 | sluice p99 | added p99 | p99.9 d / s | max d / s | errors d / s |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  row rate "fixed rate $RATE/s"
  if [[ $STREAM == 1 ]]; then row stream "fixed rate $RATE/s, stream"; fi
  row c1 "closed loop, 1 conn"
  row cN "closed loop, $CONNS conns"
  echo
  added=$(jq -rs 'map(select(.label | startswith("rate-"))) | if length == 2 then (map(select(.label == "rate-gateway"))[0].latency.p50_us - map(select(.label == "rate-direct"))[0].latency.p50_us) else "n/a" end' "$RESULTS")
  if [[ $added != n/a ]] && ((added <= 200)); then
    echo "Target (p50 added latency ≤ 200 µs at $RATE req/s): MET ($added µs)."
  else
    echo "Target (p50 added latency ≤ 200 µs at $RATE req/s): MISSED ($added µs)."
  fi
  if [[ -n $OUT ]]; then echo "Raw results: $RESULTS"; fi
} | tee "$WORK/summary.md"
if [[ -n $OUT ]]; then cp "$WORK/summary.md" "$KEEP/summary.md"; fi
exit "$FAILED"
