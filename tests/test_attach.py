"""Loss evaluation graphs: attach_losses (onnx.compose merges) and evaluate, driven by the GFL distillation example.

The merged student + teacher + five-loss graph is built once per module (the loss exports dominate the cost).
"""

import importlib.util
import json
import platform
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import onnx_model
from onnx import TensorProto, helper

from visdet_export import build_loss
from visdet_export.export.artifacts import ArtifactError
from visdet_export.export.attach import (
    AttachError,
    attach_losses,
    attached_losses,
    evaluate,
    load_samples,
    save_samples,
)
from visdet_export.export.onnx import embedded_config, export_onnx
from visdet_export.export.verify import verify
from visdet_export.specs import spec_for

EXAMPLE = Path(__file__).resolve().parents[1] / "export_scripts" / "distill_gfl_example.py"
_spec = importlib.util.spec_from_file_location("distill_gfl_example", EXAMPLE)
example = importlib.util.module_from_spec(_spec)
sys.modules["distill_gfl_example"] = example
_spec.loader.exec_module(example)

RTOL, ATOL = example.RTOL, example.ATOL
POSITIVES = (0, 1, 9, 40)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("attach")


@pytest.fixture(scope="module")
def model():
    return example.StudentTeacher().eval()


@pytest.fixture(scope="module")
def merged(model, workdir):
    return example.build_merged(model, workdir)


@pytest.fixture(scope="module")
def samples():
    return [example.make_sample(n, seed=i) for i, n in enumerate(POSITIVES)]


@pytest.fixture(scope="module")
def kd_graph(workdir):
    """A standalone KD loss graph (pred, soft_label, weight), reused as a pre-exported loss."""
    cfg = dict(type="KnowledgeDistillationKLDivLoss", T=2.0)
    return export_onnx(cfg, workdir / "kd.onnx", optional_inputs=("weight",))


def _identity_model(path: Path, opset: int, ir_version: int, width: int = 80, output: str = "y") -> Path:
    """A hand-written model: output = x * 2 with x (N, width) float, at the given opset / IR version."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])
    y = helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", width])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], np.float32(2.0).tobytes(), raw=True)
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], [output])], "double", [x], [y], [two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


# --- the example: merged graph against PyTorch --------------------------------------------------------------------


def test_exporting_prints_nothing(model, tmp_path, capfd):
    """The example's model export and the package's loss exports (what attach_losses runs) print no exporter
    progress ("[torch.onnx] Obtain model graph ...": torch.onnx.export prints it unless verbose=False)."""
    example.export_model(model, tmp_path / "model.onnx")
    export_onnx(dict(type="GIoULoss"), tmp_path / "giou.onnx")
    out, err = capfd.readouterr()
    assert "[torch.onnx]" not in out + err, out + err


def test_merged_losses_match_pytorch(model, merged, samples):
    rows = example.compare(model, merged, samples)
    for n, row in zip(POSITIVES, rows):
        for name, (ort_value, torch_value) in row.items():
            assert np.isfinite(ort_value), (n, name)
            np.testing.assert_allclose(ort_value, torch_value, rtol=RTOL, atol=ATOL, err_msg=f"{name} at N={n}")
    zero = rows[0]  # N = 0 positives: the positive-only losses are 0, the dense ones are not
    assert zero["loss_bbox"][0] == zero["loss_dfl"][0] == zero["loss_ld"][0] == 0.0
    assert zero["loss_cls"][0] > 0 and zero["loss_kd"][0] > 0


@pytest.mark.parametrize("argv", [[], ["--positives", "0", "3"]], ids=["as_the_readme_runs_it", "positives"])
def test_example_main_passes(model, merged, capsys, monkeypatch, argv):
    monkeypatch.setattr(example, "build_merged", lambda _model, _directory, overwrite=False: merged)
    assert example.main(argv) == 0
    out = capsys.readouterr().out
    assert "loss_ld" in out and "N = 0 positives" in out and "0 value(s) outside" in out


def test_model_outputs_are_kept(model, merged, samples):
    session = ort.InferenceSession(str(merged), providers=["CPUExecutionProvider"])
    sample = samples[2]
    got = session.run(list(example.MODEL_OUTPUTS), {k: v.numpy() for k, v in sample.items()})
    with torch.no_grad():
        expected = model(sample["feats"], sample["pos_inds"])
    for name, value, ref in zip(example.MODEL_OUTPUTS, got, expected):
        np.testing.assert_allclose(value, ref.numpy(), rtol=RTOL, atol=1e-5, err_msg=name)


def test_merged_graph_structure(merged):
    model = onnx.load(str(merged))
    onnx.checker.check_model(model, full_check=True)
    inputs = [value.name for value in model.graph.input]
    outputs = [value.name for value in model.graph.output]
    assert outputs == list(example.MODEL_OUTPUTS) + [name for name, _, _ in example.LOSSES]
    # the shared "bbox_weight" (GIoU and LD) is one input; no prefixed leftovers
    assert inputs.count("bbox_weight") == 1 and not any("/" in name for name in inputs)
    assert set(inputs) == {
        "feats", "pos_inds", "labels", "label_scores", "num_pos", "bbox_targets", "bbox_weight",
        "bbox_avg_factor", "dfl_targets", "dfl_weight", "dfl_avg_factor", "ld_avg_factor",
    }
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    # new inputs take the model's sizes and symbols for the loss's N and C (labels: one per anchor)
    dims = {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            for value in [*model.graph.input, *model.graph.output]}
    assert dims["labels"] == dims["label_scores"] == dims["cls_score"][:1]
    assert dims["bbox_targets"] == [dims["bbox_pred"][0], 4] and isinstance(dims["bbox_pred"][0], str)
    for value in model.graph.output[len(example.MODEL_OUTPUTS):]:
        assert len(value.type.tensor_type.shape.dim) == 0  # every loss is 0-d
    described = attached_losses(merged)
    assert list(described) == [name for name, _, _ in example.LOSSES]
    assert described["loss_ld"]["config"]["type"] == "LocalizationDistillationLoss"
    assert described["loss_ld"]["inputs"]["soft_label"] == "teacher_bbox_dist"
    manifest = json.loads(Path(f"{merged}.json").read_text())
    assert manifest["kind"] == "attached_losses" and manifest["opset"] == 18


# --- evaluate -----------------------------------------------------------------------------------------------------


def test_evaluate_npz_with_progress(model, merged, samples, workdir, capsys):
    path = save_samples(workdir / "samples.npz", samples)
    assert len(load_samples(path)) == len(samples)
    summary = evaluate(merged, path, progress=True)
    assert summary.outputs == [name for name, _, _ in example.LOSSES]  # the 0-d outputs by default
    assert summary.count == len(samples)
    for i, sample in enumerate(samples):
        for name, value in example.torch_losses(model, sample).items():
            np.testing.assert_allclose(summary.values[name][i], value, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(summary.mean["loss_bbox"], np.mean(summary.values["loss_bbox"]))
    assert summary.to_dict()["nonfinite"] == {name: 0 for name in summary.outputs}
    assert "4/4 samples" in capsys.readouterr().err
    assert "loss_kd" in str(summary)
    with pytest.raises(ArtifactError, match="exists"):
        save_samples(path, samples)


def test_evaluate_stacked_npz_and_errors(kd_graph, workdir):
    g = torch.Generator().manual_seed(0)
    stacked = {
        "pred": torch.randn(3, 5, 80, generator=g).numpy(),
        "soft_label": torch.randn(3, 5, 80, generator=g).numpy(),
        "weight": torch.rand(3, 5, generator=g).double().numpy(),  # cast to the graph's float32
    }
    path = workdir / "stacked.npz"
    np.savez(path, **stacked)
    summary = evaluate(kd_graph, path, progress=False)
    loss = build_loss(dict(type="KnowledgeDistillationKLDivLoss", T=2.0))
    for i in range(3):
        ref = loss(*(torch.from_numpy(stacked[k][i]).float() for k in ("pred", "soft_label", "weight")))
        np.testing.assert_allclose(summary.values["loss"][i], float(ref), rtol=RTOL, atol=ATOL)
    one = {k: v[0] for k, v in stacked.items()}
    with pytest.raises(AttachError, match="missing input"):
        evaluate(kd_graph, [{"pred": one["pred"]}], progress=False)
    with pytest.raises(AttachError, match="unknown input"):
        evaluate(kd_graph, [{**one, "target": one["weight"]}], progress=False)
    with pytest.raises(AttachError, match="no output"):
        evaluate(kd_graph, [one], outputs=["loss_cls"], progress=False)
    with pytest.raises(AttachError, match="sample 1: input 'weight' has N = 4 but 'pred' has N = 5"):
        evaluate(kd_graph, [one, {**one, "weight": one["weight"][:4]}], progress=False)
    with pytest.raises(AttachError, match="input 'soft_label' has C = 81 but 'pred' has C = 80"):
        evaluate(kd_graph, [{**one, "soft_label": np.zeros((5, 81), np.float32)}], progress=False)
    with pytest.raises(AttachError, match=r"input 'weight' has shape \(5, 1\); it takes \['N'\]"):
        evaluate(kd_graph, [{**one, "weight": one["weight"][:, None]}], progress=False)
    with pytest.raises(AttachError, match="no samples to evaluate"):
        evaluate(kd_graph, [], progress=False)
    np.savez(workdir / "empty.npz")  # an .npz of no arrays holds no samples (it read as stacked arrays of no length)
    assert load_samples(workdir / "empty.npz") == []
    with pytest.raises(AttachError, match="no samples to evaluate"):
        evaluate(kd_graph, workdir / "empty.npz", progress=False)
    np.savez(workdir / "scalars.npz", pred=np.float32(1.0), soft_label=np.float32(2.0))  # no sample axis at all
    with pytest.raises(AttachError, match=r"stacked inputs need one common leading sample axis, got \[-1\]"):
        load_samples(workdir / "scalars.npz")
    with pytest.raises(AttachError, match="is not a file"):
        evaluate(workdir / "missing.onnx", [one], progress=False)
    with pytest.raises(AttachError, match="cannot run CUDAExecutionProvider here"):  # CI has no GPU
        evaluate(kd_graph, [one], progress=False, providers=["CUDAExecutionProvider"])


# --- attach: options and errors -----------------------------------------------------------------------------------


def test_attach_converts_opset_and_ir_and_accepts_loss_graph_paths(kd_graph, workdir):
    model_path = _identity_model(workdir / "double_opset17.onnx", opset=17, ir_version=8)
    out = attach_losses(
        model_path,
        [("loss_kd", kd_graph, {"pred": "y", "soft_label": "teacher", "weight": "w"})],
        workdir / "double_kd.onnx",
    )
    model = onnx.load(str(out))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    assert model.ir_version == onnx.load(str(kd_graph)).ir_version
    x, teacher, w = torch.randn(6, 80), torch.randn(6, 80), torch.rand(6)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y, value = session.run(["y", "loss_kd"], {"x": x.numpy(), "teacher": teacher.numpy(), "w": w.numpy()})
    np.testing.assert_allclose(y, 2 * x.numpy())
    ref = build_loss(dict(type="KnowledgeDistillationKLDivLoss", T=2.0))(2 * x, teacher, w)
    np.testing.assert_allclose(value, float(ref), rtol=RTOL, atol=ATOL)
    # N = 0 through the merged graph
    empty = session.run(["loss_kd"], {"x": x[:0].numpy(), "teacher": teacher[:0].numpy(), "w": w[:0].numpy()})
    assert float(empty[0]) == 0.0


def test_a_loss_graph_takes_the_class_count_of_the_model(kd_graph, workdir):
    """kd_graph was exported and verified with 80 classes; its class axis is free, so a 68-class model feeds it."""
    narrow = _identity_model(workdir / "narrow68.onnx", opset=18, ir_version=10, width=68)
    mapping = {"pred": "y", "soft_label": "teacher", "weight": "w"}
    out = attach_losses(narrow, [("loss_kd", kd_graph, mapping)], workdir / "kd68.onnx")
    x, teacher, w = torch.randn(5, 68), torch.randn(5, 68), torch.rand(5)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (value,) = session.run(["loss_kd"], {"x": x.numpy(), "teacher": teacher.numpy(), "w": w.numpy()})
    ref = build_loss(dict(type="KnowledgeDistillationKLDivLoss", T=2.0))(2 * x, teacher, w)
    np.testing.assert_allclose(value, float(ref), rtol=RTOL, atol=ATOL)


def test_one_class_count_fed_two_sizes_is_refused(kd_graph, workdir):
    """Student logits of 68 classes against teacher logits of 80: both fill the KD graph's C."""
    values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", width]) for name, width in
              (("x", 68), ("t", 80), ("student", 68), ("teacher", 80))]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["student"]), helper.make_node("Identity", ["t"], ["teacher"])],
        "two_heads", values[:2], values[2:],
    )
    path = workdir / "two_heads.onnx"
    onnx.save(onnx_model(graph), str(path))
    mapping = {"pred": "student", "soft_label": "teacher"}
    with pytest.raises(AttachError, match="'teacher' has C = 80 but 'student' has C = 68"):
        attach_losses(path, [("loss_kd", kd_graph, mapping)], workdir / "never_two.onnx")
    assert not (workdir / "never_two.onnx").exists()


def test_attach_refuses_bad_requests(kd_graph, workdir, merged):
    model_path = _identity_model(workdir / "double.onnx", opset=18, ir_version=10)
    out = workdir / "never.onnx"
    with pytest.raises(AttachError, match="exists"):
        attach_losses(model_path, [("l", kd_graph, {"pred": "y"})], merged)
    with pytest.raises(AttachError, match="has no input"):
        attach_losses(model_path, [("l", dict(type="KnowledgeDistillationKLDivLoss"), {"logits": "y"})], out)
    with pytest.raises(AttachError, match="name"):
        attach_losses(model_path, [("a/b", kd_graph, {"pred": "y"})], out)
    with pytest.raises(AttachError, match="already used"):
        attach_losses(model_path, [("y", kd_graph, {"pred": "y"})], out)
    narrow = _identity_model(workdir / "narrow.onnx", opset=18, ir_version=10, width=68)
    with pytest.raises(AttachError, match="shape"):  # (N, 68) model output into a (N, 4) loss input
        attach_losses(narrow, [("l", dict(type="GIoULoss"), {"pred": "y"})], out)
    with pytest.raises(AttachError, match="at least one"):
        attach_losses(model_path, [], out)
    assert not out.exists()


def test_attach_refuses_dtype_mismatch(workdir):
    model_path = _identity_model(workdir / "double_dtype.onnx", opset=18, ir_version=10)
    loss = build_loss(dict(type="FocalLoss"))
    assert spec_for(loss).names[1] == "target"  # int64 labels
    with pytest.raises(AttachError, match="int64"):
        attach_losses(model_path, [("l", loss, {"pred": "y", "target": "y"})], workdir / "never2.onnx")


def test_a_name_close_to_a_model_output_is_refused_unless_declared_new(workdir):
    """'cls_scores' beside the model's 'cls_score' is a typo until new_inputs says it is a new graph input."""
    model_path = _identity_model(workdir / "double_typo.onnx", opset=18, ir_version=10, output="cls_score")
    loss, mapping = dict(type="KnowledgeDistillationKLDivLoss"), {"pred": "cls_score", "soft_label": "cls_scores"}
    typo = r"'cls_scores' is not an output of model .* \(did you mean 'cls_score'\?.*new_inputs"
    with pytest.raises(AttachError, match=typo):
        attach_losses(model_path, [("l", loss, mapping)], workdir / "never_typo.onnx")
    assert not (workdir / "never_typo.onnx").exists()
    out = attach_losses(model_path, [("l", loss, mapping)], workdir / "typo_ok.onnx", new_inputs=["cls_scores"])
    assert [value.name for value in onnx.load(str(out)).graph.input] == ["x", "cls_scores"]
    with pytest.raises(AttachError, match="'cls_score' is an output of model .* so it cannot be a new graph input"):
        attach_losses(model_path, [("l", loss, mapping)], workdir / "never_typo.onnx", new_inputs=["cls_score"])


def test_two_inputs_of_one_loss_share_a_new_graph_input(workdir):
    """target and weight both read 'gt' (one graph input), as the same tensor does in PyTorch."""
    model_path = _identity_model(workdir / "double_shared.onnx", opset=18, ir_version=10)
    mapping = {"pred": "y", "target": "gt", "weight": "gt"}
    out = attach_losses(model_path, [("l", dict(type="L1Loss"), mapping)], workdir / "shared.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [value.name for value in session.get_inputs()] == ["x", "gt"]
    x, gt = torch.randn(6, 80), torch.rand(6, 80)
    (value,) = session.run(["l"], {"x": x.numpy(), "gt": gt.numpy()})
    np.testing.assert_allclose(value, float(build_loss(dict(type="L1Loss"))(2 * x, gt, gt)), rtol=RTOL, atol=ATOL)
    with pytest.raises(AttachError, match="input 'weight': the new input 'gt' would be float32 here but loss 'l' "
                                          "input 'target' takes int64"):
        attach_losses(
            model_path,
            [("l", dict(type="FocalLoss"), {"pred": "y", "target": "gt", "weight": "gt"})],
            workdir / "never_shared.onnx",
        )


def test_attach_refuses_external_data_outside_the_model_directory(kd_graph, tmp_path):
    inner = tmp_path / "model"
    inner.mkdir()
    model = onnx.load(str(_identity_model(inner / "m.onnx", opset=18, ir_version=10)))
    onnx.save(model, str(inner / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    (tmp_path / "outside.data").write_bytes((inner / "m.data").read_bytes())
    stored = onnx.load(str(inner / "m.onnx"), load_external_data=False)
    for entry in stored.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../outside.data"
    onnx.save(stored, str(inner / "m.onnx"))
    with pytest.raises(ArtifactError, match="outside"):
        attach_losses(inner / "m.onnx", [("l", kd_graph, {"pred": "y"})], tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_attach_reads_external_data_inside_the_model_directory(kd_graph, tmp_path):
    model = onnx.load(str(_identity_model(tmp_path / "m.onnx", opset=18, ir_version=10)))
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    assert onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph.initializer[0].external_data
    out = attach_losses(tmp_path / "m.onnx", [("l", kd_graph, {"pred": "y", "soft_label": "t"})], tmp_path / "o.onnx")
    x = np.ones((2, 80), np.float32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    # the unmapped input of a pre-exported loss graph stays, under the loss's prefix
    assert [i.name for i in session.get_inputs()] == ["x", "t", "l/weight"]
    (y,) = session.run(["y"], {"x": x, "t": x, "l/weight": np.ones(2, np.float32)})
    np.testing.assert_allclose(y, 2 * x)


# --- a detection engineer's own model (audit): dtypes, axes, re-attaching, mistakes found before any export ----------


def _two_head_model(path: Path, cls_type: int = TensorProto.FLOAT, internal: bool = False) -> Path:
    """cls = x (A, C) of ``cls_type`` and box = b (P, 4): two heads whose sample axes are different symbols; with
    ``internal`` cls goes through a Relu named "feat" that is no output."""
    source = "x"
    nodes = []
    if internal:
        nodes.append(helper.make_node("Relu", ["x"], ["feat"]))
        source = "feat"
    nodes += [helper.make_node("Identity", [source], ["cls"]), helper.make_node("Identity", ["b"], ["box"])]
    graph = helper.make_graph(
        nodes, "heads",
        [helper.make_tensor_value_info("x", cls_type, ["A", 5]), helper.make_tensor_value_info("b", TensorProto.FLOAT,
                                                                                              ["P", 4])],
        [helper.make_tensor_value_info("cls", cls_type, ["A", 5]), helper.make_tensor_value_info("box",
                                                                                                TensorProto.FLOAT,
                                                                                                ["P", 4])],
    )
    onnx.save(onnx_model(graph), str(path))
    return path


def _kd_like_graph(path: Path, soft_label_dims: list = ["N", "C"], output: str = "loss") -> Path:  # noqa: B006
    """A hand-written loss graph: ``output`` = sum(pred - soft_label), a 0-d float."""
    inputs = [helper.make_tensor_value_info("pred", TensorProto.FLOAT, ["N", "C"]),
              helper.make_tensor_value_info("soft_label", TensorProto.FLOAT, soft_label_dims)]
    nodes = [helper.make_node("Sub", ["pred", "soft_label"], ["d"]),
             helper.make_node("ReduceSum", ["d"], [output], keepdims=0)]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, [])])
    onnx.save(onnx_model(graph), str(path))
    return path


def _dims_of(path: Path) -> dict[str, list]:
    graph = onnx.load(str(path)).graph
    return {value.name: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim] for value in graph.input}


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE])
def test_half_and_double_model_outputs_are_cast_to_the_loss_graphs_float32(tmp_path, dtype):
    """They were refused ("'cls' is float16 but the loss expects float32"); eager losses take them."""
    model = _two_head_model(tmp_path / "m.onnx", dtype)
    out = attach_losses(model, [("lf", dict(type="FocalLoss"), {"pred": "cls", "target": "y"})], tmp_path / "o.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    torch_dtype = {TensorProto.FLOAT16: torch.float16, TensorProto.BFLOAT16: torch.bfloat16}.get(dtype, torch.float64)
    x, labels = (torch.randn(7, 5) * 4).to(torch_dtype), torch.randint(0, 6, (7,))
    if dtype == TensorProto.BFLOAT16:  # numpy has no bfloat16: onnxruntime takes its bits
        feed = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(x.view(torch.int16).numpy().view(np.uint16), dtype)
    else:
        feed = x.numpy()
    (value,) = session.run(["lf"], {"x": feed, "b": np.zeros((0, 4), np.float32), "y": labels.numpy()})
    np.testing.assert_allclose(value, float(build_loss(dict(type="FocalLoss"))(x, labels)), rtol=RTOL, atol=ATOL)
    # evaluate feeds the model's own dtype (bfloat16 through onnxruntime's bits), from float32 samples
    summary = evaluate(out, [{"x": x.float().numpy(), "b": np.zeros((0, 4), np.float32), "y": labels.numpy()}],
                       progress=False)
    np.testing.assert_allclose(summary.mean["lf"], value, rtol=1e-6)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the README states it for x86-64")
def test_float16_gemm_head_feeds_its_loss_the_float32_value_in_onnxruntime_cpu(tmp_path):
    """What the README says of merged float16 models: onnxruntime's CPU provider computes the float16 Gemm in float32
    and the loss sees that value unrounded, so the loss equals eager on the float32 Gemm, not on the returned float16
    scores. Should onnxruntime round there one day, this fails and the README is to be corrected."""
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(64, 20, generator=generator).half(), torch.randn(20, generator=generator).half()
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "c"], ["cls"])], "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["A", 64])],
        [helper.make_tensor_value_info("cls", TensorProto.FLOAT16, ["A", 20])],
        [onnx.numpy_helper.from_array(weight.numpy(), "w"), onnx.numpy_helper.from_array(bias.numpy(), "c")],
    )
    model = tmp_path / "m.onnx"
    onnx.save(onnx_model(graph), str(model))
    out = attach_losses(model, [("lf", dict(type="FocalLoss"), {"pred": "cls", "target": "y"})], tmp_path / "o.onnx")
    x, labels = torch.randn(500, 64, generator=generator).half(), torch.randint(0, 21, (500,), generator=generator)
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
        scores, value = session.run(["cls", "lf"], {"x": x.numpy(), "y": labels.numpy()})
        loss = build_loss(dict(type="FocalLoss"))
        in_float32 = loss(torch.addmm(bias.float(), x.float(), weight.float()), labels)
        on_returned = loss(torch.from_numpy(scores).float(), labels)
        assert float(value) == pytest.approx(float(in_float32), rel=1e-6), level
        assert float(value) != pytest.approx(float(on_returned), rel=1e-7), level


def test_attaching_again_keeps_the_first_losses_on_record(tmp_path):
    """The second attach replaced the record: verify checked only the new loss."""
    model = _two_head_model(tmp_path / "m.onnx")
    first = attach_losses(model, [("lf", dict(type="FocalLoss"), {"pred": "cls", "target": "y"})], tmp_path / "a.onnx")
    second = attach_losses(
        first, [("lg", dict(type="GIoULoss"), {"pred": "box", "target": "gt"})], tmp_path / "b.onnx"
    )
    assert list(attached_losses(second)) == ["lf", "lg"]
    assert list(json.loads(Path(f"{second}.json").read_text())["losses"]) == ["lf", "lg"]
    assert [value.name for value in onnx.load(str(second)).graph.output] == ["cls", "box", "lf", "lg"]


def test_new_inputs_share_the_losss_symbols_and_unmapped_graph_inputs_take_the_models(tmp_path, kd_graph):
    """Without a model output fixing N, each new input had its own symbol (lab/N, sc/N), and a loss graph's
    unmapped inputs (<loss>/weight) were not tied to the model's N at all."""
    model = _two_head_model(tmp_path / "m.onnx")
    out = attach_losses(
        model,
        [("q", dict(type="QualityFocalLoss"), {"pred": "p", "labels": "lab", "scores": "sc"}),
         ("kd", kd_graph, {"pred": "cls", "soft_label": "teacher"})],
        tmp_path / "o.onnx",
    )
    dims = _dims_of(out)
    assert dims["p"][0] == dims["lab"][0] == dims["sc"][0] == "q/N"
    assert dims["teacher"] == ["A", 5] and dims["kd/weight"] == ["A"]


def test_one_symbol_fed_two_model_axes_is_warned_about(tmp_path):
    """A weight per anchor (A) given to a loss on positive boxes (P): the merged model fails whenever A != P."""
    model = _two_head_model(tmp_path / "m.onnx")
    with pytest.warns(UserWarning, match=r"loss 'lg': its N is 'P' of 'box' and 'A' of 'w'"):
        attach_losses(
            model,
            [("lf", dict(type="FocalLoss"), {"pred": "cls", "target": "y", "weight": "w"}),
             ("lg", dict(type="GIoULoss"), {"pred": "box", "target": "gt", "weight": "w"})],
            tmp_path / "o.onnx",
        )


@pytest.mark.parametrize(
    "loss, mapping, match",
    [
        (dict(type="FocalLoss", reduction="none"), {"pred": "cls", "target": "y"}, "reduction='none' gives no 0-d"),
        (dict(type="FocalLoss", reduction="sum"), {"pred": "cls", "target": "y", "avg_factor": "n"},
         "reduction='sum' takes no avg_factor"),
        (dict(type="KnowledgeDistillationKLDivLoss"), {"pred": "cls", "soft_label": "feat"},
         "'feat' is an internal value of model .*, not one of its outputs"),
        (dict(type="FocalLoss"), {"pred": "cls", "target": "box"}, "'box' is float32 but the loss expects int64"),
        (dict(type="FocalLoss"), {"pred": "cls", "target": "b"}, "'b' is float32 but the loss expects int64"),
        ("graph", {"pred": "cls", "soft": "t"}, r"has no input\(s\) soft"),
        ("graph", {"pred": "cls", "soft_label": "box"}, r"'box' has C = 4 but 'cls' has C = 5"),
        ("graph-none", {"pred": "cls", "soft_label": "t"}, "must have one 0-d output"),
        (dict(type="FocalLoss"), {"pred": "cls", "target": "gt"},
         "the new input 'gt' would be int64 here but loss 'first' input 'target' takes float32"),
        (dict(type="DistributionFocalLoss"), {"pred": "cls", "target": "gt"},
         r"the new input 'gt' would have shape \(N,\) here but loss 'first' input 'target' takes \(N, 4\)"),
        ("graph-3", {"pred": "cls", "soft_label": "gt"},
         r"the new input 'gt' would have shape \(N, 3\) here but loss 'first' input 'target' takes \(N, 4\)"),
    ],
    ids=["none", "sum-avg-factor", "internal", "dtype", "dtype-of-model-input", "graph-input", "graph-shape",
         "graph-none", "new-input-dtype", "new-input-rank", "new-input-size"],
)
def test_mistakes_are_refused_before_any_export(tmp_path, monkeypatch, loss, mapping, match):
    """Each was found only after every earlier loss had been exported (or, for 'none', by verify afterwards)."""
    from visdet_export.export import attach

    model = _two_head_model(tmp_path / "m.onnx", internal=True)
    if loss == "graph-3":  # a loss graph of its own whose soft labels have 3 columns
        loss = _kd_like_graph(tmp_path / "kd3.onnx", soft_label_dims=["N", 3])
    elif isinstance(loss, str):  # a loss graph exported beforehand
        kd = dict(type="KnowledgeDistillationKLDivLoss", reduction="none" if loss == "graph-none" else "mean")
        loss = export_onnx(kd, tmp_path / "kd.onnx", optional_inputs=())
    exported = []
    monkeypatch.setattr(attach, "_export_loss_graph", lambda *args: exported.append(args))
    with pytest.raises(AttachError, match=match):
        attach_losses(model, [("first", dict(type="GIoULoss"), {"pred": "box", "target": "gt"}), ("l", loss, mapping)],
                      tmp_path / "o.onnx")
    assert exported == []


def test_a_mapping_to_something_other_than_names_is_refused(tmp_path, monkeypatch):
    """Each loss input maps to the name of a model output or a new graph input: a number or a list is refused with
    the entry's name before any export."""
    from visdet_export.export import attach

    model = _two_head_model(tmp_path / "m.onnx")
    monkeypatch.setattr(attach, "_export_loss_graph", lambda *args: pytest.fail("exported"))
    for mapping in ({"pred": "box", "target": 3}, {"pred": ["box"]}):
        with pytest.raises(AttachError, match=r"^loss 'l': the input mapping must map input names to names, got "):
            attach_losses(model, [("l", dict(type="GIoULoss"), mapping)], tmp_path / "o.onnx")


def test_verify_attached_refuses_an_attached_loss_output_that_is_not_0d(tmp_path):
    """verify of a merged model: an attached loss whose output is no longer 0-d (the model edited after attaching)
    is named, even with the manifest's losses and config intact."""
    from visdet_export.export.artifacts import read_manifest
    from visdet_export.export.attach import verify_attached

    model = _two_head_model(tmp_path / "m.onnx")
    out = attach_losses(model, [("l", _kd_like_graph(tmp_path / "kd.onnx"), {"pred": "cls", "soft_label": "soft"})],
                        tmp_path / "o.onnx")
    manifest = read_manifest(out)
    assert verify_attached(out, manifest)["attached"] == ["l"]
    edited = onnx.load(str(out))
    (node,) = [node for node in edited.graph.node if "l" in node.output]
    node.attribute.remove(next(a for a in node.attribute if a.name == "keepdims"))
    node.attribute.append(helper.make_attribute("keepdims", 1))  # the loss is now (1, 1)
    (value,) = [value for value in edited.graph.output if value.name == "l"]
    for _ in range(2):
        value.type.tensor_type.shape.dim.add().dim_value = 1
    onnx.save(edited, str(out))
    with pytest.raises(AttachError, match=r"o\.onnx has no 0-d output for the attached loss\(es\) l$"):
        verify_attached(out, manifest)


def test_verify_attached_refuses_a_model_whose_shapes_disagree(tmp_path):
    """A merged model edited so that a declared shape contradicts its graph: the checker's shape inference raised
    its own InferenceError, not the AttachError (exit 2 in the CLI) that verify_attached promises."""
    from visdet_export.export.artifacts import read_manifest
    from visdet_export.export.attach import verify_attached

    model = _two_head_model(tmp_path / "m.onnx")
    out = attach_losses(model, [("l", _kd_like_graph(tmp_path / "kd.onnx"), {"pred": "cls", "soft_label": "soft"})],
                        tmp_path / "o.onnx")
    manifest = read_manifest(out)
    edited = onnx.load(str(out))
    (value,) = [value for value in edited.graph.output if value.name == "cls"]
    value.type.tensor_type.shape.dim[1].dim_value = 7  # the graph computes (A, 5)
    onnx.save(edited, str(out))
    with pytest.raises(AttachError, match=r"o\.onnx is not a valid ONNX model: .*differ"):
        verify_attached(out, manifest)


def test_a_new_input_shared_by_a_static_and_a_symbolic_size_is_planned(tmp_path):
    """GIoU reads the new input 'gt' as (N, 4), L1 as (N, D): D is a symbol, not a clash with 4, so both losses share
    it (only two static sizes that differ, or ranks, are refused)."""
    from visdet_export.export.attach import check_plan

    model = onnx.load(str(_two_head_model(tmp_path / "m.onnx")))
    losses = [("giou", dict(type="GIoULoss"), {"pred": "box", "target": "gt"}),
              ("l1", dict(type="L1Loss"), {"pred": "box", "target": "gt"})]
    planned = check_plan(model, losses, frozenset(), "m.onnx")
    assert [(name, mapping) for name, _, mapping, _ in planned] == [(name, mapping) for name, _, mapping in losses]


@pytest.mark.parametrize(
    "loss, mapping, match",
    [
        # an RPN's / YOLOX's sigmoid CE on (N, C) logits: the default layout takes one logit per sample
        (dict(type="CrossEntropyLoss", use_sigmoid=True), {"pred": "cls", "target": "labels"},
         r"it takes \['N'\]\. That is CrossEntropyLoss's 'binary' input layout; the 'labels' or 'dense' layout "
         r"takes this mapping: attach it with \(name, config, mapping, 'labels'\) in Python, \"variant\": "
         r"\"labels\" in an attach spec"),
        # dense QFL targets: the default (labels, scores) pair has no input named target
        (dict(type="QualityFocalLoss"), {"pred": "cls", "target": "soft"},
         r"has no input\(s\) target; .*the 'dense' layout takes this mapping"),
        # softmax CE on class probabilities a model outputs
        (dict(type="CrossEntropyLoss"), {"pred": "cls", "target": "cls"},
         r"is float32 but the loss expects int64\. .*the 'probabilities' layout takes this mapping"),
    ],
    ids=["sigmoid-ce-labels", "qfl-dense", "ce-probabilities"],
)
def test_a_config_refused_in_its_default_layout_names_the_layout_that_fits(tmp_path, monkeypatch, loss, mapping, match):
    """A config attaches in its loss's default input layout unless the entry names another (its variant); where
    another layout takes the mapping, the refusal says which and how to name it, before any export. Before, it said
    only "'cls' has shape ('A', 5); it takes ['N']"."""
    from visdet_export.export import attach

    model = _two_head_model(tmp_path / "m.onnx")
    exported = []
    monkeypatch.setattr(attach, "_export_loss_graph", lambda *args: exported.append(args))
    with pytest.raises(AttachError, match=match):
        attach_losses(model, [("l", loss, mapping)], tmp_path / "o.onnx")
    assert exported == []


def test_a_config_attaches_in_the_layout_its_entry_names(tmp_path, monkeypatch, capsys):
    """(name, config, mapping, variant): an RPN's sigmoid CE on (A, C) logits with labels attaches in the 'labels'
    layout, in Python and from an attach spec's "variant", matches eager in onnxruntime and is recorded with the
    loss. An unknown layout names the loss's; a variant beside a loss graph is refused (the graph has its own)."""
    from visdet_export import cli
    from visdet_export.export import attach

    cfg = dict(type="CrossEntropyLoss", use_sigmoid=True)
    model = _two_head_model(tmp_path / "m.onnx")
    out = attach_losses(model, [("l", cfg, {"pred": "cls", "target": "labels"}, "labels")], tmp_path / "o.onnx")
    assert attached_losses(out)["l"]["variant"] == "labels"
    x, labels = torch.randn(7, 5) * 3, torch.tensor([0, 4, 5, 2, 5, 1, 3])  # 5: background
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (value,) = session.run(["l"], {"x": x.numpy(), "b": np.zeros((0, 4), np.float32), "labels": labels.numpy()})
    np.testing.assert_allclose(value, float(build_loss(cfg)(x.double(), labels)), rtol=RTOL, atol=ATOL)
    capsys.readouterr()
    spec = tmp_path / "attach.json"
    spec.write_text(json.dumps([{"name": "l", "loss": cfg, "inputs": {"pred": "cls", "target": "labels"},
                                 "variant": "dense"}]))
    assert cli.main(["attach", str(model), str(tmp_path / "dense.onnx"), "--spec", str(spec), "-q"]) == 0
    assert _dims_of(tmp_path / "dense.onnx")["labels"] == ["A", 5]  # the dense layout's float targets
    monkeypatch.setattr(attach, "_export_loss_graph", lambda *args: pytest.fail("exported"))
    with pytest.raises(AttachError, match=r"loss 'l': CrossEntropyLoss has no input variant 'dens'; choose one of "):
        attach_losses(model, [("l", cfg, {"pred": "cls", "target": "labels"}, "dens")], tmp_path / "x.onnx")
    graph = export_onnx(dict(type="KnowledgeDistillationKLDivLoss"), tmp_path / "kd.onnx", optional_inputs=())
    with pytest.raises(AttachError, match="a loss graph has the input layout it was exported in"):
        attach_losses(model, [("l", graph, {"pred": "cls"}, "labels")], tmp_path / "x.onnx")


def test_a_refusal_in_a_chosen_layout_names_that_layout_and_an_unknown_one_gets_no_hint(tmp_path, monkeypatch):
    """The hint names the layout the entry chose, not the loss's default: float targets of the logits' shape given
    to a sigmoid CE in the 'labels' layout (int64 labels) are refused as the 'labels' layout's, and the 'dense'
    layout named. An unknown layout is refused with the loss's layouts alone: no layout 'takes this mapping' hint
    describing a layout the loss does not have."""
    from visdet_export.export import attach

    cfg = dict(type="CrossEntropyLoss", use_sigmoid=True)
    model = _two_head_model(tmp_path / "m.onnx")
    monkeypatch.setattr(attach, "_export_loss_graph", lambda *args: pytest.fail("exported"))
    with pytest.raises(AttachError, match=r"is float32 but the loss expects int64\. That is CrossEntropyLoss's "
                       r"'labels' input layout; the 'dense' layout takes this mapping"):
        attach_losses(model, [("l", cfg, {"pred": "cls", "target": "cls"}, "labels")], tmp_path / "o.onnx")
    with pytest.raises(AttachError) as error:
        attach_losses(model, [("l", cfg, {"pred": "cls", "target": "labels"}, "dens")], tmp_path / "o.onnx")
    assert str(error.value).startswith("loss 'l': CrossEntropyLoss has no input variant 'dens'; choose one of ")
    assert "layout" not in str(error.value)


def test_no_layout_hint_where_no_other_layout_fits(tmp_path, monkeypatch):
    from visdet_export.export import attach

    model = _two_head_model(tmp_path / "m.onnx")
    monkeypatch.setattr(attach, "_export_loss_graph", lambda *args: pytest.fail("exported"))
    with pytest.raises(AttachError) as error:  # mask CE on (A, 5) logits: neither the mask nor the points layout
        attach_losses(model, [("l", dict(type="CrossEntropyLoss", use_mask=True), {"pred": "cls", "target": "t"})],
                      tmp_path / "o.onnx")
    assert "layout" not in str(error.value)


def test_an_opset_newer_than_onnx_knows_is_named(tmp_path):
    with pytest.raises(AttachError, match=f"at most {onnx.defs.onnx_opset_version()}"):
        attach_losses(_two_head_model(tmp_path / "m.onnx"),
                      [("lf", dict(type="FocalLoss"), {"pred": "cls", "target": "y"})], tmp_path / "o.onnx",
                      opset=onnx.defs.onnx_opset_version() + 5)


def test_broken_or_misnamed_loss_graphs_are_refused_before_any_export(tmp_path, monkeypatch):
    """A corrupt file escaped as protobuf's DecodeError; an output not named 'loss' was found only after the
    earlier losses had been exported."""
    from visdet_export.export import attach

    model = _two_head_model(tmp_path / "m.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"graph")
    _kd_like_graph(tmp_path / "total.onnx", output="total")
    exported = []
    monkeypatch.setattr(attach, "_export_loss_graph", lambda *args: exported.append(args))
    for path, match in [(tmp_path / "broken.onnx", "is not an ONNX model"), (tmp_path / "total.onnx", "output 'loss'")]:
        with pytest.raises(AttachError, match=match):
            attach_losses(model, [("first", dict(type="GIoULoss"), {"pred": "box", "target": "gt"}),
                                  ("l", path, {"pred": "cls", "soft_label": "t"})], tmp_path / "o.onnx")
    assert exported == []


def test_attaching_to_an_exported_loss_graph_keeps_its_metadata_under_its_output(tmp_path):
    """The base's own visdet_export.* keys (a FocalLoss config, 4 inputs, the output "loss") described the merged
    model, which has 7 inputs and 3 outputs, and embedded_config took it for a plain FocalLoss."""
    focal = export_onnx(dict(type="FocalLoss"), tmp_path / "focal.onnx")
    own = {p.key: p.value for p in onnx.load(str(focal)).metadata_props}
    merged = attach_losses(
        focal,
        [
            ("loss_qfl", dict(type="QualityFocalLoss"), {"pred": "pred", "labels": "qfl_l", "scores": "qfl_s"}),
            ("loss_kd", dict(type="KnowledgeDistillationKLDivLoss", T=2.0), {"pred": "pred", "soft_label": "teacher"}),
        ],
        tmp_path / "merged.onnx",
    )
    model = onnx.load(str(merged))
    assert len(model.graph.input) == 7 and [o.name for o in model.graph.output] == ["loss", "loss_qfl", "loss_kd"]
    props = {p.key: p.value for p in model.metadata_props}
    assert [key for key in props if key.startswith("visdet_export.")] == ["visdet_export.attached_losses"]
    assert {key: props["loss/" + key] for key in own} == own  # the base's, under its output, as attached ones are
    assert json.loads(props["loss_kd/visdet_export.config"])["type"] == "KnowledgeDistillationKLDivLoss"
    assert embedded_config(merged) is None and list(attached_losses(merged)) == ["loss_qfl", "loss_kd"]
    assert verify(merged)["passed"]
    # a model merged before: its top-level config is still no single loss's
    props["visdet_export.config"] = own["visdet_export.config"]
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    onnx.save(model, str(tmp_path / "older.onnx"))
    assert embedded_config(tmp_path / "older.onnx") is None
