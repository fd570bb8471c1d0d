#!/usr/bin/env bash
# A/B two (or more) `sluice` binaries on one of bench/run.sh's gateway configs, runs
# alternated, on an otherwise idle machine: requests/s, p50 and the gateway's CPU per
# request for each run, then each binary's medians. CPU per request is the figure to
# trust on a noisy VM (p50 moves by tens of µs from hour to hour); see bench/README.md.
#
#   OUT=/tmp/cfg SOAK=0 STREAMS=0 ROUNDS=0 FLOOR=0 READY_RUNS=0 STREAM=0 bench/run.sh
#   bench/ab.sh /tmp/cfg full-redis /tmp/old-sluice target/release/sluice
#
# Arguments: the OUT directory of an earlier bench/run.sh (its configs are reused, each
# run on fresh ports, a fresh request log and a fresh Redis prefix), the target
# (default, full or full-redis), and the binaries.
#
# Knobs (environment):
#   CONNS=32      closed-loop connections; RATE=500 runs open loop at that rate instead
#   DURATION=8s   recorded window of each run (after a 2 s unrecorded warm-up)
#   PAIRS=3       how many times each binary runs, alternating
#   PIN=1         loadgen + mock on CPU 0, gateway on GATEWAY_CPU
#   GATEWAY_CPU=1 1: the gateway by itself (as run.sh's throughput runs); 0: with the
#                 client and the mock (as run.sh's latency runs, LATENCY_CPU=shared)
set -euo pipefail

CONNS=${CONNS:-32}
RATE=${RATE:-}
DURATION=${DURATION:-8s}
PAIRS=${PAIRS:-3}
PIN=${PIN:-1}
GATEWAY_CPU=${GATEWAY_CPU:-1}
NAME=ab.sh
# shellcheck source=bench/reuse.sh
source "$(dirname "$0")/reuse.sh"
reuse_setup "$@"
PIN_A=() PIN_B=()
if [[ $PIN == 1 && $(nproc) -ge 2 ]] && command -v taskset >/dev/null; then
  PIN_A=(taskset -c 0) PIN_B=(taskset -c "$GATEWAY_CPU")
fi
if [[ -n $RATE ]]; then MODE=(--rate "$RATE"); else MODE=(--connections "$CONNS"); fi
ticks() { awk '{ sub(/^.*\) /, ""); split($0, f, " "); print f[12] + f[13] }' "/proc/$1/stat"; }

LAST=
one() { # binary run-number; sets LAST to "rps p50 cpu_us"
  local bin=$1 dir=$WORK/$2 mock_port gw_port
  mkdir -p "$dir"
  reuse_config "$dir"
  mock_port=$MOCK_PORT gw_port=$GW_PORT
  "${PIN_A[@]}" "$bin" mock --listen "127.0.0.1:$mock_port" >"$dir/mock.log" 2>&1 &
  local mock=$!
  PIDS+=("$mock")
  env -u SLUICE_MASTER_KEY -u SLUICE_CONFIG -u OPENAI_API_KEY -u ANTHROPIC_API_KEY \
    "${PIN_B[@]}" "$bin" serve --config "$dir/sluice.toml" >"$dir/gateway.log" 2>&1 &
  local gw=$!
  PIDS+=("$gw")
  ready "http://127.0.0.1:$mock_port/healthz" "$mock" && ready "http://127.0.0.1:$gw_port/readyz" "$gw" || {
    echo "ab.sh: $bin did not start; its log:" >&2
    cat "$dir/gateway.log" >&2
    exit 1
  }
  local url=http://127.0.0.1:$gw_port/v1/chat/completions args
  args=(--url "$url" --unique-prompt --user bench-user-1 "${AUTH[@]}" "${MODE[@]}")
  "${PIN_A[@]}" "$LOADGEN" --json --duration 2s --warmup 0s "${args[@]}" >/dev/null
  local t0 t1 line
  t0=$(ticks "$gw")
  line=$("${PIN_A[@]}" "$LOADGEN" --json --duration "$DURATION" --warmup 0s "${args[@]}")
  t1=$(ticks "$gw")
  kill "$gw" "$mock"
  wait "$gw" "$mock" 2>/dev/null || true
  LAST=$(jq -r --argjson t "$((t1 - t0))" --argjson hz "$(getconf CLK_TCK)" \
    '"\(.rps) \(.latency.p50_us) \((($t / $hz) * 1e6 / .requests) | round)"' <<<"$line")
}

echo "| run | binary | req/s | p50 µs | gateway CPU µs / request |"
echo "|---|---|---:|---:|---:|"
declare -A RESULTS
n=0
for ((pair = 1; pair <= PAIRS; pair++)); do
  for bin in "${BINS[@]}"; do
    n=$((n + 1))
    one "$bin" "$n"
    read -r rps p50 cpu <<<"$LAST"
    echo "| $n | $bin | $rps | $p50 | $cpu |"
    RESULTS[$bin]+="$rps $p50 $cpu;"
  done
done
echo
echo "| binary | median req/s | median p50 µs | median CPU µs / request |"
echo "|---|---:|---:|---:|"
for bin in "${BINS[@]}"; do
  tr ';' '\n' <<<"${RESULTS[$bin]}" | awk -v bin="$bin" 'BEGIN { n = 0 } NF == 3 { r[n] = $1; p[n] = $2; c[n] = $3; n++ }
    function median(a, n,   i, j, t) {
      for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
      return n % 2 ? a[int(n / 2)] : (a[n / 2 - 1] + a[n / 2]) / 2
    }
    END { printf "| %s | %s | %s | %s |\n", bin, median(r, n), median(p, n), median(c, n) }'
done
