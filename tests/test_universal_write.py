"""The one writer of a training checkpoint from whole tensors (``checkpoint/universal_write.py``):
every importer (consolidated, Megatron, DCP, DeepSpeed universal) writes through it."""
import pytest
import torch

from megallama.checkpoint.consolidated import expected_shapes
from megallama.checkpoint.reshard import from_state
from megallama.config import ModelConfig
from megallama.train import checkpoint as ckpt
from megallama.train.universal import MOMENTS, UniversalReader


@pytest.mark.parametrize("tp", [1, 2])
def test_padded_vocabulary_is_stored_as_a_run_stores_it(tmp_path, tp):
    """A padded vocabulary's stored form has its zero rows at TP=1 too; written without them, no
    reader accepted the checkpoint."""
    cfg = ModelConfig.preset("tiny", vocab_size=100, pad_vocab_to_multiple_of=64)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v, generator=g) for k, v in expected_shapes(cfg, "test").items()}
    moments = {m: {k: torch.rand(v.shape, generator=g) for k, v in state.items()} for m in MOMENTS}
    out = from_state(cfg, state, tmp_path / "out", tp, 1, moments=moments, step=3, consumed_samples=24)
    tag = out / ckpt.tag_for(3)
    assert ckpt.verify(tag) is None and ckpt.read_meta(tag)["consumed_samples"] == 24
    reader = UniversalReader(tag / "universal")
    assert sorted(reader.names()) == sorted(state)
    for name in state:
        assert torch.equal(reader.full(name), state[name]), name
        for m in MOMENTS:
            assert torch.equal(reader.full(name, m), moments[m][name]), (name, m)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging debris
