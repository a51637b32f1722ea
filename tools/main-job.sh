#!/usr/bin/env bash
# The main job, end to end: what lazyblk is for. Installs what it needs (Debian packages), builds
# lazyblk, brings up a local docker-registry, containerd 1.6, the lazyblk node daemon and snapshotter
# (all on 127.0.0.1 / unix sockets in a temp dir), builds a real image from Debian packages (nginx),
# converts it with `lazyblk convert`, then from a cold state starts it twice: once after containerd's
# full pull (overlayfs), once lazily from lazyblk block devices — and prints both readiness figures
# (create → first HTTP 200) and `lazyblk ls` while the lazy container runs. Leaves nothing behind.
#   tools/main-job.sh [--images nginx,numpy] [--runs N]     (as root; re-runs itself with sudo if not)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $EUID -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "run as root (block devices, mounts, containerd)" >&2; exit 1; }
  exec sudo -E PATH="$PATH" "$0" "$@"
fi
tools/install-deps.sh
images=nginx
runs=1
while (($#)); do
  case $1 in
    --images) images=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
exec python3 tools/bench/readiness.py --images "$images" --runs "$runs" --modes overlayfs,lazyblk \
  --show-ls --out .cache/main-job
