#!/usr/bin/env bash
# tokamax (the `tokamax` jax MoE backend, jax_impl/backends/tokamax_ragged_dot.py) and what it needs, as Python 3.12
# wheels in DIR (default .whl-tokamax), for the GPU machine (jax 0.11.2, torch's triton 3.6.0), which has no package
# index: carry .whl-tokamax in the device call and gpu_session.sh's tokamax_wheels installs them into their own
# folder. A folder apart from .whl (Unsloth's and Liger's, 37 MB): with xprof's 32 MB wheel the two together are over
# the 64 MiB a call carries, and tokamax 0.0.14 pins typeguard 2.13.3 where Unsloth's tyro needs typeguard 4 (the two
# sets never share a process).
# 0.0.14: the newest tokamax whose two GPU grouped GEMMs (Mosaic GPU, Pallas-Triton) both lower for CUDA with jax
# 0.11.2 (checked on a CPU with jax.export, the device stood in for by an H100; 0.0.12 fails there as on the H100).
# From 0.0.15 tokamax's Triton kernel runs on jax-triton 0.4, which needs triton >= 3.7 (a 190 MB wheel), so
# TOKAMAX_VERSION=0.0.17 gives the Mosaic kernel only there (and needs no typeguard). PyPI's 0.1.0 is a yanked, empty
# placeholder. xprof: `import tokamax` imports it (since 0.0.13), through fire, termcolor and six, and its generated
# code needs protobuf >= 6.31.1; its other dependencies are not on that path. Not tensorboardx, which tokamax lists
# but only its benchmarks/ import.
set -euo pipefail
DIR=${1:-.whl-tokamax}
mkdir -p "$DIR"
rm -f "$DIR"/*.whl  # a fresh set: tokamax_wheels installs every wheel in DIR, and two tokamax versions would clash
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform any --platform manylinux2014_x86_64 --platform manylinux_2_27_x86_64 -d "$DIR" \
  "tokamax==${TOKAMAX_VERSION:-0.0.14}" einshape immutabledict jaxtyping wadler_lindig qwix typeguard==2.13.3 absl-py \
  pydantic==2.14.4 pydantic_core==2.50.5 annotated_types typing_inspection typing_extensions \
  xprof==2.24.2 fire termcolor six "protobuf>=6.31.1"
ls "$DIR"
