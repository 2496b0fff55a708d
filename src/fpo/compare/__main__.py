"""``python -m fpo.compare DIR [DIR ...] --out OUT`` (the same as ``fpo-compare``)."""

from fpo.commands.compare import main

main()
