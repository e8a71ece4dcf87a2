"""benchmarks/gpu.sh, the GPU job prepared for a lent machine, runs.

On a machine without a GPU (this test) its smoke mode runs every section at
tiny sizes, so that the one short job a GPU session can afford does not
fail on a broken script.
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_job_runs_every_section_in_smoke_mode(tmp_path):
  env = dict(os.environ, SMOKE='1', OUT=str(tmp_path), PYTHON=sys.executable,
             JAX_PLATFORMS='cpu')
  proc = subprocess.run(['bash', 'benchmarks/gpu.sh'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(tmp_path / 'gpu-bench.log') as f:
    log = f.read()
  for section in ('== step K=2, jax', '== step K=40, jax',
                  '== solver, K=40, vmapped batch 64', '== seconds per epoch',
                  '== training steps'):
    assert section in log, section
  assert '"mgda_ub"' in log and 'chunk 1 / chunk 5' in log
  assert 'convolution / matmul' in log and '(exit' not in log
