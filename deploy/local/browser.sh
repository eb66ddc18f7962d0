#!/usr/bin/env bash
# Make the browser of the console's tests ready: Debian's `chromium`, which Playwright
# drives through its `executable_path` (`playwright install` downloads browser builds
# of its own, which this project does not rely on). `make test` runs it, and so does
# `.ci/run` through `make test`, so a fresh machine needs nothing done by hand.
#
# SESSIONBUS_TEST_CHROMIUM names another binary (then nothing is installed here).
set -euo pipefail

log() { printf '[browser] %s\n' "$*" >&2; }

binary=${SESSIONBUS_TEST_CHROMIUM:-/usr/bin/chromium}
if [[ -x $binary ]]; then
  exit 0
fi
if [[ -n ${SESSIONBUS_TEST_CHROMIUM:-} ]]; then
  log "SESSIONBUS_TEST_CHROMIUM=$binary is not an executable file"
  exit 1
fi
command="apt-get update && apt-get install -y --no-install-recommends chromium"
if [[ $(id -u) -ne 0 ]]; then
  log "Chromium is not installed: run as root: $command"
  exit 1
fi
log "installing Chromium (Debian's package)"
export DEBIAN_FRONTEND=noninteractive
# The package lists may be missing or stale on a fresh machine: one update first.
if ! apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if [[ ! -x $binary ]]; then
  log "apt-get installed chromium, but $binary is still missing"
  exit 1
fi
log "$("$binary" --version 2>/dev/null || echo "$binary")"
