"""Test configuration: float64 everywhere (float32 tests ask for it explicitly),
and the test files in the order that balances two pytest-xdist workers."""
import jax

jax.config.update("jax_enable_x64", True)

# The suite runs as `pytest -n 2 --dist loadfile --no-loadscope-reorder`: each
# worker takes whole files, in collection order, as it frees up. Longest first
# (the classic longest-processing-time schedule) keeps the two workers' loads
# within one short file of each other; collection order alone (alphabetical)
# left one worker idle for 140 s of a 790-s run. Seconds per file, measured
# with `--durations=0` on the 2-core machine (2026-12-08); files not listed run
# after these, in their usual order.
_FILE_SECONDS = {
    "test_notebooks.py": 225, "test_adjoints.py": 212, "test_sde.py": 153, "test_dde_backsolve.py": 135,
    "test_gradients.py": 117, "test_single_kernel.py": 116, "test_sde_backsolve.py": 114, "test_dde.py": 92,
    "test_stiff.py": 58, "test_nn.py": 32, "test_solution.py": 30, "test_brownian.py": 28,
    "test_accuracy.py": 21, "test_forward_mode.py": 15, "test_errors.py": 12, "test_demo.py": 12,
}


def pytest_collection_modifyitems(config, items):
    # A stable sort: the tests of a file keep their order.
    items.sort(key=lambda item: -_FILE_SECONDS.get(item.path.name, 0))
