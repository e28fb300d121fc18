"""Megatron's distributed optimizer (``--use-distributed-optimizer``) state in the legacy form:
``distrib_optim.pt`` beside each rank's ``model_optim_rng.pt``, whose ``optimizer`` entry then
holds only the param groups.

The file is what DP rank 0 gathers (megatron-core ``DistributedOptimizer.get_parameter_state_dp_zero``):
``{"buckets_coalesced": True, 0: {(param dtype, grad dtype): {"param", "exp_avg", "exp_avg_sq":
flat fp32, "numel_unpadded": n}}}``, one flat buffer per grad buffer (one for a LLaMA: every
weight has one dtype). A buffer holds the rank's parameters in *reverse* model order (backprop
order), each starting at a multiple of 64 elements within its bucket; a bucket closes once it
holds ``bucket_size`` elements, and a shared (tied, pipelined) embedding gets a bucket of its own;
the gathered buffer drops each bucket's end padding (to a multiple of lcm(DP, 128)), so it does not
depend on the DP size (megatron-core ``distributed/param_and_grad_buffer.py``). ``param`` is the
fp32 master. Parameters are taken in the order the rank file's ``model`` entry lists them (the
module's registration order, as megatron-core builds the buffer from ``named_parameters``).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from megallama.checkpoint import megatron as mg
from megallama.checkpoint.streaming import Lazy, materialize
from megallama.errors import UserError

KEYS = (("param", "master"), ("exp_avg", "exp_avg"), ("exp_avg_sq", "exp_avg_sq"))  # Megatron's -> ours
ALIGN = 64  # param_and_grad_buffer.py _pad_start_of_param_if_needed: 128-byte aligned 16-bit values


def flat_layout(numels: Sequence[int], own_bucket: Sequence[bool],
                bucket_size: Optional[int]) -> Tuple[List[int], int]:
    """Each parameter's offset in the gathered buffer (parameters given in model order) and the
    buffer's length, as megatron-core's ``_ParamAndGradBuffer`` places them."""
    offsets = [0] * len(numels)
    done, local, held = 0, 0, 0  # elements of closed buckets; position in, and params of, the open one
    for i in reversed(range(len(numels))):
        local = math.ceil(local / ALIGN) * ALIGN
        if own_bucket[i] and held:  # the previous bucket closes at this parameter's aligned start
            done, local, held = done + local, 0, 0
        offsets[i] = done + local
        local, held = local + numels[i], held + 1
        if own_bucket[i] or (bucket_size is not None and local >= bucket_size):
            done, local, held = done + local, 0, 0
    return offsets, done + local


def bucket_size(args, stage: int, n_params: int) -> Optional[int]:
    """megatron's DDP bucket size: none without ``overlap_grad_reduce`` or past the first stage."""
    a = vars(args)
    if not a.get("overlap_grad_reduce") or stage > 0:
        return None
    if a.get("ddp_num_buckets"):
        return n_params // a["ddp_num_buckets"]
    dp = (a.get("data_parallel_size") or 1) * (a.get("context_parallel_size") or 1)
    return a.get("ddp_bucket_size") or max(40_000_000, 1_000_000 * dp)


def own_buckets(names: Sequence[str], tied: bool, stage: int, pp: int) -> List[bool]:
    """A tied embedding's copies on the first and last of several stages each get their own bucket."""
    shared = set()
    if tied and pp > 1:
        shared = {mg.EMB} if stage == 0 else {mg.OUT} if stage == pp - 1 else set()
    return [n in shared for n in names]


def layout(names: Sequence[str], shapes: Dict[str, Tuple[int, ...]], args, tied: bool, stage: int,
           pp: int) -> Tuple[List[int], int]:
    numels = [math.prod(shapes[n]) for n in names]
    return flat_layout(numels, own_buckets(names, tied, stage, pp), bucket_size(args, stage, sum(numels)))


def in_buckets(numels: Sequence[int], lengths: Sequence[int], where) -> List[int]:
    """Offsets as :func:`flat_layout` places them, the buckets given by their saved lengths (torch_dist's
    ``dp_reshardable`` form keeps one tensor per bucket): a bucket ends where a parameter (or an
    aligned start) reaches its length."""
    offsets, done, local, b = [0] * len(numels), 0, 0, 0
    for i in reversed(range(len(numels))):
        local = math.ceil(local / ALIGN) * ALIGN
        if b < len(lengths) and local and local == lengths[b]:  # closed before a bucket of its own
            done, local, b = done + local, 0, b + 1
        offsets[i] = done + local
        local += numels[i]
        if b >= len(lengths) or local > lengths[b]:
            break
        if local == lengths[b]:
            done, local, b = done + local, 0, b + 1
    if b != len(lengths) or local:
        raise UserError(f"{where}: its buckets hold {list(lengths)} elements; Megatron's layout of the rank's "
                        f"{len(numels)} parameters does not fill them")
    return offsets


def te_order(names: Sequence[str]) -> List[str]:
    """Transformer Engine's registration order: each norm inside the linear layer after it, after the
    attention's output projection (megatron-core builds ``linear_proj`` before ``linear_qkv``)."""
    out: List[str] = []
    for name in names:
        if out and out[-1].endswith("input_layernorm.weight") and name.endswith("linear_proj.weight"):
            out.insert(len(out) - 1, name)
        else:
            out.append(name)
    return out


def check_masters(first_rows, where) -> None:
    """Megatron copies the fp32 masters into the weights after every step, so each weight's first
    row is its master's, cast: a parameter order or bucket split other than the one assumed shows."""
    for name, master, weight in first_rows:
        if not torch.equal(master.to(weight.dtype), weight):
            raise UserError(f"{where}: the distributed optimizer's fp32 master of '{name}' is not its weight (its "
                            "flat buffers do not hold the parameters in the order Megatron's local or Transformer "
                            "Engine layers register them)")


# ----------------------------------------------------------------------------- reading
def locate_rank(path: Path, names: Sequence[str], shapes: Dict[str, Tuple[int, ...]], args, tied: bool,
                stage: int, pp: int) -> Tuple[Tuple, Dict[str, int]]:
    """The key path of the buffers in ``path`` (``(0, dtypes)``, then a Megatron key) and each
    parameter's offset in them, the file checked first."""
    from megallama.checkpoint.megatron_files import load_file

    data = load_file(path) if path.is_file() else None
    if data is None:
        raise UserError(f"{path}: not found (args.use_distributed_optimizer is set, so Megatron saved the Adam "
                        "state there)")
    if not data.get("buckets_coalesced"):
        raise UserError(f"{path}: not the coalesced-bucket form megatron-core has written since Feb 2024 (re-save it "
                        "with Megatron's --ckpt-convert-update-legacy-dist-opt-format)")
    buffers = [k for k in data if k != "buckets_coalesced"]
    per_dtype = data.get(0)
    if buffers != [0] or not isinstance(per_dtype, dict) or len(per_dtype) != 1:
        raise UserError(f"{path}: expected one grad buffer of one dtype (a LLaMA's weights share a dtype), got "
                        f"buffers {buffers!r:.60}")
    dtypes, flat = next(iter(per_dtype.items()))
    offsets, total = layout(names, shapes, args, tied, stage, pp)
    if not isinstance(flat, dict) or flat.get("numel_unpadded") != total:
        got = flat.get("numel_unpadded") if isinstance(flat, dict) else None
        raise UserError(f"{path}: its buffer holds {got!r:.40} elements; Megatron's layout of this rank's "
                        f"{len(names)} parameters gives {total}")
    for key, _ in KEYS:
        t = flat.get(key)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (total,) or not t.dtype.is_floating_point:
            raise UserError(f"{path}: '{key}' is not a flat float tensor of {total} elements")
    return (0, dtypes), dict(zip(names, offsets))


# ----------------------------------------------------------------------------- writing
def rank_entry(names: Sequence[str], shapes: Dict[str, Tuple[int, ...]], makers: Dict[str, Dict[str, Callable]],
               param_dtype: torch.dtype, args, tied: bool, stage: int, pp: int, placeholder) -> Tuple[Dict, Dict]:
    """``distrib_optim.pt``'s entry (placeholders) and the fills of its flat buffers, each a lazy
    buffer read a block at a time. ``makers``: ours key (master, exp_avg...) -> name -> shard maker."""
    offsets, total = layout(names, shapes, args, tied, stage, pp)
    dtypes = (param_dtype, torch.float32 if vars(args).get("accumulate_allreduce_grads_in_fp32") else param_dtype)
    flat: Dict = {key: placeholder((total,), torch.float32) for key, _ in KEYS}
    flat["numel_unpadded"] = total
    fills = {(0, dtypes, key): (lambda m=makers[ours]: _flat(m, names, shapes, offsets, total)) for key, ours in KEYS}
    return {"buckets_coalesced": True, 0: {dtypes: flat}}, fills


def _flat(makers: Dict[str, Callable], names, shapes, offsets, total) -> Lazy:
    """The gathered buffer as a lazy 1-D tensor: a block reads the rows of the parameters it covers
    (one dense parameter kept between blocks; padding reads as zeros)."""
    last: list = [None, None]

    def value(name):
        if last[0] != name:
            last[:] = [None, None]
            last[:] = [name, makers[name]()]
        return last[1]

    def read(a: int, b: int) -> torch.Tensor:
        out = torch.zeros(b - a, dtype=torch.float32)
        for off, name in sorted(zip(offsets, names)):  # buffer order: a parameter a block shares is the one kept
            numel = math.prod(shapes[name])
            lo, hi = max(a, off) - off, min(b, off + numel) - off
            if lo >= hi:
                continue
            row = numel // shapes[name][0]
            r0, r1 = lo // row, -(-hi // row)
            rows = materialize(mg._rows(value(name), r0, r1)).reshape(-1)
            out[off + lo - a:off + hi - a] = rows[lo - r0 * row:hi - r0 * row].float()
        return out
    return Lazy((total,), torch.float32, read)


# ----------------------------------------------------------------------------- torch_dist, dp_reshardable
_BUCKET = re.compile(r"^optimizer\.distributed\.dp_group_idx_(\d+)\.gbuf_idx_(\d+)\.dtype_(.+)\.bucket_idx_(\d+)\."
                     r"(param|exp_avg|exp_avg_sq)$")


def find_buckets(tensors: Dict[str, Tuple[Tuple[int, ...], torch.dtype]], where) -> Dict[int, Dict[str, List[str]]]:
    """megatron-core's ``dp_reshardable`` keys (Megatron-LM's default for the distributed optimizer
    in torch_dist): model-parallel rank -> Megatron key -> that rank's bucket tensors in order."""
    found: Dict[int, Dict[str, Dict[int, str]]] = {}
    kinds = set()
    for fqn in tensors:
        m = _BUCKET.match(fqn)
        if m:
            kinds.add((m.group(2), m.group(3)))
            found.setdefault(int(m.group(1)), {}).setdefault(m.group(5), {})[int(m.group(4))] = fqn
    if len(kinds) > 1:
        raise UserError(f"{where}: distributed-optimizer buckets of several grad buffers or dtypes ({sorted(kinds)}"
                        f"); a LLaMA's weights share one")
    out = {}
    for mp, keys in found.items():
        ordered = {k: [keys.get(k, {}).get(b) for b in range(len(keys.get("param", {})))] for k, _ in KEYS}
        lengths = {k: [tensors[f][0] if f else None for f in v] for k, v in ordered.items()}
        if len({str(v) for v in lengths.values()}) != 1 or None in lengths["param"] or not lengths["param"]:
            raise UserError(f"{where}: distributed-optimizer buckets of model-parallel rank {mp} are incomplete "
                            "(param, exp_avg and exp_avg_sq of every bucket, each 1-D)")
        out[mp] = ordered
    return out


def bucket_state(reader, buckets, cfg, args, padded: int, where):
    """``get(stage, tp rank, name, ours key)`` over the buckets (lazy boxes): model-parallel rank
    ``stage * tp + tp rank`` as megatron-core numbers them (TP fastest)."""
    a = vars(args)
    tp, pp = a.get("tensor_model_parallel_size") or 1, a.get("pipeline_model_parallel_size") or 1
    if sorted(buckets) != list(range(tp * pp)) or cfg.n_layers % pp or a.get("decoder_first_pipeline_num_layers") \
            or a.get("decoder_last_pipeline_num_layers"):
        raise UserError(f"{where}: distributed-optimizer buckets for model-parallel ranks {sorted(buckets)}, expected "
                        f"0..{tp * pp - 1} (tp={tp} x pp={pp}, layers split evenly)")
    counts = [cfg.n_layers // pp] * pp
    from megallama.checkpoint.consolidated import expected_shapes

    meta = {k: torch.empty(v, device="meta") for k, v in expected_shapes(cfg, str(where)).items()}
    located: Dict[Tuple[int, int, str], Tuple[int, int, Tuple[int, ...]]] = {}
    for mp, keys in buckets.items():
        s, t = divmod(mp, tp)
        shapes = {k: tuple(v.shape) for k, v in mg.from_megallama(meta, cfg, tp, counts, s, t, padded=padded).items()}
        names = list(shapes) if a.get("transformer_impl") == "local" else te_order(list(shapes))
        lengths = [reader.tensors[f][0][0] for f in keys["param"]]
        starts = [sum(lengths[:b]) for b in range(len(lengths))]
        for name, off in zip(names, in_buckets([math.prod(shapes[n]) for n in names], lengths, f"{where} (rank {mp})")):
            b = max(i for i, st in enumerate(starts) if st <= off)
            located[(s, t, name)] = (mp, b, off - starts[b], shapes[name])

    def get(s: int, t: int, name: str, key: str) -> Lazy:
        mp, b, off, shape = located[(s, t, name)]
        fqn = buckets[mp][key][b]
        row = math.prod(shape[1:])
        return Lazy(shape, torch.float32, lambda r0, r1: reader.load_box(fqn, (off + r0 * row,), ((r1 - r0) * row,))
                    .view((r1 - r0,) + tuple(shape[1:])))
    return get, tp, counts
