#!/usr/bin/env bash
# Headless browser for tests/test_app_browser.py: Debian's chromium and the chromedriver built with it.
# Selenium drives them through the system chromedriver, so no browser or driver is downloaded at test time.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq chromium chromium-driver
