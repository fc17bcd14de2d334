"""Input specs: which sizes a configuration fixes and which it leaves free (exported graphs take any value of a
free size; random inputs draw its default or the one asked for)."""

import pytest
import torch

from visdet_export import build_loss
from visdet_export.specs import CONFIG_VARIANTS, SampleOptions, head_variant, representative_configs, spec_for

CONFIGS = representative_configs()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_drawn_inputs_have_the_spec_shapes_at_default_and_other_free_sizes(name):
    loss = build_loss(CONFIGS[name])
    spec = spec_for(loss, CONFIG_VARIANTS.get(name))
    assert set(spec.symbols()) == {"N", *spec.sizes}  # every free size has a default, and only those
    assert spec.symbols()[0] == "N"
    for sizes in ({}, spec.smaller_sizes()):
        drawn = spec.sample(loss, 5, seed=1, options=SampleOptions(sizes=sizes))
        for tensor_spec in spec.inputs:
            want = tensor_spec.concrete_shape(5, {**spec.sizes, **sizes})
            assert tuple(drawn[tensor_spec.name].shape) == want, (tensor_spec.name, sizes)
        assert torch.isfinite(spec.call(loss, drawn)), sizes


def test_the_configuration_fixes_what_the_loss_checks():
    focal = spec_for(build_loss(dict(type="FocalLoss")))
    assert focal.inputs[0].shape == ("N", "C") and focal.sizes == {"C": 80}
    weighted = spec_for(build_loss(dict(type="CrossEntropyLoss", class_weight=[1.0, 2.0, 3.0])))
    assert weighted.inputs[0].shape == ("N", 3) and weighted.sizes == {}
    assert spec_for(build_loss(dict(type="DistributionFocalLoss"))).inputs[0].shape == ("N", "B")
    fixed_bins = spec_for(build_loss(dict(type="DistributionFocalLoss", reg_max=7)))
    assert fixed_bins.inputs[0].shape == ("N", 8) and fixed_bins.sizes == {}
    ld = spec_for(build_loss(dict(type="LocalizationDistillationLoss", reg_max=7)))
    assert ld.inputs[0].shape == ("N", 32)
    mask = spec_for(build_loss(dict(type="CrossEntropyLoss", use_mask=True)))
    assert mask.inputs[0].shape == ("N", "C", "H", "W") and mask.inputs[1].shape == ("N", "H", "W")
    assert spec_for(build_loss(dict(type="GIoULoss"))).symbols() == ["N"]  # boxes: four coordinates
    assert spec_for(build_loss(dict(type="MSELoss"))).inputs[0].shape == ("N", "D")  # 4 deltas, YOLOv3's 2 wh


def test_an_unknown_free_size_is_refused():
    loss = build_loss(dict(type="GIoULoss"))
    with pytest.raises(ValueError, match="no free size"):
        spec_for(loss).sample(loss, 3, options=SampleOptions(sizes={"C": 3}))


@pytest.mark.parametrize(
    ("path", "config", "variant"),
    [
        ("rpn_head.loss_cls", dict(type="CrossEntropyLoss", use_sigmoid=True), "labels"),  # (N, 1), background 1
        ("model.rpn_head.loss_cls", dict(type="CrossEntropyLoss", use_sigmoid=True), "labels"),
        ("model.rpn_head.stages.0.loss_cls", dict(type="CrossEntropyLoss", use_sigmoid=True), "labels"),  # Cascade RPN
        ("model.roi_head.point_head.loss_point", dict(type="CrossEntropyLoss", use_mask=True), "points"),  # PointRend
        ("model.roi_head.mask_head.loss_mask", dict(type="CrossEntropyLoss", use_mask=True), None),
        ("bbox_head.loss_centerness", dict(type="CrossEntropyLoss", use_sigmoid=True), None),  # one logit, soft target
        ("loss_cls", dict(type="CrossEntropyLoss", use_sigmoid=True), "dense"),  # YOLOv3: one-hot float targets
        ("loss_conf", dict(type="CrossEntropyLoss", use_sigmoid=True), None),  # YOLOv3's objectness
        ("bbox_head.loss_xy", dict(type="CrossEntropyLoss", use_sigmoid=True), "dense"),  # YOLOv3's (N, 2) offsets
        ("roi_head.bbox_head.loss_cls", dict(type="CrossEntropyLoss", use_sigmoid=False), None),
        ("roi_head.mask_head.loss_mask", dict(type="CrossEntropyLoss", use_mask=True), None),
        ("bbox_head.loss_cls", dict(type="FocalLoss"), None),
    ],
)
def test_head_variant_is_the_layout_the_head_calls_the_loss_with(path, config, variant):
    assert head_variant(path, config) == variant
    spec = spec_for(build_loss(config), variant)
    if variant == "labels":
        assert spec.inputs[0].shape == ("N", "C") and spec.inputs[1].kind == "int64"
    if variant == "dense":
        assert spec.inputs[0].shape == spec.inputs[1].shape == ("N", "C") and spec.inputs[1].kind == "float"


def test_dense_sigmoid_cross_entropy_is_the_per_class_bce_of_soft_targets():
    """The dense layout (YOLOv3 / YOLOX class targets) in float64 against BCE-with-logits written out."""
    loss = build_loss(dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=2.0))
    spec = spec_for(loss, "dense")
    inputs = spec.sample(loss, 9, seed=4, options=SampleOptions(dtype=torch.float64, sizes={"C": 6}))
    pred, target, weight, avg_factor = (inputs[k] for k in ("pred", "target", "weight", "avg_factor"))
    bce = torch.clamp(pred, min=0) - pred * target + torch.log1p(torch.exp(-pred.abs()))
    want = 2.0 * (bce * weight[:, None]).sum() / (avg_factor + torch.finfo(torch.float32).eps)  # visdet's eps
    torch.testing.assert_close(spec.call(loss, inputs), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(representative_configs()))
def test_every_listed_variant_builds_and_the_default_comes_first(name):
    loss = build_loss(representative_configs()[name])
    variants = spec_for(loss).variants
    assert variants and spec_for(loss).variant == variants[0]
    for variant in variants:
        spec = spec_for(loss, variant)
        assert spec.variant == variant and spec.variants == variants
        spec.sample(loss, 3)
    with pytest.raises(ValueError, match=", ".join(variants)):
        spec_for(loss, "no-such-layout")


def test_smaller_sizes_respect_the_least_sizes() -> None:
    """A spec whose loss refuses fewer than 8 classes drew 4 for its smaller-size checks, and failed its own export."""
    from visdet_export.specs import LossSpec, TensorSpec

    spec = LossSpec("X", "v", (TensorSpec("pred", ("N", "C")),), lambda n, g, o: {}, lambda m, i, r: m(i),
                    {"C": 16, "D": 80}, least_sizes={"C": 8})
    assert spec.smaller_sizes() == {"C": 8, "D": 20}
