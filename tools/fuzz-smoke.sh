#!/usr/bin/env bash
# Short, seeded runs of every fuzz target: blob/index parsing, tar conversion, registry answers
# (manifests, indexes, referrers, auth challenges, traces), NBD client sessions, netlink replies. cargo-fuzz needs nightly
# features; RUSTC_BOOTSTRAP=1 enables them on the stable toolchain this project uses.
#   tools/fuzz-smoke.sh [SECONDS_PER_TARGET]   (default 20)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-20}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
export RUSTC_BOOTSTRAP=1
(cd image-format && cargo fuzz run parse_blob -- -seed=1 -max_total_time="$secs" -max_len=4096)
mkdir -p fuzz/corpus/convert_tar
(cd fuzz && cargo fuzz run convert_tar corpus/convert_tar seeds/convert_tar -- -seed=1 -max_total_time="$secs" -max_len=65536)
for t in registry_answers nbd_session netlink_reply; do
  mkdir -p "fuzz/corpus/$t"
  (cd fuzz && cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- -seed=1 -max_total_time="$secs" -max_len=8192)
done
echo "fuzz smoke: no crashes"
