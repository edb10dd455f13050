#!/usr/bin/env bash
# The setup guide's `start_ray_cluster.sh`: start the head node of a Ray cluster, or join one.
# A thin wrapper over `artifex cluster start` (itself Ray's own `ray start`); extra flags go through.
#
#   scripts/start_ray_cluster.sh                          # this machine becomes the head (port 6379)
#   scripts/start_ray_cluster.sh --num-gpus 2             # ... offering 2 GPUs
#   scripts/start_ray_cluster.sh HEAD_IP:6379             # join the cluster of that head
#   scripts/start_ray_cluster.sh --address HEAD_IP:6379   # the same
#
# Then: artifex serve --ray HEAD_IP:6379 --model ti2v-5b   (and `artifex cluster status` / `artifex cluster stop`)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ -x "$root/.venv/bin/artifex" ]]; then
    artifex=("$root/.venv/bin/artifex")
elif command -v artifex >/dev/null 2>&1; then
    artifex=(artifex)
else
    echo "start_ray_cluster: artifex is not installed; run 'make demo' (or 'make test') in $root first" >&2
    exit 1
fi

if [[ $# -gt 0 && "$1" != -* ]]; then  # a bare HOST:PORT first: join that head
    set -- --address "$@"
fi
role=(--head)
for arg in "$@"; do
    [[ "$arg" == "--address" || "$arg" == --address=* || "$arg" == "--head" ]] && role=()
done
exec "${artifex[@]}" cluster start "${role[@]}" "$@"
