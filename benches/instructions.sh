#!/usr/bin/env bash
# Instructions per L1 hit, under callgrind: the proxy (`--workers 1`, local backend)
# against the bare hyper server that sends the same answer from memory (`loadgen bare
# --copy-of`), both counted only while `wrk -t1 -c8` asks for one warm 2 KiB key for
# $SECONDS_EACH seconds; per request = the instructions counted / the requests wrk saw
# answered, and the heap allocations per request likewise. Then the proxy's heaviest
# functions, inclusive, per request.
#
#   bash benches/instructions.sh
#
# Counts, unlike requests per second, do not move with the machine's load; they leave out
# the kernel. Under valgrind, SHA-256 takes its software path (valgrind hides SHA-NI), so
# the key hash weighs about 3,500 instructions here and far less natively.
# Everything listens on 127.0.0.1, on free ports, and is stopped on exit. Missing tools
# (valgrind, wrk, curl) are installed with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${SECONDS_EACH:-8}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
for pair in valgrind:valgrind callgrind_annotate:valgrind wrk:wrk curl:curl; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  printf '# installing with apt-get: %s\n' "${missing[*]}" >&2
  as_root apt-get update -qq >/dev/null
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo build --release --example proxy --example loadgen >&2
BIN=$PWD/target/release/examples
TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${KEEP:-}" ] || rm -rf "$TMP"
}
trap cleanup EXIT

free_port() {
  local p
  for _ in $(seq 1 100); do
    # Below the ephemeral range, so no outgoing connection holds it.
    p=$((20000 + RANDOM % 12000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  echo "instructions.sh: no free port" >&2
  exit 1
}
# wait_url URL [PID LOG]: until URL answers (60 s at most); fails at once, with the log,
# if PID has exited.
wait_url() {
  for _ in $(seq 1 300); do
    curl -sf -o /dev/null --max-time 2 "$1" && return 0
    if [ -n "${2:-}" ] && ! kill -0 "$2" 2>/dev/null; then
      echo "instructions.sh: the server for $1 exited: $(tail -n 5 "$3")" >&2
      exit 1
    fi
    sleep 0.2
  done
  echo "instructions.sh: $1 did not answer" >&2
  exit 1
}

UP=$(free_port)
"$BIN/loadgen" upstream --listen "127.0.0.1:$UP" --delay 0ms >"$TMP/upstream.log" 2>&1 &
PIDS+=($!)
wait_url "http://127.0.0.1:$UP/__count"

# count NAME URL CMD...: runs CMD under callgrind with counting off, warms URL, counts
# while wrk runs; prints "NAME requests instructions per-request".
count() {
  local name=$1 url=$2 pid n total
  shift 2
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$TMP/$name.out" \
    "$@" >"$TMP/$name.log" 2>&1 &
  pid=$!
  PIDS+=("$pid")
  wait_url "$url" "$pid" "$TMP/$name.log"
  for _ in 1 2 3; do curl -sf -o /dev/null "$url"; done
  callgrind_control -i on "$pid" >/dev/null
  wrk -t1 -c8 "-d${SECONDS_EACH}s" "$url" >"$TMP/$name.wrk"
  callgrind_control -i off "$pid" >/dev/null
  callgrind_control -d "$pid" >/dev/null
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  n=$(awk '/requests in/ {print $1}' "$TMP/$name.wrk")
  total=$(callgrind_annotate "$TMP/$name.out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  echo "$name $n $total $((total / n))"
}

# The bare server copies the answer of a proxy that is not under valgrind.
SRC=$(free_port)
"$BIN/proxy" --workers 1 --listen "127.0.0.1:$SRC" --upstream "http://127.0.0.1:$UP" >"$TMP/source.log" 2>&1 &
PIDS+=($!)
wait_url "http://127.0.0.1:$SRC/2k/hot"

OURS_PORT=$(free_port)
read -r _ ours_n ours_total ours_per < <(count ours "http://127.0.0.1:$OURS_PORT/2k/hot" \
  "$BIN/proxy" --workers 1 --listen "127.0.0.1:$OURS_PORT" --upstream "http://127.0.0.1:$UP")
BARE_PORT=$(free_port)
read -r _ bare_n bare_total bare_per < <(count bare "http://127.0.0.1:$BARE_PORT/2k/hot" \
  "$BIN/loadgen" --workers 1 bare --listen "127.0.0.1:$BARE_PORT" --copy-of "http://127.0.0.1:$SRC/2k/hot")

# allocs FILE N: heap allocations per request, the calls into the allocator's malloc and
# realloc (both binaries use mimalloc), from callgrind's call counts.
allocs() {
  awk -v n="$2" '
    /^c?fn=/ {
      id = $1; sub(/^c?fn=/, "", id)
      if (NF > 1) { name = $0; sub(/^[^ ]* /, "", name); names[id] = name }
      if ($0 ~ /^cfn=/) callee = names[id]
    }
    /^calls=/ {
      split($0, c, /[= ]/)
      if (callee == "mi_malloc_aligned") m += c[2]
      if (callee == "mi_realloc_aligned") r += c[2]
    }
    END { printf "%.2f + %.2f", m / n, r / n }' "$1"
}

echo "| server | requests counted | instructions | per request | allocations + reallocations per request |"
echo "|---|---:|---:|---:|---:|"
echo "| ours: proxy --workers 1 | $ours_n | $ours_total | **$ours_per** | $(allocs "$TMP/ours.out.1" "$ours_n") |"
echo "| bare: loadgen --workers 1 bare | $bare_n | $bare_total | **$bare_per** | $(allocs "$TMP/bare.out.1" "$bare_n") |"
echo
echo "The proxy's heaviest functions of its own and its dependencies', inclusive, per request:"
echo
callgrind_annotate --inclusive=yes "$TMP/ours.out.1" 2>/dev/null |
  awk -v n="$ours_n" '/^ *[0-9,]+ \(/ {
      ir = $1; gsub(",", "", ir)
      fn = $0; sub(/^[^:]*:/, "", fn); sub(/ \[.*$/, "", fn)
      if (fn ~ /tower_stampede|moka|sha2|Stampede/) printf "- %7d  %s\n", ir / n, fn
    }' | head -n 20
