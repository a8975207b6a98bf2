"""``python -m cmd_optim analyze RUN_DIR`` (the ``cmd-optim`` console script)."""

from .analysis.cli import main

if __name__ == "__main__":
    main()
