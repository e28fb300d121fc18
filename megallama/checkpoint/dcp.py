"""torchtitan's checkpoints: ``torch.distributed.checkpoint`` (DCP) directories with its LLaMA names.

torchtitan (v0.2) saves one flat state dict: the model's parameters at the top level
(``tok_embeddings.weight``, ``layers.N.attention.wq.weight``, ``feed_forward.w1.weight`` ...,
``output.weight``), Adam flattened per parameter (``optimizer.state.<name>.exp_avg``,
``optimizer.param_groups.<name>.lr``), ``lr_scheduler.*``, ``train_state.step`` and
``dataloader.*``. Its complex RoPE rotates adjacent channel pairs, Meta's layout, so Wq/Wk rows
(and their moments) are permuted per head as in the Meta import; its Llama 3 always scales RoPE
(Llama 3.1's factor 8 unless told otherwise). DCP stores no model config: the shape comes from a
``params.json`` of torchtitan's model args (Meta's names), which an export writes beside the data.

Nothing read runs pickled code (:mod:`megallama.checkpoint.dcp_safe`). Tensors are read one at a
time through DCP's planner, which assembles each from however many chunks the saving ranks wrote
(FSDP/TP shards): DCP reshards on load. Writing streams too: DCP plans from shape-only tensors and
each is produced only when DCP writes it, one file per tensor, so peak memory stays near the
largest tensor in both directions.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Tuple

import torch

from megallama.checkpoint.dcp_safe import SafeDcpReader
from megallama.checkpoint.meta import half_to_interleaved, interleaved_to_half, meta_shapes
from megallama.checkpoint.streaming import Lazy, Tensorish, cat, materialize
from megallama.config import ModelConfig
from megallama.config.schema import RopeScaling
from megallama.errors import UserError
from megallama.checkpoint.staging import staged_dir

PARAMS = "params.json"
OPT = "optimizer.state."
MOMENTS = ("exp_avg", "exp_avg_sq")
# torchtitan after v0.2 (main, 2026) renamed these; read either, write v0.2's
_ALIASES = {"attention.qkv_linear.wq.weight": "attention.wq.weight", "attention.qkv_linear.wk.weight":
            "attention.wk.weight", "attention.qkv_linear.wv.weight": "attention.wv.weight",
            "lm_head.weight": "output.weight"}
_SAME = ("attention.wo.weight", "feed_forward.w2.weight", "attention_norm.weight", "ffn_norm.weight")


# ------------------------------------------------------------------------------- lazy tensors
_LAST: list = [None, None]  # the last whole tensor computed: its rows are read block by block


def _whole(key, shape, dtype, compute: Callable[[], torch.Tensor]) -> Lazy:
    """A :class:`Lazy` computed whole once (a permutation needs every row of a head), then sliced."""
    def read(a: int, b: int) -> torch.Tensor:
        if _LAST[0] != key:
            _LAST[:] = [None, None]  # the previous tensor goes before the next is computed
            _LAST[:] = [key, compute()]
        return _LAST[1][a:b]
    return Lazy(shape, dtype, read)


def _permuted(t: Tensorish, heads: int, fn, key) -> Lazy:
    return _whole(key, tuple(t.shape), t.dtype, lambda: fn(materialize(t), heads))


# ------------------------------------------------------------------------------- name mapping
def from_titan(src: Mapping[str, Tensorish], cfg: ModelConfig, suffix: str = "") -> Dict[str, Tensorish]:
    """torchtitan's names (``suffix``: ``.exp_avg`` etc. for moments) -> megallama's TP=1 names, lazily."""
    out = {k: src[k + suffix] for k in ("tok_embeddings.weight", "norm.weight")}
    if not cfg.tie_embeddings:
        out["output.weight"] = src["output.weight" + suffix]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        q = _permuted(src[p + "attention.wq.weight" + suffix], cfg.n_heads, interleaved_to_half, (p, "q", suffix))
        k = _permuted(src[p + "attention.wk.weight" + suffix], cfg.kv_heads, interleaved_to_half, (p, "k", suffix))
        out[p + "attention.wqkv.weight"] = cat([q, k, src[p + "attention.wv.weight" + suffix]])
        out[p + "feed_forward.w13.weight"] = cat([src[p + f"feed_forward.w{n}.weight" + suffix] for n in (1, 3)])
        out.update({p + n: src[p + n + suffix] for n in _SAME})
    return out


def to_titan(state: Mapping[str, Tensorish], cfg: ModelConfig, suffix: str = "") -> Dict[str, Tensorish]:
    """megallama's TP=1 names -> torchtitan's (``suffix`` appended), lazily; a tied head is written
    as its own ``output.weight`` (torchtitan v0.2 has no tying)."""
    q, kv, hidden = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_hidden_size
    out = {"tok_embeddings.weight": state["tok_embeddings.weight"], "norm.weight": state["norm.weight"],
           "output.weight": state["tok_embeddings.weight" if cfg.tie_embeddings else "output.weight"]}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        wq, wk, wv = _rows(state[p + "attention.wqkv.weight"]).split([q, kv, kv])
        out[p + "attention.wq.weight"] = _permuted(wq, cfg.n_heads, half_to_interleaved, (p, "q", suffix))
        out[p + "attention.wk.weight"] = _permuted(wk, cfg.kv_heads, half_to_interleaved, (p, "k", suffix))
        out[p + "attention.wv.weight"] = wv
        out[p + "feed_forward.w1.weight"], out[p + "feed_forward.w3.weight"] = \
            _rows(state[p + "feed_forward.w13.weight"]).split([hidden, hidden])
        out.update({p + n: state[p + n] for n in _SAME})
    return {k + suffix: v for k, v in out.items()}


def _rows(t: Tensorish) -> Lazy:
    return t if isinstance(t, Lazy) else Lazy(t.shape, t.dtype, lambda a, b: t[a:b])


# ------------------------------------------------------------------------------- model config
def config_from_params(params: Dict, vocab: int, tied: bool, where: str) -> ModelConfig:
    """The model torchtitan's args describe (Meta's keys; RoPE scaled unless ``use_scaled_rope``
    is false; ``rope_scaling_args`` as torchtitan names them). An export's own record wins."""
    from megallama.checkpoint.meta import _config
    from megallama.checkpoint.safe_read import model_config

    if "megallama" in params:
        return model_config(params["megallama"], f"{where}: megallama")
    scaled = params.get("use_scaled_rope", True)
    cfg = _config({**params, "use_scaled_rope": False, "max_seq_len": params.get("max_seq_len", 131072)},
                  vocab, where, tied=tied)
    if scaled is not True:
        if scaled is not False:
            raise UserError(f"{where}: use_scaled_rope must be true or false, got {scaled!r:.40}")
        return cfg
    args = params.get("rope_scaling_args") or {}
    if not isinstance(args, dict):
        raise UserError(f"{where}: rope_scaling_args must be an object, got {args!r:.60}")
    names = {"scaling_factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor":
             "high_freq_factor", "original_max_position_embeddings": "original_max_seq_len"}
    unknown = sorted(set(args) - set(names))
    if unknown:
        raise UserError(f"{where}: rope_scaling_args.{unknown[0]}: unknown (expected {', '.join(names)})")
    try:
        scaling = RopeScaling(**{names[k]: v for k, v in args.items()})
    except Exception as exc:  # ValidationError / ConfigError: one line
        raise UserError(f"{where}: rope_scaling_args: {str(exc).splitlines()[0][:160]}") from None
    return ModelConfig.model_validate({**cfg.model_dump(), "rope_scaling": scaling.model_dump()})


def params_for(cfg: ModelConfig) -> Dict:
    """torchtitan's model args for ``cfg`` (what its ``llama3_args`` flavour must say), plus our record."""
    out = {k: getattr(cfg, k) for k in ("dim", "n_layers", "n_heads", "vocab_size", "multiple_of",
                                        "ffn_dim_multiplier", "norm_eps", "rope_theta", "max_seq_len")}
    out["n_kv_heads"] = cfg.kv_heads
    out["use_scaled_rope"] = cfg.rope_scaling is not None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        out["rope_scaling_args"] = {"scaling_factor": s.factor, "low_freq_factor": s.low_freq_factor,
                                    "high_freq_factor": s.high_freq_factor,
                                    "original_max_position_embeddings": s.original_max_seq_len}
    return {**out, "megallama": cfg.model_dump()}


# ------------------------------------------------------------------------------- reading
class TitanCheckpoint:
    """A torchtitan DCP directory: model config, lazy weights and (if saved) Adam moments and step.
    Every name and shape is checked against the config before a tensor is read."""

    def __init__(self, path, params_file: Optional[str] = None):
        from megallama.checkpoint.safe_read import read_json

        self.path = Path(path)
        self.reader = SafeDcpReader(self.path)
        self._fqn = {}  # model tensor under v0.2's name -> its name in the checkpoint
        for fqn in self.reader.tensors:
            if fqn.split(".", 1)[0] not in ("optimizer", "lr_scheduler", "train_state", "dataloader"):
                old = next((a for a in _ALIASES if fqn == a or fqn.endswith("." + a)), None)
                self._fqn[fqn[: len(fqn) - len(old)] + _ALIASES[old] if old else fqn] = fqn
        pfile = Path(params_file) if params_file else self.path / PARAMS
        if not pfile.is_file():
            raise UserError(f"{pfile}: not found; DCP keeps no model config: pass --params with torchtitan's "
                            "model args as JSON (dim, n_layers, n_heads, n_kv_heads, multiple_of, "
                            "ffn_dim_multiplier, norm_eps, rope_theta)")
        emb = self.reader.tensors.get("tok_embeddings.weight")
        if emb is None or len(emb[0]) != 2:
            raise UserError(f"{self.path}: no 2-D tensor 'tok_embeddings.weight' (not a torchtitan LLaMA checkpoint)")
        tied = "output.weight" not in self._names()
        self.cfg = config_from_params(read_json(pfile), emb[0][0], tied, str(pfile))
        if self.cfg.tie_embeddings and not tied:  # our export of a tied model wrote the head for torchtitan
            from megallama.checkpoint.streaming import equal

            if not equal(self._lazy(self._fqn["output.weight"]), self._lazy("tok_embeddings.weight")):
                raise UserError(f"{self.path}: {pfile.name} says the head is tied, but output.weight differs from "
                                "tok_embeddings.weight (trained untied since?): drop its 'megallama' record")
            del self._fqn["output.weight"]
        expected = meta_shapes(self.cfg)
        names = self._names()
        for name, shape in expected.items():
            got = names.get(name)
            if got is None:
                raise UserError(f"{self.path}: missing tensor '{name}' (the model {pfile.name} describes)")
            moments = [self.reader.tensors.get(OPT + self._fqn[name] + "." + m, got) for m in MOMENTS]
            bad = next((t for t in [got] + moments if tuple(t[0]) != shape or not t[1].is_floating_point), None)
            if bad is not None:
                raise UserError(f"{self.path}: tensor '{name}' (or its Adam state) is {tuple(bad[0])} of "
                                f"{str(bad[1]).replace('torch.', '')}, expected a float tensor of {shape} from "
                                f"{pfile.name}")
        extra = sorted(set(names) - set(expected))
        if extra:
            raise UserError(f"{self.path}: unexpected tensor '{extra[0]}' (not a torchtitan LLaMA checkpoint)")
        held = [OPT + f + "." + m in self.reader.tensors for f in self._fqn.values() for m in MOMENTS]
        if any(held) and not all(held):
            missing = next(OPT + f + "." + m for f in self._fqn.values() for m in MOMENTS
                           if OPT + f + "." + m not in self.reader.tensors)
            raise UserError(f"{self.path}: optimizer state is incomplete: no '{missing}'")
        self.has_optimizer = all(held)

    def _names(self) -> Dict[str, Tuple]:
        return {n: self.reader.tensors[f] for n, f in self._fqn.items()}

    def _lazy(self, fqn: str) -> Lazy:
        shape, dtype = self.reader.tensors[fqn]
        return _whole(("dcp", fqn), tuple(shape), dtype, lambda: self.reader.load(fqn))

    def weights(self) -> Dict[str, Tensorish]:
        return from_titan({n: self._lazy(f) for n, f in self._fqn.items()}, self.cfg)

    def moments(self, key: str) -> Dict[str, Tensorish]:
        return from_titan({n + "." + key: self._lazy(OPT + f + "." + key) for n, f in self._fqn.items()},
                          self.cfg, "." + key)

    def step(self) -> int:
        """``train_state.step``, else the optimizer's own step count, else 0."""
        value = self.reader.load_value("train_state.step")
        if value is None and self.has_optimizer:
            first = OPT + next(iter(self._fqn.values())) + ".step"
            value = int(self.reader.load(first).item()) if first in self.reader.tensors else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise UserError(f"{self.path}: train_state.step must be a non-negative integer, got {value!r:.40}")
        return value or 0


# ------------------------------------------------------------------------------- writing
def _planner(sources: Mapping[str, Tensorish]):
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class StreamingPlanner(DefaultSavePlanner):
        """Plans from shape-only tensors; each is produced only when DCP writes it."""

        def lookup_object(self, index):
            src = sources.get(index.fqn)
            return super().lookup_object(index) if src is None else materialize(src).detach().cpu().contiguous()

    return StreamingPlanner()


def save_titan(out: Path, tensors: Mapping[str, Tensorish], values: Dict, cfg: ModelConfig) -> None:
    """A DCP directory as torchtitan saves it (model flat, ``optimizer``/``lr_scheduler``/
    ``train_state`` nested), plus ``params.json``; written beside ``out`` and renamed into place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    state: Dict = {}
    for fqn, t in tensors.items():
        head, _, rest = fqn.partition(".")
        shape_only = torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
        if head == "optimizer":
            state.setdefault(head, {})[rest] = shape_only
        else:
            state[fqn] = shape_only
    for fqn, v in values.items():
        head, _, rest = fqn.partition(".")
        state.setdefault(head, {})[rest] = v
    try:
        with staged_dir(out) as tmp:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
                dcp.save(state, storage_writer=FileSystemWriter(str(tmp), single_file_per_rank=False),
                         planner=_planner(tensors))
            (tmp / PARAMS).write_text(json.dumps(params_for(cfg), indent=1))
    finally:
        _LAST[:] = [None, None]

