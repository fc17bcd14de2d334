"""Input specs: for every registered loss, one source of truth for its inputs.

A :class:`LossSpec` names each input, gives its dtype and its shape, says how the inputs map onto the loss's
``forward``, and draws valid random inputs. A shape holds the symbolic sample count ``"N"``, symbols for the sizes
the configuration leaves free (``"C"`` classes, ``"B"`` DFL bins, ``"H"`` / ``"W"`` mask sizes, ``"D"`` values per
sample of a regression loss: exported graphs take any value, random inputs a default of :attr:`LossSpec.sizes`),
and the sizes the configuration fixes as integers (a class weight fixes the classes; boxes have four coordinates).
Tests, export, verification and benchmarks all use it, so a loss registered later with a spec is covered by all of them.

>>> from visdet_export import build_loss
>>> loss = build_loss(dict(type="FocalLoss"))
>>> spec = spec_for(loss)
>>> [t.name for t in spec.inputs]
['pred', 'target', 'weight', 'avg_factor']
>>> inputs = spec.sample(loss, 8, seed=0)
>>> float(spec.call(loss, inputs)) > 0
True
"""

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

Dim = Union[str, int]

#: Largest ``pred`` drawn for one parity or matrix check (see :meth:`LossSpec.capped`).
MAX_CHECK_ELEMENTS = 1 << 22
#: The symbol of the sample count; every other symbol of a shape is a size of at least 1 in exported programs
#: (:meth:`LossSpec.smallest_size`).
SAMPLES = "N"


FLOAT = "float"  # the dtype chosen for the sample (float32 by default)
INT64 = "int64"


@dataclass(frozen=True)
class TensorSpec:
    """One input: ``kind`` is "float" (the sample's floating dtype) or "int64"; ``shape`` holds integers and
    symbols ("N", and the free sizes of :attr:`LossSpec.sizes`)."""

    name: str
    shape: tuple[Dim, ...]
    kind: str = FLOAT
    optional: bool = False
    doc: str = ""

    def dtype(self, float_dtype: torch.dtype) -> torch.dtype:
        return torch.int64 if self.kind == INT64 else float_dtype

    def concrete_shape(self, n: int, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(n if dim == SAMPLES else sizes[dim] if isinstance(dim, str) else dim for dim in self.shape)


@dataclass(frozen=True)
class SampleOptions:
    """How random inputs are drawn.

    Attributes:
        dtype: floating dtype of predictions, targets and weights.
        logit_range: logits uniform in [-r, r] instead of 2 x standard normal (extreme-logit tests).
        zero_weight_fraction: share of weights set to exactly 0 (masked elements).
        positive_fraction: share of samples labelled with a class where class labels include background (focal,
            QFL, sigmoid CE), the rest background; None: labels uniform over the classes and background (about 1%
            background at 80 classes, where a detector's anchors are mostly background: ``positive_fraction=0.01``).
        sizes: values of the spec's free sizes (``{"C": 20}``: 20 classes); the others take the spec's defaults.
    """

    dtype: torch.dtype = torch.float32
    logit_range: Optional[float] = None
    zero_weight_fraction: float = 0.2
    positive_fraction: Optional[float] = None
    sizes: Mapping[str, int] = field(default_factory=dict)


Sampler = Callable[[int, torch.Generator, SampleOptions], dict[str, Tensor]]
Caller = Callable[[nn.Module, Mapping[str, Tensor], Optional[str]], Tensor]


@dataclass(frozen=True)
class LossSpec:
    """The inputs of one configured loss, how to call it, and how to draw valid random inputs."""

    loss_type: str
    variant: str
    inputs: tuple[TensorSpec, ...]
    sampler: Sampler = field(repr=False, compare=False)
    caller: Caller = field(repr=False, compare=False)
    #: The default of every free size the shapes name (random inputs take it unless told otherwise).
    sizes: Mapping[str, int] = field(default_factory=dict)
    #: Every input layout the configured loss takes (``spec_for(loss, variant)``), the default first.
    variants: tuple[str, ...] = ()
    #: Free sizes below which the loss refuses its inputs (a ValueError in eager, TorchScript and compile), which
    #: exported graphs refuse too: ``{"C": 1}`` where labels index the classes, ``{"B": 2}`` for DFL's bins.
    least_sizes: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a spec written outside the package (a plugin's) fails here, naming what is missing, rather than with a
        # KeyError deep inside an exporter
        if not self.inputs:
            raise ValueError(f"the input spec of {self.loss_type} has no inputs")
        names = [t.name for t in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"the input spec of {self.loss_type} repeats an input name: {names}")
        missing = sorted(
            {dim for t in self.inputs for dim in t.shape if isinstance(dim, str) and dim != SAMPLES} - set(self.sizes)
        )
        if missing:
            raise ValueError(
                f"the input spec of {self.loss_type} names the free size(s) {missing} in its shapes but gives no "
                f"default for them: pass sizes={{{', '.join(repr(m) + ': ...' for m in missing)}}} to LossSpec"
            )
        unknown = sorted(set(self.least_sizes) - set(self.sizes))
        if unknown:
            raise ValueError(f"the input spec of {self.loss_type} gives least sizes of {unknown}, not free sizes")

    def smallest_size(self, symbol: str) -> int:
        """The least size exported programs take for ``symbol``: no samples is valid input; a free size is at
        least 1, or its :attr:`least_sizes` entry."""
        return 0 if symbol == SAMPLES else max(1, self.least_sizes.get(symbol, 1))

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def pred(self) -> str:
        return self.inputs[0].name

    def symbols(self, names: Optional[Sequence[str]] = None) -> list[str]:
        """The symbols of the shapes of the named inputs (all by default), "N" first where present."""
        chosen = [t for t in self.inputs if names is None or t.name in names]
        found = {dim for t in chosen for dim in t.shape if isinstance(dim, str)}
        return sorted(found, key=lambda symbol: (symbol != SAMPLES, symbol))

    def per_sample_elements(self) -> int:
        """Elements of ``pred`` per sample at the default sizes."""
        elements = 1
        for dim in self.inputs[0].concrete_shape(1, self.sizes):
            elements *= dim
        return elements

    def smaller_sizes(self) -> dict[str, int]:
        """Free sizes other than the defaults (a quarter of each, at least 2 and at least the least size), to check
        that a graph takes them."""
        return {
            symbol: min(size, max(2, self.least_sizes.get(symbol, 2), size // 4)) for symbol, size in self.sizes.items()
        }

    def capped(self, n: int, max_elements: int = MAX_CHECK_ELEMENTS) -> int:
        """``n`` capped so that ``pred`` holds at most ``max_elements`` elements (but at least 7 samples):
        a mask loss's prediction is 62720 values per sample."""
        return min(int(n), max(7, max_elements // max(self.per_sample_elements(), 1)))

    def capped_sizes(self, sizes: Sequence[int], max_elements: int = MAX_CHECK_ELEMENTS) -> list[int]:
        """The distinct :meth:`capped` sizes, sorted."""
        return sorted({self.capped(n, max_elements) for n in sizes})

    def sample(
        self,
        loss: nn.Module,
        n: int,
        *,
        seed: int = 0,
        options: SampleOptions = SampleOptions(),
        include: Optional[Sequence[str]] = None,
    ) -> dict[str, Tensor]:
        """Valid random inputs for ``n`` samples, in spec order; ``include`` keeps only the named inputs
        (required inputs are always kept)."""
        del loss  # the spec already holds what the configuration fixes
        unknown = sorted(set(options.sizes) - set(self.sizes))
        if unknown:
            raise ValueError(f"{self.loss_type} ({self.variant}) has no free size {unknown}; it has {dict(self.sizes)}")
        generator = torch.Generator().manual_seed(seed)
        sizes = {**self.sizes, **options.sizes}
        drawn = self.sampler(n, generator, replace(options, sizes=sizes))
        self._check_drawn(drawn, n, sizes, options.dtype)
        keep = {t.name for t in self.inputs if not t.optional or include is None or t.name in include}
        return {t.name: drawn[t.name] for t in self.inputs if t.name in keep}

    def _check_drawn(self, drawn: Mapping[str, Tensor], n: int, sizes: Mapping[str, int], dtype: torch.dtype) -> None:
        """Raise ValueError unless the sampler drew every input, and only those, with the spec's dtype and shape:
        a manifest describes the spec, so an artifact traced from other inputs would be fed what it never saw."""
        where = f"the sampler of {self.loss_type} ({self.variant})"
        extra = sorted(set(drawn) - set(self.names))
        missing = [name for name in self.names if name not in drawn]
        if extra or missing:
            raise ValueError(
                f"{where} drew {sorted(drawn)}; its spec lists {self.names} (missing {missing}, unknown {extra})"
            )
        for t in self.inputs:
            value, shape = drawn[t.name], t.concrete_shape(n, sizes)
            if not isinstance(value, Tensor) or value.dtype != t.dtype(dtype) or tuple(value.shape) != shape:
                got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(
                    f"{where} drew {t.name!r} as {got}; its spec says {t.dtype(dtype)} {shape} "
                    f"(shape {t.shape} at N={n}, sizes {dict(sizes)})"
                )

    def call(self, loss: nn.Module, inputs: Mapping[str, Tensor], reduction_override: Optional[str] = None) -> Tensor:
        """Call ``loss`` with named inputs; absent optional inputs are passed as None."""
        return self.caller(loss, inputs, reduction_override)

    def bind(self, loss: nn.Module, names: Sequence[str]) -> nn.Module:
        """A module whose ``forward`` takes the named inputs positionally (what exporters need)."""
        return PositionalLoss(loss, self, tuple(names))


class PositionalLoss(nn.Module):
    """``forward(*tensors)`` in a fixed input order, for torch.export / ONNX / AOTInductor."""

    def __init__(self, loss: nn.Module, spec: LossSpec, names: tuple[str, ...]) -> None:
        super().__init__()
        self.loss = loss
        self.spec = spec
        self.names = names

    def forward(self, *tensors: Tensor) -> Tensor:
        return self.spec.call(self.loss, dict(zip(self.names, tensors)), None)


# --- drawing helpers (public: the specs of losses registered outside the package use them too) ----------------


def sample_logits(shape: tuple[int, ...], generator: torch.Generator, options: SampleOptions) -> Tensor:
    """Logits ~ N(0, 2), or uniform in [-r, r] with ``options.logit_range`` r (verification's extreme check draws
    r = 100: a spec of one's own should draw its logits here so that it gets that check)."""
    if options.logit_range is not None:
        r = options.logit_range
        return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul(r).to(options.dtype)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * 2).to(options.dtype)


def sample_weights(shape: tuple[int, ...], generator: torch.Generator, options: SampleOptions) -> Tensor:
    """Weights in [0.1, 1.1), a share ``options.zero_weight_fraction`` of them 0 (masked)."""
    weight = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.1
    zero = torch.rand(shape, generator=generator, dtype=torch.float64) < options.zero_weight_fraction
    return torch.where(zero, 0.0, weight).to(options.dtype)


def sample_labels(n: int, c: int, generator: torch.Generator, options: SampleOptions) -> Tensor:
    """Labels in [0, c], c = background (:attr:`SampleOptions.positive_fraction`)."""
    if options.positive_fraction is None:
        return torch.randint(0, c + 1, (n,), generator=generator)
    classes = torch.randint(0, c, (n,), generator=generator)
    positive = torch.rand(n, generator=generator, dtype=torch.float64) < options.positive_fraction
    return torch.where(positive, classes, c)


def sample_avg_factor(n: int, generator: torch.Generator, options: SampleOptions) -> Tensor:
    """A 0-d ``avg_factor`` in [1, n + 1)."""
    return (torch.rand((), generator=generator, dtype=torch.float64) * n + 1).to(options.dtype)


def _below(bound: float, dtype: torch.dtype) -> float:
    """``bound`` less one relative machine epsilon of ``dtype``: the numbers in [0, it) stay below ``bound`` when
    rounded to ``dtype`` (it lies at least one representable value below ``bound``)."""
    return bound * (1.0 - torch.finfo(dtype).eps)


def sample_boxes(n: int, generator: torch.Generator, dtype: torch.dtype, scale: float = 100.0) -> Tensor:
    """(n, 4) boxes (x1, y1, x2, y2) of sides 1 to ``scale / 2 + 1``."""
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale * 0.5 + 1.0
    return torch.cat([xy, xy + wh], dim=1).to(dtype)


def jitter_boxes(boxes: Tensor, generator: torch.Generator) -> Tensor:
    """Predictions near the targets, so IoUs spread over (0, 1]."""
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2).double()
    noise = torch.randn(boxes.shape, generator=generator, dtype=torch.float64) * 0.2 * wh
    return (boxes.double() + noise).to(boxes.dtype)


def _optional(name: str, shape: tuple[Dim, ...], doc: str) -> TensorSpec:
    return TensorSpec(name, shape, FLOAT, True, doc)


AVG_FACTOR = _optional("avg_factor", (), "denominator of the mean (0-d)")


#: The positional arguments of :func:`standard_caller`, visdet's ``forward`` signature.
STANDARD_ARGUMENTS = ("pred", "target", "weight", "avg_factor", "reduction_override")


def standard_caller(loss: nn.Module, inputs: Mapping[str, Tensor], reduction_override: Optional[str]) -> Tensor:
    """``LossSpec.call`` of a loss whose ``forward`` is visdet's ``(pred, target, weight, avg_factor,
    reduction_override)``."""
    return loss(
        inputs["pred"], inputs["target"], inputs.get("weight"), inputs.get("avg_factor"), reduction_override
    )


# --- per-loss specs --------------------------------------------------------------------------------------------

NUM_CLASSES = 80
MASK_SIZE = 28
POINTS = 196  # PointRend's training points per RoI (14 x 14)
DEFAULT_REG_MAX = 16
CLASSES = {"C": NUM_CLASSES}

SpecBuilder = Callable[[nn.Module, Optional[str]], LossSpec]
SPEC_BUILDERS: dict[str, SpecBuilder] = {}


def register_spec(loss_type: str) -> Callable[[SpecBuilder], SpecBuilder]:
    """Register the spec builder of a loss type (``builder(loss, variant) -> LossSpec``)."""

    def register(builder: SpecBuilder) -> SpecBuilder:
        SPEC_BUILDERS[loss_type] = builder
        return builder

    return register


def spec_for(loss: nn.Module, variant: Optional[str] = None) -> LossSpec:
    """The input spec of a built loss (``variant`` picks another target layout where a loss has several)."""
    from .registry import MODELS, registered_name

    # each class of the MRO by the name it is registered under, then by its class name unless another class is
    # registered under that name: a subclass presetting defaults takes its base's spec, a spec may name the class
    # rather than its registered alias, and a class named like a built-in never takes the built-in's spec
    loss = getattr(loss, "_orig_mod", loss)  # the module a torch.compile wrapper holds
    for klass in type(loss).__mro__:
        own_name = MODELS.module_dict.get(klass.__name__) in (None, klass)
        for loss_type in (registered_name(klass), klass.__name__ if own_name else None):
            if loss_type is not None and loss_type in SPEC_BUILDERS:
                spec = SPEC_BUILDERS[loss_type](loss, variant)
                if spec.caller is standard_caller:
                    _check_standard_forward(loss, spec.loss_type)
                return spec
    raise KeyError(
        f"no input spec is registered for {type(loss).__name__}; add one with visdet_export.specs.register_spec"
    )


def _check_standard_forward(loss: nn.Module, loss_type: str) -> None:
    """TypeError unless ``loss.forward`` takes the five positional arguments :func:`standard_caller` passes: a loss of
    one's own that takes a built-in's spec (a subclass) failed later, inside an exporter, with "forward() takes from
    3 to 4 positional arguments but 6 were given"."""
    try:
        signature = inspect.signature(loss.forward)
    except (TypeError, ValueError):  # no signature to read (a builtin): the call itself will tell
        return
    try:
        signature.bind(*STANDARD_ARGUMENTS)
    except TypeError:
        raise TypeError(
            f"{type(loss).__name__}.forward{signature} cannot take the arguments the {loss_type} input spec passes, "
            f"({', '.join(STANDARD_ARGUMENTS)}): add the missing parameters to forward, or register a spec of its "
            "own with visdet_export.specs.register_spec"
        ) from None


def _check_variant(loss_type: str, variant: Optional[str], choices: tuple[str, ...]) -> str:
    if variant is None:
        return choices[0]
    if variant not in choices:
        raise ValueError(f"{loss_type} has no input variant {variant!r}; choose one of {', '.join(choices)}")
    return variant


@register_spec("FocalLoss")
def _focal_spec(loss: nn.Module, variant: Optional[str]) -> LossSpec:
    choices = ("labels", "onehot")
    variant = _check_variant("FocalLoss", variant, choices)
    activated = bool(getattr(loss, "activated", False))

    def sample(n: int, generator: torch.Generator, options: SampleOptions) -> dict[str, Tensor]:
        c = options.sizes["C"]
        logits = sample_logits((n, c), generator, options)
        labels = sample_labels(n, c, generator, options)
        target = labels if variant == "labels" else (labels.unsqueeze(1) == torch.arange(c)).to(options.dtype)
        return {
            "pred": torch.sigmoid(logits.float()).to(options.dtype) if activated else logits,
            "target": target,
            "weight": sample_weights((n,), generator, options),
            "avg_factor": sample_avg_factor(n, generator, options),
        }

    target = (
        TensorSpec("target", ("N",), INT64, doc="labels in [0, C], C = background")
        if variant == "labels"
        else TensorSpec("target", ("N", "C"), doc="one-hot targets")
    )
    pred_doc = "probabilities" if activated else "logits"
    inputs = (
        TensorSpec("pred", ("N", "C"), doc=pred_doc), target, _optional("weight", ("N",), "per-sample"), AVG_FACTOR
    )
    least = {"C": 1} if variant == "labels" else {}  # labels index the classes; one-hot targets of no classes sum to 0
    return LossSpec("FocalLoss", variant, inputs, sample, standard_caller, CLASSES, variants=choices, least_sizes=least)


@register_spec("QualityFocalLoss")
def _qfl_spec(loss: nn.Module, variant: Optional[str]) -> LossSpec:
    choices = ("pair", "dense")
    variant = _check_variant("QualityFocalLoss", variant, choices)
    activated = bool(getattr(loss, "activated", False))

    def sample(n: int, generator: torch.Generator, options: SampleOptions) -> dict[str, Tensor]:
        c = options.sizes["C"]
        logits = sample_logits((n, c), generator, options)
        labels = sample_labels(n, c, generator, options)
        scores = torch.rand(n, generator=generator, dtype=torch.float64).to(options.dtype)
        drawn = {
            "pred": torch.sigmoid(logits.float()).to(options.dtype) if activated else logits,
            "weight": sample_weights((n,), generator, options),
            "avg_factor": sample_avg_factor(n, generator, options),
        }
        if variant == "pair":
            drawn.update(labels=labels, scores=scores)
        else:
            drawn["target"] = torch.where(labels.unsqueeze(1) == torch.arange(c), scores.unsqueeze(1), 0.0)
        return drawn

    def call(module: nn.Module, inputs: Mapping[str, Tensor], reduction_override: Optional[str]) -> Tensor:
        target = (inputs["labels"], inputs["scores"]) if variant == "pair" else inputs["target"]
        return module(inputs["pred"], target, inputs.get("weight"), inputs.get("avg_factor"), reduction_override)

    targets = (
        (
            TensorSpec("labels", ("N",), INT64, doc="labels in [0, C], C = background"),
            TensorSpec("scores", ("N",), doc="IoU quality scores in [0, 1]"),
        )
        if variant == "pair"
        else (TensorSpec("target", ("N", "C"), doc="dense soft targets"),)
    )
    pred = TensorSpec("pred", ("N", "C"), doc="probabilities" if activated else "logits")
    inputs = (pred, *targets, _optional("weight", ("N",), "per-sample"), AVG_FACTOR)
    least = {"C": 1} if variant == "pair" else {}
    return LossSpec("QualityFocalLoss", variant, inputs, sample, call, CLASSES, variants=choices, least_sizes=least)


@register_spec("DistributionFocalLoss")
def _dfl_spec(loss: nn.Module, variant: Optional[str]) -> LossSpec:
    choices = ("distances",)
    variant = _check_variant("DistributionFocalLoss", variant, choices)
    # a configured reg_max fixes the bins (the loss checks them); visdet's default infers them from pred
    configured = getattr(loss, "reg_max", None)
    bins: Dim = "B" if configured is None else int(configured) + 1

    def sample(n: int, generator: torch.Generator, options: SampleOptions) -> dict[str, Tensor]:
        reg_max = (options.sizes["B"] if isinstance(bins, str) else bins) - 1
        return {
            "pred": sample_logits((n, reg_max + 1), generator, options),
            # below reg_max after rounding to the sample's dtype too (a bfloat16 15.99 is 16, which MMDetection's
            # formulation, reading bin floor(t) + 1, cannot take)
            "target": (torch.rand(n, generator=generator, dtype=torch.float64) * _below(reg_max, options.dtype)).to(
                options.dtype
            ),
            "weight": sample_weights((n,), generator, options),
            "avg_factor": sample_avg_factor(n, generator, options),
        }

    inputs = (
        TensorSpec("pred", ("N", bins), doc="bin logits, reg_max + 1"),
        TensorSpec("target", ("N",), doc="distances in [0, reg_max]"),
        _optional("weight", ("N",), "per-sample"),
        AVG_FACTOR,
    )
    sizes = {"B": DEFAULT_REG_MAX + 1} if isinstance(bins, str) else {}
    least = {"B": 2} if isinstance(bins, str) else {}  # reg_max >= 1
    return LossSpec(
        "DistributionFocalLoss", variant, inputs, sample, standard_caller, sizes, variants=choices, least_sizes=least
    )


@register_spec("CrossEntropyLoss")
def _ce_spec(loss: nn.Module, variant: Optional[str]) -> LossSpec:
    use_sigmoid = bool(getattr(loss, "use_sigmoid", False))
    use_mask = bool(getattr(loss, "use_mask", False))
    class_weight = getattr(loss, "class_weight", None)
    # a class weight fixes the classes; otherwise any count
    classes: Dim = "C" if class_weight is None else int(class_weight.numel())
    free = dict(CLASSES) if class_weight is None else {}
    ignore_index = int(getattr(loss, "ignore_index", -100))

    def class_count(options: SampleOptions) -> int:
        return options.sizes["C"] if isinstance(classes, str) else classes

    if use_mask:
        # Mask R-CNN's (H, W) masks, or PointRend's P sampled points (loss_point)
        choices: tuple[str, ...] = ("mask", "points")
        variant = _check_variant("CrossEntropyLoss", variant, choices)
        spatial = ("H", "W") if variant == "mask" else ("P",)

        def sample_mask(n: int, generator: torch.Generator, options: SampleOptions) -> dict[str, Tensor]:
            c, where = class_count(options), tuple(options.sizes[symbol] for symbol in spatial)
            pixels = math.prod(where)
            return {
                "pred": sample_logits((n, c, *where), generator, options),
                "target": (torch.rand((n, *where), generator=generator) > 0.5).to(options.dtype),
                "label": torch.randint(0, c, (n,), generator=generator),
                "avg_factor": sample_avg_factor(n * pixels, generator, options),
            }

        def call_mask(module: nn.Module, inputs: Mapping[str, Tensor], reduction_override: Optional[str]) -> Tensor:
            return module(
                inputs["pred"], inputs["target"], inputs["label"], inputs.get("avg_factor"), reduction_override
            )

        inputs = (
            TensorSpec("pred", ("N", classes, *spatial), doc="mask logits per class"),
            TensorSpec("target", ("N", *spatial), doc="binary masks"),
            TensorSpec("label", ("N",), INT64, doc=f"RoI classes in [0, {classes}) (a RoI labelled outside counts 0)"),
            AVG_FACTOR,
        )
        sizes = {**free, **({"H": MASK_SIZE, "W": MASK_SIZE} if variant == "mask" else {"P": POINTS})}
        return LossSpec(
            "CrossEntropyLoss", variant, inputs, sample_mask, call_mask, sizes, variants=choices,
            least_sizes={"C": 1} if free else {},
        )

    if use_sigmoid:
        # binary: one logit per sample (FCOS centerness); labels: class labels (RPN); dense: soft targets per class
        # (YOLOv3's one-hot, possibly smoothed, targets and YOLOX's IoU-aware ones, flattened to (N, C))
        choices = ("binary", "labels", "dense")
    else:
        # probabilities: class-probability targets of the logits' shape (F.cross_entropy's soft targets)
        choices = ("labels", "probabilities")
    variant = _check_variant("CrossEntropyLoss", variant, choices)

    def sample(n: int, generator: torch.Generator, options: SampleOptions) -> dict[str, Tensor]:
        if variant == "binary":
            pred = sample_logits((n,), generator, options)
            target = torch.rand(n, generator=generator, dtype=torch.float64).to(options.dtype)
        elif variant == "dense":
            c = class_count(options)
            pred = sample_logits((n, c), generator, options)
            target = torch.rand(n, c, generator=generator, dtype=torch.float64).to(options.dtype)
        elif variant == "probabilities":
            c = class_count(options)
            pred = sample_logits((n, c), generator, options)
            # rows summing to 1, some spread over the classes, some close to one-hot
            scores = torch.randn(n, c, generator=generator, dtype=torch.float64) * 3
            target = torch.softmax(scores, dim=1).to(options.dtype)
        else:
            c = class_count(options)
            pred = sample_logits((n, c), generator, options)
            if use_sigmoid:
                target = sample_labels(n, c, generator, options)
            else:
                target = torch.randint(0, c, (n,), generator=generator)
            ignored = torch.rand(n, generator=generator) < 0.1
            target = torch.where(ignored, ignore_index, target)
        return {
            "pred": pred,
            "target": target,
            "weight": sample_weights((n,), generator, options),
            "avg_factor": sample_avg_factor(n, generator, options),
        }

    if variant == "binary":
        head = (TensorSpec("pred", ("N",), doc="logits"), TensorSpec("target", ("N",), doc="soft targets in [0, 1]"))
        free = {}
    elif variant == "dense":
        head = (
            TensorSpec("pred", ("N", classes), doc="logits"),
            TensorSpec("target", ("N", classes), doc="soft targets in [0, 1] per class"),
        )
    elif variant == "probabilities":
        head = (
            TensorSpec("pred", ("N", classes), doc="logits"),
            TensorSpec("target", ("N", classes), doc="class probabilities per sample (used as given)"),
        )
    else:
        # sigmoid: C itself is the background (an all-zero row); softmax: every label in [0, C) is a class
        labels = f"labels in [0, {classes}], {classes} = background" if use_sigmoid else f"labels in [0, {classes})"
        head = (
            TensorSpec("pred", ("N", classes), doc="logits"),
            TensorSpec("target", ("N",), INT64, doc=f"{labels}; {ignore_index} = ignored"),
        )
    inputs = (*head, _optional("weight", ("N",), "per-sample"), AVG_FACTOR)
    least = {"C": 1} if variant in ("labels", "probabilities") and free else {}
    return LossSpec(
        "CrossEntropyLoss", variant, inputs, sample, standard_caller, free, variants=choices, least_sizes=least
    )


def _regression_spec(loss_type: str) -> SpecBuilder:
    def build(loss: nn.Module, variant: Optional[str]) -> LossSpec:
        choices = ("deltas",)
        variant = _check_variant(loss_type, variant, choices)

        def sample(n: int, generator: torch.Generator, options: SampleOptions) -> dict[str, Tensor]:
            d = options.sizes["D"]
            target = torch.randn(n, d, generator=generator, dtype=torch.float64)
            pred = target + torch.randn(n, d, generator=generator, dtype=torch.float64) * 1.5
            return {
                "pred": pred.to(options.dtype),
                "target": target.to(options.dtype),
                "weight": sample_weights((n, d), generator, options),
                "avg_factor": sample_avg_factor(n, generator, options),
            }

        # D: the values per sample, 4 box deltas by default (YOLOv3's wh: 2)
        inputs = (
            TensorSpec("pred", ("N", "D"), doc="deltas (4 per box)"),
            TensorSpec("target", ("N", "D"), doc="target deltas"),
            _optional("weight", ("N", "D"), "per value"),
            AVG_FACTOR,
        )
        return LossSpec(loss_type, variant, inputs, sample, standard_caller, {"D": 4}, variants=choices)

    return build


for _name in ("L1Loss", "SmoothL1Loss", "MSELoss", "BalancedL1Loss"):
    register_spec(_name)(_regression_spec(_name))


def _box_spec(loss_type: str) -> SpecBuilder:
    def build(loss: nn.Module, variant: Optional[str]) -> LossSpec:
        choices = ("boxes",)
        variant = _check_variant(loss_type, variant, choices)

        def sample(n: int, generator: torch.Generator, options: SampleOptions) -> dict[str, Tensor]:
            target = sample_boxes(n, generator, torch.float64)
            return {
                "pred": jitter_boxes(target, generator).to(options.dtype),
                "target": target.to(options.dtype),
                "weight": sample_weights((n,), generator, options),
                "avg_factor": sample_avg_factor(n, generator, options),
            }

        inputs = (
            TensorSpec("pred", ("N", 4), doc="boxes (x1, y1, x2, y2)"),
            TensorSpec("target", ("N", 4), doc="boxes (x1, y1, x2, y2)"),
            _optional("weight", ("N",), "per-box"),
            AVG_FACTOR,
        )
        return LossSpec(loss_type, variant, inputs, sample, standard_caller, variants=choices)

    return build


for _name in ("IoULoss", "GIoULoss"):
    register_spec(_name)(_box_spec(_name))


def _distillation_caller(loss: nn.Module, inputs: Mapping[str, Tensor], reduction_override: Optional[str]) -> Tensor:
    return loss(
        inputs["pred"], inputs["soft_label"], inputs.get("weight"), inputs.get("avg_factor"), reduction_override
    )


@register_spec("KnowledgeDistillationKLDivLoss")
def _kd_spec(loss: nn.Module, variant: Optional[str]) -> LossSpec:
    choices = ("logits",)
    variant = _check_variant("KnowledgeDistillationKLDivLoss", variant, choices)

    def sample(n: int, generator: torch.Generator, options: SampleOptions) -> dict[str, Tensor]:
        c = options.sizes["C"]
        return {
            "pred": sample_logits((n, c), generator, options),
            "soft_label": sample_logits((n, c), generator, options),
            "weight": sample_weights((n,), generator, options),
            "avg_factor": sample_avg_factor(n, generator, options),
        }

    inputs = (
        TensorSpec("pred", ("N", "C"), doc="student logits"),
        TensorSpec("soft_label", ("N", "C"), doc="teacher logits"),
        _optional("weight", ("N",), "per-sample"),
        AVG_FACTOR,
    )
    return LossSpec(
        "KnowledgeDistillationKLDivLoss", variant, inputs, sample, _distillation_caller, CLASSES, variants=choices,
        least_sizes={"C": 1},  # a mean over no classes
    )


@register_spec("LocalizationDistillationLoss")
def _ld_spec(loss: nn.Module, variant: Optional[str]) -> LossSpec:
    choices = ("distributions",)
    variant = _check_variant("LocalizationDistillationLoss", variant, choices)
    width = 4 * (int(getattr(loss, "reg_max", DEFAULT_REG_MAX)) + 1)

    def sample(n: int, generator: torch.Generator, options: SampleOptions) -> dict[str, Tensor]:
        return {
            "pred": sample_logits((n, width), generator, options),
            "soft_label": sample_logits((n, width), generator, options),
            "weight": sample_weights((n,), generator, options),
            "avg_factor": sample_avg_factor(n, generator, options),
        }

    inputs = (
        TensorSpec("pred", ("N", width), doc="student DFL bin logits, 4 sides x (reg_max + 1)"),
        TensorSpec("soft_label", ("N", width), doc="teacher DFL bin logits, 4 sides x (reg_max + 1)"),
        _optional("weight", ("N",), "per-box"),
        AVG_FACTOR,
    )
    return LossSpec("LocalizationDistillationLoss", variant, inputs, sample, _distillation_caller, variants=choices)


# --- representative configurations ----------------------------------------------------------------------------

SEED_CONFIGS: dict[str, dict[str, object]] = {
    # Every loss block of the seed page (visdet's losses page), by where it appears.
    "ce_softmax": dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
    "focal": dict(type="FocalLoss", gamma=2.0, alpha=0.25, loss_weight=1.0),
    "qfl": dict(type="QualityFocalLoss", beta=2.0, loss_weight=1.0),
    "l1": dict(type="L1Loss", loss_weight=1.0),
    "smooth_l1": dict(type="SmoothL1Loss", beta=1.0, loss_weight=1.0),
    "mse": dict(type="MSELoss", loss_weight=1.0),
    "balanced_l1": dict(type="BalancedL1Loss", alpha=0.5, gamma=1.5, beta=1.0, loss_weight=1.0),
    "iou_log": dict(type="IoULoss", mode="log", loss_weight=1.0),
    "giou": dict(type="GIoULoss", loss_weight=2.0),
    "dfl": dict(type="DistributionFocalLoss", loss_weight=0.25),
    "ce_sigmoid_centerness": dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
    "qfl_gfl": dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
}

OPTION_CONFIGS: dict[str, dict[str, object]] = {
    # The options the seed names beyond its snippets.
    "focal_activated": dict(type="FocalLoss", activated=True),
    "qfl_activated": dict(type="QualityFocalLoss", activated=True),
    "ce_sigmoid_labels": dict(type="CrossEntropyLoss", use_sigmoid=True, avg_non_ignore=True),
    "ce_class_weight": dict(type="CrossEntropyLoss", class_weight=[1.0] * 40 + [2.0] * 40, avg_non_ignore=True),
    "ce_mask": dict(type="CrossEntropyLoss", use_mask=True),
    # softmax CE on class-probability targets (label smoothing, mixup), class weights and loss weight included
    "ce_softmax_probabilities": dict(
        type="CrossEntropyLoss", class_weight=[0.5] * 40 + [1.5] * 40, avg_non_ignore=True, loss_weight=0.5
    ),
    "iou_linear": dict(type="IoULoss", mode="linear"),
    "iou_square": dict(type="IoULoss", mode="square"),
    "kd_kl_div": dict(type="KnowledgeDistillationKLDivLoss", loss_weight=1.0, T=10),
    "kd_kl_div_t1": dict(type="KnowledgeDistillationKLDivLoss", T=1.0),
    "ld": dict(type="LocalizationDistillationLoss", loss_weight=0.25, T=10, reg_max=16),
}

# The input variant each named configuration is exercised with (default variant otherwise).
CONFIG_VARIANTS: dict[str, str] = {"ce_sigmoid_labels": "labels", "ce_softmax_probabilities": "probabilities"}


def head_variant(path: str, config: Mapping[str, object]) -> Optional[str]:
    """The input variant a detector's head calls the loss at dotted ``path`` with (None: the loss's default).

    A sigmoid ``CrossEntropyLoss`` named ``loss_cls`` classifies: in the RPN head (``rpn_head.loss_cls``) (N, 1)
    objectness logits against labels, 1 the background (the labels layout; Cascade RPN's stages too); elsewhere
    (YOLOv3's and YOLOX's heads) against soft targets of the logits' shape (N, C) (YOLOv3's one-hot, possibly
    smoothed, flattened; the dense layout), as YOLOv3's ``loss_xy`` does for its (N, 2) centre offsets. Named
    otherwise (FCOS's ``loss_centerness``, YOLOv3's ``loss_conf``), one logit per sample and its soft target, the
    default. A mask ``CrossEntropyLoss`` named ``loss_point`` takes PointRend's (N, C, P) point logits.
    """
    name = path.rsplit(".", 1)[-1]
    if config.get("type") != "CrossEntropyLoss":
        return None
    if config.get("use_mask"):
        return "points" if name == "loss_point" else None
    if not config.get("use_sigmoid") or name not in ("loss_cls", "loss_xy"):
        return None
    # the RPN head's own loss, or a stage of Cascade RPN's (rpn_head.stages.0.loss_cls)
    in_rpn_head = path.startswith("rpn_head.") or ".rpn_head." in path
    return "labels" if in_rpn_head else "dense"


def representative_configs() -> dict[str, dict[str, object]]:
    """Named configurations covering every registered seed loss and option: the runtime matrix's rows."""
    return {**SEED_CONFIGS, **OPTION_CONFIGS}


__all__ = [
    "AVG_FACTOR",
    "CONFIG_VARIANTS",
    "LossSpec",
    "OPTION_CONFIGS",
    "PositionalLoss",
    "SEED_CONFIGS",
    "SampleOptions",
    "TensorSpec",
    "head_variant",
    "jitter_boxes",
    "register_spec",
    "representative_configs",
    "sample_avg_factor",
    "sample_boxes",
    "sample_labels",
    "sample_logits",
    "sample_weights",
    "spec_for",
    "standard_caller",
]
