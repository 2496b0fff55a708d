"""The comparison study that ``docs/results.md`` reports, as one resumable command,
``fpo-study`` (`fpo.study.comparison`): it runs ``fpo-cache``, ``fpo-train -m`` and
``fpo-compare`` in the repository checkout and writes ``docs/results/``."""
