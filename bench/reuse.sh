# Sourced by ab.sh and instructions.sh: one of an earlier bench/run.sh's gateway configs,
# run again on fresh ports, a fresh request log and a fresh Redis prefix.
#
#   NAME=ab.sh; reuse_setup "$@"   # the script's arguments: cfg-dir target binary...
#   reuse_config "$dir"       # sets MOCK_PORT and GW_PORT, writes $dir/sluice.toml
#
# reuse_setup prints the calling script's usage (its header, lines 2-12) when given fewer
# than three arguments; else it checks the config, changes to the repository root,
# builds loadgen, and sets TARGET, BINS (the binaries, made absolute), CONFIG, LOADGEN, AUTH (the
# config's key, as loadgen arguments) and WORK (a temp dir).
# On exit, every PID in PIDS is stopped, every Redis prefix in PREFIXES deleted and WORK
# removed.
# shellcheck shell=bash disable=SC2034  # the variables set here are the callers' to use

reuse_setup() { # cfg-dir target binary...
  if (($# < 3)); then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
  fi
  TARGET=$2 CONFIG=$1/$2/sluice.toml
  [[ -f $CONFIG ]] || { echo "$NAME: no $CONFIG (run bench/run.sh with OUT=$1 first)" >&2; exit 2; }
  shift 2
  BINS=()
  local bin
  for bin in "$@"; do BINS+=("$(realpath "$bin")"); done
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  local target_dir key
  target_dir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
  cargo build --release -p sluice-loadgen >&2
  LOADGEN=$target_dir/release/loadgen
  key=$(grep -m1 -o 'sk-bench-[0-9a-f]*' "$CONFIG" || true)
  AUTH=()
  [[ -n $key ]] && AUTH=(--api-key "$key")
  WORK=$(mktemp -d "/tmp/sluice-${NAME%.sh}.XXXXXX")
  PIDS=()
  PREFIXES=()
  trap reuse_cleanup EXIT
  trap 'exit 130' INT TERM
}

reuse_cleanup() {
  kill "${PIDS[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  local p
  for p in "${PREFIXES[@]}"; do
    redis-cli --scan --pattern "${p}*" 2>/dev/null | xargs -r -n 500 redis-cli del >/dev/null 2>&1 || true
  done
  rm -rf "$WORK"
}

port() { # a port nothing listens on, below the ephemeral range
  local p
  for _ in $(seq 50); do
    p=$((10000 + RANDOM % 20000))
    ss -Htln "sport = :$p" | grep -q . || { echo "$p"; return; }
  done
  echo "$NAME: no free port" >&2
  return 1
}

ready() { # url pid [seconds]: until the URL answers 200, while the process lives
  local tries=$((${3:-10} * 20))
  for _ in $(seq "$tries"); do
    kill -0 "$2" 2>/dev/null || return 1
    curl -fsS -o /dev/null "$1" 2>/dev/null && return 0
    sleep 0.05
  done
  return 1
}

reuse_config() { # dir: the mock's port and the gateway's, the request log and the Redis prefix, fresh
  local prefix="sluice_${NAME%.sh}_$RANDOM$RANDOM:"
  PREFIXES+=("$prefix")
  MOCK_PORT=$(port) GW_PORT=$(port)
  sed -E "s#127\.0\.0\.1:[0-9]+/v1#127.0.0.1:$MOCK_PORT/v1#g;
          s#^listen = \".*\"#listen = \"127.0.0.1:$GW_PORT\"#;
          s#^path = \".*\"#path = \"$1/sluice.db\"#;
          s#^prefix = \".*\"#prefix = \"$prefix\"#" "$CONFIG" >"$1/sluice.toml"
}
