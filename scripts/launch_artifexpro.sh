#!/usr/bin/env bash
# The setup guide's `launch_artifexpro`: start the Artifex service (`artifex serve --debug`) with the
# environment `artifex doctor` recommends. Arguments go to `artifex serve` unchanged; without a --model
# the service runs ti2v-5b.
#
#   scripts/launch_artifexpro.sh --model ti2v-5b --checkpoint ti2v-5b=/models/Wan2.2-TI2V-5B-Diffusers
#   scripts/launch_artifexpro.sh --model tiny-ti2v --port 8080          # CPU, built-in tiny model
#
# The guide also started a Ray cluster here; that is scripts/start_ray_cluster.sh now, and this
# script serves on it with --ray HEAD_IP:6379 (or --ray auto) among its arguments.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Fragmentation-resistant CUDA allocator (large, varying video activations) and no tokenizer
# thread pools fighting the worker threads.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"

if [[ -x "$root/.venv/bin/artifex" ]]; then
    artifex=("$root/.venv/bin/artifex")
elif command -v artifex >/dev/null 2>&1; then
    artifex=(artifex)
else
    echo "launch_artifexpro: artifex is not installed; run 'make demo' (or 'make test') in $root first" >&2
    exit 1
fi

has_model=0
for arg in "$@"; do
    [[ "$arg" == "--model" || "$arg" == --model=* ]] && has_model=1
done
if [[ $has_model -eq 0 ]]; then
    set -- --model ti2v-5b "$@"
fi

exec "${artifex[@]}" serve --debug "$@"
