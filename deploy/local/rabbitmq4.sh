#!/usr/bin/env bash
# A RabbitMQ 4 node beside the machine's broker, for testing sessionbus on the release
# line people deploy. The node runs Debian 13's own rabbitmq-server (4.0.x on Erlang
# 27) from a Debian 13 root made once per machine with debootstrap and cached, so the
# machine's packages are left as they are.
#
#   rabbitmq4.sh build                 make the root (cached: a second call returns at once)
#   rabbitmq4.sh start [NAME]          build if needed, start node NAME on free ports, wait
#                                      until it runs; prints its settings as NAME=value lines
#                                      (also in $ROOT/var/lib/sessionbus/nodes/NAME/node.env)
#   rabbitmq4.sh stop NAME             stop the node and remove its data
#   rabbitmq4.sh ctl NAME ARGS...      rabbitmqctl ARGS against the node
#   rabbitmq4.sh diag NAME ARGS...     rabbitmq-diagnostics ARGS against the node
#   rabbitmq4.sh run CMD ARGS...       CMD inside the root, with this environment
#   rabbitmq4.sh root                  the root's path
#
# Every node refuses every deprecated feature (refuse-deprecated.conf beside this
# script) and runs the management, Prometheus and stream plugins. It has its own node
# name, distribution port and CLI distribution ports, and registers with the host's
# epmd (one per machine, on 4369). Commands run as root inside the root (chroot) in a
# mount namespace of their own that sees /proc, /sys and /dev; nothing is mounted on
# the host. SESSIONBUS_RABBITMQ4_CACHE moves the cache (default /var/cache/sessionbus);
# SESSIONBUS_RABBITMQ4_COOKIE gives nodes that are to be clustered one Erlang cookie.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${SESSIONBUS_RABBITMQ4_CACHE:-/var/cache/sessionbus}
ROOT=$CACHE/rabbitmq4-trixie
# Bumped when the recipe below changes, so a cached root built the old way is rebuilt.
RECIPE=1
SUITE=trixie
NODES=/var/lib/sessionbus/nodes # inside the root

log() { printf '[rabbitmq4] %s\n' "$*" >&2; }
fail() {
  log "$*"
  exit 1
}

need_root() {
  [[ $(id -u) == 0 ]] || fail "needs root (debootstrap and chroot): run it with sudo"
}

# The Debian mirror apt on this machine already uses; debootstrap's own default when
# none is configured.
mirror() {
  local uri
  uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null |
    grep -Eo '(https?://[^ ]+/debian)/?( |$)' | grep -v -- '-security' | head -n1 | tr -d ' ') || true
  printf '%s' "${uri%/}"
}

# CMD inside the root, in a private mount namespace with /proc, /sys and /dev mounted
# (Erlang and RabbitMQ read /proc; a detached node keeps the namespace while it runs).
in_root() {
  unshare --mount --propagation private -- /bin/sh -c '
    root=$1; shift
    mount -t proc proc "$root/proc" &&
      mount --rbind /sys "$root/sys" &&
      mount --rbind /dev "$root/dev" &&
      exec chroot "$root" "$@"' in_root "$ROOT" "$@"
}

taken() { # taken ROOT UID GID: the root already has a user UID or a group GID
  cut -d: -f3 "$1/etc/passwd" | grep -qx "$2" || cut -d: -f3 "$1/etc/group" | grep -qx "$3"
}

build() {
  need_root
  mkdir -p "$CACHE"
  # Another build of the same root: wait for it, then use its result. The lock's file
  # descriptor is open in this subshell only, so a node started later does not inherit
  # (and hold) it.
  (
    flock 9
    build_locked
  ) 9>"$CACHE/rabbitmq4.lock"
}

build_locked() {
  if [[ -f $ROOT/.sessionbus-recipe && $(cat "$ROOT/.sessionbus-recipe") == "$RECIPE" ]]; then
    return
  fi
  local started=$SECONDS
  if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
  fi
  local work=$ROOT.new
  rm -rf "$work" "$ROOT"
  log "debootstrap $SUITE into $work"
  # shellcheck disable=SC2046  # the mirror is one word or nothing
  debootstrap --variant=minbase "$SUITE" "$work" $(mirror) >"$CACHE/debootstrap.log" 2>&1 ||
    fail "debootstrap failed: see $CACHE/debootstrap.log"
  # Install without starting: invoke-rc.d asks policy-rc.d, and 101 means "do not".
  printf '#!/bin/sh\nexit 101\n' >"$work/usr/sbin/policy-rc.d"
  chmod 755 "$work/usr/sbin/policy-rc.d"
  # The package's rabbitmq user would take the root's next free system uid, which may
  # be a host user's (postgres here): the root's files would show as that user on the
  # host. Create it first with the host's rabbitmq ids, or ids free on both sides.
  local uid gid
  uid=$(id -u rabbitmq 2>/dev/null || true)
  gid=$(getent group rabbitmq | cut -d: -f3 || true)
  if [[ -z $uid || -z $gid ]] || taken "$work" "$uid" "$gid"; then
    for uid in $(seq 990 -1 900); do
      gid=$uid
      if ! getent passwd "$uid" >/dev/null && ! getent group "$gid" >/dev/null &&
        ! taken "$work" "$uid" "$gid"; then break; fi
    done
  fi
  chroot "$work" groupadd --system --gid "$gid" rabbitmq
  chroot "$work" useradd --system --uid "$uid" --gid "$gid" --home-dir /var/lib/rabbitmq \
    --shell /usr/sbin/nologin rabbitmq
  cp /etc/hosts "$work/etc/hosts"
  log "installing rabbitmq-server in the root"
  ROOT=$work in_root /usr/bin/env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends rabbitmq-server >>"$CACHE/debootstrap.log" 2>&1 ||
    fail "apt-get install rabbitmq-server failed: see $CACHE/debootstrap.log"
  ROOT=$work in_root apt-get clean
  mkdir -p "$work$NODES"
  echo "$RECIPE" >"$work/.sessionbus-recipe"
  mv "$work" "$ROOT"
  log "built $ROOT in $((SECONDS - started)) s: $(versions)"
}

versions() {
  chroot "$ROOT" dpkg-query -W -f '${Package} ${Version}; ' rabbitmq-server erlang-base
}

port_free() { # port_free PORT: nothing listens or is bound there
  python3 -c 'import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)' "$1"
}

# A base port with a free block of 20 (AMQP, distribution, management, stream,
# Prometheus; CLI distribution at +10..+19), below the ephemeral range and apart from
# the 11000-14900 blocks tests/support/private_broker.py takes for its nodes.
free_base() {
  local base port ok
  for _ in $(seq 200); do
    base=$((16000 + RANDOM % 200 * 20))
    ok=1
    for port in $(seq "$base" $((base + 4))) $(seq $((base + 10)) $((base + 19))); do
      if ! port_free "$port"; then
        ok=0
        break
      fi
    done
    if ((ok)); then
      echo "$base"
      return
    fi
  done
  fail "no free ports for a RabbitMQ 4 node"
}

node_env() { # node_env NAME: load the node's settings into this shell
  local file=$ROOT$NODES/$1/node.env
  [[ -f $file ]] || fail "no node $1 (no $file)"
  set -a
  # shellcheck disable=SC1090
  source "$file"
  set +a
}

start() {
  local name=${1:-rq4n$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')}
  [[ $name =~ ^[a-z][a-z0-9_-]*$ ]] || fail "node name $name: lower-case letters, digits, - and _"
  build
  local dir=$NODES/$name host_dir=$ROOT$NODES/$name
  [[ ! -e $host_dir ]] || fail "node $name exists ($host_dir): stop it first"
  local started=$SECONDS base
  base=$(free_base)
  mkdir -p "$host_dir"/{home,mnesia,log}
  # Nodes meant to form a cluster share a cookie: SESSIONBUS_RABBITMQ4_COOKIE.
  local cookie=${SESSIONBUS_RABBITMQ4_COOKIE:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n' | tr a-f A-F)}
  printf '%s' "$cookie" >"$host_dir/home/.erlang.cookie"
  chmod 400 "$host_dir/home/.erlang.cookie"
  {
    echo "# sessionbus RabbitMQ 4 node $name"
    echo "listeners.tcp.1 = 127.0.0.1:$base"
    echo "management.tcp.ip = 127.0.0.1"
    echo "management.tcp.port = $((base + 2))"
    echo "stream.listeners.tcp.1 = 127.0.0.1:$((base + 3))"
    echo "stream.advertised_host = 127.0.0.1"
    echo "stream.advertised_port = $((base + 3))"
    echo "prometheus.tcp.ip = 127.0.0.1"
    echo "prometheus.tcp.port = $((base + 4))"
    echo "log.console = false"
    echo "log.file.level = info"
    cat "$HERE/refuse-deprecated.conf"
  } >"$host_dir/rabbitmq.conf"
  echo '[rabbitmq_management,rabbitmq_prometheus,rabbitmq_stream].' >"$host_dir/enabled_plugins"
  : >"$host_dir/rabbitmq-env.conf"
  cat >"$host_dir/node.env" <<EOF
RABBITMQ4_NODE_NAME=$name
HOME=$dir/home
RABBITMQ_NODENAME=$name@localhost
RABBITMQ_NODE_PORT=$base
RABBITMQ_DIST_PORT=$((base + 1))
RABBITMQ_CTL_DIST_PORT_MIN=$((base + 10))
RABBITMQ_CTL_DIST_PORT_MAX=$((base + 19))
RABBITMQ_MNESIA_BASE=$dir/mnesia
RABBITMQ_LOG_BASE=$dir/log
RABBITMQ_CONFIG_FILE=$dir/rabbitmq.conf
RABBITMQ_ENABLED_PLUGINS_FILE=$dir/enabled_plugins
RABBITMQ_CONF_ENV_FILE=$dir/rabbitmq-env.conf
SESSIONBUS_TEST_AMQP_URL=amqp://guest:guest@127.0.0.1:$base/
SESSIONBUS_TEST_MANAGEMENT_URL=http://guest:guest@127.0.0.1:$((base + 2))/
SESSIONBUS_TEST_PROMETHEUS_URL=http://127.0.0.1:$((base + 4))/
SESSIONBUS_TEST_STREAM_PORT=$((base + 3))
EOF
  node_env "$name"
  log "starting $RABBITMQ_NODENAME (AMQP $base)"
  in_root /usr/lib/rabbitmq/bin/rabbitmq-server -detached >"$host_dir/log/start.out" 2>&1 ||
    fail "rabbitmq-server did not start: $(cat "$host_dir/log/start.out")"
  # await_startup gives up at once while the node is not yet registered with epmd:
  # ask check_running until the node answers, then wait for the boot to finish.
  local deadline=$((SECONDS + 180))
  until in_root /usr/lib/rabbitmq/bin/rabbitmq-diagnostics -q check_running >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "$RABBITMQ_NODENAME not running after 180 s; log: $host_dir/log"
    sleep 1
  done
  in_root /usr/lib/rabbitmq/bin/rabbitmqctl -q await_startup --timeout 120 >/dev/null
  until curl -fsS --max-time 5 "${SESSIONBUS_TEST_MANAGEMENT_URL}api/overview" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "management API of $RABBITMQ_NODENAME not up after 180 s"
    sleep 1
  done
  log "$RABBITMQ_NODENAME running after $((SECONDS - started)) s"
  grep -E '^(RABBITMQ4_NODE_NAME|RABBITMQ_NODENAME|SESSIONBUS_)' "$host_dir/node.env"
}

stop() {
  local name=${1:?node name}
  node_env "$name"
  in_root /usr/lib/rabbitmq/bin/rabbitmqctl -q stop --idle-timeout 60 >/dev/null 2>&1 || true
  local pid_file=$ROOT$RABBITMQ_MNESIA_BASE/$RABBITMQ_NODENAME.pid pid
  if [[ -f $pid_file ]]; then
    pid=$(cat "$pid_file")
    for _ in $(seq 30); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.5
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -rf "${ROOT:?}$NODES/$name"
  log "stopped $RABBITMQ_NODENAME"
}

case ${1:-} in
build)
  build
  echo "$ROOT"
  ;;
start)
  need_root
  start "${2:-}"
  ;;
stop)
  need_root
  stop "${2:-}"
  ;;
ctl | diag)
  need_root
  tool=rabbitmqctl
  [[ $1 == diag ]] && tool=rabbitmq-diagnostics
  node_env "${2:?node name}"
  shift 2
  in_root "/usr/lib/rabbitmq/bin/$tool" "$@"
  ;;
run)
  need_root
  [[ -f $ROOT/.sessionbus-recipe ]] || fail "no root at $ROOT: run '$0 build' first"
  shift
  in_root "$@"
  ;;
root) echo "$ROOT" ;;
*)
  sed -n '2,22p' "$0" >&2
  exit 2
  ;;
esac
