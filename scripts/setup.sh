#!/usr/bin/env bash
# Installs what building FishChat needs beyond the Rust toolchain: libclang,
# which bindgen uses to generate RocksDB's bindings. Idempotent and quiet when
# everything is already there.
set -euo pipefail

have_libclang() {
  # On Debian, the package is the truth: a fresh machine can carry the
  # libclang runtime without the headers bindgen needs.
  if command -v dpkg >/dev/null; then
    dpkg -s libclang-dev >/dev/null 2>&1
    return
  fi
  ldconfig -p 2>/dev/null | grep -q 'libclang\(-[0-9.]*\)\?\.so'
}

if ! have_libclang; then
  echo "setup: installing libclang-dev (needed by bindgen for RocksDB)" >&2
  sudo_cmd=""
  if [ "$(id -u)" -ne 0 ]; then sudo_cmd="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo_cmd apt-get update -qq
  $sudo_cmd apt-get install -y -qq libclang-dev >/dev/null
fi
