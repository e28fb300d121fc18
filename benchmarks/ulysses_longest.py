"""The longest sequence a tiny-width model trains in a fixed per-rank memory budget at Ulysses
1, 2 and 4 (degree = ranks, gloo on CPU), found by search over sequence lengths.

Per-rank peak = model states + saved activations, both counted as distinct storages: the
parameters, gradients and AdamW state after a real step, plus the saved-tensor meter's peak over
that step's forward and backward (``SavedTensorMeter``). Why not peak RSS: on CPU there is no
allocator peak, and RSS mixes the Python/torch runtime (~300 MB a process), gloo buffers and
malloc's caching with the model, varies with the load of this shared box, and only ever grows in
one process, so each trial would need its own. The counts are what the memory model budgets and
are exact; what they leave out is the transient working set (the loss's logits, the all-to-all
send/receive buffers, gradients in flight), reported beside them from the memory model.

States are replicated over the Ulysses ranks (no ZeRO here): the figure isolates what Ulysses
shards, the activations. With ZeRO over DP x Ulysses, states fall with the degree too.

    PYTHONPATH=. .venv/bin/python benchmarks/ulysses_longest.py
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
MiB = 2 ** 20


def _states(model, opt) -> int:
    """Bytes of the distinct storages of parameters, gradients and optimizer state (0-d steps aside)."""
    from megallama.profiling.measure import SMALL, storage_key

    seen = {}
    tensors = [t for p in model.parameters() for t in (p, p.grad) if t is not None]
    tensors += [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.untyped_storage().nbytes() > SMALL:
            seen[storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _trial(model, opt, vocab: int, seq: int) -> dict:
    """One real training step at ``seq``: the meter's saved-activation peak and the loss."""
    import torch.distributed as dist

    from megallama.profiling.measure import SavedTensorMeter

    gen = torch.Generator().manual_seed(seq)
    tokens = torch.randint(0, vocab, (1, seq), generator=gen)
    meter = SavedTensorMeter(model)
    start = time.perf_counter()
    with meter:
        loss = model(tokens, tokens)
        loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    peak = torch.tensor([meter.peak], dtype=torch.float64)
    if dist.is_initialized():   # every rank takes the same decision: the worst rank's bytes
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return dict(activations=int(peak.item()), loss=loss.item(), step_s=time.perf_counter() - start)


def _predicted(cfg, seq: int, u: int) -> dict:
    from megallama.profiling import activations as act
    from megallama.profiling.layout import Layout
    from megallama.profiling.memory import stage_activation_bytes

    impl = act.ActivationImpl.for_device("cpu")
    d = stage_activation_bytes(cfg, Layout(dtype="fp32", ulysses=u), seq, 0, impl)
    transient = sum(x.bytes for x in act.last_stage_saved_tensors(cfg, seq // u, 1, 1, False, 4, impl) if not x.saved)
    return dict(saved=d["blocks"] + d["embedding"] + d["head_and_loss"] - transient, transient_logits=transient)


def _search(rank: int, world: int, args) -> dict:
    """Double the sequence until the step no longer fits, then bisect to ``args.step`` tokens."""
    from megallama.config import ModelConfig
    from megallama.model import build_model
    from megallama.parallel import initialize

    state = initialize(ulysses=world)
    cfg = ModelConfig(dim=args.dim, n_layers=args.layers, n_heads=args.heads, vocab_size=args.vocab,
                      max_seq_len=args.max_seq)
    torch.manual_seed(0)
    model = build_model(cfg, state, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    _trial(model, opt, cfg.vocab_size, args.step)   # grads and Adam's moments now exist
    states = _states(model, opt)
    budget = args.budget_mib * MiB
    trials = {}

    def fits(seq: int) -> bool:
        if seq not in trials:
            t = _trial(model, opt, cfg.vocab_size, seq)
            t["peak"] = states + t["activations"]
            trials[seq] = t
        return trials[seq]["peak"] <= budget

    lo, hi = 0, args.step
    while hi <= args.max_seq and fits(hi):
        lo, hi = hi, 2 * hi
    if hi > args.max_seq:
        raise SystemExit(f"--max-seq {args.max_seq}: still fits at ulysses={world}; raise it or lower --budget-mib")
    while hi - lo > args.step:   # fits(lo) (or lo == 0), not fits(hi)
        mid = (lo + hi) // 2 // args.step * args.step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    best = trials.get(lo, {})
    return dict(ulysses=world, longest_seq=lo, states_bytes=states, activation_bytes=best.get("activations"),
                peak_bytes=best.get("peak"), loss=best.get("loss"), step_s=best.get("step_s"),
                first_over=dict(seq=hi, peak_bytes=trials[hi]["peak"]),
                predicted=_predicted(cfg, lo, world) if lo else None,
                trials={s: t["peak"] for s, t in sorted(trials.items())})


def _worker(rank, world, port, args, queue):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = _search(rank, world, args)
        if rank == 0:
            queue.put(pickle.dumps(out))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs) or queue.empty():
        raise SystemExit(f"ulysses={world}: a rank failed (exit codes {[p.exitcode for p in procs]})")
    return pickle.loads(queue.get())


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    u = [r["ulysses"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(u, [r["longest_seq"] for r in rows], "o-", label="measured")
    ax.plot(u, [rows[0]["longest_seq"] * x for x in u], "k--", lw=0.8, label="linear in ranks")
    ax.set(xlabel="Ulysses degree (ranks)", ylabel="longest sequence (tokens)", xticks=u,
           title="Longest sequence in a fixed per-rank budget")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--budget-mib", type=float, default=320.0, help="per-rank memory budget")
    ap.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--step", type=int, default=64, help="search resolution in tokens (a multiple of every degree)")
    ap.add_argument("--max-seq", type=int, default=1 << 16)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ulysses_longest.json")
    ap.add_argument("--png", action="store_true", help="also plot next to --out (matplotlib)")
    args = ap.parse_args(argv)
    if any(args.step % u for u in args.degrees):
        ap.error(f"--step: expected a multiple of every degree {args.degrees}, got {args.step}")
    rows = []
    for u in args.degrees:
        start = time.perf_counter()
        rows.append(run_ranks(u, args))
        rows[-1]["search_s"] = round(time.perf_counter() - start, 1)
        print(f"ulysses={u}: {rows[-1]['longest_seq']} tokens ({rows[-1]['search_s']} s)", file=sys.stderr)
    base = rows[0]
    print(f"dim {args.dim}, {args.layers} layers, {args.heads} heads, vocab {args.vocab}, fp32, AdamW, micro-batch 1; "
          f"budget {args.budget_mib:.0f} MiB per rank")
    print(f"{'ulysses':>7} {'longest seq':>11} {'ratio':>6} {'states MiB':>10} {'acts MiB':>9} {'peak MiB':>9} "
          f"{'model acts MiB':>14} {'acts/token/rank KiB':>19}")
    for r in rows:
        r["ratio"] = r["longest_seq"] / base["longest_seq"]
        pred = r["predicted"]["saved"] / MiB
        print(f"{r['ulysses']:>7} {r['longest_seq']:>11} {r['ratio']:>6.2f} {r['states_bytes'] / MiB:>10.1f} "
              f"{r['activation_bytes'] / MiB:>9.1f} {r['peak_bytes'] / MiB:>9.1f} {pred:>14.1f} "
              f"{r['activation_bytes'] / r['longest_seq'] / 1024:>19.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = dict(config={k: v for k, v in vars(args).items() if k not in ("out", "png")},
                  measure="states (params, grads, AdamW) + saved-tensor meter peak, distinct storages", rows=rows)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(args.out)
    if args.png:
        plot(rows, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
