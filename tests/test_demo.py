import re

import pytest

from cmd_optim.__main__ import main


def test_demo_prints_a_comparison_table(capsys):
    main(["demo", "--steps", "300", "--warmup-steps", "100", "--modes", "5"])
    out = capsys.readouterr().out
    rows = {m.group(1): m.groups()[1:] for m in re.finditer(r"^(SGD|CMD\(SGD\))\s+([\d.]+)\s+([\d,]+)", out, re.M)}
    assert set(rows) == {"SGD", "CMD(SGD)"}
    assert rows["SGD"][1] == "85,002"
    assert int(rows["CMD(SGD)"][1]) <= 5
    assert float(rows["CMD(SGD)"][0]) > 0.85


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train"])
    assert exit_info.value.code == 2
    assert "usage: cmd-optim {demo,analyze}" in capsys.readouterr().out
