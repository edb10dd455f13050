#!/usr/bin/env bash
# System packages the test suite needs beyond the Python ones: Debian's chromium, driven by
# Playwright in tests/test_serve_api.py (Playwright's own browser downloads are never used).
# Called by `make test`. Installs as root through apt-get; otherwise says what to run.
set -euo pipefail

if [[ -x /usr/bin/chromium ]]; then
    exit 0
fi
if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "install_test_deps: installing chromium (apt-get) for the web page test" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
    exit 0
fi
echo "install_test_deps: /usr/bin/chromium is missing and cannot be installed from here." >&2
echo "  As root on Debian/Ubuntu:  apt-get update && apt-get install -y chromium" >&2
echo "  Without it the browser test is skipped (and fails when CI=true)." >&2
exit 0
