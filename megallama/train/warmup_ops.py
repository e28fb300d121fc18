"""Build DeepSpeed's JIT ops once, before any ranks start (two ranks building at once can abort).

Run as ``python -m megallama.train.warmup_ops``; ``make`` does it after installing.
"""
from __future__ import annotations

import sys


def warmup() -> int:
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
    except Exception as exc:  # deepspeed not importable: nothing to build
        print(f"warmup_ops: deepspeed unavailable ({exc})")
        return 0
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        print("warmup_ops: no shared-memory comm op for this accelerator")
        return 0
    builder.load()
    print(f"warmup_ops: {builder.absolute_name()} ready")
    return 0


if __name__ == "__main__":
    sys.exit(warmup())
