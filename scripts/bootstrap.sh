#!/usr/bin/env bash
# Idempotent set-up of a MOAT machine (Debian 12, Ubuntu 22.04/24.04), run as root.
# Installs the system packages MOAT drives (Mininet, iproute2, tshark, sshd, dnsmasq binary,
# iperf3) and builds .venv from the system Python with --system-site-packages so the
# Debian-packaged `mininet` module is visible inside it. A second run only checks.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$here/.venv"
stamp="$venv/.moat-bootstrap"

apt_packages=(
  mininet iproute2 bridge-utils iputils-ping iptables tshark openssh-server
  iperf3 dnsmasq-base python3-venv python3-pip ethtool procps psmisc ruby tcpdump
  # A bare debian:12 container lacks these: .ci/run runs make, pip needs the CA
  # certificates, the unit tests parse the CI workflow with yaml.
  make ca-certificates python3-yaml
  # The eBPF GRE backend, issue 16: clang compiles bpf/moat_gre.c, libbpf-dev has its
  # headers, bpftool loads and pins it; Ubuntu ships bpftool in linux-tools, added below.
  clang llvm libbpf-dev
)
if apt-cache show bpftool >/dev/null 2>&1; then
  apt_packages+=(bpftool)
else
  apt_packages+=(linux-tools-common "linux-tools-$(uname -r)")
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "bootstrap.sh: run as root (sudo make setup, or as root: make setup)" >&2
  exit 1
fi

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # tshark asks whether non-root users may capture; answer it here so apt never prompts.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Mobile objects need no user account: each runs as a uid (and gid) of its own from the range
# 620000-629999 (MOAT_OBJECT_UIDS=FIRST-LAST changes it), claimed by its agent, without a
# passwd entry; a uid a user, a group or /etc/subuid holds is skipped
# (agent/hosting/object_uids.py).

# The remote site's SFTP account (topologies/site.py): unprivileged, no home, no shell,
# chrooted into the repository by the site's sshd. Password '*' (none can match) rather than
# a locked '!': sshd without PAM refuses a locked account even for key logins.
if ! getent passwd moat-site >/dev/null; then
  echo "bootstrap: creating system user moat-site"
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
          --shell /usr/sbin/nologin --password '*' moat-site
fi

# Debian's openssh-server enables a system sshd; MOAT starts its own per remote site, so the
# system one is left as the distribution configured it.

py=/usr/bin/python3
if [ ! -x "$venv/bin/python" ]; then
  echo "bootstrap: creating $venv from $py"
  "$py" -m venv --system-site-packages "$venv"
fi

# Re-install the project only when its metadata changed since the last successful run.
sum="$(sha256sum "$here/pyproject.toml" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$sum" ]; then
  echo "bootstrap: installing moat (editable, with test extras) into $venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e "$here[test]"
  echo "$sum" > "$stamp"
fi

"$venv/bin/python" -c "import mininet.net, scapy" && echo "bootstrap: ok (mininet + scapy importable in $venv)"
