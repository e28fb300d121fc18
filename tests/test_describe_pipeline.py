"""``megallama describe --pp``: the blocks each pipeline stage holds (the split training uses) and
the heaviest stage's parameters, counted independently of the split rule's own weights."""
import json

from megallama.config import ModelConfig


def _cli(capsys, *argv):
    from megallama.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_llama3_405b_on_16_stages(capsys):
    rc, out, err = _cli(capsys, "describe", "--model", "llama3-405b", "--pp", "16")
    assert rc == 0, err
    assert "pipeline: 16 stages holding 7/8x14/7 of 126 layers" in out
    rc, out, err = _cli(capsys, "describe", "--model", "llama3-405b", "--pp", "16", "--tp", "8", "--json")
    info = json.loads(out)
    assert [s["layers"] for s in info["stages"]] == [7] + [8] * 14 + [7]
    cfg = ModelConfig.preset("llama3-405b")
    d, v, f = cfg.dim, cfg.vocab_size, cfg.ffn_hidden_size
    hd, kv = d // cfg.n_heads, cfg.kv_heads
    block = (d * d + 2 * d * kv * hd + d * d + 3 * d * f) // 8 + 2 * d  # TP 8 shards the matrices, not the norms
    assert info["stages"][1]["parameters_per_rank"] == 8 * block
    assert info["stages"][0]["parameters_per_rank"] == 7 * block + v * d // 8
    assert info["stages"][15]["parameters_per_rank"] == 7 * block + v * d // 8 + d
    assert info["heaviest_stage"] == info["stages"][1]
    assert sum(s["parameters_per_rank"] for s in info["stages"]) == info["parameters_per_rank"]


def test_a_run_config_s_split_and_bad_pp(capsys, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\nparallel: {pp: 3, pipeline_layers: [2, 1, 1]}\n")
    rc, out, err = _cli(capsys, "describe", "--config", path, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["stage_split"] == "2/1x2" and info["heaviest_stage"]["stage"] == 0
    rc, out, err = _cli(capsys, "describe", "--config", path, "--pp", "2")
    assert rc == 2 and err.strip() == ("megallama describe: error: parallel.pipeline_layers: lists 3 stages, "
                                       "expected parallel.pp=2")
    rc, out, err = _cli(capsys, "describe", "--model", "tiny", "--pp", "5")
    assert rc == 2 and err.strip() == "megallama describe: error: --pp 5: more stages than the model's 4 layers"
    rc, out, err = _cli(capsys, "describe", "--model", "tiny")
    assert rc == 0 and "pipeline" not in out
