"""The CUDA kernels' own source, run on a CPU and compared with the CPU op.

CI never has a GPU. ``cuda_host_emulation/`` compiles the real kernel header
(``ops/csrc/cuda/multi_scale_deformable_attn_kernels.cuh``, launchers included) with g++
and a shim for the CUDA built-ins: each warp's 32 lanes are coroutines that meet at
every ``__shfl_xor_sync``, warps run concurrently on host threads, atomics are
``std::atomic_ref``, and every tensor ends flush against a ``PROT_NONE`` page, so that any
read or write past its end faults. UBSan (where g++ has it) reports misaligned vector
loads and integer overflow. This checks the kernels' index arithmetic, shuffles, bounds
and vector paths against the CPU op in every dtype; it cannot see what only a GPU shows
(timing, the memory model, fast-math and FMA contraction, the sanitizer's race checks).
"""
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch

import ops  # noqa: F401  registers torch.ops.ddetr.*
from ops import has_kernel

pytestmark = pytest.mark.skipif(not has_kernel('cpu'), reason='ops._C is not built')

ROOT = Path(__file__).resolve().parents[2]
EMULATION = Path(__file__).resolve().parent / 'cuda_host_emulation'
SOURCES = [*sorted(EMULATION.iterdir()),
           ROOT / 'ops/csrc/cuda/multi_scale_deformable_attn_kernels.cuh',
           ROOT / 'ops/csrc/multi_scale_deformable_attn_common.h']
FLAGS = ['-std=c++20', '-O1', '-pthread', '-Wall', '-Wno-unknown-pragmas']
SANITIZE = ['-fsanitize=undefined', '-fno-sanitize-recover=all']

NAMES = ('output', 'grad_value', 'grad_sampling_locations', 'grad_attention_weights')
VECTOR = {torch.float32: 4, torch.float64: 2, torch.float16: 8, torch.bfloat16: 8}
# Max error relative to each tensor's largest magnitude. float32 and float64: the kernels
# and the CPU op both accumulate in the input's precision and differ only in summation
# order (atomics, the reduction across a group's lanes) and FMA contraction. float16 and
# bfloat16: the kernels accumulate in float32 from the same rounded inputs and round the
# result once, so they are within half an ulp (2^-11, 2^-8 relative) of the float32 op on
# those inputs; 10 % margin for the float32 noise.
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1.1 * 2**-11,
             torch.bfloat16: 1.1 * 2**-8}
DTYPE_NAMES = {torch.float32: 'float32', torch.float64: 'float64', torch.float16: 'float16',
               torch.bfloat16: 'bfloat16'}

CASES = {
    # The review's finding: idle threads of the last block read grad_output past its end.
    'original': dict(shapes=[(6, 6), (3, 3), (2, 2), (1, 1)], bs=2, nq=37, heads=8, dim=32,
                     points=4),
    # Odd channels (no vector path), one level, eight points.
    'odd_one_level_8_points': dict(shapes=[(7, 5)], bs=1, nq=9, heads=3, dim=33, points=8),
    # More vectors than a warp has lanes: some lanes own two or three chunks.
    'wide': dict(shapes=[(5, 4), (2, 3)], bs=1, nq=5, heads=2, dim=136, points=2),
}


@pytest.fixture(scope='session')
def driver() -> Path:
    """The emulation driver, compiled once per source version (cached in the temp dir)."""
    gxx = shutil.which('g++')
    if gxx is None:
        pytest.skip('g++ not found')
    digest = hashlib.sha256(' '.join(FLAGS + SANITIZE).encode())
    for path in SOURCES:
        digest.update(path.name.encode() + path.read_bytes())
    folder = Path(tempfile.gettempdir()) / f'ddetr-cuda-host-emulation-{digest.hexdigest()[:16]}'
    exe = folder / 'driver'
    if exe.exists():
        return exe
    folder.mkdir(exist_ok=True)
    tmp = folder / f'driver.{os.getpid()}'
    cmd = [gxx, *FLAGS, f'-I{EMULATION}', f'-I{ROOT}', str(EMULATION / 'driver.cpp'), '-o',
           str(tmp)]
    result = subprocess.run(cmd[:1] + SANITIZE + cmd[1:], capture_output=True, text=True)
    if result.returncode != 0:  # g++ without libubsan: the bounds checks still hold
        warnings.warn('g++ cannot build with UBSan here; misaligned vector loads and integer '
                      f'overflow go unchecked: {result.stderr[-500:]}')
        result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    os.replace(tmp, exe)
    return exe


def _write(path: Path, t: torch.Tensor) -> None:
    t = t.contiguous()
    path.write_bytes(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))


def _read(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=dtype).reshape(shape)


def run_emulated(driver: Path, folder: Path, inputs: Dict[str, torch.Tensor],
                 grad_output: torch.Tensor, dtype: torch.dtype, vectorise: bool = True,
                 placement: str = 'end', workers: int = 4, repeats: int = 0) -> dict:
    """Forward and backward of the emulated CUDA kernels on ``inputs`` cast to ``dtype``.

    Returns the outputs as tensors (``grad_value_atomic`` in the accumulation type, as
    the launcher leaves it before its final cast; the deterministic backward's gradients,
    run ``repeats`` times, with the suffix ``_deterministic_{run}``) and ``info``, what
    the driver ran.
    """
    folder.mkdir()
    value, loc, attn = (inputs[k].to(dtype) for k in
                        ('value', 'sampling_locations', 'attention_weights'))
    bs, num_keys, heads, dim = value.shape
    nq, levels, points = loc.shape[1], loc.shape[3], loc.shape[4]
    for name, t in dict(value=value, sampling_locations=loc, attention_weights=attn,
                        grad_output=grad_output.to(dtype),
                        spatial_shapes=inputs['spatial_shapes'].long(),
                        level_start_index=inputs['level_start_index'].long()).items():
        _write(folder / f'{name}.bin', t)
    (folder / 'case.txt').write_text(
        f'dtype {DTYPE_NAMES[dtype]}\nsizes {bs} {num_keys} {heads} {dim} {nq} {levels} {points}\n'
        f'vectorise {int(vectorise)}\nplacement {placement}\nworkers {workers}\n'
        f'repeats {repeats}\n')
    result = subprocess.run([str(driver), 'run', str(folder)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (f'the emulated kernels failed (exit {result.returncode}):\n'
                                    f'{result.stderr[-3000:]}')
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    out = dict(info=json.loads(result.stdout.splitlines()[-1]),
               output=_read(folder / 'output.bin', dtype, (bs, nq, heads * dim)),
               grad_value_atomic=_read(folder / 'grad_value_atomic.bin', acc, value.shape),
               grad_sampling_locations=_read(folder / 'grad_sampling_locations.bin', dtype,
                                             loc.shape),
               grad_attention_weights=_read(folder / 'grad_attention_weights.bin', dtype,
                                            attn.shape))
    for run in range(repeats):
        for name, shape in (('grad_value', value.shape), ('grad_sampling_locations', loc.shape),
                            ('grad_attention_weights', attn.shape)):
            key = f'{name}_deterministic_{run}'
            out[key] = _read(folder / f'{key}.bin', dtype, shape)
    return out


def cpu_op(inputs: Dict[str, torch.Tensor], grad_output: torch.Tensor, dtype: torch.dtype,
           compute: Optional[torch.dtype] = None):
    """Output and gradients of the CPU op on the inputs rounded to ``dtype``, computed in
    ``compute`` (default ``dtype``), through torch.ops: no Python-side checks."""
    compute = compute or dtype
    args = [inputs['value'], inputs['spatial_shapes'], inputs['level_start_index'],
            inputs['sampling_locations'], inputs['attention_weights']]
    args = [a.to(dtype).to(compute) if a.is_floating_point() else a for a in args]
    out = torch.ops.ddetr.multi_scale_deformable_attn(*args)
    grads = torch.ops.ddetr._multi_scale_deformable_attn_backward(
        grad_output.to(dtype).to(compute), *args)
    return (out, *grads)


def make_case(make_inputs, name: str, seed: int = 0):
    spec = dict(CASES[name])
    inputs = make_inputs(spec.pop('shapes'), seed=seed, **spec)
    gen = torch.Generator().manual_seed(seed + 1)
    bs, nq = inputs['sampling_locations'].shape[:2]
    grad_output = torch.randn(bs, nq, spec['heads'] * spec['dim'], generator=gen,
                              dtype=torch.float64)
    return inputs, grad_output


def check_against_cpu(ours: dict, inputs, grad_output, dtype, assert_close_relative,
                      deterministic_runs: int = 0):
    """Every output within TOLERANCE[dtype] of the float32/float64 CPU op on the same
    rounded inputs; bfloat16 also within one ulp of the CPU op's own bfloat16 kernel.
    Both backward paths: the atomic one, and the deterministic one's runs."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    references = [(cpu_op(inputs, grad_output, dtype, compute), TOLERANCE[dtype])]
    if dtype == torch.bfloat16:
        references.append((cpu_op(inputs, grad_output, dtype), 1.1 * 2**-7))
    # The launcher casts the atomic path's accumulated grad_value to the input dtype last.
    paths = {'atomic': (ours['output'], ours['grad_value_atomic'].to(dtype),
                        ours['grad_sampling_locations'], ours['grad_attention_weights'])}
    for run in range(deterministic_runs):
        tag = f'_deterministic_{run}'
        paths[tag[1:]] = (ours['output'], ours['grad_value' + tag],
                          ours['grad_sampling_locations' + tag], ours['grad_attention_weights' + tag])
    for path, actual in paths.items():
        for expected, tol in references:
            for name, a, b in zip(NAMES, actual, expected):
                assert a.dtype == dtype
                assert_close_relative(a, b, tol, f'{name} ({dtype}, {path} backward)')


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns, so that equality is bitwise (-0.0, NaN included)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_half_conversions_round_to_nearest_even(driver, tmp_path):
    """The shim's __half and __nv_bfloat16 convert exactly as torch does."""
    gen = torch.Generator().manual_seed(0)
    exponents = torch.randint(-30, 20, (20000,), generator=gen).double()
    values = torch.randn(20000, generator=gen, dtype=torch.float64) * 2.0**exponents
    # Ties and near-ties of both formats, overflow to inf, subnormals, specials.
    half_ties = (torch.arange(1, 2000, dtype=torch.float64) + 0.5) * 2.0**-24
    bf16_ties = (torch.arange(256, 512, dtype=torch.float64) + 0.5) * 2.0**-8
    specials = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e30, float('inf'),
                             -float('inf'), float('nan'), 2.0**-25, 2.0**-26, 6e-8, 3.3e38])
    f = torch.cat([values, -values, half_ties, bf16_ties, -bf16_ties, specials]).float()
    _write(tmp_path / 'in.bin', f)
    subprocess.run([str(driver), 'convert', str(tmp_path / 'in.bin'), str(tmp_path)], check=True)
    for name, dtype in (('half', torch.float16), ('bfloat16', torch.bfloat16)):
        ours = _read(tmp_path / f'to_{name}.bin', torch.int16, f.shape)
        expected = f.to(dtype).view(torch.int16)
        nan = torch.isnan(f)
        assert torch.equal(ours[~nan], expected[~nan]), f'float32 -> {name} differs from torch'
        assert torch.isnan(ours.view(dtype)[nan]).all()
        pattern = torch.arange(65536, dtype=torch.int32)  # in the driver's order, 0 to 0xffff
        bits = torch.where(pattern < 32768, pattern, pattern - 65536).to(torch.int16)
        back = _read(tmp_path / f'from_{name}.bin', torch.float32, (65536,))
        expected_back = bits.view(dtype).float()
        same = (back == expected_back) | (torch.isnan(back) & torch.isnan(expected_back))
        # -0.0 == 0.0 above: compare signs too.
        assert same.all() and torch.equal(torch.signbit(back), torch.signbit(expected_back)), \
            f'{name} -> float32 differs from torch'


@pytest.mark.parametrize('mistake, report', [
    ('read_past_end', 'past the end of src'),
    ('write_before_start', 'before the start of dst'),
    ('shuffle_after_return', 'waits for lanes that have already returned'),
])
def test_emulation_reports_mistakes(driver, mistake, report):
    """The guard pages and the shuffle check work on this machine: a kernel with a
    deliberate mistake of each kind is reported, not run to a quiet end."""
    result = subprocess.run([str(driver), 'selftest', mistake], capture_output=True, text=True)
    assert result.returncode != 0 and report in result.stderr, result.stdout + result.stderr


@pytest.mark.parametrize('case', CASES)
@pytest.mark.parametrize('vectorise', [True, False], ids=['vector', 'scalar'])
@pytest.mark.parametrize('dtype', list(TOLERANCE), ids=DTYPE_NAMES.get)
def test_matches_cpu_op(driver, tmp_path, make_inputs, assert_close_relative, case, vectorise,
                        dtype):
    inputs, grad_output = make_case(make_inputs, case)
    ours = run_emulated(driver, tmp_path / 'run', inputs, grad_output, dtype, vectorise,
                        repeats=1)
    # The vector path really ran where it can, and only there.
    dim = CASES[case]['dim']
    expect_vector = vectorise and dim % VECTOR[dtype] == 0
    for path in ('forward', 'backward', 'deterministic'):
        assert ours['info'][f'{path}_vectorised'] == expect_vector, path
    check_against_cpu(ours, inputs, grad_output, dtype, assert_close_relative,
                      deterministic_runs=1)


@pytest.mark.parametrize('case', ['original', 'odd_one_level_8_points'])
def test_nothing_read_before_the_start(driver, tmp_path, make_inputs, assert_close_relative,
                                       case):
    """Each tensor flush against the guard page before its start instead of after its end."""
    inputs, grad_output = make_case(make_inputs, case)
    ours = run_emulated(driver, tmp_path / 'run', inputs, grad_output, torch.float32,
                        placement='start', repeats=1)
    check_against_cpu(ours, inputs, grad_output, torch.float32, assert_close_relative,
                      deterministic_runs=1)


@pytest.mark.parametrize('shapes, starts', [
    ([(7, 5), (4, 4)], [0, 35]),           # the levels claim 51 keys; value has 40
    ([(7, 5), (4, 4)], [-3, 38]),          # starts before value, and near its end
    ([(2**40, 2**40), (3, 2**62)], [0, 2**62]),  # products that overflow int64
    ([(1, 2**63 - 1), (2**63 - 1, 1)], [-2**63, 2**63 - 1]),
    ([(0, 5), (-4, 3)], [0, 1]),           # empty and negative sizes
], ids=['too_few_keys', 'bad_starts', 'huge', 'extremes', 'empty_negative'])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=DTYPE_NAMES.get)
def test_inconsistent_levels_read_nothing_outside_value(driver, tmp_path, make_inputs,
                                                        assert_close_relative, shapes, starts,
                                                        dtype):
    """Level shapes and starts that disagree with num_keys (which the GPU path does not
    validate: that would synchronise the host) read nothing outside value, and give
    what the CPU op gives on them."""
    inputs = make_inputs([(5, 4), (4, 5)], bs=2, heads=2, dim=8, nq=13, points=3, outside=0.3)
    inputs['spatial_shapes'] = torch.tensor(shapes, dtype=torch.long)
    inputs['level_start_index'] = torch.tensor(starts, dtype=torch.long)
    loc = inputs['sampling_locations']
    loc[0, 0, 0, 0, 0] = float('nan')  # non-finite locations read nothing either
    loc[0, 1, 0, 0, 0, 0] = float('inf')
    loc[1, 2, 1, 1, 1, 1] = -float('inf')
    grad_output = torch.randn(2, 13, 16, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(3))
    ours = run_emulated(driver, tmp_path / 'run', inputs, grad_output, dtype, repeats=1)
    check_against_cpu(ours, inputs, grad_output, dtype, assert_close_relative,
                      deterministic_runs=1)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float16], ids=DTYPE_NAMES.get)
def test_deterministic_backward_is_bitwise_reproducible(driver, tmp_path, make_inputs,
                                                        assert_close_relative, dtype):
    """The deterministic backward (torch.use_deterministic_algorithms on a GPU) gives the
    same bits on every run, whatever the schedule: three runs on eight host threads agree,
    and grad_value, whose every element is one sum in a fixed order, is the same bits
    even on a single thread without the vector path. (grad_loc and grad_attn reduce over
    channels across a group's lanes: the vector path, which changes the group, changes
    their rounding, but never from run to run.)"""
    # Many queries on small maps: every grad_value row sums many terms, so the order of
    # the additions shows in the low bits.
    inputs = make_inputs([(3, 2), (1, 2)], bs=2, heads=2, dim=8, nq=200, points=4, outside=0.1)
    grad_output = torch.randn(2, 200, 16, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(5))
    many = run_emulated(driver, tmp_path / 'many', inputs, grad_output, dtype, workers=8,
                        repeats=3)
    one = run_emulated(driver, tmp_path / 'one', inputs, grad_output, dtype, vectorise=False,
                       workers=1, repeats=1)
    assert many['info']['deterministic_vectorised'] and not one['info']['deterministic_vectorised']
    for name in ('grad_value', 'grad_sampling_locations', 'grad_attention_weights'):
        first = bits(many[f'{name}_deterministic_0'])
        for run in (1, 2):
            assert torch.equal(bits(many[f'{name}_deterministic_{run}']), first), \
                f'{name} of the deterministic backward differs between runs'
    assert torch.equal(bits(one['grad_value_deterministic_0']),
                       bits(many['grad_value_deterministic_0']))
    # grad_loc and grad_attn have no atomics on either path: the same bits.
    for name in ('grad_sampling_locations', 'grad_attention_weights'):
        assert torch.equal(bits(many[name]), bits(many[f'{name}_deterministic_0']))
    check_against_cpu(many, inputs, grad_output, dtype, assert_close_relative,
                      deterministic_runs=3)
