#!/usr/bin/env bash
# The CUDA build of ops._C, checked on a machine without a GPU (`make check-cuda-build`).
#
# PyPI's plain torch wheel is a CUDA build; its CUDA library packages carry the cuBLAS,
# cuSPARSE and cuSOLVER headers that torch's own headers include. Against that torch and
# the machine's nvcc this script builds the extension for sm_80 and sm_90, outside the
# source tree (the CPU build in ops/ is left alone), and checks that
#   1. ops._C imports and says it has CUDA kernels;
#   2. the op, its backward and the autocast rule are registered for CUDA;
#   3. a CUDA call without a driver fails with torch's own message, not a crash.
# Linking against libtorch_cuda is what this proves; running the kernels needs a GPU
# (tools/gpu/check_all.sh).
#
# The environment (.venv-cuda, about 4 GB, git-ignored) is made once; CUDA_VENV,
# BASE_PYTHON, TORCH_SPEC, TORCH_CUDA_ARCH_LIST and MAX_JOBS override the defaults.
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
say() { echo "== $(($(date +%s) - start)) s: $*"; }
VENV=${CUDA_VENV:-.venv-cuda}
PY=$VENV/bin/python
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PATH=$CUDA_HOME/bin:$PATH MAX_JOBS=${MAX_JOBS:-2}
command -v nvcc >/dev/null || { echo "nvcc not found under CUDA_HOME=$CUDA_HOME"; exit 2; }

if [[ ! -x $PY ]]; then
    say "making $VENV with ${BASE_PYTHON:-python3}"
    "${BASE_PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
    # --isolated: past any local index or constraint file, to PyPI's CUDA build.
    say "installing $TORCH_SPEC (CUDA build from PyPI, about 4 GB) into $VENV"
    "$PY" -m pip install --isolated -q "$TORCH_SPEC" 'setuptools>=64,<81' wheel ninja numpy
fi
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
CUDA_INCLUDE=$(ls -d "$SITE"/nvidia/cu*/include 2>/dev/null | head -1)
[[ -n $CUDA_INCLUDE ]] || { echo "no nvidia/cu*/include under $SITE: torch's CUDA library packages are missing"; exit 2; }
export CPATH=$CUDA_INCLUDE${CPATH:+:$CPATH}
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
nvcc --version | tail -1

OUTDIR=build/cuda-check
rm -rf "$OUTDIR"
say "building ops._C with FORCE_CUDA=1 for arch $TORCH_CUDA_ARCH_LIST (log: $OUTDIR/build.log)"
mkdir -p "$OUTDIR/stage/ops"
if ! FORCE_CUDA=1 "$PY" setup.py build_ext --build-lib "$OUTDIR/lib" --build-temp "$OUTDIR/tmp" \
        > "$OUTDIR/build.log" 2>&1; then
    tail -n 40 "$OUTDIR/build.log"
    say "build FAILED"
    exit 1
fi
say "built"
# The Python package beside the CUDA-built library, away from the source tree's ops/_C.
cp ops/*.py "$OUTDIR/stage/ops/"
cp "$OUTDIR"/lib/ops/_C*.so "$OUTDIR/stage/ops/"
# The device code in the library's fatbinary, read from its headers (the toolkit's
# cuobjdump is not always installed): one cubin (kind 2) per requested arch.
"$PY" - "$OUTDIR"/stage/ops/_C*.so "$TORCH_CUDA_ARCH_LIST" <<'PY'
import struct
import sys

data = open(sys.argv[1], 'rb').read()
wanted = {int(float(a) * 10) for a in sys.argv[2].replace(' ', ';').split(';') if a}
cubins, pos = set(), 0
while (start := data.find(struct.pack('<I', 0xBA55ED50), pos)) >= 0:
    _, header_size, fat_size = struct.unpack_from('<HHQ', data, start + 4)
    entry, end = start + header_size, start + header_size + fat_size
    while entry < end:
        kind, _, entry_header, payload = struct.unpack_from('<HHIQ', data, entry)
        arch, = struct.unpack_from('<I', data, entry + 28)
        if kind == 2:
            cubins.add(arch)
        entry += entry_header + payload
    pos = max(end, start + 4)
missing = wanted - cubins
assert not missing, f'no cubin for sm_{sorted(missing)} (found {sorted(cubins)})'
print('device code (cubins) for', ', '.join(f'sm_{a}' for a in sorted(cubins)))
PY
cd "$OUTDIR/stage"
"$OLDPWD/$PY" - <<'PY'
import torch

import ops
from ops.multi_scale_deformable_attn import _C

assert ops.__file__.startswith(__import__('os').getcwd()), ops.__file__
assert _C is not None and _C.with_cuda, 'ops._C was built without CUDA kernels'
assert ops.has_kernel('cuda')
print('1. import: ok (', _C.__file__, ')')

has = torch._C._dispatch_has_kernel_for_dispatch_key
for op, key in [('ddetr::multi_scale_deformable_attn', 'CUDA'),
                ('ddetr::_multi_scale_deformable_attn_backward', 'CUDA'),
                ('ddetr::multi_scale_deformable_attn', 'AutocastCUDA')]:
    assert has(op, key), f'{op} has no {key} kernel'
    print(f'2. {op}: {key} kernel registered')

try:
    value = torch.zeros(1, 4, 1, 8, device='cuda')
    raise AssertionError('a CUDA tensor was made on a machine without a driver')
except RuntimeError as err:
    message = str(err)
    assert 'driver' in message.lower() or 'no cuda gpus' in message.lower(), message
    print('3. CUDA call without a driver:', message.splitlines()[0])
PY
say "check-cuda-build passed"
