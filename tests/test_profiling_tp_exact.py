"""At TP=2 (with and without sequence parallelism) the activation and TP-communication models
match, byte for byte and call for call, what ``megallama.model`` does on two gloo ranks."""
import torch

from tests.dist_utils import run_distributed


def _measure(rank, world):
    import torch.distributed as dist

    from megallama.config import ModelConfig
    from megallama.model import build_model
    from megallama.parallel import initialize
    from megallama.profiling import activations as act
    from megallama.profiling.comm import collective_bytes_per_step
    from megallama.profiling.layout import Layout
    from megallama.profiling.memory import stage_activation_bytes

    counts = {"calls": 0, "bytes": 0}
    real = {n: getattr(dist, n) for n in ("all_reduce", "all_gather", "reduce_scatter_tensor")}

    def wrap(name):
        def call(*a, **k):   # unsharded payload: all_gather(parts, x) moves x * world
            t = a[0] if name == "all_reduce" else a[1]
            counts["calls"] += 1
            counts["bytes"] += t.numel() * t.element_size() * (world if name == "all_gather" else 1)
            return real[name](*a, **k)
        return call

    for name in real:
        setattr(dist, name, wrap(name))
    out = []
    seq, mbs = 64, 2
    for sp in (False, True):
        state = initialize(tp=world, pp=1, sequence_parallel=sp)
        for preset in ("tiny", "tiny-gqa"):
            cfg = ModelConfig.preset(preset)
            model = build_model(cfg, state)
            tok = torch.randint(0, cfg.vocab_size, (mbs, seq), generator=torch.Generator().manual_seed(0))
            skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
            seen = {}

            def pack(t):
                seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
                return t

            counts.update(calls=0, bytes=0)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = model(tok, tok)
            loss.backward()
            for m in model.modules():
                for pair in getattr(m, "_cache", {}).values():
                    skip |= {t.untyped_storage().data_ptr() for t in pair}
            saved = sum(n for ptr, n in seen.items() if ptr not in skip and n > 16)

            impl = act.ActivationImpl.for_device("cpu")
            layout = Layout(tp=world, mbs=mbs, sp=sp, dtype="fp32")
            d = stage_activation_bytes(cfg, layout, seq, 0, impl)
            transient = sum(x.bytes for x in act.last_stage_saved_tensors(cfg, seq, mbs, world, sp, 4, impl)
                            if not x.saved)
            tp = collective_bytes_per_step(cfg, layout, seq)["tp"]
            out.append(dict(case=f"{preset} sp={sp}", saved=saved,
                            predicted=d["blocks"] + d["embedding"] + d["head_and_loss"] - transient,
                            calls=counts["calls"], predicted_calls=tp["calls"], bytes=counts["bytes"],
                            predicted_bytes=tp["payload_bytes"]))
    return out


def test_tp2_activations_and_collectives_are_exact():
    for row in run_distributed(_measure, 2):
        assert row["predicted"] == row["saved"], row
        assert row["predicted_calls"] == row["calls"] and row["predicted_bytes"] == row["bytes"], row
