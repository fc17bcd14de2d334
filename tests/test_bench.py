"""Smoke test of the benchmark runner at tiny sizes: it runs, and writes valid JSON and markdown with ratios.

No timing is asserted (timings are measured, never tested)."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _runner():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import run  # benchmarks/run.py
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return run


def _one_round_argv(out, losses: str, providers: str, *extra: str) -> list[str]:
    """A runner command line of one timed round at N = 64 without the memory pass, writing to ``out``."""
    return [
        "--quick", "--losses", losses, "--sizes", "64", "--repeats", "1", "--warmup", "1", "--no-memory",
        "--providers", providers, "--allocator", "default", "--out", str(out), *extra,
    ]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    run = _runner()
    out = tmp_path_factory.mktemp("bench")
    argv = [
        "--quick", "--losses", "focal,giou,l1", "--sizes", "64", "--repeats", "2", "--warmup", "1",
        "--providers", "baseline,eager,torchscript", "--allocator", "default", "--out", str(out),
    ]
    assert run.main(argv) == 0
    return out


def test_json_has_ratios_for_every_loss(bench):
    result = json.loads((bench / "results.json").read_text())
    (run_,) = result["runs"]
    assert run_["allocator"] == "default"
    assert run_["environment"]["threads"] == 1
    assert not run_["errors"]
    rows = {row["config"]: row for row in run_["rows"]}
    assert set(rows) == {"focal", "giou", "l1"}
    for row in rows.values():
        assert row["N"] == 64
        assert row["fwd_bwd_ms"]["baseline"]["median"] > 0
        assert row["ratios"]["eager/baseline"] > 0
        assert row["ratios"]["torchscript/baseline"] > 0
        assert row["peak_bytes"]["eager"] >= row["input_bytes"]


def test_markdown_table(bench):
    text = (bench / "results.md").read_text()
    assert "| config | N | baseline ms | eager/base |" in text
    assert "| focal | 64 |" in text
    assert "default glibc allocator" in text


def test_baselines_match_our_values():
    """The MMDetection-style baselines compute the same loss as ours on ordinary inputs."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from baselines import baseline_for
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from visdet_export import build_loss
    from visdet_export.specs import CONFIG_VARIANTS, SEED_CONFIGS, SampleOptions, spec_for

    for name, cfg in SEED_CONFIGS.items():
        if name == "giou":  # jittered boxes can be inverted; ours treats those as empty (documented difference)
            continue
        loss = build_loss(cfg)
        spec = spec_for(loss, CONFIG_VARIANTS.get(name))
        inputs = spec.sample(loss, 200, seed=1, options=SampleOptions(dtype=torch.float64))
        ours = spec.call(loss, inputs)
        theirs = baseline_for(loss)(loss, inputs)
        torch.testing.assert_close(ours, theirs.reshape(ours.shape), rtol=1e-6, atol=1e-9, msg=name)


def test_the_memory_pass_prints_nothing_and_measures(capfd):
    """The profiler's C++ start / stop lines went to the terminal twice per memory pass (forty lines in a --quick
    run of two losses), whatever KINETO_LOG_LEVEL said; the measurement itself is unchanged."""
    import torch

    run = _runner()
    peak = run.peak_tensor_bytes(lambda: torch.ones(1 << 20).mul_(2.0), torch.device("cpu"))
    captured = capfd.readouterr()
    assert "profiler_st" not in captured.err + captured.out
    assert peak >= 4 << 20


@pytest.mark.parametrize(
    ("sizes", "message"), [("3,x", "takes sample counts"), ("64,-1", "sample counts must be >= 0")]
)
def test_sizes_that_are_not_counts_are_usage_errors(sizes, message, capsys):
    """``--sizes`` parses as ``check --sizes`` does (visdet_export.parsers.sample_counts)."""
    run = _runner()
    with pytest.raises(SystemExit) as exit_:
        run.parse_args(["--sizes", sizes])
    assert exit_.value.code == 2
    assert f"argument --sizes: {message}" in capsys.readouterr().err
    assert run.parse_args(["--sizes", "0,64,"]).sizes == [0, 64]


def test_short_cells_repeat_until_min_cell_time():
    run = _runner()
    args = run.parse_args(["--repeats", "5", "--min-repeats", "3", "--cell-budget-s", "8", "--min-cell-s", "1"])
    assert run._more_repeats(2, 100.0, args)  # --min-repeats whatever the time
    assert run._more_repeats(4, 7.9, args) and not run._more_repeats(4, 8.1, args)  # --cell-budget-s
    assert run._more_repeats(5, 0.5, args) and not run._more_repeats(5, 1.5, args)  # short cells go on
    assert not run._more_repeats(50, 0.5, args)  # at most 10x --repeats
    assert run.parse_args(["--quick"]).min_cell_s == 0.0


def test_torch_free_options_describe_the_runner():
    """``benchmarks/run_options.py`` (the options ``visdet-export bench --help`` reads without torch) describes
    run.py with the first paragraph of run.py's docstring, and run.py parses with it."""
    run = _runner()
    options = sys.modules["run_options"]  # imported by run.py
    assert run.__doc__.split("\n\n")[0] == options.DESCRIPTION
    assert run.ALL_PROVIDERS is options.ALL_PROVIDERS and run.parse_options is options.parse_args


def test_allocator_runs_default_to_both_on_cpu_only():
    run = _runner()
    assert run.parse_args([]).allocator == "both"
    assert run.parse_args(["--quick"]).allocator == "default"
    assert run.parse_args(["--device", "cuda"]).allocator == "default"  # glibc's state does not time a GPU


def test_onnx_column_refuses_cpu_onnxruntime_against_a_gpu(tmp_path):
    """Without onnxruntime's CUDA provider the GPU run drops the ORT column instead of timing the CPU against it."""
    import onnxruntime as ort
    import torch

    from visdet_export import build_loss
    from visdet_export.specs import spec_for

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed: the CUDA column is real")
    run = _runner()
    loss = build_loss(dict(type="L1Loss"))
    spec = spec_for(loss)
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        run.onnx_session(loss, spec, spec.names, 1, tmp_path, "l1", torch.device("cuda"))
    assert not list(tmp_path.iterdir())  # refused before exporting anything


def test_low_precision_runs_keep_every_loss(tmp_path):
    """The GPU command's half-precision runs: every row comes back in bfloat16 and float16 (the ONNX column is left
    out there, the exported graphs taking float32), DFL's sampled distances included (rounded to 16 in bfloat16,
    they broke the baseline's bin indexing)."""
    run = _runner()
    assert run.main(_one_round_argv(tmp_path, "dfl,l1", "baseline,eager,onnx", "--dtypes", "bfloat16,float16")) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [r["dtype"] for r in runs] == ["bfloat16", "float16"]
    for run_ in runs:
        assert not run_["errors"]
        assert {row["config"] for row in run_["rows"]} == {"dfl", "l1"}
        for row in run_["rows"]:
            assert row["dtype"] == run_["dtype"]
            assert row["ratios"]["eager/baseline"] > 0
            assert row["infer_ms"].get("onnx") is None


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32"])
def test_sampled_distances_stay_below_reg_max(dtype_name):
    import torch

    from visdet_export import build_loss
    from visdet_export.specs import SampleOptions, spec_for

    loss = build_loss(dict(type="DistributionFocalLoss"))
    inputs = spec_for(loss).sample(loss, 20_000, seed=0, options=SampleOptions(dtype=getattr(torch, dtype_name)))
    reg_max = inputs["pred"].size(1) - 1
    assert 0.99 * reg_max < float(inputs["target"].max()) < reg_max


def test_a_run_cut_short_keeps_the_configurations_it_finished(tmp_path, monkeypatch):
    """A GPU session's command runs under a time limit: results.json / results.md hold every finished
    configuration as it goes, marked incomplete until the run ends."""
    run = _runner()
    finished = run.run_config

    def stop_at_l1(name, *args, **kwargs):
        if name == "l1":
            raise KeyboardInterrupt  # what a timeout's signal leaves, as far as the files go
        return finished(name, *args, **kwargs)

    monkeypatch.setattr(run, "run_config", stop_at_l1)
    argv = _one_round_argv(tmp_path, "giou,l1", "baseline,eager")
    with pytest.raises(KeyboardInterrupt):
        run.main(argv)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["complete"] is False
    assert [row["config"] for row in result["runs"][0]["rows"]] == ["giou"]
    assert "| giou | 64 |" in (tmp_path / "results.md").read_text()
    monkeypatch.setattr(run, "run_config", finished)
    assert run.main(argv) == 0
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is True


@pytest.mark.parametrize(("name", "variant"), [("FocalLoss", "labels"), ("QualityFocalLoss", "pair"),
                                                ("CrossEntropyLoss", "labels")])
def test_positive_fraction_draws_mostly_background(name, variant):
    """``--positive-fraction 0.01``: labels as a detector's anchors have them (about 1% with a class, the rest
    background), where the default draws them uniformly over the classes and background."""
    import torch

    from visdet_export import build_loss
    from visdet_export.specs import SampleOptions, spec_for

    loss = build_loss(dict(type=name, use_sigmoid=True))
    spec = spec_for(loss, variant)
    key = "labels" if "labels" in spec.names else "target"
    n, classes = 100_000, 80
    for fraction, expected in ((None, classes / (classes + 1)), (0.01, 0.01), (0.0, 0.0)):
        labels = spec.sample(loss, n, seed=3, options=SampleOptions(positive_fraction=fraction))[key]
        labels = labels[labels != getattr(loss, "ignore_index", -100)]
        positive = ((labels >= 0) & (labels < classes)).double().mean().item()
        assert abs(positive - expected) < 0.005, (fraction, positive)
        assert bool(((labels >= 0) & (labels <= classes)).all())
        if fraction:
            assert len(torch.unique(labels[labels < classes])) == classes


def test_positive_fraction_is_recorded(tmp_path):
    run = _runner()
    assert run.main(_one_round_argv(tmp_path, "focal", "baseline,eager", "--positive-fraction", "0.01")) == 0
    (record,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert record["positive_fraction"] == 0.01 and not record["errors"]
    assert "1.0% of the samples with a class" in (tmp_path / "results.md").read_text()
