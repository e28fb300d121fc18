"""Generation: the KV cache changes nothing but speed; TP=2 draws the same tokens as TP=1;
sampling is seeded and respects top-p; the CLI prints what the library generates."""
import json

import pytest
import torch

from megallama import LlamaForCausalLM, ModelConfig
from megallama.inference import generate, make_kv_caches, sample_next
from megallama.parallel import ParallelState
from tests.dist_utils import run_distributed

PROMPTS = [[1, 17, 250, 3, 99, 1000, 7], [1, 42, 5]]  # different lengths share one batch
SAMPLED = dict(temperature=0.9, top_p=0.9, seed=11)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(ModelConfig.preset("tiny-gqa"), ParallelState(), seed=5).eval()


def test_cached_decoding_equals_full_forward(model):
    x = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x)
        caches = make_kv_caches(model, 2, 20)
        steps = [model(x[:, :8], kv_caches=caches)]  # prefill, then one token at a time
        steps += [model(x[:, i:i + 1], start_pos=i, kv_caches=caches) for i in range(8, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("settings", [dict(), SAMPLED], ids=["greedy", "sampled"])
def test_kv_cache_generation_equals_no_cache(model, settings):
    a = generate(model, PROMPTS, 12, use_cache=True, return_logits=True, **settings)
    b = generate(model, PROMPTS, 12, use_cache=False, return_logits=True, **settings)
    assert a.tokens == b.tokens and all(len(t) == 12 for t in a.tokens)
    for la, lb in zip(a.logits, b.logits):
        assert la.shape == (12, model.config.vocab_size)
        assert (la - lb).abs().max().item() < 1e-4
    if not settings:  # greedy: each sequence continues as if it were alone in the batch
        assert generate(model, [PROMPTS[1]], 12).tokens[0] == a.tokens[1]


def test_greedy_is_argmax_of_the_full_model(model):
    out = generate(model, [PROMPTS[0]], 5).tokens[0]
    seq = list(PROMPTS[0])
    with torch.no_grad():
        for tok in out:
            assert tok == model(torch.tensor([seq]))[0, -1].argmax().item()
            seq.append(tok)


def test_sampling_is_seeded_and_stops_at_eos(model):
    a, b = (generate(model, PROMPTS, 10, **SAMPLED).tokens for _ in range(2))
    assert a == b
    assert generate(model, PROMPTS, 10, **dict(SAMPLED, seed=12)).tokens != a
    first = generate(model, PROMPTS, 10).tokens[0]
    stopped = generate(model, PROMPTS, 10, eos_id=first[3])
    assert stopped.tokens[0] == first[:first.index(first[3])] and stopped.finish[0] == "eos"


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits, temperature=1.0, top_p=0.7, generator=gen)
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.03
    assert torch.equal(sample_next(logits, 0.0), torch.zeros(4000, dtype=torch.long))
    assert set(sample_next(logits, 1.0, 1.0, gen).tolist()) == {0, 1, 2, 3}


def _tp_generation(rank, world):
    import torch.distributed as dist

    from megallama.checkpoint.pretrained import build_for_inference
    from megallama.parallel import initialize

    state = initialize(tp=world)
    cfg = ModelConfig.preset("tiny-gqa")
    full = LlamaForCausalLM(cfg, ParallelState(), seed=5).state_dict()
    model = build_for_inference(cfg, full, parallel=state)  # each rank keeps its slice of the same full weights
    assert model.layers[0].attention.wqkv.weight.shape[0] == (8 + 2 * 4) * 16 // world
    runs = {name: generate(model, PROMPTS, 10, return_logits=True, **s)
            for name, s in (("greedy", {}), ("sampled", SAMPLED))}
    every_rank = [None] * world
    dist.all_gather_object(every_rank, {k: r.tokens for k, r in runs.items()})
    if rank != 0:
        return None
    ref_model = build_for_inference(cfg, full)
    ref = {name: generate(ref_model, PROMPTS, 10, return_logits=True, **s)
           for name, s in (("greedy", {}), ("sampled", SAMPLED))}
    return dict(ranks_agree=all(r == every_rank[0] for r in every_rank),
                same_tokens={k: runs[k].tokens == ref[k].tokens for k in runs},
                logit_err=max((a - b).abs().max().item() for k in runs
                              for a, b in zip(runs[k].logits, ref[k].logits)))


def test_tp2_generation_equals_tp1():
    result = run_distributed(_tp_generation, 2)
    assert result["ranks_agree"], result
    assert all(result["same_tokens"].values()), result
    assert result["logit_err"] < 1e-4, result


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A consolidated checkpoint sized for the test tokenizer, with tokenizer.model beside it."""
    import shutil

    from megallama.checkpoint import save_consolidated
    from tests.conftest_data import tokenizer_path

    cfg = ModelConfig.preset("tiny", vocab_size=320, n_layers=2)
    out = tmp_path_factory.mktemp("gen") / "ckpt"
    save_consolidated(LlamaForCausalLM(cfg, ParallelState(), seed=2).state_dict(), cfg, out)
    shutil.copyfile(tokenizer_path(), out / "tokenizer.model")
    return out


def _cli(capsys, monkeypatch, *argv):
    from megallama.cli import main

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, value)  # a single process, whatever launched pytest
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_prints_what_the_library_generates(checkpoint, capsys, monkeypatch):
    from megallama import from_pretrained
    from megallama.data.tokenizer import Tokenizer

    rc, out, err = _cli(capsys, monkeypatch, "generate", "--checkpoint", checkpoint, "--prompt", "the quick brown",
                        "--max-new-tokens", 6, "--temperature", 0.7, "--top-p", 0.95, "--seed", 3, "--json")
    assert rc == 0, err
    row = json.loads(out)["results"][0]
    tok = Tokenizer(checkpoint / "tokenizer.model")
    ids = tok.encode("the quick brown", bos=True)
    expected = generate(from_pretrained(checkpoint), [ids], 6, 0.7, 0.95, 3, eos_id=tok.eos_id)
    assert row["new_tokens"] == expected.tokens[0]
    assert tok.decode(ids + row["new_tokens"]) == "the quick brown" + row["completion"]


def test_cli_bad_inputs_are_one_line(checkpoint, capsys, monkeypatch, tmp_path):
    cases = [(["--checkpoint", tmp_path / "nope"], "not found"),
             (["--checkpoint", checkpoint, "--tokenizer", tmp_path / "none.model"], "tokenizer model not found"),
             (["--checkpoint", checkpoint, "--top-p", "0"], "--top-p"),
             (["--checkpoint", checkpoint, "--max-new-tokens", "600"], "max_seq_len=512")]
    for argv, needle in cases:
        rc, _, err = _cli(capsys, monkeypatch, "generate", "--prompt", "hi", *argv)
        assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


def test_cli_under_torchrun_tp2_matches_single_process(checkpoint, capsys, monkeypatch):
    import os
    import subprocess
    import sys
    from pathlib import Path

    argv = ["generate", "--checkpoint", checkpoint, "--prompt", "the quick", "--prompt", "def x",
            "--max-new-tokens", 5, "--temperature", 0.8, "--seed", 9, "--json"]
    rc, out, err = _cli(capsys, monkeypatch, *argv)
    assert rc == 0, err
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "megallama", *map(str, argv)], capture_output=True, text=True, cwd=root,
                          env=dict(env, PYTHONPATH=str(root), OMP_NUM_THREADS="1"), timeout=180)
    assert proc.returncode == 0, proc.stderr
    tp2 = json.loads(proc.stdout.strip().splitlines()[-1])  # rank 0 alone prints
    assert tp2["tp"] == 2 and len(proc.stdout.strip().splitlines()) == 1
    assert [r["new_tokens"] for r in tp2["results"]] == [r["new_tokens"] for r in json.loads(out)["results"]]
