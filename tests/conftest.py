import os

# Triton kernels run in Triton's interpreter on the CPU; the flag must be set before any kernel is defined.
os.environ.setdefault('TRITON_INTERPRET', '1')

import pytest  # noqa: E402
import torch  # noqa: E402

# a parallel run (pytest -n W, pytest-xdist) shares the cores among its workers
WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1') or 1)
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


ONE_THREAD = ('tests/train/', 'tests/seg/', 'tests/test_detection.py')


@pytest.fixture(autouse=True, scope='module')
def _threads(request):
    """Training loops, heads and detection run many tiny ops, which one thread runs fastest (and which a shared
    machine runs without oversubscription); everything else keeps the default."""
    before = torch.get_num_threads()
    if any(part in request.node.path.as_posix() for part in ONE_THREAD):
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)
    yield


# the longest tests (each a minute or more of subprocesses: timm's suite, a wheel install, the README's commands):
# handed out first, so that a parallel run does not end on one worker running them while the others wait
LONG_FIRST = (
    'tests/test_timm_suite.py::test_timm_suite_',
    'tests/train/test_installed.py::',
    'tests/test_registry.py::test_readme_tables',
    'tests/test_readme.py::test_visattn_lines_run',
)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONG_FIRST))  # stable: the rest keeps its order
