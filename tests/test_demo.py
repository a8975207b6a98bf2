import re
import subprocess
import sys

from benchmarks import demo


def test_demo_prints_the_comparison_with_the_model_at_the_switch(capsys):
    rows = demo.main(["--steps", "300", "--switch-after", "100", "--modes", "5"])
    out = capsys.readouterr().out
    row = r"^(SGD at the switch|SGD|CMD\(SGD\)|CMD\(SGD\), modes)\s+([\d.]+)\s+([\d,]+)"
    printed = {m.group(1): m.groups()[1:] for m in re.finditer(row, out, re.M)}
    assert set(printed) == {"SGD at the switch", "SGD", "CMD(SGD)", "CMD(SGD), modes"}
    assert printed["SGD"][1] == "85,002" and int(printed["CMD(SGD), modes"][1]) <= 5
    assert int(printed["CMD(SGD)"][1].replace(",", "")) < 85_002  # the projected cores and the full vectors
    assert float(printed["CMD(SGD)"][0]) > 0.85
    assert "Recovery" in out and "How to read it" in out
    assert [r["method"] for r in rows] == ["SGD at the switch", "SGD", "CMD(SGD)", "CMD(SGD), modes"]


def test_without_the_data_extra_the_demo_names_it():
    """A user who installed without extras gets one line naming the extra, not a traceback."""
    code = ("import sys, builtins; real = builtins.__import__\n"
            "def fake(name, *a, **k):\n"
            "    if name.startswith('sklearn'): raise ImportError('No module named sklearn')\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = fake\n"
            "from benchmarks import demo; demo.main([])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "pip install -e '.[data]'" in result.stderr
