"""``python -m zmqdist``: the command line."""

from zmqdist.cli import main

main()
