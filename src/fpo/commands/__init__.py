"""The command-line entry points, one module per command (``fpo-train`` is `train`).

Each module only composes its config and calls library code; what they share (user errors
as one paragraph, the config folder, the CUDA allocator default) is in `common`.
"""
