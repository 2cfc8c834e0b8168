"""tools/deployment/benchmark_onnx.py runs (a smoke test on a tiny input: no timing here)."""
import re


def test_benchmark_prints_the_table(run_tool):
    proc = run_tool(['tools/deployment/benchmark_onnx.py', '--cases', 'demo:64x64',
                     '--warmup', '0', '--repeat', '1', '--threads', '1'])
    out = proc.stdout
    assert out.startswith('command: ') and '\nmachine: ' in out
    assert 'PyTorch intra-op 1, onnxruntime intra-op 1' in out
    row = re.search(r'\| demo \| 1x3x64x64 \| ([\d.]+) \(([\d.]+)\) \| ([\d.]+) \(([\d.]+)\) \| '
                    r'([\d.]+) \| ([\d.e+-]+) \|', out)
    assert row, out
    assert all(float(v) > 0 for v in row.groups()[:5])
    # The two runtimes agree on the scores (sigmoids in [0, 1]); onnxruntime and torch
    # round float32 sums of up to a few thousand terms in other orders: 1e-4 (~800 eps32).
    assert float(row.group(6)) < 1e-4
