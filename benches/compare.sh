#!/usr/bin/env bash
# Side by side on this machine: tower-stampede's proxy (3 instances sharing one Redis),
# nginx (proxy_cache + proxy_cache_lock, 3 instances) and Varnish (3 instances), in
# front of one counting upstream that takes 200 ms per call. Then hit throughput (ours
# vs nginx, one core each, wrk on the other) and the proxy's memory (RSS growth against
# --cache-size) through 200k cached 2 KiB answers and then 100k no-store URLs.
#
#   bash benches/compare.sh                 # every section
#   bash benches/compare.sh fleet hit       # only these (fleet, hit, l2, memory)
#
# Everything listens on 127.0.0.1 only, on free ports (never 80 or 6379), runs from a
# temporary directory, is bounded by timeouts and is stopped on exit. Missing tools
# (nginx, varnish, wrk, redis-server, curl, taskset) are installed with apt-get.
# KEEP=1 keeps the temporary directory (configs and logs) for inspection.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

UPSTREAM_DELAY=200ms
A_CLIENTS=300
A_KEYS=1
B_CLIENTS=3000
B_KEYS=100
WRK_SECONDS=10
FILL_KEYS=200000
NOSTORE_KEYS=100000
# The memory section's bounds (bytes) and runs per bound; both may be set from outside.
MEM_BOUNDS=${MEM_BOUNDS:-268435456 67108864}
MEM_RUNS=${MEM_RUNS:-3}
# Measured rounds of each fleet scenario (after one warm-up run per front), extra flags
# for its load generator (say, --close-each) and for its three proxies (say, --workers 1).
FLEET_ROUNDS=${FLEET_ROUNDS:-3}
read -r -a STAMPEDE_FLAGS <<<"${STAMPEDE_FLAGS:-}"
read -r -a FLEET_OURS_FLAGS <<<"${FLEET_OURS_FLAGS:-}"
# The L2 section's distinct keys (2 KiB each in Redis) and rounds.
L2_KEYS=${L2_KEYS:-60000}
L2_ROUNDS=${L2_ROUNDS:-3}

SECTIONS=" ${*:-fleet hit l2 memory} "
for section in $SECTIONS; do
  case $section in
    fleet | hit | l2 | memory) ;;
    *)
      printf 'compare.sh: unknown section %s (known: fleet hit l2 memory)\n' "$section" >&2
      exit 2
      ;;
  esac
done
want() { case "$SECTIONS" in *" $1 "*) return 0 ;; esac; return 1; }

say() { printf '%s\n' "$*"; }
log() { printf '# %s\n' "$*" >&2; }
die() {
  printf 'compare.sh: %s\n' "$*" >&2
  exit 1
}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# ---------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------

install_missing() {
  local missing=() pair cmd pkg
  for pair in nginx:nginx varnishd:varnish wrk:wrk redis-server:redis-server \
    redis-cli:redis-tools redis-benchmark:redis-tools curl:curl taskset:util-linux ss:iproute2; do
    cmd=${pair%%:*}
    pkg=${pair#*:}
    if ! command -v "$cmd" >/dev/null 2>&1 && ! [ -x "/usr/sbin/$cmd" ]; then
      missing+=("$pkg")
    fi
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  log "installing with apt-get: ${missing[*]}"
  # Package scripts must not start system-wide nginx/varnish/redis services (port 80,
  # 6081, 6379): deny service starts for the duration of the install unless a policy
  # is already in place.
  local policy=/usr/sbin/policy-rc.d added=0
  if [ ! -e "$policy" ]; then
    as_root sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod +x $policy"
    added=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  local rc=0
  as_root timeout 600 apt-get update -qq || rc=$?
  if [ "$rc" -eq 0 ]; then
    as_root timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
  fi
  [ "$added" -eq 1 ] && as_root rm -f "$policy"
  [ "$rc" -eq 0 ] || die "apt-get failed (exit $rc)"
}

install_missing
export PATH="$PATH:/usr/sbin:/sbin"
command -v cargo >/dev/null 2>&1 || die "cargo not found: install a Rust toolchain (https://rustup.rs)"

# ---------------------------------------------------------------------------------------
# Machine
# ---------------------------------------------------------------------------------------

NPROC=$(nproc)
# The one-core comparisons (hit, l2): the server on CPU 0, its load on CPU 1.
if [ "$NPROC" -ge 2 ]; then
  SERVER_CPU=(taskset -c 0)
  LOAD_CPU=(taskset -c 1)
  pinning="server pinned to CPU 0 (taskset -c 0), wrk to CPU 1 (taskset -c 1)"
else
  SERVER_CPU=()
  LOAD_CPU=()
  pinning="one CPU only: nothing pinned"
fi
CPU_MODEL=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
say "## Machine"
say ""
say "- nproc: $NPROC; CPU: ${CPU_MODEL:-unknown}; kernel: $(uname -sr); memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
say "- load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
say "- $(nginx -v 2>&1 | sed 's/^nginx version: //'); $(varnishd -V 2>&1 | head -n1 | sed 's/ revision.*//;s/^varnishd (//;s/)$//'); $(redis-server --version | awk '{print "redis " $3}' | tr -d 'v='); $(wrk -v 2>&1 | head -n1 | awk '{print $1, $2}'); $(rustc --version | awk '{print $1, $2}')"

# ---------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------

log "building: cargo build --release --example proxy --example loadgen"
timeout 1200 cargo build --release --example proxy --example loadgen >&2
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
PROXY=$TARGET_DIR/release/examples/proxy
LOADGEN=$TARGET_DIR/release/examples/loadgen
[ -x "$PROXY" ] && [ -x "$LOADGEN" ] || die "built binaries not found under $TARGET_DIR/release/examples"

# ---------------------------------------------------------------------------------------
# Processes, ports, clean-up
# ---------------------------------------------------------------------------------------

TMP=$(mktemp -d "${TMPDIR:-/tmp}/stampede-compare.XXXXXX")
PIDS=()

STOPPED=" "
stop_pid() {
  local pid=$1 i
  case "$STOPPED" in *" $pid "*) return 0 ;; esac
  # Once reaped, the pid may be reused: never signal it again.
  STOPPED="$STOPPED$pid "
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do
    stop_pid "$pid"
  done
  if [ "${KEEP:-0}" = 1 ]; then
    log "kept $TMP"
  else
    rm -rf "$TMP"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Thousands of sockets per process.
ulimit -n "$(ulimit -Hn | sed 's/unlimited/65536/')" 2>/dev/null || true
[ "$(ulimit -n)" -ge 8192 ] || log "warning: ulimit -n is $(ulimit -n); 3000 clients need more"

# free_port: sets $PORT to a loopback port that no socket uses and this run has not
# handed out yet (called in this shell, not in $(...), so that it remembers).
USED_PORTS=" "
free_port() {
  local i
  for i in $(seq 1 200); do
    PORT=$((20000 + RANDOM % 40000))
    case "$USED_PORTS" in *" $PORT "*) continue ;; esac
    if [ -z "$(ss -Htan "( sport = :$PORT or dport = :$PORT )" 2>/dev/null)" ]; then
      USED_PORTS="$USED_PORTS$PORT "
      return 0
    fi
  done
  die "no free port found"
}

# start NAME CMD...: runs CMD in the background, logs to $TMP/NAME.log, sets $LAST_PID.
start() {
  local name=$1
  shift
  "$@" >"$TMP/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# wait_url URL: until it answers 200 (20 s at most).
wait_url() {
  local i
  for i in $(seq 1 200); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1" || true)" = 200 ]; then
      return 0
    fi
    sleep 0.1
  done
  die "$1 did not answer 200 within 20 s"
}

wait_log() {
  local file=$1 pattern=$2 i
  for i in $(seq 1 200); do
    grep -q "$pattern" "$file" 2>/dev/null && return 0
    sleep 0.1
  done
  die "no '$pattern' in $file within 20 s: $(tail -n 5 "$file")"
}

# kv LINE KEY: the value of KEY=value in LINE.
kv() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p" | head -n1; }

# cpu_ms PID...: CPU time (user + system) used so far by these processes and their
# children (nginx workers, the varnish child), in milliseconds.
CLK_TCK=$(getconf CLK_TCK)
cpu_ms() {
  local pid p ticks=0 t
  for pid in "$@"; do
    for p in "$pid" $(pgrep -P "$pid" 2>/dev/null || true); do
      t=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}' || true)
      ticks=$((ticks + ${t:-0}))
    done
  done
  echo $((ticks * 1000 / CLK_TCK))
}

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }
mib() { awk -v kb="$1" 'BEGIN {printf "%.1f MiB", kb / 1024}'; }

# ---------------------------------------------------------------------------------------
# Upstream, Redis, fronts
# ---------------------------------------------------------------------------------------

free_port
UP_PORT=$PORT
UPSTREAM=http://127.0.0.1:$UP_PORT
start upstream "$LOADGEN" upstream --listen "127.0.0.1:$UP_PORT" --delay "$UPSTREAM_DELAY"
wait_url "$UPSTREAM/__count"
# upstream_count [URL]: the requests the upstream at URL (default: the 200 ms one) served.
upstream_count() { curl -sf --max-time 5 "${1:-$UPSTREAM}/__count" | tr -d '[:space:]'; }

free_port
REDIS_PORT=$PORT
mkdir -p "$TMP/redis"
start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$TMP/redis" --daemonize no --protected-mode yes --maxclients 10000
for i in $(seq 1 100); do
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG && break
  sleep 0.1
done
redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG || die "redis-server did not start"
REDIS_PID=$LAST_PID
REDIS_URL=redis://127.0.0.1:$REDIS_PORT/

# fast_upstream: starts, once, a counting upstream that answers at once (for the sections
# that fill a cache); sets $UPSTREAM_FAST.
UPSTREAM_FAST=""
fast_upstream() {
  [ -n "$UPSTREAM_FAST" ] && return 0
  free_port
  start upstream-fast "$LOADGEN" upstream --listen "127.0.0.1:$PORT" --delay 0ms
  UPSTREAM_FAST=http://127.0.0.1:$PORT
  wait_url "$UPSTREAM_FAST/__count"
}

# start_ours NAME [proxy flags...]: starts a proxy (under "${PIN[@]}", if set), sets
# $LAST_PORT and $LAST_PID.
PIN=()
start_ours() {
  local name=$1
  shift
  free_port
  LAST_PORT=$PORT
  start "$name" "${PIN[@]}" env RUST_LOG=info NO_COLOR=1 "$PROXY" --listen "127.0.0.1:$LAST_PORT" "$@"
  wait_log "$TMP/$name.log" "listening on"
}

# nginx_conf DIR PORT [HTTP-DIRECTIVE]: a proxy_cache + proxy_cache_lock config, one worker.
nginx_conf() {
  local dir=$1 port=$2 extra=${3:-} user_line=""
  mkdir -p "$dir/cache" "$dir/tmp"
  [ "$(id -u)" -eq 0 ] && user_line="user $(id -un) $(id -gn);"
  cat >"$dir/nginx.conf" <<EOF
$user_line
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
worker_rlimit_nofile 20000;
events { worker_connections 10000; }
http {
  access_log off;
  $extra
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_body_temp_path $dir/tmp/client;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  proxy_cache_path $dir/cache levels=1:2 keys_zone=front:32m max_size=1g inactive=10m use_temp_path=off;
  upstream origin {
    server 127.0.0.1:$UP_PORT;
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$port backlog=4096;
    location / {
      proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_cache front;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 5s;
      add_header X-Cache-Status \$upstream_cache_status;
    }
  }
}
EOF
}

# start_nginx NAME HTTP-DIRECTIVE [taskset args...]
start_nginx() {
  local name=$1 extra=$2
  shift 2
  free_port
  LAST_PORT=$PORT
  nginx_conf "$TMP/$name" "$LAST_PORT" "$extra"
  start "$name" "$@" nginx -p "$TMP/$name/" -c "$TMP/$name/nginx.conf" -e "$TMP/$name/error.log"
  wait_url "http://127.0.0.1:$LAST_PORT/__warm"
}

start_varnish() {
  local name=$1
  free_port
  LAST_PORT=$PORT
  start "$name" varnishd -j none -F -T none -a "127.0.0.1:$LAST_PORT" -b "127.0.0.1:$UP_PORT" \
    -n "$TMP/$name" -s malloc,256m
  wait_url "http://127.0.0.1:$LAST_PORT/__warm"
}

if want fleet; then
log "starting 3 × ours (one shared redis-server), 3 × nginx, 3 × varnish"
OURS=() NGINX=() VARNISH=() OURS_PIDS=() NGINX_PIDS=() VARNISH_PIDS=()
for n in 1 2 3; do
  start_ours "ours$n" --upstream "$UPSTREAM" --redis "$REDIS_URL" "${FLEET_OURS_FLAGS[@]}"
  OURS+=("http://127.0.0.1:$LAST_PORT")
  OURS_PIDS+=("$LAST_PID")
  start_nginx "nginx$n" ""
  NGINX+=("http://127.0.0.1:$LAST_PORT")
  NGINX_PIDS+=("$LAST_PID")
  start_varnish "varnish$n"
  VARNISH+=("http://127.0.0.1:$LAST_PORT")
  VARNISH_PIDS+=("$LAST_PID")
done

join() {
  local IFS=,
  echo "$*"
}

# ---------------------------------------------------------------------------------------
# Scenarios A and B
# ---------------------------------------------------------------------------------------

# stampede_run FRONT CLIENTS KEYS TAG: one stampede against FRONT's 3 instances; sets
# RUN_LINE (the loadgen line, empty on failure), RUN_CALLS (upstream calls) and RUN_CPU
# (CPU ms of the instances, ours with the redis-server, over the run).
stampede_run() {
  local front=$1 clients=$2 keys=$3 tag=$4 targets before cpu0 pids=()
  case $front in
    nothing) targets=$UPSTREAM ;;
    ours) targets=$(join "${OURS[@]}") pids=("${OURS_PIDS[@]}" "$REDIS_PID") ;;
    nginx) targets=$(join "${NGINX[@]}") pids=("${NGINX_PIDS[@]}") ;;
    varnish) targets=$(join "${VARNISH[@]}") pids=("${VARNISH_PIDS[@]}") ;;
  esac
  before=$(upstream_count)
  cpu0=$(cpu_ms "${pids[@]}")
  RUN_LINE=$(timeout 180 "$LOADGEN" stampede --targets "$targets" --clients "$clients" --keys "$keys" \
    "${STAMPEDE_FLAGS[@]}" 2>"$TMP/stampede-$front-$clients-$tag.err" || true)
  # Late upstream calls (a waiter timing out, a refresh) still count.
  sleep 0.3
  RUN_CALLS=$(($(upstream_count) - before))
  RUN_CPU=$(($(cpu_ms "${pids[@]}") - cpu0))
  [ "$front" = nothing ] && RUN_CPU="–"
  return 0
}

# scenario TITLE CLIENTS KEYS: one uncounted warm-up run per front (it opens the fronts'
# upstream connections: a first burst of hundreds of connects shows SYN retries, not
# caching), then FLEET_ROUNDS rounds, the fronts in turn.
scenario() {
  local title=$1 clients=$2 keys=$3 front round details="" p99 ratios=""
  local -A P99
  say ""
  say "## $title"
  say ""
  for front in nothing ours nginx varnish; do
    stampede_run "$front" "$clients" "$keys" warm
  done
  say "| round | front | upstream calls | p50 ms | p99 ms | max ms | ok | errors | front CPU ms |"
  say "|---:|---|---:|---:|---:|---:|---:|---:|---:|"
  for round in $(seq 1 "$FLEET_ROUNDS"); do
    for front in nothing ours nginx varnish; do
      stampede_run "$front" "$clients" "$keys" "$round"
      if [ -z "$RUN_LINE" ]; then
        say "| $round | $front | $RUN_CALLS | – | – | – | – | loadgen failed: $(tail -n1 "$TMP/stampede-$front-$clients-$round.err") | $RUN_CPU |"
        P99[$front]=""
        continue
      fi
      p99=$(kv "$RUN_LINE" p99_ms)
      P99[$front]=$p99
      say "| $round | $front | $RUN_CALLS | $(kv "$RUN_LINE" p50_ms) | $p99 | $(kv "$RUN_LINE" max_ms) | $(kv "$RUN_LINE" ok) | $(kv "$RUN_LINE" errors) | $RUN_CPU |"
      details="$details"$'\n'"- round $round, $front: \`$RUN_LINE\`"$'\n'"$(sed 's/^/  - /' "$TMP/stampede-$front-$clients-$round.err")"
    done
    if [ -n "${P99[ours]}" ] && [ -n "${P99[nginx]}" ]; then
      ratios="$ratios $(awk -v a="${P99[ours]}" -v b="${P99[nginx]}" 'BEGIN {printf "%.2f", a / b}')"
    fi
  done
  say ""
  say "p99 ours / nginx, round by round:${ratios:- –}"
  say ""
  say "$clients clients on $keys cold key(s), released together, spread round-robin over 3 instances of each front (\"nothing\": straight to the upstream); every front had one uncounted warm-up run first; upstream calls = delta of the upstream's count; latencies from each client's release to the last body byte; connections closed $([ "${#STAMPEDE_FLAGS[@]}" -gt 0 ] && echo "as loadgen's \`${STAMPEDE_FLAGS[*]}\` says" || echo "once the last client has its answer")$([ "${#FLEET_OURS_FLAGS[@]}" -gt 0 ] && echo "; ours with \`${FLEET_OURS_FLAGS[*]}\`"); front CPU = user+system time of the 3 instances (ours: plus the redis-server) during the run, connection set-up and teardown included. Details (loadgen line, then the Cache-Status / X-Cache-Status values seen; Varnish sends none):"
  say "$details"
}

scenario "Scenario A: $A_CLIENTS clients, $A_KEYS cold key, upstream $UPSTREAM_DELAY" "$A_CLIENTS" "$A_KEYS"
scenario "Scenario B: $B_CLIENTS clients, $B_KEYS cold keys, upstream $UPSTREAM_DELAY" "$B_CLIENTS" "$B_KEYS"

log "stopping the scenario fronts"
for pid in "${OURS_PIDS[@]}" "${NGINX_PIDS[@]}" "${VARNISH_PIDS[@]}"; do stop_pid "$pid"; done
fi

# ---------------------------------------------------------------------------------------
# Hit throughput: one core each (ours, a bare hyper server, nginx)
# ---------------------------------------------------------------------------------------
if want hit; then

say ""
say "## Hit throughput (wrk -t1 -c64 -d${WRK_SECONDS}s on one warm key)"
say ""
# Alternating rounds of the hit section (each front once per round); may be set from outside.
WRK_ROUNDS=${WRK_ROUNDS:-3}

# wrk_run NAME URL: one wrk run; sets WRK_RPS, WRK_P50, WRK_P99, WRK_BAD.
wrk_run() {
  local name=$1 url=$2 out
  out=$TMP/wrk-$name.txt
  timeout $((WRK_SECONDS + 30)) "${LOAD_CPU[@]}" wrk -t1 -c64 "-d${WRK_SECONDS}s" --latency "$url" >"$out" 2>&1 || true
  WRK_RPS=$(awk '/^Requests\/sec:/ {print $2}' "$out")
  WRK_P50=$(awk '$1 == "50%" {print $2}' "$out")
  WRK_P99=$(awk '$1 == "99%" {print $2}' "$out")
  WRK_BAD=$(awk '/Non-2xx or 3xx responses:/ {print "non-2xx:", $NF} /Socket errors:/ {print}' "$out" | tr '\n' ' ')
}

# A 2 KiB answer (the upstream pads /2k/ paths to 2048 bytes).
HOT=/2k/hot-wrk
# The fronts measured: ours; a bare hyper server sending the same answer from memory (the
# limit of the hit path: loadgen bare copies our answer, head and body, once at start);
# nginx as configured above; and nginx with its open-file cache (a proxy_cache hit
# otherwise opens, stats and closes the cache file each time). The answer's max-age is
# 60 s: without stale-while-revalidate, its expiry would stall every connection for the
# 200 ms refill once a minute (a miss, not the hit path, and never the bare server). So
# ours runs with --grace and nginx with background updates: both refresh behind a hit.
HIT_STALE="proxy_cache_use_stale updating; proxy_cache_background_update on;"
declare -A URL BEST PIDOF RPS
PIN=("${SERVER_CPU[@]}")
start_ours wrk-ours --upstream "$UPSTREAM" --redis "$REDIS_URL" --workers 1 --grace 60s
PIN=()
PIDOF[ours]=$LAST_PID URL[ours]=http://127.0.0.1:$LAST_PORT$HOT
curl -s -o /dev/null "${URL[ours]}"
free_port
start wrk-bare "${SERVER_CPU[@]}" "$LOADGEN" --workers 1 bare --listen "127.0.0.1:$PORT" --copy-of "${URL[ours]}"
PIDOF[bare]=$LAST_PID URL[bare]=http://127.0.0.1:$PORT$HOT
wait_url "${URL[bare]}"
start_nginx wrk-nginx "$HIT_STALE" "${SERVER_CPU[@]}"
PIDOF[nginx]=$LAST_PID URL[nginx]=http://127.0.0.1:$LAST_PORT$HOT
start_nginx wrk-nginx-ofc "$HIT_STALE open_file_cache max=1000 inactive=60s;" "${SERVER_CPU[@]}"
PIDOF[nginx-ofc]=$LAST_PID URL[nginx-ofc]=http://127.0.0.1:$LAST_PORT$HOT
WRK_FRONTS=(ours bare nginx nginx-ofc)
for front in "${WRK_FRONTS[@]}"; do
  curl -s -o /dev/null "${URL[$front]}"
  BEST[$front]=0
done
OURS_STATUS=$(curl -s -D - -o /dev/null "${URL[ours]}" | tr -d '\r' | sed -n 's/^cache-status: //Ip')
NGINX_STATUS=$(curl -s -D - -o /dev/null "${URL[nginx]}" | tr -d '\r' | sed -n 's/^x-cache-status: //Ip')
OURS_HEAD=$(curl -s -D - -o /dev/null "${URL[ours]}" | wc -c)
BARE_HEAD=$(curl -s -D - -o /dev/null "${URL[bare]}" | wc -c)
NGINX_HEAD=$(curl -s -D - -o /dev/null "${URL[nginx]}" | wc -c)
OURS_THREADS=$(ls "/proc/${PIDOF[ours]}/task" | wc -l)
HOT_BODY=$(curl -s "${URL[ours]}" | wc -c)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f×", a / b; else print "–"}'; }
say "| round | front | requests/sec | p50 | p99 | wrk errors |"
say "|---:|---|---:|---:|---:|---|"
# Alternate, so that a burst of load from elsewhere on the machine hits every front.
# One uncounted run each first: connections, allocator and caches warm.
for front in "${WRK_FRONTS[@]}"; do
  timeout 30 "${LOAD_CPU[@]}" wrk -t1 -c64 -d3s "${URL[$front]}" >/dev/null 2>&1 || true
done
ROUND_RATIOS=()
for round in $(seq 1 "$WRK_ROUNDS"); do
  for front in "${WRK_FRONTS[@]}"; do
    wrk_run "$front-$round" "${URL[$front]}"
    RPS[$front]=${WRK_RPS:-0}
    say "| $round | $front | ${WRK_RPS:-–} | ${WRK_P50:-–} | ${WRK_P99:-–} | ${WRK_BAD:-none} |"
    if [ -n "$WRK_RPS" ]; then
      BEST[$front]=$(awk -v a="${BEST[$front]}" -v b="$WRK_RPS" 'BEGIN {print (b > a) ? b : a}')
    fi
  done
  ROUND_RATIOS+=("$(ratio "${RPS[ours]}" "${RPS[bare]}")")
done
# The median of the round ratios: each pairs runs seconds apart, so a slow spell on the
# machine tends to hit both.
MEDIAN_RATIO=$(printf '%s\n' "${ROUND_RATIOS[@]}" | tr -d '×' | sort -n | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2}')
for front in "${WRK_FRONTS[@]}"; do stop_pid "${PIDOF[$front]}"; done
say ""
say "**ours / bare hyper = $(ratio "${BEST[ours]}" "${BEST[bare]}")** (best of $WRK_ROUNDS alternating rounds each: ${BEST[ours]} vs ${BEST[bare]} requests/sec; round by round: ${ROUND_RATIOS[*]}, median ${MEDIAN_RATIO}×); **ours / nginx = $(ratio "${BEST[ours]}" "${BEST[nginx]}")** (${BEST[nginx]} requests/sec); ours / nginx with open_file_cache = $(ratio "${BEST[ours]}" "${BEST[nginx-ofc]}") (${BEST[nginx-ofc]} requests/sec)."
say ""
say "ours: proxy --workers 1 --grace 60s ($OURS_THREADS threads, all pinned), Cache-Status \`$OURS_STATUS\`, $OURS_HEAD-byte response head; bare: \`loadgen --workers 1 bare\` (hyper-util's auto server, as the proxy), $BARE_HEAD-byte head; nginx: worker_processes 1, access_log off, \`$HIT_STALE\`, X-Cache-Status \`$NGINX_STATUS\`, $NGINX_HEAD-byte head; nginx-ofc: the same plus \`open_file_cache max=1000 inactive=60s\`; body $HOT_BODY bytes from all; $pinning."
say ""

fi

# ---------------------------------------------------------------------------------------
# L2 hits: a node with a cold L1 in front of a warm Redis, against redis-benchmark
# ---------------------------------------------------------------------------------------
if want l2; then

say ""
say "## L2 hits: a node with a cold L1 and a warm Redis ($L2_KEYS distinct 2 KiB answers)"
say ""
fast_upstream
# per_op MS N: microseconds per operation.
per_op() { awk -v ms="$1" -v n="$2" 'BEGIN {if (n > 0) printf "%.1f", ms * 1000 / n; else print "–"}'; }
# rate_of N MS: operations per CPU-second.
rate_of() { awk -v n="$1" -v ms="$2" 'BEGIN {if (ms > 0) printf "%.0f", n * 1000 / ms; else print "–"}'; }

# The entries come into Redis through one writer node (the answers a fleet stores).
L2_PREFIX=/2k/l2-$RANDOM$RANDOM-
start_ours l2-writer --upstream "$UPSTREAM_FAST" --redis "$REDIS_URL" --ttl-override 1h --max-body 4096
WRITER_PID=$LAST_PID
l2fill=$(timeout 600 "$LOADGEN" fill --target "http://127.0.0.1:$LAST_PORT" --keys "$L2_KEYS" --prefix "$L2_PREFIX" \
  --concurrency 64 2>"$TMP/l2-fill.err" || true)
# The writer answers before its store lands: let the last stores land before stopping it.
dbsize() { redis-cli -h 127.0.0.1 -p "$REDIS_PORT" dbsize | tr -d '[:space:]'; }
stored=$(dbsize)
for i in $(seq 1 50); do
  sleep 0.2
  now=$(dbsize)
  [ "$now" = "$stored" ] && break
  stored=$now
done
stop_pid "$WRITER_PID"

# What Redis itself does with one Lua read of a 2 KiB value, and with a plain GET.
redis-cli -h 127.0.0.1 -p "$REDIS_PORT" set bench:2k "$(head -c 2048 /dev/zero | tr '\0' x)" >/dev/null
LUA_SHA=$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" script load "return redis.call('GET', KEYS[1])" | tr -d '[:space:]')
RB_N=200000
# bench_redis NAME ARGS...: redis-benchmark (64 clients, one command at a time) on the load
# CPU; sets RB_RPS, RB_MS (redis-server CPU ms over the run) and RB_US (per command).
bench_redis() {
  local name=$1 cpu0 out
  shift
  cpu0=$(cpu_ms "$REDIS_PID")
  out=$(timeout 120 "${LOAD_CPU[@]}" redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c 64 -n "$RB_N" -q "$@" 2>&1 | tr '\r' '\n' | grep 'requests per second' | tail -n1 || true)
  RB_MS=$(($(cpu_ms "$REDIS_PID") - cpu0))
  RB_US=$(per_op "$RB_MS" "$RB_N")
  RB_RPS=$(awk '{for (i = 1; i <= NF; i++) if ($i == "requests") {print $(i - 1); exit}}' <<<"$out")
  printf '%s\n' "- $name: \`$out\`" >>"$TMP/l2-notes.txt"
}

say "| round | what | requests/s | ok | upstream calls | node CPU µs/request | node requests per CPU-second | Redis CPU µs/request | Redis requests per CPU-second |"
say "|---:|---|---:|---:|---:|---:|---:|---:|---:|"
: >"$TMP/l2-notes.txt"
for round in $(seq 1 "$L2_ROUNDS"); do
  bench_redis "round $round, EVALSHA (GET of 2 KiB in Lua)" evalsha "$LUA_SHA" 1 bench:2k
  say "| $round | redis-benchmark EVALSHA (a Lua GET of 2 KiB) | ${RB_RPS:-–} | $RB_N | – | – | – | $RB_US | $(rate_of "$RB_N" "$RB_MS") |"
  bench_redis "round $round, GET of 2 KiB" get bench:2k
  say "| $round | redis-benchmark GET (2 KiB) | ${RB_RPS:-–} | $RB_N | – | – | – | $RB_US | $(rate_of "$RB_N" "$RB_MS") |"
  # A fresh node each round: its L1 (1 MiB, a few hundred answers) starts cold and stays
  # cold, since the keys are read once each, in order.
  PIN=("${SERVER_CPU[@]}")
  start_ours "l2-reader-$round" --upstream "$UPSTREAM_FAST" --redis "$REDIS_URL" --workers 1 \
    --cache-size 1048576 --ttl-override 1h --max-body 4096
  PIN=()
  reader=$LAST_PID
  curl -s -o /dev/null "http://127.0.0.1:$LAST_PORT/__warm"
  before=$(upstream_count "$UPSTREAM_FAST")
  node0=$(cpu_ms "$reader")
  redis0=$(cpu_ms "$REDIS_PID")
  line=$(timeout 600 "${LOAD_CPU[@]}" "$LOADGEN" fill --target "http://127.0.0.1:$LAST_PORT" --keys "$L2_KEYS" \
    --prefix "$L2_PREFIX" --concurrency 64 2>"$TMP/l2-read-$round.err" || true)
  node=$(($(cpu_ms "$reader") - node0))
  redis=$(($(cpu_ms "$REDIS_PID") - redis0))
  calls=$(($(upstream_count "$UPSTREAM_FAST") - before))
  stop_pid "$reader"
  n=$(kv "$line" done)
  say "| $round | ours: L2 hits through one node (--workers 1) | $(kv "$line" rps) | ${n:-0} | $calls | $(per_op "$node" "${n:-0}") | $(rate_of "${n:-0}" "$node") | $(per_op "$redis" "${n:-0}") | $(rate_of "${n:-0}" "$redis") |"
  printf '%s\n' "- round $round, ours: \`$line\`" >>"$TMP/l2-notes.txt"
done
say ""
say "Redis holds $stored keys, filled through one writer node (\`$l2fill\`). Each round: redis-benchmark (-c 64, one command at a time, pinned to CPU 1) on one 2 KiB key, then a fresh node pinned to CPU 0 (--workers 1, --cache-size 1 MiB: a few hundred answers, while the $L2_KEYS keys are read once each) answering every key once from Redis, driven by \`loadgen fill --concurrency 64\` on CPU 1; upstream calls = delta of the upstream's count (0: every answer came from Redis). CPU = user+system time from /proc over the run, in 10 ms ticks; redis-server is not pinned."
say ""
cat "$TMP/l2-notes.txt"
fi

# ---------------------------------------------------------------------------------------
# Memory: 200k distinct 2 KiB answers, then 100k distinct no-store URLs, per bound
# ---------------------------------------------------------------------------------------
if want memory; then

say ""
say "## Memory: $FILL_KEYS distinct 2 KiB answers, then $NOSTORE_KEYS distinct no-store URLs, through one proxy (local backend, --max-body 4096 --ttl 1h)"
say ""
fast_upstream
PAYLOAD_KB=$((FILL_KEYS * 2048 / 1024))

# healthz URL KEY: a number from the proxy's /healthz (it brings L1's evictions up to date).
healthz() { curl -sf --max-time 5 "$1/healthz" | grep -o "\"$2\":[0-9]*" | cut -d: -f2; }
ratio_of() { awk -v kb="$1" -v b="$2" 'BEGIN {printf "%.2f", kb * 1024 / b}'; }
# span N...: "lowest–highest×".
span() { printf '%s\n' "$@" | sort -n | awk 'NR == 1 {lo = $1} {hi = $1} END {printf "%s–%s×", lo, hi}'; }

say "| --cache-size (bound) | run | RSS at start | growth after cacheable | / bound | growth after no-store | / bound | peak growth / bound | counted (memory().bytes()) | entries kept | fills |"
say "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
MEM_NOTES=""
MEM_SUMMARY=""
for bound in $MEM_BOUNDS; do
  R1=() R2=()
  for run in $(seq 1 "$MEM_RUNS"); do
    free_port
    MPORT=$PORT
    start_ours "mem-$bound-$run" --upstream "$UPSTREAM_FAST" --cache-size "$bound" --max-body 4096 --ttl 1h \
      --metrics-listen "127.0.0.1:$MPORT"
    pid=$LAST_PID
    url=http://127.0.0.1:$LAST_PORT
    murl=http://127.0.0.1:$MPORT
    curl -s -o /dev/null "$url/__warm"
    healthz "$murl" capacity >/dev/null
    sleep 0.5
    rss0=$(rss_kb "$pid")
    fill1=$(timeout 600 "$LOADGEN" fill --target "$url" --keys "$FILL_KEYS" --prefix /2k/ --concurrency 64 2>"$TMP/fill1-$bound-$run.err" || true)
    sleep 1
    rss1=$(rss_kb "$pid")
    fill2=$(timeout 600 "$LOADGEN" fill --target "$url" --keys "$NOSTORE_KEYS" --prefix /nostore/ --concurrency 64 2>"$TMP/fill2-$bound-$run.err" || true)
    sleep 1
    rss2=$(rss_kb "$pid")
    hwm=$(hwm_kb "$pid")
    counted=$(healthz "$murl" l1_bytes)
    entries=$(healthz "$murl" l1_entries)
    stop_pid "$pid"
    g1=$((rss1 - rss0)) g2=$((rss2 - rss0)) gp=$((hwm - rss0))
    R1+=("$(ratio_of "$g1" "$bound")")
    R2+=("$(ratio_of "$g2" "$bound")")
    say "| $(mib $((bound / 1024))) | $run | $(mib "$rss0") | $(mib "$g1") | **$(ratio_of "$g1" "$bound")×** | $(mib "$g2") | **$(ratio_of "$g2" "$bound")×** | $(ratio_of "$gp" "$bound")× | $(mib $((${counted:-0} / 1024))) | ${entries:-–} | $(kv "$fill1" done)+$(kv "$fill2" done) ok, $(kv "$fill1" errors)+$(kv "$fill2" errors) errors, $(kv "$fill1" secs)+$(kv "$fill2" secs) s |"
    MEM_NOTES="$MEM_NOTES"$'\n'"- $bound, run $run, cacheable: \`$fill1\`"$'\n'"- $bound, run $run, no-store: \`$fill2\`"
  done
  MEM_SUMMARY="$MEM_SUMMARY"$'\n'"- $(mib $((bound / 1024))): growth / bound $(span "${R1[@]}") after the cacheable phase (target ≤ 1.15×), $(span "${R2[@]}") after both (target ≤ 1.25×), over $MEM_RUNS runs"
done
say ""
say "Raw payload of the cacheable phase: $FILL_KEYS × 2048 bytes = $(mib "$PAYLOAD_KB"). Growth = VmRSS (from /proc/PID/status) after each phase minus VmRSS at start, 1 s after the phase ended; peak = VmHWM minus VmRSS at start. Every /nostore/ answer carries \`Cache-Control: no-store\` and leaves a hit-for-pass marker. Counted and entries kept: the proxy's /healthz (\`layer.memory()\`) after both phases."
say "$MEM_SUMMARY"
say "$MEM_NOTES"
fi
say ""
say "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
