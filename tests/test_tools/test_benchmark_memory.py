"""benchmark_model.py --memory: checkpointing cases, each in a fresh process, one table."""
TOOLS = 'tools/analysis_tools'


def test_memory_comparison_table(run_tool):
    out = run_tool([f'{TOOLS}/benchmark_model.py', '--memory', '--size', '64', '--batch', '1',
                    '--repeat', '1', '--warmup', '0', '--threads', '1', '--cases',
                    'ours, num_cp=all, backbone with_cp', 'ours']).stdout
    assert 'peak: peak RSS of the process (ru_maxrss)' in out, out
    rows = {line.split('|')[1].strip(): line for line in out.splitlines()
            if line.startswith('| ') and 'GiB' in line}
    assert list(rows) == ['ours, num_cp=all, backbone with_cp', 'ours'], out
    assert '+0.0%' in rows['ours']  # the reference row
