"""``python -m fpo.compare DIR [DIR ...] --out OUT`` (the same as ``fpo-compare``)."""

from fpo.compare.cli import main

main()
