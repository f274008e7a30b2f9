#!/bin/sh
# The station's half of deploy/deploy.sh, run as root in the directory the files were sent to:
#   sh install-on-station.sh DIR [BUNDLE_NAME]
# Nothing is installed until every file has matched SHA256SUMS and the bundle its manifest (checked
# by the binary in the package sent). A config the new binary refuses leaves the station's config
# and bundle as they were.
set -eu

dir="$1"
bundle="${2:-}"
config=/etc/outpost/outpostd.toml
models=/var/lib/outpost/models
say() { echo "deploy: $(hostname): $*" >&2; }
cd "$dir"

sha256sum --check --quiet --strict SHA256SUMS || { say "files were damaged on the way; nothing was installed"; exit 1; }
if [ -n "$bundle" ]; then
  # Every file against the sha256 its manifest records, by the binary about to be installed.
  dpkg-deb --extract outpostd.deb unpacked
  unpacked/usr/bin/outpostd model inspect "$bundle" > /dev/null ||
    { say "the bundle $bundle does not match its manifest; nothing was installed"; exit 1; }
fi
say "what arrived is intact; installing $(dpkg-deb --showformat='${Package} ${Version}' --show outpostd.deb)"

# The station's config is the one sent, never the package's default.
if command -v apt-get > /dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o Dpkg::Options::=--force-confold "./outpostd.deb" >&2
else
  dpkg --force-confold --install outpostd.deb >&2
fi

if [ -n "$bundle" ]; then
  mkdir -p "$models"
  rm -rf "$models/.$bundle.previous"
  [ ! -e "$models/$bundle" ] || mv "$models/$bundle" "$models/.$bundle.previous"
  mv "$bundle" "$models/$bundle"
  # The service's user owns its state directory (systemd hands a new one over at the first start).
  chown -R --reference=/var/lib/private/outpost "$models"
fi

# Checked beside the live config, so that its relative paths mean what they will mean there.
install -m 0640 -o root -g outpost outpostd.toml "$config.new"
if ! outpostd check-config "$config.new" > /dev/null; then
  rm -f "$config.new"
  if [ -n "$bundle" ] && [ -e "$models/.$bundle.previous" ]; then
    rm -rf "$models/$bundle"
    mv "$models/.$bundle.previous" "$models/$bundle"
  fi
  say "the config was refused (above); the station keeps its own config and bundle"
  exit 1
fi
mv "$config.new" "$config"
[ -z "$bundle" ] || rm -rf "$models/.$bundle.previous"

systemctl enable --quiet outpostd.service
if [ -d /run/systemd/system ]; then
  systemctl restart --no-block outpostd.service
  # READY comes once the model has loaded and the broker has answered (within TimeoutStartSec).
  state=activating
  for _ in $(seq 1 200); do
    state=$(systemctl show --property=ActiveState --value outpostd.service)
    [ "$state" = activating ] || break
    sleep 1
  done
  systemctl status --no-pager --lines=5 outpostd.service >&2 || true
  [ "$state" = active ] || { say "outpostd did not start ($state): journalctl -u outpostd says why"; exit 1; }
  say "outpostd is running: $(systemctl show --property=StatusText --value outpostd.service)"
else
  say "installed and enabled; systemd is not running here, so outpostd starts at the next boot"
fi
cd /
rm -rf "$dir"
