"""tools/deployment/benchmark_onnx.py runs (a smoke test on a tiny input: no timing here)."""
import re


def test_benchmark_prints_the_table(run_tool):
    proc = run_tool(['tools/deployment/benchmark_onnx.py', '--cases', 'demo:64x64',
                     '--warmup', '0', '--repeat', '1', '--threads', '1'])
    out = proc.stdout
    assert out.startswith('command: ') and '\nmachine: ' in out
    assert 'PyTorch intra-op 1, onnxruntime intra-op 1' in out
    # The GridSample and the gather op modes side by side, each against PyTorch.
    assert ('| model | input | PyTorch median (min) ms | onnxruntime GridSample median (min) ms '
            '| PyTorch / GridSample | onnxruntime gather median (min) ms | PyTorch / gather | '
            'max score diff GridSample | max score diff gather |') in out
    time = r'([\d.]+) \(([\d.]+)\)'
    row = re.search(rf'\| demo \| 1x3x64x64 \| {time} \| {time} \| ([\d.]+) \| {time} \| '
                    r'([\d.]+) \| ([\d.e+-]+) \| ([\d.e+-]+) \|', out)
    assert row, out
    assert all(float(v) > 0 for v in row.groups()[:8])
    # Each onnxruntime graph agrees with PyTorch on the scores (sigmoids in [0, 1]): the
    # runtimes round float32 sums of up to a few thousand terms in other orders, 1e-4
    # (~800 eps32), the bar of the export tests.
    assert float(row.group(9)) < 1e-4 and float(row.group(10)) < 1e-4
