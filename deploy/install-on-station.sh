#!/bin/sh
# The station's half of deploy/deploy.sh, run as root in the directory the files were sent to:
#   sh install-on-station.sh DIR [BUNDLE_NAME]
# Nothing changes until every file matches SHA256SUMS, the bundle its manifest, and the new config
# passes `check-config`, all checked by the binary in the package sent. Then the config and bundle
# go in place, the package is installed, and the service restarts and must become ready; the
# bundle it replaced is kept until it has.
set -eu

dir="$1"
bundle="${2:-}"
config=/etc/outpost/outpostd.toml
models=/var/lib/outpost/models
say() { echo "deploy: $(hostname): $*" >&2; }
trap 'cd / && rm -rf "$dir"' EXIT
cd "$dir"

sha256sum --check --quiet --strict SHA256SUMS || { say "files were damaged on the way; nothing was changed"; exit 1; }
arch=$(dpkg-deb --field outpostd.deb Architecture)
[ "$arch" = "$(dpkg --print-architecture)" ] ||
  { say "the package is for $arch, this station is $(dpkg --print-architecture); nothing was changed"; exit 1; }
dpkg-deb --extract outpostd.deb unpacked
new=unpacked/usr/bin/outpostd
if [ -n "$bundle" ]; then
  "$new" model inspect "$bundle" > /dev/null ||
    { say "the bundle $bundle does not match its manifest; nothing was changed"; exit 1; }
  # The state directory as the package makes it (a DynamicUser= layout), for a first deploy.
  if [ ! -e /var/lib/outpost ] && [ ! -L /var/lib/outpost ]; then
    install -d -m 0700 /var/lib/private /var/lib/private/outpost
    ln -s private/outpost /var/lib/outpost
  fi
  mkdir -p "$models"
  rm -rf "$models/.$bundle.previous"
  [ ! -e "$models/$bundle" ] || mv "$models/$bundle" "$models/.$bundle.previous"
  mv "$bundle" "$models/$bundle"
fi
put_back_bundle() {
  if [ -n "$bundle" ]; then
    rm -rf "${models:?}/$bundle"
    [ ! -e "$models/.$bundle.previous" ] || mv "$models/.$bundle.previous" "$models/$bundle"
  fi
}

# Checked beside the live config, so that its relative paths mean what they will mean there.
mkdir -p /etc/outpost
install -m 0640 outpostd.toml "$config.new"
if ! "$new" check-config "$config.new" > /dev/null; then
  rm -f "$config.new"
  put_back_bundle
  say "the config was refused (above); nothing was changed"
  exit 1
fi
mv "$config.new" "$config"
say "what arrived is intact and the config passes; installing $(dpkg-deb --showformat='${Package} ${Version}' --show outpostd.deb)"

# The station's config is the one just put in place, never the package's default; the same
# version again is installed again (a rebuild), an older one too (a rollback).
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall --allow-downgrades \
  -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confold "./outpostd.deb" >&2; then
  say "the package did not install (above); the new config and bundle are in place${bundle:+, the previous bundle is $models/.$bundle.previous}"
  exit 1
fi
# The service's user owns its state directory (systemd hands a new one over at the first start).
[ -z "$bundle" ] || chown -R --reference=/var/lib/outpost/ "$models"

systemctl enable --quiet outpostd.service
if [ -d /run/systemd/system ]; then
  # Blocks until READY (the model loaded, the broker answered) or failure, within TimeoutStartSec.
  timeout 300 systemctl restart outpostd.service || true
  systemctl status --no-pager --lines=5 outpostd.service >&2 || true
  if ! systemctl is-active --quiet outpostd.service; then
    say "outpostd did not start: journalctl -u outpostd says why${bundle:+; the previous bundle is $models/.$bundle.previous}"
    exit 1
  fi
  say "outpostd is running: $(systemctl show --property=StatusText --value outpostd.service)"
else
  say "installed and enabled; systemd is not running here, so outpostd starts at the next boot"
fi
[ -z "$bundle" ] || rm -rf "$models/.$bundle.previous"
