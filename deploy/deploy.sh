#!/usr/bin/env bash
# Installs outpostd on a station over ssh: the package, the station's config and a model bundle,
# every file checked on arrival, then (re)starts the service. Nothing on the station changes
# until everything sent has arrived intact and the new config passes `outpostd check-config`
# (deploy/install-on-station.sh, the station's half, says how).
#
#   bash deploy/deploy.sh [-p PORT] [-i IDENTITY] [-o SSH_OPTION]... USER@HOST \
#       --package outpostd_VERSION_arm64.deb --config STATION.toml [--bundle MODEL_DIR]
#
# The bundle lands in /var/lib/outpost/models/<its directory's name>, where the config's
# `[model] bundle` must name it. Leave --bundle out to keep the one the station has (a package or
# config update). A USER other than root needs sudo on the station. deploy/debian/README.md has
# the whole procedure.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

usage() {
  sed -n '6,7p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
fail() {
  echo "deploy: $*" >&2
  exit 1
}

ssh_options=(-o BatchMode=yes -o ConnectTimeout=15)
scp_options=("${ssh_options[@]}")
station="" package="" config="" bundle=""
while (($#)); do
  case "$1" in
    -p) ssh_options+=(-p "$2"); scp_options+=(-P "$2"); shift 2 ;;
    -i) ssh_options+=(-i "$2"); scp_options+=(-i "$2"); shift 2 ;;
    -o) ssh_options+=(-o "$2"); scp_options+=(-o "$2"); shift 2 ;;
    --package) package="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --bundle) bundle="${2%/}"; shift 2 ;;
    -h | --help) usage ;;
    -*) echo "deploy: unknown option $1" >&2; usage ;;
    *) [ -z "$station" ] || usage; station="$1"; shift ;;
  esac
done
[ -n "$station" ] && [ -n "$package" ] && [ -n "$config" ] || usage

# What is sent, checked here first: a mistake found on the station costs a slow copy.
[ -f "$package" ] || fail "--package $package: no such file"
name=$(dpkg-deb --field "$package" Package 2>/dev/null) || fail "--package $package: not a Debian package"
[ "$name" = outpostd ] || fail "--package $package: holds $name, not outpostd"
[ -f "$config" ] || fail "--config $config: no such file"
if [ -n "$bundle" ]; then
  [ -f "$bundle/manifest.json" ] || fail "--bundle $bundle: no manifest.json, not a model bundle (deploy/models/README.md)"
  grep -qF "\"/var/lib/outpost/models/$(basename "$bundle")\"" "$config" ||
    fail "--config $config: its [model] bundle must be \"/var/lib/outpost/models/$(basename "$bundle")\", where the bundle goes"
fi

# The files travel with a list of their sha256 sums, which the station checks before it installs
# anything.
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
cp "$package" "$staging/outpostd.deb"
cp "$config" "$staging/outpostd.toml"
cp "$here/install-on-station.sh" "$staging/"
send=("$staging/outpostd.deb" "$staging/outpostd.toml" "$staging/install-on-station.sh")
(cd "$staging" && sha256sum outpostd.deb outpostd.toml install-on-station.sh) > "$staging/SHA256SUMS"
if [ -n "$bundle" ]; then
  (cd "$(dirname "$bundle")" && find "$(basename "$bundle")" -type f -print0 | sort -z | xargs -0 sha256sum) >> "$staging/SHA256SUMS"
  send+=("$bundle")
fi
echo "deploy: sending $(basename "$package")${bundle:+, the bundle $(basename "$bundle") ($(du -sh "$bundle" | cut -f1))} and $(basename "$config") to $station" >&2

# A directory of its own, readable by the login user alone: the config may hold the broker's
# password. The station's script removes it, whatever happens there.
remote_dir=$(ssh "${ssh_options[@]}" "$station" 'umask 077 && mktemp -d /var/tmp/outpost-deploy.XXXXXX') ||
  fail "cannot reach $station over ssh (key-based login is needed: ssh-copy-id $station)"
scp -q -r "${scp_options[@]}" "${send[@]}" "$station:$remote_dir/" || fail "copying to $station failed"
scp -q "${scp_options[@]}" "$staging/SHA256SUMS" "$station:$remote_dir/" || fail "copying to $station failed"

sudo="sudo -n"
[ "$(ssh "${ssh_options[@]}" "$station" id -u)" = 0 ] && sudo=""
install=$(printf '%q ' sh "$remote_dir/install-on-station.sh" "$remote_dir" ${bundle:+"$(basename "$bundle")"})
ssh "${ssh_options[@]}" "$station" "$sudo $install" || fail "installing on $station failed (see above)"
