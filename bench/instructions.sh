#!/usr/bin/env bash
# Instructions per request of one or more `sluice` binaries on one of bench/run.sh's
# gateway configs, counted by callgrind: within about 3 % run after run for the same
# binary and load, however busy or slow the VM is (ab.sh's CPU per request moves by
# ±10 % here). It counts user-space instructions only, every thread of the gateway
# (the request log's SQLite writer too), not the kernel's work for the sockets, and a
# big memcpy counts by its bytes, so read it beside ab.sh, not instead of it.
#
#   OUT=/tmp/cfg SOAK=0 STREAMS=0 ROUNDS=0 FLOOR=0 READY_RUNS=0 STREAM=0 bench/run.sh
#   bench/instructions.sh /tmp/cfg full /tmp/sluice-before target/release/sluice
#
# Arguments: the OUT directory of an earlier bench/run.sh, the target (default, full,
# full-redis or full-redis-sync), and the binaries. Each gateway runs under callgrind with instrumentation
# off until a 2 s warm-up has passed, then counts while loadgen sends RATE requests a
# second for DURATION, open loop (so every binary gets the same number of requests),
# on at most 8 connections.
#
# Knobs (environment): RATE=100, DURATION=8s, STREAM=0 (1: every request asks for a
# streamed answer, so the SSE path is what is counted), KEEP= (a directory to keep each
# callgrind.out in, for callgrind_annotate), COUNT=gateway; COUNT=redis counts a
# private redis-server's instructions instead (full-redis, full-redis-sync): the config's [redis]
# url is pointed at it, the gateway runs natively, and the figure is what each request
# costs Redis (its scripts, the cache and budget commands). That figure moves by up to
# ±10 % between invocations (600k, 484k, 543k a request for one binary, Run 34): how
# many requests meet in one combined call depends on the natively running gateway's
# timing. Compare binaries within one invocation, not across them.
set -euo pipefail

RATE=${RATE:-100}
DURATION=${DURATION:-8s}
KEEP=${KEEP:-}
STREAM=${STREAM:-0}
SUFFIX=
[[ $STREAM == 1 ]] && SUFFIX=.stream
COUNT=${COUNT:-gateway}
case $COUNT in gateway | redis) ;; *) echo "instructions.sh: COUNT is gateway or redis" >&2; exit 2 ;; esac
command -v valgrind >/dev/null && command -v callgrind_control >/dev/null ||
  { echo "instructions.sh: needs valgrind (apt-get install valgrind)" >&2; exit 2; }
NAME=instructions.sh
# shellcheck source=bench/reuse.sh
source "$(dirname "$0")/reuse.sh"
reuse_setup "$@"
if [[ $COUNT == redis ]]; then
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null ||
    { echo "instructions.sh: COUNT=redis needs redis-server and redis-cli" >&2; exit 2; }
  grep -q '^url = "redis' "$CONFIG" ||
    { echo "instructions.sh: COUNT=redis needs a config with [redis] (full-redis, full-redis-sync)" >&2; exit 2; }
fi

echo "| binary | requests | errors | instructions / request ($COUNT) |"
echo "|---|---:|---:|---:|"
n=0
for bin in "${BINS[@]}"; do
  n=$((n + 1))
  dir=$WORK/$n
  mkdir -p "$dir"
  reuse_config "$dir"
  mock_port=$MOCK_PORT gw_port=$GW_PORT
  "$bin" mock --listen "127.0.0.1:$mock_port" >"$dir/mock.log" 2>&1 &
  mock=$!
  PIDS+=("$mock")
  callgrind=(valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$dir/callgrind.out")
  gateway=("${callgrind[@]}")
  if [[ $COUNT == gateway ]]; then
    # Under callgrind the gateway runs tens of times slower: a long Redis timeout, so no
    # call of its own fails over to the closed-on-failure path (a 503 in the count).
    sed -i -E 's#^(url = "redis://[^"]*")$#\1\ntimeout = "10s"#' "$dir/sluice.toml"
  fi
  if [[ $COUNT == redis ]]; then
    redis_port=$(port)
    # Under callgrind Redis answers tens of times slower: a long timeout, so no call
    # fails over to the closed-on-failure path.
    sed -i -E "s#^url = \"redis://[^\"]*\"#url = \"redis://127.0.0.1:$redis_port\"\ntimeout = \"10s\"#" "$dir/sluice.toml"
    "${callgrind[@]}" redis-server --port "$redis_port" --bind 127.0.0.1 --save '' \
      --appendonly no >"$dir/redis.log" 2>&1 &
    counted=$!
    PIDS+=("$counted")
    for _ in $(seq 100); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done
    redis-cli -p "$redis_port" ping >/dev/null 2>&1 || {
      echo "instructions.sh: redis-server did not start under valgrind; its log:" >&2
      cat "$dir/redis.log" >&2
      exit 1
    }
    gateway=()
  fi
  env -u SLUICE_MASTER_KEY -u SLUICE_CONFIG -u OPENAI_API_KEY -u ANTHROPIC_API_KEY \
    "${gateway[@]}" "$bin" serve --config "$dir/sluice.toml" >"$dir/gateway.log" 2>&1 &
  gw=$!
  PIDS+=("$gw")
  [[ $COUNT == gateway ]] && counted=$gw
  ready "http://127.0.0.1:$mock_port/healthz" "$mock" && ready "http://127.0.0.1:$gw_port/readyz" "$gw" 60 || {
    echo "instructions.sh: $bin did not start (under valgrind: COUNT=$COUNT); its log:" >&2
    cat "$dir/gateway.log" >&2
    exit 1
  }
  args=(--url "http://127.0.0.1:$gw_port/v1/chat/completions" --unique-prompt --user bench-user-1
    "${AUTH[@]}" --rate "$RATE" --max-connections 8 --warmup 0s --json)
  [[ $STREAM == 1 ]] && args+=(--stream)
  "$LOADGEN" "${args[@]}" --duration 2s >/dev/null
  callgrind_control -i on "$counted" >/dev/null
  line=$("$LOADGEN" "${args[@]}" --duration "$DURATION")
  # `-d` writes what was counted since instrumentation went on as part 1.
  callgrind_control -d "$counted" >/dev/null
  for _ in $(seq 100); do [[ -s $dir/callgrind.out.1 ]] && break; sleep 0.1; done
  kill "$gw" "$mock" "$counted" 2>/dev/null || true
  wait "$gw" "$mock" "$counted" 2>/dev/null || true
  total=$(awk '/^summary:/ { print $2; exit }' "$dir/callgrind.out.1")
  requests=$(jq .requests <<<"$line")
  [[ -n $KEEP ]] && mkdir -p "$KEEP" && cp "$dir/callgrind.out.1" "$KEEP/callgrind.$TARGET.$COUNT$SUFFIX.$n.out"
  echo "| $bin | $requests | $(jq .errors <<<"$line") | $((total / requests)) |"
done
