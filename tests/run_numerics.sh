#!/usr/bin/env bash
# The numeric tests (pytest -m numerics) on every CPU code path this machine can run:
# ATen's kernels at ATEN_CPU_CAPABILITY=default, avx2 and avx512, with MKL and oneDNN
# held to the same instruction set (what an AMD CPU without AVX-512 runs), each at 1 and
# 2 threads. A path the CPU lacks is reported and skipped. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
declare -A MKL=([default]=SSE4_2 [avx2]=AVX2 [avx512]=AVX512)
declare -A DNNL=([default]=SSE41 [avx2]=AVX2 [avx512]=AVX512_CORE)
failed=() ran=() skipped=()
for cap in default avx2 avx512; do
    env_vars=(ATEN_CPU_CAPABILITY=$cap MKL_ENABLE_INSTRUCTIONS=${MKL[$cap]}
              ONEDNN_MAX_CPU_ISA=${DNNL[$cap]} OMP_WAIT_POLICY=PASSIVE)
    # torch quietly falls back to a lower path when the CPU lacks the one asked for.
    got=$(env "${env_vars[@]}" "$PY" -c "import torch; print(torch.backends.cpu.get_cpu_capability().lower())")
    if [[ $got != "$cap" ]]; then
        skipped+=("$cap (this CPU runs $got)")
        continue
    fi
    for threads in 1 2; do
        echo "== ATen $cap, MKL ${MKL[$cap]}, oneDNN ${DNNL[$cap]}, $threads thread(s)"
        if env "${env_vars[@]}" OMP_NUM_THREADS=$threads TEST_THREADS=$threads "$PY" -m pytest tests -m numerics \
                -q -p no:cacheprovider "$@"; then
            ran+=("$cap/$threads")
        else
            failed+=("$cap/$threads")
        fi
    done
done
echo "numerics: passed on ${ran[*]:-none}; failed on ${failed[*]:-none}; not run: ${skipped[*]:-none}"
((${#failed[@]} == 0))
