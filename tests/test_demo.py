"""The demo (`python -m neuralde.demo`) runs end to end, learns, and writes a PNG.

Short runs only: the point is that the pieces fit together, not the fit itself.
"""
import sys

import neuralde.demo


def test_demo_trains_and_writes_png(tmp_path):
    out = tmp_path / "demo.png"
    result = neuralde.demo.main(["--iters", "40", "--out", str(out)])

    assert result["png"] == str(out.resolve())
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # Measured (float64, seed 0): 1.92e2 -> 2.47e1, a factor of ~7.8 in 40
    # steps. Requiring 3 leaves headroom yet catches a wrong or zero gradient.
    assert result["final_loss"] < result["initial_loss"] / 3


def test_demo_without_matplotlib_still_reports_loss(tmp_path, monkeypatch, capsys):
    # A None entry in sys.modules makes `import matplotlib` fail as if it were
    # not installed; training is stubbed out, as the test above covers it.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(neuralde.demo, "train", lambda model, u0, data, iters, lr: (model, [2.0, 1.0]))
    out = tmp_path / "demo.png"
    result = neuralde.demo.main(["--iters", "2", "--out", str(out)])

    assert result["png"] is None
    assert not out.exists()
    assert result["final_loss"] == 1.0
    captured = capsys.readouterr()
    assert "1.0000e+00" in captured.out
    assert 'pip install "neuralde[examples]"' in captured.err


def test_quick_env_reduces_default_iterations(monkeypatch):
    monkeypatch.setenv("NEURALDE_DEMO_QUICK", "1")
    assert neuralde.demo._parse_args([]).iters == neuralde.demo.QUICK_ITERS
    monkeypatch.delenv("NEURALDE_DEMO_QUICK")
    assert neuralde.demo._parse_args([]).iters == neuralde.demo.DEFAULT_ITERS
