#!/bin/bash
# Follows README.md word for word on a bare Debian 12 (a debootstrap'ed root, in a
# chroot): installs python3-venv as the README says, runs the first command
# (the gateway on the default routes.yaml) until it is ready, as root and as a
# user, takes the tour's /metrics, installs the test peers with the script the
# README names, and runs the README's test command. Exit 0 if all of it works.
#
# Usage, as root on a Debian machine, from a clone of the repository:
#   bash tests/try-readme.sh [ROOTFS]      (ROOTFS: /var/tmp/gateway-readme-root)
# Needs debootstrap (installed if missing); downloads Debian packages and the
# gateway's dependencies from PyPI; takes 20-30 minutes, most of it the tests.
# The chroot shares this machine's network: the ports of the default routes.yaml
# (2525, 5870, 1119, 5353, 8080, 9100 on 127.0.0.1) must be free while it runs.
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
root=${1:-/var/tmp/gateway-readme-root}
fail() { echo "FAILED: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root (it builds and enters a chroot)"
command -v debootstrap >/dev/null || apt-get install -y --no-install-recommends debootstrap

if [ ! -x "$root/usr/bin/python3" ]; then
    debootstrap --variant=minbase --include=python3,ca-certificates,git \
        bookworm "$root" http://deb.debian.org/debian
fi
cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
cp /etc/resolv.conf "$root/etc/resolv.conf"
for fs in proc sys dev dev/pts; do
    mountpoint -q "$root/$fs" || mount --bind "/$fs" "$root/$fs"
done
mountpoint -q "$root/tmp" || mount -t tmpfs tmpfs "$root/tmp"
cleanup() {
    for fs in tmp dev/pts dev sys proc; do umount -l "$root/$fs" 2>/dev/null || true; done
}
trap cleanup EXIT
run() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 "$@"; }
run update-ca-certificates >/dev/null 2>&1 || true
rm -rf "$root/root/gateway" "$root/home/tester/gateway"
git clone -q "$repo" "$root/root/gateway"

# The README's commands: the prerequisite, the first two sh blocks, the peers line.
readme="$repo/README.md"
blocks=$(awk '/^```sh$/ {n++; inside=1; next} /^```$/ {inside=0; next} inside && n<=2 {print n": "$0}' "$readme")
first=$(printf '%s\n' "$blocks" | sed -n 's/^1: //p')
second=$(printf '%s\n' "$blocks" | sed -n 's/^2: //p')
venv=$(grep -o '`apt-get install -y python3-venv`' "$readme" | head -1 | tr -d '`')
peers=$(grep -m1 '^bash tests/install-peers.sh' "$readme" | sed 's/ *#.*//')
[ -n "$first" ] && [ -n "$second" ] && [ -n "$venv" ] && [ -n "$peers" ] ||
    fail "README.md does not have the commands this script follows"
printf '== the README says\n%s\n%s\n%s\n%s\n' "$venv" "$first" "$peers" "$second"

echo "== $venv (as root, no sudo)"
run bash -c "apt-get update -q && DEBIAN_FRONTEND=noninteractive $venv"

first_command() {  # $1: who runs it; the gateway runs until it is ready, then stops
    local home=$1 log=$1/first.log
    run bash -c "cd $home/gateway && setsid bash -c \"$first\" >$log 2>&1 &"
    for _ in $(seq 300); do
        grep -q "gateway ready" "$root$log" 2>/dev/null && break
        grep -q "Traceback\|error:" "$root$log" 2>/dev/null && break
        sleep 1
    done
    grep -q "gateway ready" "$root$log" || fail "the first command did not start the gateway: $(tail -20 "$root$log")"
}

echo "== the first command, as root"
first_command /root
run bash -c "curl -sf http://127.0.0.1:9100/metrics 2>/dev/null || python3 -c \"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9100/metrics').read().decode())\"" |
    grep -q '^gateway_ready 1' || fail "/metrics of the default routes.yaml does not say ready"
stop_first() {  # $1: the clone; the running gateway names its pid in its status file
    local status=$1/var/spool/gateway.status pid
    pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$status")
    [ -n "$pid" ] || fail "no pid in $status"
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    fail "the gateway $pid did not stop on SIGTERM"
}
stop_first "$root/root/gateway"

echo "== the first command, as a user"
run useradd -m tester 2>/dev/null || true
git clone -q "$repo" "$root/home/tester/gateway"
chroot "$root" chown -R tester: /home/tester/gateway
first_user() {
    chroot --userspec=tester:tester "$root" env -i PATH=/usr/bin:/bin HOME=/home/tester LANG=C.UTF-8 \
        bash -c "cd /home/tester/gateway && setsid bash -c \"$first\" >/home/tester/first.log 2>&1 &"
    for _ in $(seq 300); do
        grep -q "gateway ready" "$root/home/tester/first.log" 2>/dev/null && return 0
        sleep 1
    done
    fail "the first command did not start the gateway as a user: $(tail -20 "$root/home/tester/first.log")"
}
first_user
stop_first "$root/home/tester/gateway"

echo "== $peers (as root)"
run bash -c "cd /root/gateway && $peers"
echo "== $second"
run bash -c "cd /root/gateway && CI=true $second" || fail "the README's test command failed"
echo "== the README works on a bare Debian 12"
