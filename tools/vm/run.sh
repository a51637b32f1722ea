#!/usr/bin/env bash
# Boots the prepared VM (TCG; KVM is not available on these hosts) and returns 0 only if the guest test
# script printed PASS. The serial console goes to .cache/vm/console.log.
#   tools/vm/run.sh [TIMEOUT_SECONDS]
set -euo pipefail
cd "$(dirname "$0")/../.."
vm=.cache/vm
timeout "${1:-600}" qemu-system-x86_64 -accel tcg -m "${VM_MEM:-2048}" -smp 2 -nographic -no-reboot \
  -kernel "$vm/vmlinuz" -initrd "$vm/initrd.gz" \
  -append "console=ttyS0 panic=-1 quiet" >"$vm/console.log" 2>&1 || true
grep -a "LAZYBLK-VM" "$vm/console.log" || true
grep -aq "LAZYBLK-VM-RESULT: PASS" "$vm/console.log"
