#!/usr/bin/env bash
# Install headless Chromium and its WebDriver from Debian's packages for the MLflow UI browser
# test (tests/test_report.py). The browser cannot be downloaded at run time here, so it comes
# from apt. Safe to run again: does nothing when both are already installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  echo "chromium: $(chromium --version 2>/dev/null | head -1)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "ci_browser.sh: need root (or sudo) to apt-get install chromium chromium-driver" >&2
    exit 1
  fi
fi
echo "installing chromium and chromium-driver (apt-get)"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  chromium chromium-driver >/dev/null
echo "chromium: $(chromium --version 2>/dev/null | head -1)"
