#!/usr/bin/env bash
# System packages the tests drive for real: Debian's chromium (the Gradio demo in a headless browser, via
# Playwright) and bubblewrap (the code reward's sandbox). Idempotent; installs only what is missing, and only as root with apt-get (else says what to do).
set -euo pipefail
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_system: missing ${need[*]}; install them (Debian: apt-get install ${need[*]}): the tests that drive them cannot pass without" >&2
  exit 0
fi
echo "setup_system: apt-get install ${need[*]} ..."
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; }
