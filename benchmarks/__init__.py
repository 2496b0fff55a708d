"""Measurements of this template, each run from the repository root as ``python -m
benchmarks.<name>`` (``benchmarks`` is a package there, not an installed one; each uses
``fpo``'s public API only):

- ``run``: our objectives side by side with TRL (issue 11; ``benchmarks/config.yaml``);
  ``memory_phases``, ``packing_flops`` and ``equal_math`` are its parts and companions;
- ``reference_cache``: FPO from the offline reference cache vs online, SimPO, TDPO-2;
- ``cache_verify``: what checking the cache shards' sha256 costs when a cache is opened;
- ``strategy_step``: a few optimizer steps of the paper setting under one trainer strategy
  on a GPU (``device_strategies.sh`` runs every strategy);
- ``bf16_feature_drift``: FPO's feature distance at step 0 under bf16 autocast
  (``device_bf16.sh`` on a GPU);
- ``subnormals``: a CPU matmul on subnormal floats, with and without flushing them.

``device_checks.sh`` runs every GPU-only measurement in one device call.
"""
