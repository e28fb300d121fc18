"""``universal_checkpoint_info``: what DeepSpeed's ``ds_to_universal`` needs to merge our files.

The tool rebuilds each full parameter from its TP slices by name pattern: TP-replicated (every
rank's copy equal; the first kept), row-parallel (joined on dim 1), vocabulary (joined, then cut
to ``original_vocab_size``: a padded vocabulary's zero rows go), fused sub-parameters (each rank
holds its slice of every block, Q|K|V or W1|W3, with the per-rank widths given), and otherwise
joined on dim 0. The engine writes the dict set on its module into every model-states file.

DeepSpeed reads it from the first file only (pipeline stage 0), so under a pipeline it must name
every stage's parameters: they come from a meta-device build of the whole model, under a prefix
that also matches DeepSpeed's layer index (``N.``) or tied-layer key. A fused block whose heads
are replicated over ranks (fewer KV heads than TP ranks: only the first copy trains) has no such
description; it is declared unsupported, and the tool refuses it in one line naming it. The
run's layout meta rides along under ``megallama``, so a converted directory says what it holds.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, Tuple

MEGALLAMA = "megallama"  # our key inside the info: the run's layout meta (model config, schedule)
PREFIX = r"^(?:\d+\.|tied_modules\.[^.]+\.)?"  # DeepSpeed's pipeline layer index or tied-layer key


def pattern(name: str) -> str:
    """A regex for ``name`` (canonical) under any layer number and pipeline prefix."""
    parts = (r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))
    return PREFIX + r"\.".join(parts) + "$"


def _kind(info: Dict, shape: Tuple[int, ...], tp: int) -> Tuple[str, object]:
    from megallama.parallel.layers import tp_pieces

    if info["split_dim"] is None:
        return "replicated", None
    sizes = info["fused_sizes"] or [shape[info["split_dim"]]]
    if info.get("pad_multiple"):  # one block, cut evenly once padded
        return "vocab", sizes[0]
    pieces = tp_pieces(sizes, info.get("fused_heads"), tp)
    if any(rep > 1 for _, rep in pieces):
        return "unsupported", (f"heads replicated over TP ranks (fewer KV heads than tp={tp}) train only their "
                               "first copy; megallama's own universal/ holds them (megallama convert)")
    if len(sizes) == 1:
        return ("row", None) if info["split_dim"] == 1 else ("column", None)
    if info["split_dim"] != 0:
        return "unsupported", f"fused blocks along dim {info['split_dim']}"
    return "sub", ((tuple(sizes),) + tuple(shape[1:]), [[piece] * tp for piece, _ in pieces])


def build_info(params: Iterable[Tuple[str, Dict, Tuple[int, ...]]], tp: int, meta: Dict,
               tied: Iterable[str] = ()) -> Dict:
    """The info for ``(canonical name, split info, logical shape)`` of every parameter at ``tp``;
    ``tied``: DeepSpeed's names of weights a later pipeline stage holds a copy of (read once)."""
    from deepspeed.checkpoint import constants as c

    kinds: Dict[str, list] = {}
    for name, info, shape in params:
        kinds.setdefault(pattern(name), []).append((name, _kind(info, shape, tp)))
    out = {c.UNIVERSAL_CHECKPOINT_VERSION_KEY: c.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
           c.TP_REPLICATED_PARAMETER_PATTERNS: [], c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS: [],
           c.VOCABULARY_PARAMETER_PATTERNS: [], c.PARAMETER_WITH_SUB_PARAMS: [], c.SUB_PARAM_SHARD_WIDTHS: {},
           c.PIPELINE_REPLICATED_PARAMETER_PATTERNS: ["^" + re.escape(n) + "$" for n in tied],
           c.AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS: {}, MEGALLAMA: meta}
    lists = {"replicated": c.TP_REPLICATED_PARAMETER_PATTERNS, "row": c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS,
             "vocab": c.VOCABULARY_PARAMETER_PATTERNS}
    for pat, named in kinds.items():
        # names the pattern joins must merge alike; otherwise each gets its own exact pattern
        groups = [(pat, named[0][1])] if all(k == named[0][1] for _, k in named) else \
            [(PREFIX + re.escape(n) + "$", k) for n, k in named]
        for p, (kind, detail) in groups:
            if kind in lists:
                out[lists[kind]].append(p)
            if kind == "vocab":
                if out.setdefault(c.ORIGINAL_VOCAB_SIZE, detail) != detail:
                    out[c.AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS][p] = "a second, different vocabulary size"
            elif kind == "sub":
                shape, widths = detail
                out[c.PARAMETER_WITH_SUB_PARAMS].append({"patterns": [p], "shape": shape, "partition_dim": 0})
                out[c.SUB_PARAM_SHARD_WIDTHS][p] = widths
            elif kind == "unsupported":
                out[c.AUTOTP_UNSUPPORTED_PARAMETER_PATTERNS][p] = detail
    return out


def attach(engine, module, meta: Dict, tp: int) -> None:
    """Set the info on ``engine.module`` (DeepSpeed saves what it finds there); built once per run."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO
    from deepspeed.pipe import PipelineModule

    from megallama.train.universal import _split_info, canonical_params

    if getattr(engine.module, UNIVERSAL_CHECKPOINT_INFO, None) is not None:
        return
    params = []
    for name, p in canonical_params(module):
        info, shape = _split_info(p), list(getattr(p, "ds_shape", p.shape))  # ZeRO-3 holds a partition
        if info["split_dim"] is not None:
            shape[info["split_dim"]] = sum(info["fused_sizes"])
        params.append((name, info, tuple(shape)))
    if isinstance(module, PipelineModule):  # this stage's parameters are not all of them
        from megallama.checkpoint.safe_read import model_config
        from megallama.train.universal import _expected

        shapes, splits = _expected(model_config(meta["model"], "checkpoint meta"))
        params = [(n, splits[n], shapes[n]) for n in shapes]
    tied = [f"tied_modules.{key}.{attr}" for key, attrs in getattr(module, "tied_weight_attrs", {}).items()
            for attr in attrs]  # only the weight: the rest of the last stage's tied layer is its own
    setattr(engine.module, UNIVERSAL_CHECKPOINT_INFO, build_info(params, tp, meta, tied))
