#!/usr/bin/env bash
# Installs the programs the test suite drives (mail, news, DNS, web peers) and
# python3-venv, with apt-get on Debian 12. Needs root: run it as root, or as a
# user with sudo (it asks sudo for itself). Safe to run again: it installs only
# what is missing. .ci/run runs it; README.md names it.
set -euo pipefail

if [[ $(id -u) != 0 ]]; then
    exec sudo --preserve-env=DEBIAN_FRONTEND bash "$0" "$@"
fi
export DEBIAN_FRONTEND=noninteractive

step="start"
section() {
    step=$*
    printf '\n==== %s ====\n' "$step"
}
trap 'printf "\ninstalling the test peers FAILED in step: %s (exit status %s)\n" "$step" "$?" >&2' ERR

fail() {
    printf '\ninstalling the test peers FAILED: %s\n' "$*" >&2
    exit 1
}

# Debian packages the integration tests drive, one "package:program" per entry;
# the install step is skipped when every program is already there.
PEER_PACKAGES=(
    postfix:/usr/sbin/smtp-sink
    postfix:/usr/sbin/smtp-source
    swaks:/usr/bin/swaks
    # DNS and web peers. dnsutils brings dig through bind9-dnsutils and
    # nginx-light brings nginx plus its echo module; both are the names to install.
    unbound:/usr/sbin/unbound
    unbound:/usr/sbin/unbound-checkconf
    dnsdist:/usr/bin/dnsdist
    dnsutils:/usr/bin/dig
    knot-dnsutils:/usr/bin/kdig
    curl:/usr/bin/curl
    dnsperf:/usr/bin/dnsperf
    nghttp2-client:/usr/bin/h2load
    nginx-light:/usr/sbin/nginx
    wrk:/usr/bin/wrk
    openssl:/usr/bin/openssl
    # The TLS scanner the listeners' TLS is checked with.
    testssl.sh:/usr/bin/testssl
    iproute2:/usr/bin/ss
    # gateway graph --format svg draws with Graphviz's dot.
    graphviz:/usr/bin/dot
    # The admin dashboard is tested in a real browser (Selenium drives Debian's chromium).
    chromium:/usr/bin/chromium
    chromium-driver:/usr/bin/chromedriver
    # TFTP clients: tftp-hpa (plain RFC 1350), atftp (blksize, windowsize, timeout).
    tftp-hpa:/usr/bin/tftp
    atftp:/usr/bin/atftp
    # FTP: vsftpd is the FTP server uploads are delivered to, lftp a second client.
    vsftpd:/usr/sbin/vsftpd
    lftp:/usr/bin/lftp
    # SFTP: OpenSSH's sshd (a private instance) takes uploads, sftp checks them.
    openssh-server:/usr/sbin/sshd
    openssh-client:/usr/bin/sftp
    openssh-client:/usr/bin/ssh-keygen
    # systemd's tools only (no init): socket activation and unit checks.
    systemd:/usr/bin/systemd-socket-activate
    systemd:/usr/bin/systemd-analyze
    # The news server; installed last and in two steps (install_inn2 below).
    inn2:/usr/lib/news/bin/innd
    inn2:/usr/lib/news/bin/ctlinnd
    inn2:/usr/lib/news/bin/rc.news
)

step="start"
section() {
    step=$*
    printf '\n==== %s ====\n' "$step"
}
trap 'printf "\nCI FAILED in step: %s (exit status %s)\n" "$step" "$?" >&2' ERR

fail() {
    printf '\nCI FAILED: %s\n' "$*" >&2
    exit 1
}

inn2_configured() {
    # shellcheck disable=SC2016 # ${Status} is dpkg-query's field, not a shell variable
    [[ $(dpkg-query -W -f='${Status}' inn2 2>/dev/null || true) == "install ok installed" ]]
}

# inn2 after postfix: inn2 needs a mail transport agent and, with none there,
# apt picks exim4, which conflicts with postfix. Its postinst needs a domain,
# which a host name without a dot does not give: the first install unpacks
# /etc/news/inn.conf and exits 100; with domain and bindaddress set there, the
# same install finishes the configuration. Safe to run again at any stage.
install_inn2() {
    local conf=/etc/news/inn.conf
    inn2_configured && return 0
    # The postinst adds "usenet: root" to /etc/aliases and runs newaliases, which
    # fails (exit 75) with postfix installed as a toolbox without main.cf: give
    # the alias first, so the postinst has nothing to add.
    if [[ -f /etc/aliases ]] && ! grep -q '^usenet:' /etc/aliases; then
        printf 'usenet: root\n' >>/etc/aliases
    fi
    if apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends inn2; then
        return 0
    fi
    echo "inn2's first install stopped in its postinst (expected when the host name has no domain);"
    echo "setting domain and bindaddress in $conf and installing again."
    [[ -f $conf ]] || fail "installing inn2 left no $conf; see apt-get's output above."
    # Fill in the empty "domain:" and "bindaddress:" lines (a second line of the
    # same key is an error to INN), or add them when there are none.
    sed -i -E 's/^domain:[[:space:]]*$/domain: localdomain/;
               s/^bindaddress:[[:space:]]*$/bindaddress: 127.0.0.1/' "$conf"
    grep -Eq '^domain:' "$conf" || printf 'domain: localdomain\n' >>"$conf"
    grep -Eq '^bindaddress:' "$conf" || printf 'bindaddress: 127.0.0.1\n' >>"$conf"
    apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends inn2
    inn2_configured || fail "inn2 is installed but not configured (dpkg-query -W inn2); see apt-get's output above."
}

section "System packages"
missing=()
packages=()
for entry in "${PEER_PACKAGES[@]}"; do
    package=${entry%%:*}
    program=${entry#*:}
    [[ " ${packages[*]} " == *" $package "* ]] || packages+=("$package")
    [[ -x $program ]] || missing+=("$program")
done
# A failed first install leaves inn2's programs in place but the package unconfigured.
inn2_configured || missing+=("inn2's configuration")
# Debian's own python3 makes virtualenvs only with python3-venv installed.
if [[ $(command -v python3 || true) == /usr/bin/python3 ]] &&
    ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    missing+=("python3's ensurepip")
    packages+=(python3-venv)
fi
if ((${#missing[@]} == 0)); then
    echo "All peer programs are present (${packages[*]}); skipping apt-get."
else
    echo "Missing: ${missing[*]}"
    echo "Installing: ${packages[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update
    # Postfix only as a toolbox (smtp-sink, smtp-source): no main.cf, no daemon.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    first=()
    for package in "${packages[@]}"; do
        [[ $package == inn2 ]] || first+=("$package")
    done
    # Packages start their system daemons on install (sshd on 22, vsftpd on 21): the
    # tests run private instances only, so the install may start none.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${first[@]}"
    install_inn2
    for entry in "${PEER_PACKAGES[@]}"; do
        [[ -x ${entry#*:} ]] ||
            fail "apt-get installed ${entry%%:*}, but ${entry#*:} is still missing."
    done
fi
