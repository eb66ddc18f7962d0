#!/usr/bin/env bash
# Make the local RabbitMQ and PostgreSQL ready for the test suite: start them if they
# are installed here but down, and enable the broker plugins the suite relies on (the
# management API for `sessionctl queues` and test clean-up, streams for the audit
# stream). `make test` and `.ci/run` both run it, so a fresh machine whose broker has
# its plugins off needs nothing done by hand.
#
# Services addressed elsewhere are left alone: with SESSIONBUS_TEST_AMQP_URL /
# SESSIONBUS_TEST_POSTGRES_URL naming a host other than this one, or with a Docker
# engine answering (the fixtures then start containers), there is nothing to prepare.
set -euo pipefail

log() { printf '[services] %s\n' "$*" >&2; }
fail() { log "$*"; exit 1; }

wait_for() {  # wait_for NAME SECONDS CMD...
  local name=$1 seconds=$2; shift 2
  for ((i = 0; i < seconds; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  fail "$name did not come up within ${seconds}s"
}

is_local() {  # is_local URL: its host is this machine
  local host
  host=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.urlsplit(sys.argv[1]).hostname or "")' "$1")
  [[ $host == 127.* || $host == localhost || $host == ::1 ]]
}

docker_answers() {
  [[ -z ${SESSIONBUS_TEST_NO_DOCKER:-} ]] && [[ -S /var/run/docker.sock ]] &&
    curl -fsS --max-time 3 --unix-socket /var/run/docker.sock http://docker/_ping >/dev/null 2>&1
}

port_open() {  # port_open HOST PORT
  (exec 3<>"/dev/tcp/$1/$2") >/dev/null 2>&1
}

PLUGINS=(rabbitmq_management rabbitmq_stream)

ensure_rabbitmq() {
  local url=${SESSIONBUS_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}
  if ! is_local "$url"; then log "RabbitMQ at a remote address: left as it is"; return; fi
  if ! command -v rabbitmq-diagnostics >/dev/null; then
    fail "RabbitMQ is not installed here: install it (apt-get install rabbitmq-server) or set SESSIONBUS_TEST_AMQP_URL"
  fi
  if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    log "starting RabbitMQ"
    rabbitmq-server -detached >/dev/null 2>&1 || true
    wait_for RabbitMQ 90 rabbitmq-diagnostics -q ping
  fi
  # The app may be stopped while the node answers (an interrupted fault test).
  if ! rabbitmq-diagnostics -q check_running >/dev/null 2>&1; then
    rabbitmqctl -q start_app >/dev/null 2>&1 || true
    wait_for "RabbitMQ app" 60 rabbitmq-diagnostics -q check_running
  fi
  local management=${SESSIONBUS_TEST_MANAGEMENT_URL:-http://guest:guest@127.0.0.1:15672/}
  if curl -fsS --max-time 5 "${management%/}/api/overview" >/dev/null 2>&1 &&
    port_open 127.0.0.1 5552; then
    return
  fi
  log "enabling ${PLUGINS[*]}"
  if ! rabbitmq-plugins -q enable "${PLUGINS[@]}" >/dev/null; then
    fail "could not enable the broker plugins: run 'rabbitmq-plugins enable ${PLUGINS[*]}' as root"
  fi
  wait_for "RabbitMQ management API" 60 curl -fsS --max-time 5 "${management%/}/api/overview"
  wait_for "RabbitMQ stream port" 60 port_open 127.0.0.1 5552
}

ensure_postgres() {
  local url=${SESSIONBUS_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/test}
  if ! is_local "$url"; then log "PostgreSQL at a remote address: left as it is"; return; fi
  local port
  port=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.urlsplit(sys.argv[1]).port or 5432)' "$url")
  if pg_isready -q -h 127.0.0.1 -p "$port" 2>/dev/null; then return; fi
  if ! command -v pg_ctlcluster >/dev/null; then
    fail "PostgreSQL is not running at 127.0.0.1:$port: start it or set SESSIONBUS_TEST_POSTGRES_URL"
  fi
  log "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start >/dev/null 2>&1 || true
  wait_for PostgreSQL 60 pg_isready -q -h 127.0.0.1 -p "$port"
}

if docker_answers; then
  log "a Docker engine answers: the fixtures start the services in containers"
  exit 0
fi
ensure_rabbitmq
ensure_postgres
