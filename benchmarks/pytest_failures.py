"""A pytest plugin for the GPU runs (benchmarks/gpu_run.sh): each failure's report goes to
$OUT/failures.txt the moment it happens, so a run cut off by the machine's time limit still says which
tests failed and why (pytest prints its summary only at the end).

    PYTHONPATH=benchmarks python -m pytest -p pytest_failures -n 8 tests
"""

import os


def pytest_runtest_logreport(report) -> None:
    if not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):  # the controller writes what workers send
        return
    with open(os.path.join(os.environ.get("OUT", "."), "failures.txt"), "a") as f:
        f.write(f"=== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
