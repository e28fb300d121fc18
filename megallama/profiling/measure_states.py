"""Count the model states a DeepSpeed engine holds on this rank, at the moments the memory model
describes them.

Why walk the engine: ZeRO keeps flat buffers, partitions and buckets under attribute names that
change between versions; walking everything reachable from the engine's module, its DeepSpeed
optimizer and the torch optimizer inside, and counting each distinct storage once, finds them
all. Each storage goes to one category, first match wins: ``buffers`` for reduction buckets
(``ipg``), ``params`` (module parameters, ZeRO-3 partitions; a ZeRO-3 parameter gathered right
now is a buffer), ``grads`` (their ``.grad`` and ZeRO's gradient partitions), ``optimizer`` (the
inner optimizer's state and its fp32 masters), ``step_buffers`` (the masters' gradients) and
``buffers`` (the rest). :class:`ModelStateMeter` snapshots after each forward, after the last
backward before gradients are reduced (full gradients still exist at ZeRO 0/1), when a
data-parallel all-reduce starts (ZeRO-0 reduces a flattened copy) and when the inner optimizer
steps (fp32 gradient partitions exist).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch

from megallama.profiling.measure import SMALL, storage_key

CATEGORIES = ("params", "grads", "optimizer", "step_buffers", "buffers")


def _walk(obj: Any, path: str, out: List[Tuple[str, torch.Tensor]], seen: Set[int], depth: int = 0) -> None:
    """Tensors reachable from DeepSpeed / torch.optim objects, lists and dicts (with ``.grad``)."""
    if depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        out.append((path, obj))
        if obj.grad is not None:
            out.append((path + ".grad", obj.grad))
        if isinstance(getattr(obj, "ds_tensor", None), torch.Tensor):
            out.append((path + ".ds_tensor", obj.ds_tensor))
        return
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None), torch.nn.Module)):
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple, set)):
        for i, x in enumerate(obj):
            _walk(x, f"{path}[{i}]", out, seen, depth + 1)
    elif isinstance(obj, dict):
        for k, x in obj.items():
            _walk(x, f"{path}[{k if isinstance(k, (str, int)) else '.'}]", out, seen, depth + 1)
    elif type(obj).__module__.split(".")[0] in ("deepspeed", "torch") and hasattr(obj, "__dict__"):
        for k, x in vars(obj).items():
            _walk(x, f"{path}.{k}", out, seen, depth + 1)


def inner_optimizer(optimizer: Any) -> Optional[torch.optim.Optimizer]:
    """The torch optimizer that holds Adam's state, inside DeepSpeed's wrappers."""
    opt = optimizer
    for _ in range(4):
        if isinstance(opt, torch.optim.Optimizer) and not type(opt).__module__.startswith("deepspeed"):
            return opt
        opt = getattr(opt, "optimizer", None)
    return None


def count_model_states(engine: Any, module: Optional[torch.nn.Module] = None,
                       detail: Optional[List[Tuple[str, str, int]]] = None,
                       extra: Tuple[torch.Tensor, ...] = ()) -> Dict[str, int]:
    """One snapshot of the bytes the engine holds, by category (see the module docstring).
    ``detail``: a list to receive ``(category, where found, bytes)`` per storage; ``extra``:
    tensors in flight outside the engine's own attributes (a flattened bucket being reduced)."""
    module = module if module is not None else engine.module
    placed: Dict[Any, Tuple[str, str, int]] = {}

    def put(t: Optional[torch.Tensor], category: str, where: str) -> None:
        if t is None or t.device.type == "meta" or t.untyped_storage().nbytes() <= SMALL:
            return
        placed.setdefault(storage_key(t), (category, where, t.untyped_storage().nbytes()))

    base = inner_optimizer(engine.optimizer)
    found: List[Tuple[str, torch.Tensor]] = []
    _walk(engine.optimizer, "optimizer", found, {id(base)} if base is not None else set())
    for path, t in found:   # reduction buckets (not the parameters they list), whatever they hold now
        if "ipg" in path.lower() and not isinstance(t, torch.nn.Parameter) and not path.endswith(".ds_tensor"):
            put(t, "buffers", path)
    named = list(module.named_parameters())
    for name, p in named:
        if isinstance(getattr(p, "ds_tensor", None), torch.Tensor):
            put(p.ds_tensor, "params", name + ".ds_tensor")
            put(p.data, "buffers", name + " (gathered)")     # a ZeRO-3 parameter gathered right now
        else:
            put(p.data, "params", name)
    for name, p in named:
        put(p.grad, "grads", name + ".grad")
    for path, t in found:   # ZeRO's gradient partitions (``x.grad``: a master's, later)
        attr = path.rsplit(".", 1)[-1].split("[")[0].lower()
        if "grad" in attr and attr != "grad":
            put(t, "grads", path)
    if base is not None:
        for i, state in enumerate(base.state.values()):
            for k, t in state.items():
                if isinstance(t, torch.Tensor):
                    put(t, "optimizer", f"inner.state[{i}].{k}")
        masters = [p for g in base.param_groups for p in g["params"]]
        for i, p in enumerate(masters):
            put(p, "optimizer", f"inner.params[{i}]")
        for i, p in enumerate(masters):
            put(p.grad, "step_buffers", f"inner.params[{i}].grad")
    for path, t in found:   # masters of the groups DeepSpeed is not stepping right now
        attr = path.rsplit(".", 1)[-1].split("[")[0].lower()
        put(t, "optimizer" if "fp32" in attr else "step_buffers" if path.endswith(".grad") else "buffers", path)
    for t in extra:
        put(t, "buffers", "in flight")
    out = {c: 0 for c in CATEGORIES}
    for cat, where, nbytes in placed.values():
        out[cat] += nbytes
        if detail is not None:
            detail.append((cat, where, nbytes))
    out["total"] = sum(out[c] for c in CATEGORIES)
    return out


class ModelStateMeter:
    """Snapshots :func:`count_model_states` after the last backward of a step (before gradients
    are reduced), when a data-parallel all-reduce starts (ZeRO-0 reduces a flattened copy of the
    gradients) and when the inner optimizer steps; ``result()`` is the largest value of each
    category over the snapshots (``total``: the largest snapshot total). ``dp_ranks``: the
    data-parallel group's ranks (``state.dp_ranks``)."""

    def __init__(self, engine: Any, module: Optional[torch.nn.Module], dp_ranks):
        self.dp_ranks = sorted(dp_ranks)
        self.engine, self.module = engine, module
        self.snapshots: Dict[str, Dict[str, int]] = {}
        self._undo: List[Callable[[], None]] = []
        self.enabled = True

    def snapshot(self, moment: str, extra: Tuple[torch.Tensor, ...] = ()) -> Dict[str, int]:
        got = count_model_states(self.engine, self.module, extra=extra)
        prev = self.snapshots.get(moment)
        self.snapshots[moment] = got if prev is None else {k: max(v, prev[k]) for k, v in got.items()}
        return got

    def _hook(self, obj: Any, name: str, moment: str) -> None:
        fn = getattr(obj, name)
        had = name in vars(obj)

        def wrapped(*a, **k):
            if self.enabled:
                self.snapshot(moment)
            return fn(*a, **k)

        setattr(obj, name, wrapped)
        self._undo.append(lambda: setattr(obj, name, fn) if had else delattr(obj, name))

    def _hook_dp_all_reduce(self) -> None:
        import torch.distributed as dist

        fn = dist.all_reduce

        def wrapped(tensor, *a, **k):
            group = k.get("group", a[1] if len(a) > 1 else None)
            ranks = sorted(dist.get_process_group_ranks(group)) if group is not None else \
                list(range(dist.get_world_size()))
            if self.enabled and ranks == self.dp_ranks and tensor.numel() > 1:
                self.snapshot("dp_all_reduce", (tensor,))
            return fn(tensor, *a, **k)

        dist.all_reduce = wrapped
        self._undo.append(lambda: setattr(dist, "all_reduce", fn))

    def __enter__(self) -> "ModelStateMeter":
        from megallama.train.deepspeed_patches import gradients_final_at

        for name in gradients_final_at(self.engine):
            self._hook(self.engine, name, "after_backward")
        self._hook_dp_all_reduce()
        base = inner_optimizer(self.engine.optimizer)
        if base is not None:
            self._hook(base, "step", "optimizer_step")
        return self

    def __exit__(self, *exc) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    # the moment each category is defined at (``buffers``: its peak over the step)
    MOMENTS = {"params": "after_backward", "grads": "after_backward", "optimizer": "after_backward",
               "step_buffers": "optimizer_step"}

    def result(self) -> Dict[str, int]:
        """Each category at the moment the memory model describes it: params, grads and optimizer
        states after the last backward (full gradients at ZeRO 0/1, partitions at 2/3),
        ``step_buffers`` inside the optimizer step, ``buffers`` at their peak; ``total``: the
        largest snapshot total."""
        if not self.snapshots:
            return {}
        out = {c: self.snapshots.get(self.MOMENTS.get(c, ""), {}).get(c, 0) for c in CATEGORIES}
        out["buffers"] = max(s["buffers"] for s in self.snapshots.values())
        out["total"] = max(s["total"] for s in self.snapshots.values())
        return out
