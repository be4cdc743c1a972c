#!/usr/bin/env bash
# System packages the project needs: Debian's Chromium (real-browser tests and link benchmarks), Firefox ESR (the
# cross-browser room test), iproute2 (network namespaces for WebRTC tests), npm (browser assets come from the npm
# registry). Installs only what is missing.
set -euo pipefail

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium chromium-driver)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v npm >/dev/null 2>&1 || need+=(npm)
command -v tc >/dev/null 2>&1 || need+=(iproute2)
command -v firefox-esr >/dev/null 2>&1 || need+=(firefox-esr)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

if [ ${#need[@]} -eq 0 ]; then
  echo "[system] chromium, firefox-esr, iproute2, npm, python3-venv: present"
  exit 0
fi
echo "[system] installing: ${need[*]}"
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1; then
  sudo=(sudo)
else
  echo "[system] error: need root or sudo to apt-get install ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "[system] installed: ${need[*]}"
