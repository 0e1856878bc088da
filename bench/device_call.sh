#!/usr/bin/env bash
# Several runbook steps in one device call, from a committed snapshot of the tree, so files other engineers are
# still editing in the checkout (the device copies the working tree, uncommitted files included) do not travel.
#
# Here (CPU machine):   bash bench/device_call.sh --pack          # writes .head.tar and .head.commit (git-ignored)
# Device call:          command "bash bench/device_call.sh STEP [STEP ...]", carry .head.tar .head.commit and what
#                       the steps need (.whl, .whl-nvcomp, .smol); env such as BUDGET or DENSE passes through.
# Each step's console log comes back as $OUT/STEP.log (the device returns at most 8 files: pick steps whose JSON and
# logs fit; PNGs are dropped and can be redrawn from the JSON).
set -uo pipefail
if [ "${1:-}" = "--pack" ]; then
  git archive HEAD -o .head.tar && git rev-parse --short HEAD > .head.commit && echo "packed $(cat .head.commit)"
  exit 0
fi
: "${OUT:?run this on the device machine, where OUT is set}"
if [ -f .head.tar ]; then
  src=/tmp/overspill-head
  rm -rf "$src" && mkdir -p "$src" && tar -xf .head.tar -C "$src" || exit 1
  for d in .whl .whl-nvcomp .smol; do [ -d "$d" ] && cp -r "$d" "$src/"; done
  export OVERSPILL_GIT_COMMIT=$(cat .head.commit)
  cd "$src" || exit 1
fi
: "${OVERSPILL_GIT_COMMIT:?pass OVERSPILL_GIT_COMMIT or pack with --pack: the tree travels without .git}"
for step in "$@"; do
  echo "== $step at $OVERSPILL_GIT_COMMIT"
  bash bench/gpu_session.sh "$step"
  [ -f "$OUT/log" ] && cp "$OUT/log" "$OUT/$step.log"
done
rm -f "$OUT"/*.png "$OUT/log"
