#!/usr/bin/env bash
# Fetches containerd 2.x (Debian sid's package; its static-enough Go binaries run on bookworm) into
# DIR/usr/bin without installing it, for the containerd 2.x snapshotter test. Prints the bin directory.
#   tools/get-containerd2.sh [DIR (default .cache/containerd2)]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.cache/containerd2}
if [[ -x "$dir/usr/bin/containerd" ]]; then
  echo "$PWD/$dir/usr/bin"
  exit 0
fi
apt=$(mktemp -d)
trap 'rm -rf "$apt"' EXIT
mkdir -p "$apt/parts" "$apt/lists/partial" "$apt/cache/archives/partial"
cat >"$apt/parts/sid.sources" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: sid
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
opts=(-o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$apt/parts"
  -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root)
apt-get "${opts[@]}" update -qq >/dev/null
(cd "$apt" && apt-get "${opts[@]}" download containerd >/dev/null 2>&1)
mkdir -p "$dir"
dpkg-deb -x "$apt"/containerd_*.deb "$dir"
"$dir/usr/bin/containerd" --version >&2
echo "$PWD/$dir/usr/bin"
