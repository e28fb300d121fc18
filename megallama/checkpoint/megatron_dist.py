"""megatron-core's ``torch_dist`` checkpoints: ``iter_NNNNNNN/`` holding a DCP directory
(``.metadata``, ``__R_I.distcp``), ``common.pt`` (args, iteration, optimizer param groups) and
``metadata.json`` (``"sharded_backend": "torch_dist"``).

Every key is one global tensor whatever TP/PP saved it: TP shards sit at their rank's offset, so
``linear_qkv`` is Megatron's per-group interleaved QKV of all groups in turn, ``linear_fc1`` every
rank's gate then every rank's up (megatron-core's SwiGLU sharded factory) and the vocabulary is
padded. Layers are stacked on a leading axis over all pipeline stages
(``decoder.layers.self_attention.linear_qkv.weight`` is ``[num_layers, ...]``) or, for
non-homogeneous blocks, keyed per layer (``decoder.layers.3....``). That is the legacy layout at
TP=1, PP=1, so :mod:`~megallama.checkpoint.megatron`'s mapping applies with one stage and one rank.
Adam state saved in model space (the non-distributed optimizers; the distributed optimizer's
``fully_sharded_model_space`` and ``fully_reshardable`` forms) is
``optimizer.state.{exp_avg,exp_avg_sq}.<key>``, with fp32 masters in
``optimizer.state.fp32_param.<key>`` (``param.`` in the reshardable form) under mixed precision;
the distributed optimizer's ``dp_reshardable`` form (Megatron-LM's default) keeps each
model-parallel rank's flat grad buckets instead (:mod:`~megallama.checkpoint.megatron_dopt`).

Nothing read runs code: ``.metadata`` through :mod:`~megallama.checkpoint.dcp_safe`'s allow-list,
``common.pt`` weights-only with the legacy reader's allow-list (Megatron's ``args`` Namespace).
Tensors are read box by box (one layer's row block), so a conversion holds row blocks, not the model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from megallama.checkpoint import megatron as mg
from megallama.checkpoint.dcp_safe import SafeDcpReader
from megallama.checkpoint.megatron_dopt import KEYS, bucket_state, check_masters, find_buckets
from megallama.checkpoint.megatron_files import MOMENTS, check_shapes, iteration_dir, is_torch_dist, load_file
from megallama.checkpoint.streaming import Lazy
from megallama.errors import UserError

STACKED = "decoder.layers."
OPT = "optimizer.state."
MASTERS = ("fp32_param", "param")


class TorchDistCheckpoint:
    """A torch_dist iteration directory's config, tensors and Adam state, checked before any tensor is read."""

    def __init__(self, path: Path):
        self.dir = Path(path)
        backend = self._backend()
        if backend != "torch_dist":
            raise UserError(f"{self.dir / 'metadata.json'}: sharded_backend is {backend!r:.40}, expected "
                            "'torch_dist' (megatron-core's other backends are not read)")
        common = load_file(self.dir / "common.pt")
        self.args = common.get("args")
        self.cfg = mg.config_from_args(self.args, str(self.dir / "common.pt"))
        self.iteration = int(common.get("iteration", 0) or 0)
        self.consumed = int(vars(self.args).get("consumed_train_samples", 0) or 0)
        self.reader = SafeDcpReader(self.dir)
        self.keys: Dict[str, Tuple[str, Optional[int]]] = {}  # canonical per-layer name -> (stored key, stack index)
        for fqn, (shape, _) in self.reader.tensors.items():
            if fqn.startswith("optimizer.") or "_extra_state" in fqn:
                continue
            name = mg.canonical(fqn)
            if name.startswith(STACKED) and mg.layer_of(name)[0] is None:
                if len(shape) < 2 or shape[0] != self.cfg.n_layers:
                    raise UserError(f"{self.dir}: stacked tensor '{fqn}' of shape {shape} does not hold "
                                    f"args.num_layers={self.cfg.n_layers} layers on its first axis")
                self.keys.update({mg.LAYER.format(i) + name[len(STACKED):]: (fqn, i) for i in range(shape[0])})
            else:
                self.keys[name] = (fqn, None)
        if mg.EMB not in self.keys:
            raise UserError(f"{self.dir}: missing tensor '{mg.EMB}'")
        self.padded = self._shape(mg.EMB)[0]
        check_shapes(self.cfg, 1, [self.cfg.n_layers], self.padded, 0, 0,
                     {n: (self._shape(n), self.reader.tensors[f][1]) for n, (f, _) in self.keys.items()}, self.dir)
        stored = {f for f, _ in self.keys.values()}
        self.has_optimizer = all(f"{OPT}{k}.{f}" in self.reader.tensors for f in stored for k in MOMENTS)
        for f in stored:  # every state held is a float tensor of its parameter's shape
            for k in MOMENTS + MASTERS:
                got = self.reader.tensors.get(f"{OPT}{k}.{f}")
                if got is not None and (got[0] != self.reader.tensors[f][0] or not got[1].is_floating_point):
                    raise UserError(f"{self.dir}: '{OPT}{k}.{f}' is {got[1]} {got[0]}, expected a float tensor of "
                                    f"its parameter's shape {self.reader.tensors[f][0]}")
        self.buckets = {} if self.has_optimizer else find_buckets(self.reader.tensors, self.dir)
        self.has_optimizer |= bool(self.buckets)
        self.not_read = None
        if not self.has_optimizer and any(f.startswith("optimizer.") for f in self.reader.tensors):
            self.not_read = (f"{self.dir}: its Adam state is neither in model space (optimizer.state.exp_avg.<key>) "
                             "nor in the distributed optimizer's dp_reshardable buckets; converting the weights only")

    def _backend(self):
        f = self.dir / "metadata.json"
        if not f.is_file():
            raise UserError(f"{self.dir}: holds torch_dist files but no metadata.json (megatron-core writes "
                            ".metadata, common.pt and metadata.json)")
        try:
            data = json.loads(f.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise UserError(f"{f}: not JSON ({str(exc)[:80]})") from None
        return data.get("sharded_backend") if isinstance(data, dict) else None

    def _shape(self, name: str) -> Tuple[int, ...]:
        fqn, layer = self.keys[name]
        shape = self.reader.tensors[fqn][0]
        return shape if layer is None else shape[1:]

    def _getter(self, prefix: str = ""):
        def get(s: int, t: int, name: str) -> Lazy:
            fqn, layer = self.keys[name]
            fqn = prefix + fqn
            shape, dtype = self.reader.tensors[fqn]  # checked against its parameter's above
            lead = () if layer is None else (layer,)
            inner = shape[len(lead):]

            def read(a: int, b: int) -> torch.Tensor:
                box = self.reader.load_box(fqn, lead + (a,) + (0,) * (len(inner) - 1),
                                           (1,) * len(lead) + (b - a,) + tuple(inner[1:]))
                return box[0] if lead else box
            return Lazy(inner, dtype, read)
        return get

    def weights(self) -> Dict[str, Lazy]:
        return mg.to_megallama(self._getter(), self.cfg, 1, [self.cfg.n_layers])

    def optimizer(self) -> Optional[Tuple[Dict[str, Lazy], Dict[str, Dict[str, Lazy]]]]:
        """``(fp32 masters, {moment: state})`` in megallama's names (lazy), or None when not held here."""
        if not self.has_optimizer:
            return None
        if self.buckets:
            return self._bucket_optimizer()
        stored = {f for f, _ in self.keys.values()}
        master = next((f"{OPT}{m}." for m in MASTERS if all(f"{OPT}{m}.{f}" in self.reader.tensors for f in stored)),
                      "")  # fp32 training keeps no separate masters: the weights are
        convert = lambda prefix: mg.to_megallama(self._getter(prefix), self.cfg, 1, [self.cfg.n_layers])  # noqa: E731
        return convert(master), {k: convert(f"{OPT}{k}.") for k in MOMENTS}

    def _bucket_optimizer(self):
        get, tp, counts = bucket_state(self.reader, self.buckets, self.cfg, self.args, self.padded, self.dir)
        state = {ours: mg.to_megallama(lambda s, t, n, key=key: get(s, t, n, key), self.cfg, tp, counts)
                 for key, ours in KEYS}
        weights = self.weights()
        check_masters(((n, state["master"][n].rows(0, 1).load(), w.rows(0, 1).load()) for n, w in weights.items()),
                      self.dir)
        return state["master"], {k: state[k] for k in MOMENTS}


def open_megatron(path: Path):
    """The legacy per-rank or the torch_dist reader, whichever form ``path`` holds."""
    from megallama.checkpoint.megatron_files import MegatronCheckpoint

    it = iteration_dir(path)
    return TorchDistCheckpoint(it) if is_torch_dist(it) else MegatronCheckpoint(path)
