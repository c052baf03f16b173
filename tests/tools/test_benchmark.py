"""tools/benchmark.py: one run times several detectors' training iterations and relates them."""
from conftest import SMALL_SYNTHETIC, cpu_schedule_file, run_tool


def test_times_each_model_and_relates_it_to_the_first():
    out = run_tool('benchmark', '--models', 'condinst,knet', '--iters', '1', *SMALL_SYNTHETIC).stdout
    header, *rows = out.strip().splitlines()
    assert header.split() == ['model', 's/iter', 'ratio', 'schedule', 'min']
    (first, s1, r1, n1, m1), (second, s2, r2, n2, m2) = (row.split() for row in rows)
    assert (first, second) == ('condinst', 'knet') and float(r1) == 1.0
    assert float(s1) > 0 and float(s2) > 0 and abs(float(r2) - float(s2) / float(s1)) < 0.01
    # the schedules are the models' CPU schedules (schedule/model/cpu_<model>.yaml)
    iters = cpu_schedule_file('knet').max_iters
    assert (int(n1), int(n2)) == (cpu_schedule_file('condinst').max_iters, iters)
    # both printed values are rounded: s/iter to 0.001 (times the schedule), minutes to 0.1
    assert abs(float(m2) - float(s2) * iters / 60) <= 0.0005 * iters / 60 + 0.05 + 1e-9


def test_bad_arguments_fail_in_one_line():
    proc = run_tool('benchmark', '--models', 'mask_rcnn,nope', check=False)
    assert proc.returncode == 2 and proc.stderr.startswith('error: --models: nope: valid choices: blendmask,')
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_tool('benchmark', '--iters', '0', check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == 'error: --iters: expected at least 1, got 0'
    # as tools/train.py, a run this machine cannot do fails before any model is built
    proc = run_tool('benchmark', '--models', 'knet', 'amp=true', check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == ('error: amp=true needs a CUDA GPU and none is '
                                                            'available; drop amp=true to train on CPU')
