"""Megatron's legacy checkpoint directory: ``latest_checkpointed_iteration.txt`` and, per TP rank
and pipeline stage, ``iter_NNNNNNN/mp_rank_TT[_SSS]/model_optim_rng.pt`` (a torch pickle).

Unpickling runs only torch's weights-only loader: tensors and plain data, Megatron's ``args``
(an ``argparse.Namespace``), numpy's RNG arrays, and Megatron's enums rebuilt as inert records.
Anything else is refused in one line naming the file and the global. Files are memory-mapped and
each tensor read on demand, so a conversion holds row blocks, not the model. Adam state is
that of Megatron's non-distributed optimizers (torch Adam's ``state`` indexed over parameter
groups built in model order, 2-D weights first, then norms; fp32 masters in
``fp32_from_fp16_params`` under bf16/fp16) or, under ``args.use_distributed_optimizer``, the flat
buffers of ``distrib_optim.pt`` (:mod:`~megallama.checkpoint.megatron_dopt`).
"""
from __future__ import annotations

import math
import re
from argparse import Namespace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from megallama.checkpoint import megatron as mg
from megallama.checkpoint.streaming import CHUNK_BYTES, Lazy, nbytes
from megallama.config import ModelConfig
from megallama.errors import UserError

TRACKER, FILE, DOPT_FILE = "latest_checkpointed_iteration.txt", "model_optim_rng.pt", "distrib_optim.pt"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")
MOMENTS = ("exp_avg", "exp_avg_sq")


class MegatronEnum:
    """An enum member of Megatron's (``AttnBackend.auto``...) as an inert record of its value."""

    def __init__(self, value: Any = None):
        self.value = value

    def __repr__(self) -> str:
        return f"MegatronEnum({self.value!r})"


_ENUMS = ["megatron.core.enums.ModelType", "megatron.core.transformer.enums.ModelType",
          "megatron.core.transformer.enums.AttnBackend", "megatron.core.transformer.enums.AttnMaskType",
          "megatron.core.transformer.enums.AttnType", "megatron.core.transformer.enums.LayerType",
          "megatron.core.transformer.enums.CudaGraphScope", "megatron.core.enums.Fp8Recipe",
          "megatron.legacy.model.enums.AttnMaskType", "megatron.legacy.model.enums.AttnType",
          "megatron.legacy.model.enums.LayerType", "megatron.model.enums.AttnMaskType",
          "megatron.model.enums.AttnType", "megatron.model.enums.LayerType",
          "megatron.model.enums.PositionEmbeddingType"]


def allowed_globals() -> list:
    import numpy as np

    found: list = [Namespace, np.ndarray, np.dtype] + [(MegatronEnum, name) for name in _ENUMS]
    core = getattr(np, "_core", None) or np.core
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 and 2 name it differently
        found.append((core.multiarray._reconstruct, f"{module}._reconstruct"))
    numeric = ("Int", "UInt", "Float", "Bool")  # RNG states hold uint32/float64 arrays; never object arrays
    found += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", None))
              if n.endswith("DType") and n.startswith(numeric)]
    return found


def load_file(path: Path) -> Dict:
    """A rank file, memory-mapped (tensors read when touched), weights-only with the allow-list."""
    from megallama.checkpoint.safe_pickle import load_weights_only, refusal_reason

    try:
        try:
            data = load_weights_only(path, allowed_globals(), mmap=True)
        except RuntimeError as exc:  # the legacy (non-zip) format cannot be mapped
            if "mmap" not in str(exc):
                raise
            data = load_weights_only(path, allowed_globals())
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except Exception as exc:  # UnpicklingError and friends: report, never execute
        raise UserError(f"{path}: refusing to unpickle it: not a torch file of only tensors, plain data and "
                        f"Megatron's args ({refusal_reason(exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a dict of Megatron checkpoint entries, got {type(data).__name__}")
    return data


def iteration_dir(path: Path) -> Path:
    """The ``iter_NNNNNNN`` (or ``release``) directory ``path`` is or its tracker file names."""
    p = Path(path)
    tracker = p / TRACKER
    if tracker.is_file():
        with open(tracker, "rb") as fh:
            text = fh.read(64).decode(errors="replace").strip()
        if text != "release" and not text.isdigit():
            raise UserError(f"{tracker}: expected an iteration number or 'release', got {text[:40]!r}")
        p = p / ("release" if text == "release" else f"iter_{int(text):07d}")
        if not p.is_dir():
            raise UserError(f"{p}: not found (named by {tracker})")
    elif not is_torch_dist(p) and not any(_RANK_DIR.match(d.name) for d in p.iterdir()):
        raise UserError(f"{path}: no {TRACKER}, no mp_rank_XX directories and no torch_dist files (not a Megatron "
                        "checkpoint)")
    return p


def is_torch_dist(p: Path) -> bool:
    """megatron-core's ``torch_dist`` form (read by :mod:`~megallama.checkpoint.megatron_dist`)."""
    return any((p / f).is_file() for f in (".metadata", "common.pt", "metadata.json"))


def check_shapes(cfg: ModelConfig, tp: int, layer_counts: List[int], padded: int, s: int, t: int,
                 got: Dict[str, Tuple[Tuple[int, ...], torch.dtype]], where) -> None:
    """Every tensor of stage ``s``, TP rank ``t`` is one Megatron's LLaMA holds there, of its shape."""
    from megallama.checkpoint.consolidated import expected_shapes

    meta_state = {k: torch.empty(v, device="meta") for k, v in expected_shapes(cfg, str(where)).items()}
    want = {k: tuple(v.shape) for k, v in mg.from_megallama(meta_state, cfg, tp, layer_counts, s, t,
                                                            padded=padded).items()}
    if cfg.tie_embeddings and s == len(layer_counts) - 1:
        want.setdefault(mg.OUT, want.get(mg.EMB, (padded // tp, cfg.dim)))
    for name, (shape, dtype) in got.items():
        if name not in want:
            raise UserError(f"{where}: unexpected tensor '{name}' (not a LLaMA GPT layer)")
        if tuple(shape) != want[name] or not dtype.is_floating_point:
            raise UserError(f"{where}: tensor '{name}' is {dtype} {tuple(shape)}, expected a float tensor of shape "
                            f"{want[name]}")
    absent = sorted(set(want) - set(got) - ({mg.OUT} if cfg.tie_embeddings else set()))
    if absent:
        raise UserError(f"{where}: missing tensor '{absent[0]}'")


def _flatten(tree: Dict, prefix: str = "") -> Dict[str, Tuple[str, ...]]:
    """Dotted name -> key path of every tensor in a (possibly nested) state dict."""
    out: Dict[str, Tuple[str, ...]] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update({n: (key,) + p for n, p in _flatten(value, name + ".").items()})
        elif isinstance(value, torch.Tensor) and not name.endswith("_extra_state"):
            out[name] = (key,)
    return out


class MegatronCheckpoint:
    """A legacy checkpoint's config, layout and tensors, checked before any tensor is read."""

    def __init__(self, path: Path):
        self.dir = iteration_dir(path)
        grid = {}
        for d in sorted(self.dir.iterdir()):
            m = _RANK_DIR.match(d.name)
            if m:
                grid[(int(m.group(2) or 0), int(m.group(1)))] = d / FILE
        self.pp = 1 + max(s for s, _ in grid)
        self.tp = 1 + max(t for _, t in grid)
        missing = [(s, t) for s in range(self.pp) for t in range(self.tp) if (s, t) not in grid]
        if missing:
            raise UserError(f"{self.dir}: rank directory for pipeline stage {missing[0][0]}, TP rank "
                            f"{missing[0][1]} is missing (found a {self.tp} x {self.pp} grid)")
        self.files = grid
        self._mapped = _Mapped()
        first = load_file(grid[(0, 0)])
        where = str(grid[(0, 0)])
        if "model" not in first:
            raise UserError(f"{where}: no 'model' entry" + (" (virtual pipeline stages are not read)"
                                                            if "model0" in first else ""))
        self.args = first.get("args")
        self.cfg: ModelConfig = mg.config_from_args(self.args, where)
        a = vars(self.args)
        for key, n in (("tensor_model_parallel_size", self.tp), ("pipeline_model_parallel_size", self.pp)):
            if a.get(key, n) != n:
                raise UserError(f"{where}: args.{key}={a[key]} but the directory holds {n} such ranks")
        mg.check_layout(self.cfg, self.tp)
        self.iteration = int(first.get("iteration", 0) or 0)
        self.consumed = int(a.get("consumed_train_samples", 0) or 0)
        self.padded = a["padded_vocab_size"]
        self.names: Dict[Tuple[int, int], Dict[str, Tuple[str, ...]]] = {}
        self.meta: Dict[Tuple[int, int, str], Tuple[Tuple[int, ...], torch.dtype]] = {}
        self.distributed = bool(a.get("use_distributed_optimizer"))  # Adam state in distrib_optim.pt
        self.has_optimizer = True
        for (s, t), f in sorted(grid.items()):
            data = first if (s, t) == (0, 0) else load_file(f)
            flat = {mg.canonical(n): ("model",) + p for n, p in _flatten(data.get("model") or {}).items()}
            self.names[(s, t)] = flat
            for name, keys in flat.items():
                tensor = _at(data, keys)
                self.meta[(s, t, name)] = (tuple(tensor.shape), tensor.dtype)
            held = (f.parent / DOPT_FILE).is_file() if self.distributed else bool(data.get("optimizer"))
            self.has_optimizer &= held
        self.layer_counts = [self._count_layers(s) for s in range(self.pp)]
        if sum(self.layer_counts) != self.cfg.n_layers:
            raise UserError(f"{self.dir}: its stages hold {sum(self.layer_counts)} layers, args.num_layers is "
                            f"{self.cfg.n_layers}")
        self._check_shapes()

    def _count_layers(self, s: int) -> int:
        layers = {mg.layer_of(n)[0] for n in self.names[(s, 0)]} - {None}
        return max(layers) + 1 if layers else 0

    def _check_shapes(self) -> None:
        for (s, t), names in self.names.items():
            check_shapes(self.cfg, self.tp, self.layer_counts, self.padded, s, t,
                         {n: self.meta[(s, t, n)] for n in names}, self.files[(s, t)])

    def get(self, s: int, t: int, name: str) -> Lazy:
        shape, dtype = self.meta[(s, t, name)]
        path, keys = self.files[(s, t)], self.names[(s, t)][name]

        def read(a: int, b: int) -> torch.Tensor:
            rows = self._mapped.tensor(path, keys)[a:b].clone()
            self._mapped.read_bytes += nbytes(rows)
            return rows
        return Lazy(shape, dtype, read)

    def weights(self) -> Dict[str, Lazy]:
        return mg.to_megallama(self.get, self.cfg, self.tp, self.layer_counts)

    def optimizer(self) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, Dict[str, torch.Tensor]]]]:
        """``(fp32 masters, {moment: state})`` in megallama's names, or None when not held here."""
        if not self.has_optimizer:
            return None
        shards: Dict[Tuple[int, int, str], Dict[str, torch.Tensor]] = {}
        for (s, t), path in self.files.items():
            if self.distributed:
                state = self._distributed_state(s, t, path.parent / DOPT_FILE)
            else:
                state = _adam_state(load_file(path), self.names[(s, t)], path)
            for name, moments in state.items():
                shards[(s, t, name)] = moments
        parts = {key: mg.to_megallama(lambda s, t, n, key=key: shards[(s, t, n)][key], self.cfg, self.tp,
                                      self.layer_counts) for key in ("master",) + MOMENTS}
        return parts["master"], {k: parts[k] for k in MOMENTS}

    def _distributed_state(self, s: int, t: int, path: Path) -> Dict[str, Dict[str, Lazy]]:
        """A rank's ``distrib_optim.pt`` as lazy tensors, read through the remapped file like the weights."""
        from megallama.checkpoint.megatron_dopt import KEYS, check_masters, locate_rank

        names = list(self.names[(s, t)])
        shapes = {n: self.meta[(s, t, n)][0] for n in names}
        prefix, offsets = locate_rank(path, names, shapes, self.args, self.cfg.tie_embeddings, s, self.pp)

        def lazy(name: str, key: str) -> Lazy:
            shape, off = shapes[name], offsets[name]
            row = math.prod(shape[1:])

            def read(a: int, b: int) -> torch.Tensor:
                flat = self._mapped.tensor(path, prefix + (key,))
                rows = flat[off + a * row:off + b * row].view((b - a,) + tuple(shape[1:])).clone()
                self._mapped.read_bytes += nbytes(rows)
                return rows
            return Lazy(shape, torch.float32, read)
        state = {n: {ours: lazy(n, key) for key, ours in KEYS} for n in names}
        check_masters(((n, state[n]["master"].rows(0, 1).load(), self.get(s, t, n).rows(0, 1).load()) for n in names),
                      path)
        return state


class _Mapped:
    """One rank file mapped at a time, mapped afresh once ``CHUNK_BYTES`` have been read from it:
    the pages a read touched stay resident only while their mapping lives, so this bounds them."""

    def __init__(self):
        self.path, self.data, self.read_bytes = None, None, 0

    def tensor(self, path: Path, keys: Tuple[str, ...]) -> torch.Tensor:
        if path != self.path or self.read_bytes >= CHUNK_BYTES:
            self.data = None  # the old mapping goes before the new one is made
            self.path, self.data, self.read_bytes = path, load_file(path), 0
        return _at(self.data, keys)


def _at(data: Dict, keys: Tuple[str, ...]):
    for k in keys:
        data = data[k]
    return data


def param_order(names: List[str], shape_of) -> List[List[str]]:
    """Megatron's optimizer groups: parameters in model order, weights (decayed) then 1-D norms."""
    return [[n for n in names if len(shape_of(n)) > 1], [n for n in names if len(shape_of(n)) <= 1]]


def _adam_state(data: Dict, names: Dict[str, Tuple[str, ...]], path: Path) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per canonical name: ``master`` (fp32), ``exp_avg``, ``exp_avg_sq`` of one rank file."""
    opt = data["optimizer"]
    if isinstance(opt, list) and len(opt) == 1:  # a ChainedOptimizer of one
        opt = opt[0]
    inner = opt.get("optimizer", opt) if isinstance(opt, dict) else None
    if not isinstance(inner, dict) or not isinstance(inner.get("state"), dict) or "param_groups" not in inner:
        raise UserError(f"{path}: 'optimizer' is not a torch Adam state (state and param_groups)")
    masters = opt.get("fp32_from_fp16_params")
    weights = {n: _at(data, k) for n, k in names.items()}
    groups = [g for g in param_order(list(names), lambda n: weights[n].shape) if g]
    held = [(gi, list(g.get("params", []))) for gi, g in enumerate(inner["param_groups"]) if g.get("params")]
    if [len(ids) for _, ids in held] != [len(g) for g in groups]:
        raise UserError(f"{path}: optimizer groups hold {[len(ids) for _, ids in held]} parameters; Megatron's "
                        f"grouping of this model (weights, then norms) gives {[len(g) for g in groups]}")
    out = {}
    for group, (gi, ids) in zip(groups, held):
        if masters is not None and not (isinstance(masters, list) and gi < len(masters)
                                        and isinstance(masters[gi], list) and len(masters[gi]) == len(group)):
            raise UserError(f"{path}: optimizer fp32_from_fp16_params does not match its parameter groups")
        for j, (name, idx) in enumerate(zip(group, ids)):
            st = inner["state"].get(idx, {})
            master = masters[gi][j] if masters else weights[name]
            entry = {"master": master.float(), **{k: st.get(k) for k in MOMENTS}}
            for k, v in entry.items():
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(weights[name].shape):
                    raise UserError(f"{path}: optimizer {k} of '{name}' is missing or not of shape "
                                    f"{tuple(weights[name].shape)}")
            out[name] = {k: v.float() for k, v in entry.items()}
    return out
