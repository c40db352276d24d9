"""``python -m fairage.cli``."""

from . import main

main()
