#!/bin/bash
# Follows README.md's "Run as a system service" install commands word for word
# inside a Debian 12 container booted with systemd as PID 1 (systemd-nspawn),
# then checks what the section promises: the unit starts (Type=notify), mail is
# accepted and filed, reload works and a broken file is refused, the watchdog
# restarts a stopped process, socket activation (gateway.socket) passes the
# SMTP and DNS sockets, and stop is clean.
#
# Usage, as root on a Debian machine, from a clone of the repository:
#   bash systemd/try-install.sh [ROOTFS]      (ROOTFS: /var/tmp/gateway-sysroot)
# Needs: debootstrap, systemd-container, swaks, dig; downloads Debian packages
# and the gateway's dependencies from PyPI. The container shares the machine's
# network, so ports 25, 53 and 9100 on this machine must be free while it runs.
set -eu  # not pipefail: "| grep -q" stops reading early on purpose

repo=$(cd "$(dirname "$0")/.." && pwd)
root=${1:-/var/tmp/gateway-sysroot}
fail() { echo "FAILED: $*" >&2; exit 1; }

for port in 25 53 9100; do
    ! ss -Hltnu "sport = :$port" | grep -q . || fail "port $port is in use on this machine"
done
if [ ! -x "$root/usr/lib/systemd/systemd" ]; then
    debootstrap --variant=minbase \
        --include=systemd,systemd-sysv,dbus,python3,python3-venv,ca-certificates,iproute2,procps \
        bookworm "$root" http://deb.debian.org/debian
fi
# This machine's extra certificate authorities (a TLS-inspecting proxy), if any.
cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
rm -rf "$root/root/gateway" "$root/opt/gateway" "$root/etc/gateway" "$root/var/lib/gateway" \
    "$root/etc/systemd/system/gateway."*
git clone -q "$repo" "$root/root/gateway"
chroot "$root" userdel gateway 2>/dev/null || true
echo gateway-test > "$root/etc/hostname"

systemd-nspawn -D "$root" -b --register=no --keep-unit --console=passive >"$root.log" 2>&1 &
nspawn=$!
init=""
for _ in $(seq 100); do
    init=$(pgrep -P "$nspawn" -x systemd || true)
    [ -n "$init" ] && break
    sleep 0.1
done
[ -n "$init" ] || fail "the container did not boot: $(cat "$root.log")"
run() {
    nsenter -t "$init" -m -u -i -p -- \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"
}
cleanup() { run systemctl poweroff >/dev/null 2>&1 || kill "$nspawn"; wait "$nspawn" || true; }
trap cleanup EXIT
for _ in $(seq 100); do
    state=$(run systemctl is-system-running 2>/dev/null || true)
    case "$state" in running|degraded) break ;; esac
    sleep 0.2
done
run update-ca-certificates >/dev/null 2>&1 || true

echo "== the README's install commands"
sed -n '/^## Run as a system service/,/^## /p' "$repo/README.md" \
    | sed -n '/^```sh$/,/^```$/p' | sed '1d;$d' | head -n 20 > "$root/root/install.sh"
cat "$root/root/install.sh"
run bash -c "cd /root/gateway && set -ex && . /root/install.sh"
sleep 1
run systemctl is-active gateway || fail "gateway.service is not active"
run systemctl show -p StatusText --value gateway

echo "== mail is accepted and filed"
swaks --server 127.0.0.1:25 --to alice@example.test --from bob@example.org \
    --header "Subject: try-install" > "$root.swaks" 2>&1 || true
grep -q "queued as" "$root.swaks" || fail "mail not accepted: $(tail -5 "$root.swaks")"
for _ in $(seq 50); do
    [ -n "$(ls "$root/var/lib/gateway/mail/new" 2>/dev/null)" ] && break
    sleep 0.1
done
[ -n "$(ls "$root/var/lib/gateway/mail/new" 2>/dev/null)" ] || fail "mail not filed"

echo "== reload, then a broken file is refused and the gateway keeps running"
run systemctl reload gateway
cp "$root/etc/gateway/routes.yaml" "$root/root/routes.good"
echo "bogus: 1" >> "$root/etc/gateway/routes.yaml"
! run systemctl reload gateway || fail "systemctl reload succeeded with a broken file"
sleep 0.5
run journalctl -u gateway --no-pager | grep -q "was not asked to reload" || fail "no refusal logged"
cp "$root/root/routes.good" "$root/etc/gateway/routes.yaml"
run systemctl is-active gateway || fail "the gateway stopped after a broken reload"
curl -sf http://127.0.0.1:9100/readyz >/dev/null || fail "/readyz is not ready"

echo "== the watchdog restarts a stopped event loop (up to 45 s)"
main=$(run systemctl show -p MainPID --value gateway)
run kill -STOP "$main"
for _ in $(seq 90); do
    [ "$(run systemctl show -p NRestarts --value gateway)" -ge 1 ] && break
    sleep 0.5
done
run journalctl -u gateway --no-pager | grep -q "Watchdog timeout" || fail "no watchdog restart"
for _ in $(seq 50); do
    run systemctl is-active -q gateway && break
    sleep 0.2
done

echo "== socket activation: gateway.socket passes SMTP 25 and DNS 53 (UDP and TCP)"
sed -i 's|^    listen: tcp:25 .*|    listen: systemd:domain=INET6:index=0|;
        s|^    listen: \["udp:53:interface=127.0.0.1", "tcp:53:interface=127.0.0.1"\]|    listen: [udp:systemd:index=1, systemd:domain=INET6:index=2]|' \
    "$root/etc/gateway/routes.yaml"
grep -q "udp:systemd:index=1" "$root/etc/gateway/routes.yaml" || fail "routes.yaml not edited"
run systemctl stop gateway
run systemctl enable --now gateway.socket
run systemctl start gateway
sleep 1
swaks --server 127.0.0.1:25 --to carol@example.test --from bob@example.org \
    | grep -q "queued as" || fail "mail not accepted on the passed socket"
# No resolver runs on 127.0.0.1:5301, so SERVFAIL after the 2 s timeout is the answer.
dig +time=5 +tries=1 @127.0.0.1 www.example.test | grep -q "status: SERVFAIL" || fail "no UDP answer"
dig +tcp +time=5 +tries=1 @127.0.0.1 www.example.test | grep -q "status: SERVFAIL" \
    || fail "no TCP answer"

echo "== stop"
run systemctl stop gateway.socket gateway
[ "$(run systemctl show -p Result --value gateway)" = success ] || fail "stop was not clean"
run systemd-analyze security gateway --no-pager | tail -1
echo "OK: the README's install works under systemd"
