"""Every layout reproduces the single-process run of the same precision, step by step (loss and
grad norm), over an all-pairs design of the layout options that ``megallama validate`` accepts
(tests/layout_design.py). The full product is ``benchmarks/layout_matrix.py`` (``-m slow`` here)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests import layout_design as design

ROOT = Path(__file__).resolve().parents[1]


def test_design_covers_every_valid_pair():
    valid = design.valid_cases()
    chosen = design.ci_design()
    assert set(chosen) <= set(valid)
    missing = design.required_pairs(valid) - design.required_pairs(chosen)
    assert not missing, sorted(missing, key=str)[:5]
    # each case must count: dropping any one leaves a pair uncovered (no redundant multi-rank run),
    # except the pinned regressions, which stay whatever they cover
    assert {tuple(c) for c in chosen} >= set(design.PINNED)
    for i in range(len(chosen)):
        if tuple(chosen[i]) in design.PINNED:
            continue
        assert design.required_pairs(valid) - design.required_pairs(chosen[:i] + chosen[i + 1:]), chosen[i].name


def test_design_covers_the_axes_and_respects_the_rules():
    valid = design.valid_cases()
    values = {axis: {getattr(c, axis) for c in valid} for axis in design.Case._fields}
    assert values == {axis: set(v) for axis, v in design.AXES.items()}  # no option value is ruled out entirely
    assert all(c.world <= 4 for c in valid)
    assert not any(c.pp > 1 and c.zero >= 2 for c in valid)  # DeepSpeed's pipeline engine refuses these
    assert not any(c.tp > 1 and c.sp and c.ac == "full_partitioned" for c in valid)
    assert not any(c.tp > 1 and c.pp == 1 and c.zero == 0 and c.precision == "bf16" for c in valid)


def test_pairwise_generator_is_a_cover_on_a_toy_space():
    """The generator on its own: 3 binary axes need 4 cases, not the 8 of the product."""
    cases = design.all_cases()[:8]  # the last three axes vary over these: accum x precision x ac none/selective
    assert len({(c.ac, c.accum, c.precision) for c in cases}) == 8
    got = design.pairwise_design(cases)
    assert design.required_pairs(got) == design.required_pairs(cases)
    assert len(got) == 4


@pytest.fixture(scope="module")
def matrix_base(tmp_path_factory, data_cache):
    tmp = tmp_path_factory.mktemp("matrix")
    base = design.base_config(tmp, data_cache)
    single = dict(design.reference(c) for c in design.ci_design())  # every single-process run here, together
    single["fp32-seed8"] = design.reference(design.FP32_DECODER)[1] + ["train.seed=8"]
    single["llama3"] = LLAMA3_FEATURES + [f"train.micro_batch_size={design.GLOBAL_BATCH}"]
    names = sorted(single)
    refs = dict(zip(names, design.run_references(base, [(single[n], tmp / f"ref_{n}") for n in names])))
    assert refs["fp32"]["losses"][-1] < refs["fp32"]["losses"][0]
    return base, refs


@pytest.mark.parametrize("case", design.ci_design(), ids=lambda c: c.name)
def test_layout_matches_single_process(case, matrix_base, tmp_path):
    base, refs = matrix_base
    got = design.run_case(base, design.overrides(case), case.world, tmp_path / "run")
    ref, tol = refs[design.reference(case)[0]], design.TOLERANCE[case.precision]
    dloss, dgnorm = design.rel_diff(got["losses"], ref["losses"]), design.rel_diff(got["grad_norms"], ref["grad_norms"])
    assert max(dloss, dgnorm) <= tol, (f"{case.name}: relative |dloss| {dloss:.2e}, |dgnorm| {dgnorm:.2e} "
                                       f"(tolerance {tol:g}); losses {got['losses']} vs {ref['losses']}; "
                                       f"grad norms {got['grad_norms']} vs {ref['grad_norms']}")


def test_parity_check_can_fail(matrix_base):
    """A different seed must be caught by the fp32 tolerance on both quantities (it has teeth; run
    with the references, it also shows they are not one run's results repeated)."""
    base, refs = matrix_base
    got = refs["fp32-seed8"]
    assert design.rel_diff(got["losses"], refs["fp32"]["losses"]) > design.TOLERANCE["fp32"]
    assert design.rel_diff(got["grad_norms"], refs["fp32"]["grad_norms"]) > design.TOLERANCE["fp32"]


@pytest.mark.slow
def test_full_product(tmp_path):
    """Every valid combination (hours on 2 cores): ``pytest -m slow tests/test_layout_matrix.py``."""
    spec = importlib.util.spec_from_file_location("layout_matrix", ROOT / "benchmarks" / "layout_matrix.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run_matrix(list(design.valid_cases()), tmp_path)
    assert all(r["status"] == "pass" for r in rows), bench.table([r for r in rows if r["status"] != "pass"])


SP_PP_TP = ["parallel.tp=2", "parallel.pp=2", "parallel.sequence_parallel=true", "deepspeed.zero_optimization.stage=1"]
REFUSED = [  # (overrides, the field the one-line error names); each a silent wrong result or a hang before
    (SP_PP_TP + ["deepspeed.pipeline.pipe_partitioned=true"], "deepspeed.pipeline.pipe_partitioned"),
    (SP_PP_TP + ["deepspeed.pipeline.grad_partitioned=true"], "deepspeed.pipeline.grad_partitioned"),
    (SP_PP_TP[:2] + SP_PP_TP[3:] + ["deepspeed.pipeline.pipe_partitioned=false"],
     "deepspeed.pipeline.grad_partitioned"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "train.activation_checkpointing.mode=full",
      "train.activation_checkpointing.partition_activations=true"],
     "train.activation_checkpointing.partition_activations"),
    (["deepspeed.activation_checkpointing.partition_activations=true"],
     "deepspeed.activation_checkpointing.partition_activations"),
    (["parallel.pp=2", "deepspeed.pipeline.activation_checkpoint_interval=1"],
     "deepspeed.pipeline.activation_checkpoint_interval"),
    (["parallel.pp=2", "deepspeed.pipeline.pipe_partition=false"], "deepspeed.pipeline.pipe_partition"),
    (["parallel.pp=2", "deepspeed.zero_optimization.stage=2"], "deepspeed.zero_optimization.stage"),
    (["parallel.tp=2", "deepspeed.bf16.enabled=true"], "deepspeed.zero_optimization.stage"),
    (["model.arch=encoder_decoder", "train.activation_checkpointing.mode=full",  # a crash at the second layer
      "train.activation_checkpointing.partition_activations=true"], "train.activation_checkpointing.partition_activations"),
]


@pytest.mark.parametrize("extra,field", REFUSED, ids=[f"{f}-{i}" for i, (_, f) in enumerate(REFUSED)])
def test_mishandled_layouts_are_refused_in_one_line(extra, field, tmp_path):
    from megallama.config import load_run_config
    from megallama.errors import UserError
    from megallama.train.ds_config import build_ds_config

    with pytest.raises(UserError) as err:
        cfg = load_run_config(design.base_config(tmp_path, tmp_path / "cache"), ["train.micro_batch_size=1"] + extra)
        cfg.check_layout(4)
        build_ds_config(cfg, 4)
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)


def test_sequence_parallel_pipeline_sends_whole_tensors(tmp_path):
    from megallama.config import load_run_config
    from megallama.train.ds_config import build_ds_config

    cfg = load_run_config(design.base_config(tmp_path, tmp_path / "cache"), SP_PP_TP)
    pipe = build_ds_config(cfg, 4)["pipeline"]
    assert pipe["pipe_partitioned"] is False and pipe["grad_partitioned"] is False


@pytest.mark.parametrize("command", ["validate", "train"])
def test_refusal_through_the_cli(command, tmp_path):
    from tests.train_utils import env

    base = design.base_config(tmp_path, tmp_path / "cache")
    args = [x for o in REFUSED[0][0] + [f"run_dir={tmp_path / 'run'}"] for x in ("--set", o)]
    world = {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0"} if command == "train" else {}
    proc = subprocess.run([sys.executable, "-m", "megallama", command, str(base)] + args
                          + (["--world-size", "4"] if command == "validate" else []),
                          capture_output=True, text=True, env={**env(), **world}, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "deepspeed.pipeline.pipe_partitioned:" in proc.stderr
    assert not (tmp_path / "run").exists()


# Issue 15's model features together, at layouts beyond the matrix's axes: MQA with fewer KV heads
# than TP ranks, tied embeddings over a vocabulary padded for TP, packed documents with positions
# reset; once on uneven pipeline stages with sequence parallelism, once at ZeRO-3 data parallelism.
# Both are held to one single-process run of them at ZeRO-0, trained with matrix_base's references.
LLAMA3_FEATURES = ["model.preset=tiny-gqa", "model.n_kv_heads=1", "model.tie_embeddings=true",
                   "model.vocab_size=2049", "model.pad_vocab_to_multiple_of=8", "data.document_mask=true",
                   "data.reset_position_ids=true"]


@pytest.mark.parametrize("zero,layout,world", [
    (1, ["parallel.tp=2", "parallel.pp=2", "parallel.pipeline_layers=[3,1]", "parallel.sequence_parallel=true"], 4),
    (3, ["parallel.tp=2"], 4),
], ids=["tp2-pp2uneven-sp-z1", "tp2-dp2-z3"])
def test_llama3_features_together_match_single_process(zero, layout, world, matrix_base, tmp_path):
    base, refs = matrix_base
    stage = [f"deepspeed.zero_optimization.stage={zero}"]
    ref = refs["llama3"]
    dp = world // 4 if "parallel.pp=2" in layout else world // 2
    got = design.run_case(base, LLAMA3_FEATURES + stage + layout
                          + [f"train.micro_batch_size={design.GLOBAL_BATCH // dp}"], world, tmp_path / "run")
    dloss, dgnorm = design.rel_diff(got["losses"], ref["losses"]), design.rel_diff(got["grad_norms"], ref["grad_norms"])
    assert max(dloss, dgnorm) <= design.TOLERANCE["fp32"], (dloss, dgnorm, got, ref)
