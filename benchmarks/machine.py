"""The machine a benchmark ran on, and results kept per machine kind.

A speed ratio measured where bf16 GEMMs are cheap (AMX) and one measured where they are not
(AVX-512-BF16 only) answer different questions, so every result names the CPU and its matrix
extensions, and a results file holds one entry per kind: a run on one kind never overwrites the
figures of another.
"""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Dict, Optional, Set

import torch

# /proc/cpuinfo flag -> the name the results use
MATRIX_FLAGS = {"amx_bf16": "AMX-BF16", "amx_tile": "AMX-TILE", "avx512_bf16": "AVX-512-BF16"}


def _cpuinfo_field(name: str, text: Optional[str] = None) -> Optional[str]:
    if text is None:
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    m = re.search(rf"^{name}\s*:\s*(.*)$", text, re.MULTILINE)
    return m.group(1).strip() if m else None


def cpu_model() -> str:
    """``model name`` of /proc/cpuinfo, else lscpu's ``Model name``, else what platform knows."""
    name = _cpuinfo_field("model name")
    if not name:
        try:
            out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            name = _cpuinfo_field("Model name", out)
        except (OSError, subprocess.SubprocessError):
            name = None
    return name or platform.processor() or platform.machine()


def cpu_flags() -> Set[str]:
    return set((_cpuinfo_field("flags") or "").split())


def kind_of(model: str, flags: Set[str], device: str = "cpu") -> str:
    """A short key: the CPU model slug and the strongest bf16 matrix extension, e.g.
    ``amd-epyc/avx512-bf16`` or ``intel-xeon-platinum-8480/amx``; on a GPU its name."""
    if device != "cpu":
        return "cuda/" + re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    slug = re.sub(r"\((r|tm)\)|cpu|processor|@.*$|\d+-core", " ", model.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-") or "unknown-cpu"
    ext = "amx" if {"amx_bf16", "amx_tile"} & flags else "avx512-bf16" if "avx512_bf16" in flags else "no-bf16-isa"
    return f"{slug}/{ext}"


def describe(device: str = "cpu") -> Dict:
    """What a result records about its machine (``kind`` is the key it is filed under)."""
    flags, model = cpu_flags(), cpu_model()
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    return {"kind": kind_of(model, flags, gpu or "cpu"), "cpu_model": model,
            "matrix_extensions": {name: flag in flags for flag, name in MATRIX_FLAGS.items()},
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "device": gpu or "cpu"}


def banner(machine: Dict) -> str:
    ext = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine["matrix_extensions"].items())
    return (f"machine kind {machine['kind']}: {machine['cpu_model']} x{machine['cpus']} ({ext}; torch ISA "
            f"{machine['torch_cpu_capability']}), {machine['torch_threads']} threads, device {machine['device']}")


def record(path: Path, result: Dict, kind: str, variant: Optional[str] = None) -> None:
    """File ``result`` under ``kind`` (and ``variant``, e.g. a precision, when given) in the JSON
    object at ``path``, other entries kept; written whole to a temporary file first so an
    interrupted run leaves the old file intact."""
    results = json.loads(path.read_text()) if path.exists() else {}
    if variant is None:
        results[kind] = result
    else:
        results.setdefault(kind, {})[variant] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)
