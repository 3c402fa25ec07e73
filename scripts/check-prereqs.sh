#!/usr/bin/env bash
# What `make test` needs beyond the Rust toolchain, checked first: one line says what is
# missing and how to install it (Debian/Ubuntu). Redis and Qdrant are started by the tests'
# wrappers (scripts/redis-server.sh, scripts/qdrant-server.sh), but redis-server must exist.
set -u
missing=()
command -v cc >/dev/null || missing+=(gcc)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v python3 >/dev/null || missing+=(python3)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  echo "make test needs: ${missing[*]}. Install them with: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
