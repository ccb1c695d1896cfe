#!/usr/bin/env bash
# tokamax (the `tokamax` jax MoE backend, jax_impl/backends/tokamax_ragged_dot.py) and what it needs, as Python 3.12
# wheels in DIR (default .whl/tokamax), for the GPU machine, which has no package index: carry .whl in the device
# call and gpu_session.sh's tokamax_wheels installs them into their own folder. Their own folder, not .whl: tokamax
# pins typeguard 2.13.3, Unsloth's tyro needs typeguard 4, and the two sets never share a process there. Not
# tensorboardx, which tokamax lists but its GPU paths never import.
set -euo pipefail
DIR=${1:-.whl/tokamax}
mkdir -p "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform any --platform manylinux2014_x86_64 -d "$DIR" tokamax==0.0.12 einshape immutabledict jaxtyping \
  wadler_lindig qwix typeguard==2.13.3 absl-py pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated_types typing_inspection typing_extensions
ls "$DIR"
