"""Pipeline stages are cut from the model itself: each stage's parameters carry the model's
canonical names and start from exactly the weights the unpipelined model starts from; the
blocks of a stage share one RoPE table and take activation checkpointing as the model does."""
import torch

from tests.dist_utils import run_distributed


def _stage(rank, world, preset, split):
    import deepspeed

    from megallama.config import ModelConfig
    from megallama.model import build_model
    from megallama.model.blocks import TransformerBlock
    from megallama.parallel import ParallelState, initialize
    from megallama.train.pipeline import BlockStage, build_pipeline_module
    from megallama.train.recompute import apply_activation_checkpointing
    from megallama.train.universal import canonical_params

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    cfg = ModelConfig.preset(preset)
    state = initialize(tp=1, pp=world)
    stage = build_pipeline_module(cfg, state, seed=11, stage_layers=split)
    ref = dict(build_model(cfg, ParallelState(), seed=11).named_parameters())
    names = []
    for name, p in canonical_params(stage):
        assert torch.equal(p.detach(), ref[name].detach()), name
        assert getattr(p, "tensor_model_parallel", False) == getattr(ref[name], "tensor_model_parallel", False), name
        names.append(name)
    ropes = {id(m.rope) for m in stage.modules() if isinstance(m, BlockStage)}
    assert len(ropes) == 1
    marker = object()
    apply_activation_checkpointing(stage, "full", 1, marker)
    blocks = [m for m in stage.modules() if isinstance(m, TransformerBlock)]
    assert blocks and all(b.checkpoint_fn is marker for b in blocks)
    return names, sorted(ref)


def test_stages_hold_the_models_parts_under_canonical_names():
    """An uneven split: the first stage holds the embedding and exactly the blocks it is given."""
    from megallama.config import ModelConfig
    from megallama.train.pipeline import stage_of_parameters

    names, every = run_distributed(_stage, 2, "tiny", [3, 1])
    assert names[0] == "tok_embeddings.weight" and all(n in every for n in names)
    assert {n.split(".")[1] for n in names if n.startswith("layers.")} == {"0", "1", "2"}
    assert "output.weight" not in names  # the head lives on the last stage
    # checkpoints group files by the same bounds
    stage_of = stage_of_parameters(ModelConfig.preset("tiny"), [3, 1])
    assert sorted(n for n, s in stage_of.items() if s == 0) == sorted(names)
    assert set(stage_of) == set(every)
