"""Shared compiled functions in test modules, released when the module is done."""
import pytest


def release_after_module(clear):
    """An autouse module fixture that calls ``clear()`` after the module's tests.

    Kept alive for the rest of the session, a module's shared compiled functions
    (with everything else compiled in the run) once made XLA abort while
    compiling in a later module: the process neared its memory-mapping limit.
    Assign the result to a module-level name so that pytest finds it."""

    @pytest.fixture(scope="module", autouse=True)
    def _release_compiled():
        yield
        clear()

    return _release_compiled
