#!/usr/bin/env bash
# Unpacks Debian sid packages into DIR without installing them (their Go binaries run on bookworm):
# containerd 2.x for the snapshotter tests, the lazy-loading peers for the readiness benchmark.
# Prints DIR/usr/bin.
#   tools/get-sid-package.sh DIR PACKAGE...
set -euo pipefail
dir=$1
shift
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
(cd "$apt" && apt-get "${opts[@]}" download "$@" >/dev/null 2>&1)
mkdir -p "$dir"
for p in "$@"; do
  dpkg-deb -x "$apt/${p}"_*.deb "$dir"
done
echo "$(cd "$dir" && pwd)/usr/bin"
