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
bin=$(tools/get-sid-package.sh "$dir" containerd)
"$bin/containerd" --version >&2
echo "$bin"
