#!/usr/bin/env bash
# Installs Debian's redis-server (redis-server + redis-cli) when missing: the Redis-mode tests
# (crates/skyreels-server/tests/api/redis.rs, scripts/test_cluster.sh) start their own instances.
set -euo pipefail
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    exit 0
fi
echo "installing redis-server (Debian package)"
sudo_=""
[ "$(id -u)" = 0 ] || sudo_="sudo"
install() { $sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >/dev/null; }
install || { $sudo_ apt-get update -q >/dev/null && install; }
# the package's own service is not ours to run: the tests start their instances on free ports
if command -v systemctl >/dev/null && systemctl is-active --quiet redis-server 2>/dev/null; then
    $sudo_ systemctl stop redis-server || true
fi
