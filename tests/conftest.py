import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'
# A small synthetic set keeps tests fast; the default (1000/200 images) is for real training.
SMALL_SYNTHETIC = ['data.synthetic.num_train=24', 'data.synthetic.num_val=8']


@pytest.fixture(scope='session', autouse=True)
def _cache_dir(tmp_path_factory):
    """Generated data goes to a per-session cache, never the user's."""
    os.environ['INSTSEG_CACHE'] = str(tmp_path_factory.mktemp('cache'))


def shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f'{path} not present (real test data lives beside the checkout)')
    return path


def run_tool(tool: str, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs tools/<tool>.py as a user would, from the repository root."""
    proc = subprocess.run([sys.executable, str(REPO / 'tools' / f'{tool}.py'), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ})
    if check and proc.returncode != 0:
        raise AssertionError(f'{tool} {" ".join(args)} failed ({proc.returncode}):\n'
                             f'{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}')
    return proc
