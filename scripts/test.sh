#!/usr/bin/env bash
# Runs the whole test suite. Installs what the machine lacks first:
#   - redis-server and redis-cli (for the Redis store tests), with apt-get when missing.
# Usage: scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

ensure_redis() {
  if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    return 0
  fi
  if [ -n "${REDIS_URL:-}" ]; then
    echo "test.sh: redis-server not installed; using REDIS_URL=${REDIS_URL} for the Redis tests"
    return 0
  fi
  echo "test.sh: redis-server is missing; installing it with apt-get"
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
      echo "test.sh: cannot install redis-server: not root and no sudo. Install it yourself (apt-get install redis-server) or set REDIS_URL." >&2
      exit 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: cannot install redis-server: no apt-get on this machine. Install Redis 7+ yourself or set REDIS_URL." >&2
    exit 1
  fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server redis-tools >/dev/null
  command -v redis-server >/dev/null 2>&1 || { echo "test.sh: apt-get did not provide redis-server" >&2; exit 1; }
}

ensure_redis
cargo test --workspace --all-targets "$@"
cargo test --workspace --doc
