#!/bin/bash
# The time-to-video runs of issue 22 on one GPU machine, in calls that each fit the device's 10-minute limit and
# share the machine's /tmp while it stays warm (30 s between calls). Run from the repository root:
#   PHASE=setup  (carry .whl-a: PyAV, the small wheels and artifex serve's) installs, saves the checkpoint (+ ARGS:
#                e.g. --user-loads), then checks and times fast_read on it (fast_read_check.py: fast-read-<gpu>.json;
#                FRC_ARGS: its options)
#   PHASE=runs   (carry .whl-b: fa3-fwd, once)            `bench pipeline --user-path` on that checkpoint with ARGS
# Every phase appends to the same ttv-<gpu>.json (kept in /tmp/keep between calls) and writes it under $OUT.
#   series 1: setup ARGS="--user-loads"; runs ARGS="--user-prime-steps 2 --user-budgets none,24GB --diffusers off";
#             runs ARGS="--user-budgets '' --no-user-repeat --user-flags '--fp8 all'"
#   series 2: setup; runs ARGS="--user-prime-steps 2 --user-budgets '' --no-user-repeat --diffusers off
#             --user-flags '--fp8 all' --user-flags '--fp8 all' --user-server"
#   series 3 (fast_read): setup; runs ARGS="--user-loads --user-server --user-budgets '' --no-user-repeat";
#             runs ARGS="--user-prime-steps 2 --user-budgets none,24GB --diffusers off --user-flags '--fp8 all'"
#   series 4 (pinned homes): setup FRC_ARGS="--no-check --readers libraries+pinned,fast_read+pinned --repeat 2
#             --pin-probe 8 --name fast-read-pinned"; runs ARGS="--user-prime-steps 2 --user-budgets none,24GB";
#             runs ARGS="--user-server --user-budgets '' --no-user-repeat --diffusers off --user-flags '--fp8 all'"
#   series 5 (pinning by registering, bytecode kept): setup FRC_ARGS="--readers fast_read,fast_read+pinned,
#             fast_read+pinned@alloc,libraries+pinned --repeat 2 --pin-probe 8"; then the two runs of series 4
#   series 6 (decoder warm-up, deferred diffusers packages; H100): setup FRC_ARGS=skip PROBE=probe11; runs
#             ARGS="--user-budgets none,24GB" (no prime run: the device time left did not allow one)
#   series 7 (H200): setup FRC_ARGS=skip PROBE=probe12; runs ARGS="--user-prime-steps 2 --user-budgets none,24GB
#             --no-user-repeat --user-flags ARTIFEX_DECODE_WARM_UP=off"; runs ARGS="--user-server --user-budgets ''
#             --no-user-repeat --diffusers off"
#   series 8 (read-ahead; the pinned transformers 5.24.0, not the image's 5.17): .whl-a = PyAV, diffusers, ftfy,
#             importlib-metadata, wcwidth and transformers-5.24.0 (62 MB); .whl-b = fa3-fwd and the serve wheels.
#             setup FRC_ARGS=skip PROBE=probe13; runs ARGS="--user-prime-steps 2 --user-budgets none,24GB"; runs
#             ARGS="--user-server --user-budgets '' --no-user-repeat --diffusers off" (it came on an H100)
#   next:     an H200 series (none was lent on 2026-12-08): setup FRC_ARGS=skip PROBE=probe13 (8, 4 and 2 readers)
#             with PROBE13_REPEATS=1, then probe14 (huge-page pinning) and LOAD_WORK_DEVICE=cuda load_work.py in the
#             same call; runs ARGS="--user-prime-steps 2 --user-budgets none,24GB --diffusers off --user-flags
#             'ARTIFEX_PIN_HUGE_PAGES=on --vram-budget 24GB'"; runs ARGS="--user-server --user-budgets ''
#             --no-user-repeat --user-flags '--steps 4 --guidance 1'" (diffusers' row here: the second call is full)
set -euo pipefail
unset PYTHONDONTWRITEBYTECODE  # the device sets it: every process would compile what it imports (LOG.md)
# ... and the image's packages hold no bytecode and may not be writable: all bytecode goes to one folder that
# lives as long as the machine, so only the setup's first process compiles (as a pip install compiles once)
export PYTHONPYCACHEPREFIX=/tmp/pycache
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
mkdir -p /tmp/keep /tmp/site /tmp/pycache
OUT=${OUT:-/tmp/out}
ARGS=${ARGS:-}
for w in .whl-a .whl-b; do  # whichever was carried
  if ls $w/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $w/*.whl
    python3 -m compileall -q -j 0 /tmp/site src >/dev/null || true
  fi
done
if [ "$PHASE" = setup ]; then
  # The checkpoint on a disk, not in memory: eviction from the page cache must mean something.
  CK=/tmp/ckpt; if df -T /tmp | tail -1 | grep -q tmpfs; then CK=$HOME/ckpt; fi
  echo "$CK" > /tmp/keep/ck
  rm -f /tmp/keep/ttv-*.json
  df -T /tmp "$HOME" | tee "$OUT/disk.txt"; nproc; grep -E "MemTotal|MemAvailable" /proc/meminfo
  TD=$(python3 -c "import importlib.util as u; print(u.find_spec('torch').submodule_search_locations[0])")
  echo "torch at $TD: writable $([ -w "$TD" ] && echo yes || echo no), .pyc files $(find "$TD" -name '*.pyc' | wc -l)" \
    | tee -a "$OUT/disk.txt"
  eval python3 -m artifex bench pipeline --model ti2v-5b --user-path --only-user-path --save-checkpoint "$CK" \
    --user-budgets "''" --no-user-repeat --diffusers off --output-dir "$OUT" $ARGS 2>&1 | tail -25
  if [ "${FRC_ARGS:-}" != skip ]; then
    eval python3 benchmarks/device/fast_read_check.py --checkpoint "$CK" --out "$OUT" ${FRC_ARGS:-} 2>&1 \
      | grep -v "^Loading" | tail -30
  fi
  if [ -n "${PROBE:-}" ]; then python3 "benchmarks/probes/$PROBE.py" "$OUT" 2>&1 | tail -30; fi
else
  cp /tmp/keep/ttv-*.json "$OUT/" 2>/dev/null || true
  eval python3 -m artifex bench pipeline --model ti2v-5b --user-path --only-user-path \
    --checkpoint "$(cat /tmp/keep/ck)" --append --output-dir "$OUT" $ARGS 2>&1 | tail -25
fi
cp "$OUT"/ttv-*.json /tmp/keep/
ls -la "$OUT"
