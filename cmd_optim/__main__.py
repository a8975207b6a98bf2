"""Command line: ``python -m cmd_optim demo|analyze`` (also the ``cmd-optim`` console script)."""
from __future__ import annotations

import sys


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"demo": "cmd_optim.demo", "analyze": "cmd_optim.analysis"}
    if not argv or argv[0] not in commands:
        print("usage: cmd-optim {demo,analyze} [options]   (cmd-optim COMMAND --help for the options)")
        raise SystemExit(0 if argv[:1] in (["-h"], ["--help"]) else 2)
    from importlib import import_module

    import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
