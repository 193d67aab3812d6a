#!/usr/bin/env bash
# What the test suite needs beyond the Python packages (those come from `pip install -e '.[test,test-extra,web,cluster]'`).
# Run on a fresh Debian 12 machine, as root (or a user with sudo); running it again changes nothing.
#   chromium                 the browser tests/web/test_browser.py drives (Debian's build, /usr/bin/chromium)
#   nodejs, npm              run the browser driver, tests/web/e2e.mjs (only installed when `node` is missing)
#   dataset-fashion-mnist    Fashion-MNIST, read by `apa data fashion` and the tests that use it
#   postgresql               the server tests/store/ start in a temporary directory (scripts/postgres.sh)
#   tests/web/node_modules   playwright-core, pinned by tests/web/package-lock.json (`npm ci`; it downloads no browser)
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else echo "install-test-deps: run this script as root (or install sudo) to install: $*" >&2; exit 1
  fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for pkg in chromium dataset-fashion-mnist postgresql; do
  installed "$pkg" || missing+=("$pkg")
done
command -v node >/dev/null && command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-test-deps: apt-get install ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
  echo "install-test-deps: playwright-core needs Node.js 20 or newer; this machine has $(node --version)" >&2
  exit 1
fi

want=$(node -p 'require("./tests/web/package-lock.json").packages["node_modules/playwright-core"].version')
have=$(node -p 'try { require("./tests/web/node_modules/playwright-core/package.json").version } catch (e) { "" }')
if [ "$want" != "$have" ]; then
  echo "install-test-deps: npm ci in tests/web (playwright-core $want)"
  (cd tests/web && npm ci --no-audit --no-fund --loglevel=error)
fi
echo "install-test-deps: chromium $(dpkg-query -W -f='${Version}' chromium), postgresql $(dpkg-query -W -f='${Version}' postgresql), node $(node --version), playwright-core $want"
