"""Safe config reading (RELIABILITY 2, 3, 32, 33) and the bundled recipes in losses/."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from visdet_export import build_loss, recipes
from visdet_export.config import (
    collect_losses,
    load_config,
    losses_from_file,
    parse_json,
    parse_loss_string,
    parse_python_config,
    parse_toml,
)
from visdet_export.recipes import recipe_dir, recipe_losses, recipe_names, recipe_path
from visdet_export.specs import spec_for
from visdet_export.validation import ConfigError

REPO = Path(__file__).resolve().parents[1]

# The seed page's loss blocks, transcribed: the recipes must hold exactly these.
SEED_BLOCKS = {
    "retinanet": {
        "loss_cls": dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        "loss_bbox": dict(type="SmoothL1Loss", beta=1.0, loss_weight=1.0),
    },
    "fcos": {
        "loss_cls": dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        "loss_bbox": dict(type="IoULoss", mode="log", loss_weight=1.0),
        "loss_centerness": dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
    },
    "atss": {
        "loss_cls": dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        "loss_bbox": dict(type="GIoULoss", loss_weight=2.0),
        "loss_centerness": dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
    },
    "gfl": {
        "loss_cls": dict(type="QualityFocalLoss", use_sigmoid=True, beta=2.0, loss_weight=1.0),
        "loss_bbox": dict(type="GIoULoss", loss_weight=2.0),
        "loss_dfl": dict(type="DistributionFocalLoss", loss_weight=0.25),
    },
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


# ----------------------------------------------------------------------------------------------------- recipes


def test_recipes_cover_the_families_of_the_brief():
    assert {"retinanet", "fcos", "atss", "gfl", "faster_rcnn", "libra_rcnn", "mask_rcnn", "rpn"} <= set(recipe_names())


@pytest.mark.parametrize("name", sorted(SEED_BLOCKS))
def test_seed_recipes_hold_the_seed_blocks_verbatim(name):
    assert recipe_losses(name) == SEED_BLOCKS[name]


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_loss_builds_and_has_an_input_spec(name):
    losses = recipe_losses(name)
    assert losses
    for path, cfg in losses.items():
        loss = build_loss(cfg)
        assert type(loss).__name__ == cfg["type"], path
        spec_for(loss)


def test_two_stage_recipes_name_losses_by_dotted_path():
    assert recipe_losses("mask_rcnn")["roi_head.mask_head.loss_mask"] == dict(
        type="CrossEntropyLoss", use_mask=True, loss_weight=1.0
    )
    assert recipe_losses("libra_rcnn")["roi_head.bbox_head.loss_bbox"]["type"] == "BalancedL1Loss"
    faster = recipe_losses("faster_rcnn")
    assert faster["roi_head.bbox_head.loss_cls"] == dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)
    assert faster["roi_head.bbox_head.loss_bbox"]["type"] == "L1Loss"
    assert recipe_losses("rpn") == {
        "rpn_head.loss_cls": dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
        "rpn_head.loss_bbox": dict(type="L1Loss", loss_weight=1.0),
    }
    assert "roi_head.bbox_head.2.loss_bbox" in recipe_losses("cascade_rcnn")  # list positions in the path


def test_recipes_ship_from_the_top_level_losses_folder_without_a_copy():
    # visdet_export/recipes is a symlink to losses/: the wheel packages it, git holds one copy.
    assert recipe_dir().resolve() == (REPO / "losses").resolve()
    assert sorted(p.stem for p in (REPO / "losses").glob("*.py")) == recipe_names()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"recipes/*.py"' in pyproject


def test_recipes_of_a_checkout_without_symlinks(tmp_path, monkeypatch):
    """Without symlinks git writes ``recipes`` as a text file: a source checkout reads losses/ beside the package;
    a wheel built from it has neither, and says why instead of listing no recipes."""
    package = tmp_path / "visdet_export"
    package.mkdir()
    (package / "recipes").write_text("../losses")
    (tmp_path / "losses").mkdir()
    (tmp_path / "losses" / "gfl.py").write_text("loss_cls = dict(type='FocalLoss')\n")
    monkeypatch.setattr(recipes, "PACKAGE_DIR", package)
    assert recipe_names() == ["gfl"]
    (tmp_path / "losses" / "gfl.py").unlink()
    (tmp_path / "losses").rmdir()
    with pytest.raises(ConfigError, match="recipes are missing.*without symbolic links"):
        recipe_names()


def test_unknown_recipe_suggests_close_names():
    with pytest.raises(ConfigError, match=r"unknown recipe 'retina'.*Did you mean retinanet"):
        recipe_path("retina")
    assert recipe_path("Faster-RCNN").name == "faster_rcnn.py"


# --------------------------------------------------------------------------------------- python configs: allowed


def test_python_config_literals_dict_calls_and_displays():
    cfg = parse_python_config(
        textwrap.dedent(
            '''
            """A docstring is fine."""
            num = -3
            x = +1.5
            model = dict(
                bbox_head=dict(loss_cls=dict(type="FocalLoss", gamma=2.0, alpha=0.25), flags=[True, False, None]),
                sizes=(1, 2, (3, 4)),
                table={"a": 1, 2: "b"},
                empty=dict(),
            )
            '''
        ),
        "cfg.py",
    )
    assert cfg == {
        "num": -3,
        "x": 1.5,
        "model": {
            "bbox_head": {"loss_cls": {"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25}, "flags": [True, False, None]},
            "sizes": [1, 2, [3, 4]],
            "table": {"a": 1, 2: "b"},
            "empty": {},
        },
    }


def test_python_config_names_assigned_above_and_arithmetic():
    """What real MMDetection configs write: num_classes=num_classes, Cascade R-CNN's beta=1.0 / 9.0."""
    cfg = parse_python_config(
        textwrap.dedent(
            """
            num_classes = 20
            data_root = 'data/coco/'
            head = dict(num_classes=num_classes, loss_bbox=dict(type='SmoothL1Loss', beta=1.0 / 9.0, loss_weight=-(-1)))
            model = dict(bbox_head=head, class_weight=[1.0] * num_classes + [0.5], lr=0.01 * 2 ** 3 // 1 % 7)
            ann = data_root + 'annotations/train.json'
            """
        ),
        "cfg.py",
    )
    head = {"num_classes": 20, "loss_bbox": {"type": "SmoothL1Loss", "beta": 1.0 / 9.0, "loss_weight": 1}}
    assert cfg["head"] == cfg["model"]["bbox_head"] == head and cfg["head"] is not cfg["model"]["bbox_head"]
    assert cfg["model"]["class_weight"] == [1.0] * 20 + [0.5] and cfg["model"]["lr"] == 0.01 * 2 ** 3 // 1 % 7
    assert cfg["ann"] == "data/coco/annotations/train.json"


# ------------------------------------------------------------------------------------ python configs: code refused

# Each config would create MARKER if it were executed. (line, construct) is what the error must name.
CODE_CONFIGS = {
    "import": ("loss_cls = dict(type='FocalLoss')\nimport os\nos.system('touch MARKER')\n", 2, "an import"),
    "from-import": ("from pathlib import Path\nPath('MARKER').touch()\n", 1, "an import"),
    "call": ("loss_cls = dict(type=open('MARKER', 'w'))\n", 1, "a call to open()"),
    "dunder-import": ("x = __import__('pathlib').Path('MARKER').touch()\n", 1, "a call to"),
    "attribute": ("loss_cls = dict(type=str.upper('focalloss'))\n", 1, "a call to str.upper()"),
    "bare-attribute": ("x = os.path\n", 1, "attribute access (os.path)"),
    "f-string": ("x = f\"{open('MARKER', 'w')}\"\n", 1, "an f-string"),
    "lambda": ("x = (lambda: open('MARKER', 'w'))()\n", 1, "a call"),
    "lambda-value": ("x = lambda: open('MARKER', 'w')\n", 1, "a lambda"),
    "comprehension": ("x = [open('MARKER', 'w') for _ in range(1)]\n", 1, "a list comprehension"),
    "generator": ("x = dict(a=(open('MARKER', 'w') for _ in range(1)))\n", 1, "a generator expression"),
    "string-arithmetic": ("x = 'a' * 3\n", 1, "Mult of str and int is not allowed"),
    "undefined-variable": ("loss_cls = dict(type='FocalLoss', gamma=gamma)\n", 1, "the variable reference 'gamma'"),
    "base-reference": ("x = {{_base_.model.num_classes}}\n", 1, "the reference {{_base_.model.num_classes}}"),
    "huge-power": ("x = 10 ** 10 ** 10\n", 1, "a power's exponent must be at most 64"),
    "nested-repeat": ("x = [[1] * 1000] * 1000\n", 1, "a list of numbers or strings may be repeated"),
    "long-concat": ("a = [0] * 60000\nb = a + a\n", 2, "at most 100000 long"),
    "subscript": ("x = [1][0]\n", 1, "subscripting"),
    "expression-statement": ("x = 1\nopen('MARKER', 'w')\n", 2, "a call to open()"),
    "function": ("def f():\n    open('MARKER', 'w')\nx = 1\n", 1, "a function definition"),
    "decorated-class": ("@print\nclass A:\n    pass\n", 2, "a class definition"),
    "if": ("if True:\n    open('MARKER', 'w')\n", 1, "an if statement"),
    "walrus": ("x = dict(a=(y := open('MARKER', 'w')))\n", 1, "an assignment expression"),
    "dict-unpacking": ("base = dict(a=1)\nx = dict(**base)\n", 2, "unpacking"),
    "tuple-target": ("a, b = 1, 2\n", 1, "only `name = value` assignments"),
    "attribute-target": ("os.environ = 1\n", 1, "only `name = value` assignments"),
    "augmented": ("x = 1\nx += 1\n", 2, "an augmented assignment"),
    "positional-dict": ("x = dict([('a', 1)])\n", 1, "keyword arguments only"),
    "bytes": ("x = b'abc'\n", 1, "the constant b'abc'"),
    "set": ("x = {1, 2}\n", 1, "a set"),
    "not": ("x = not True\n", 1, "the operator Not"),
    "negated-string": ("x = -'a'\n", 1, "the operator USub"),
}


@pytest.mark.parametrize("case", sorted(CODE_CONFIGS))
def test_config_with_code_is_refused_and_its_code_never_runs(tmp_path, monkeypatch, case):
    text, line, construct = CODE_CONFIGS[case]
    monkeypatch.chdir(tmp_path)  # where the code would create MARKER
    config = write(tmp_path / "detector.py", text)
    with pytest.raises(ConfigError) as info:
        load_config(config)
    message = str(info.value)
    assert f"{config}:{line}:" in message
    assert construct in message
    assert not (tmp_path / "MARKER").exists()
    assert os.listdir(tmp_path) == ["detector.py"]


def test_code_in_a_base_file_is_refused_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "base.py", "import os\nos.system('touch MARKER')\n")
    config = write(tmp_path / "child.py", "_base_ = 'base.py'\nloss_cls = dict(type='FocalLoss')\n")
    with pytest.raises(ConfigError, match=r"base\.py:1: an import is not allowed"):
        load_config(config)
    assert not (tmp_path / "MARKER").exists()


def test_syntax_error_names_file_and_line(tmp_path):
    config = write(tmp_path / "bad.py", "x = 1\nloss_cls = dict(type='FocalLoss',\n")
    with pytest.raises(ConfigError, match=r"bad\.py:\d+: invalid Python syntax"):
        load_config(config)


def test_deeply_nested_config_is_refused_not_crashing(tmp_path):
    config = write(tmp_path / "deep.py", "x = " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(ConfigError, match="nested"):
        load_config(config)


# --------------------------------------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize(
    "name, text",
    [
        ("a.py", "loss_cls = dict(type='FocalLoss', gamma=1e999)\n"),
        ("b.py", "loss_cls = dict(type='FocalLoss', gamma=-1e999)\n"),
        ("c.json", '{"loss_cls": {"type": "FocalLoss", "gamma": NaN}}'),
        ("d.json", '{"loss_cls": {"type": "FocalLoss", "gamma": -Infinity}}'),
        ("e.json", '{"loss_cls": {"type": "FocalLoss", "gamma": 1e999}}'),
        ("f.toml", "[loss_cls]\ntype = 'FocalLoss'\ngamma = inf\n"),
        ("g.toml", "[model.bbox_head.loss_cls]\ntype = 'FocalLoss'\nalpha = nan\n"),
    ],
)
def test_non_finite_numbers_are_refused_in_every_format(tmp_path, name, text):
    with pytest.raises(ConfigError, match="finite|NaN|Infinity"):
        load_config(write(tmp_path / name, text))


def test_non_finite_numbers_in_loss_strings_are_refused():
    for text in ['dict(type="FocalLoss", gamma=1e999)', '{"type": "FocalLoss", "gamma": NaN}']:
        with pytest.raises(ConfigError, match="finite"):
            parse_loss_string(text)


# --------------------------------------------------------------------------------------------- json, toml, strings


def test_json_and_toml_configs_collect_losses(tmp_path):
    detector = {"model": {"bbox_head": {"loss_cls": {"type": "FocalLoss", "gamma": 2.0}, "num_classes": 80}}}
    from_json = losses_from_file(write(tmp_path / "d.json", json.dumps(detector)))
    toml = "[model.bbox_head]\nnum_classes = 80\n[model.bbox_head.loss_cls]\ntype = 'FocalLoss'\ngamma = 2.0\n"
    from_toml = losses_from_file(write(tmp_path / "d.toml", toml))
    assert from_json == from_toml == {"model.bbox_head.loss_cls": {"type": "FocalLoss", "gamma": 2.0}}


def test_unsupported_suffix_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unsupported config type '.yaml'"):
        load_config(write(tmp_path / "d.yaml", "loss_cls: {type: FocalLoss}\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.py")


def test_file_without_losses_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no loss_\\* entries"):
        losses_from_file(write(tmp_path / "empty.py", "model = dict(backbone=dict(depth=50))\n"))


@pytest.mark.parametrize(
    "text",
    [
        'dict(type="FocalLoss", gamma=2.0)',
        '{"type": "FocalLoss", "gamma": 2.0}',
        "{'type': 'FocalLoss', 'gamma': 2.0}",
        '  dict(type="FocalLoss",\n gamma=2.0)  ',
    ],
)
def test_loss_strings_in_dict_json_and_display_syntax(text):
    assert parse_loss_string(text) == {"type": "FocalLoss", "gamma": 2.0}


def test_loss_string_bare_name_and_mistakes():
    assert parse_loss_string("GIoULoss") == {"type": "GIoULoss"}
    with pytest.raises(ConfigError, match="no 'type'"):
        parse_loss_string("dict(gamma=2.0)")
    with pytest.raises(ConfigError, match="must be a dict"):
        parse_loss_string("[1, 2]")
    with pytest.raises(ConfigError, match="a call to print"):
        parse_loss_string('dict(type=print("hi"))')
    with pytest.raises(ConfigError, match="invalid syntax"):
        parse_loss_string("dict(type=")
    with pytest.raises(ConfigError, match="empty"):
        parse_loss_string("  ")


# ------------------------------------------------------------------------------------------ collecting loss_* keys


def test_collect_losses_at_any_depth_with_lists_and_prefixed_keys():
    cfg = {
        "model": {
            "bbox_head": {"loss_cls": {"type": "FocalLoss"}, "initial_loss_cls": {"type": "FocalLoss"}},
            "roi_head": {"bbox_head": [{"loss_bbox": {"type": "L1Loss"}}, {"loss_bbox": {"type": "SmoothL1Loss"}}]},
        },
        "loss_scale": 512.0,  # a number, not a loss
        "train_cfg": {"loss_cls_weights": None},
    }
    assert collect_losses(cfg) == {
        "model.bbox_head.loss_cls": {"type": "FocalLoss"},
        "model.bbox_head.initial_loss_cls": {"type": "FocalLoss"},
        "model.roi_head.bbox_head.0.loss_bbox": {"type": "L1Loss"},
        "model.roi_head.bbox_head.1.loss_bbox": {"type": "SmoothL1Loss"},
    }
    with pytest.raises(ConfigError, match="model.loss_cls has no 'type'"):
        collect_losses({"model": {"loss_cls": {"gamma": 2.0}}})
    # a table of loss weights under a loss_* key is not a loss
    assert collect_losses({"model": {"loss_weights": {"cls": 1.0, "bbox": 2.0}, "loss_cls": {"type": "L1Loss"}}}) == {
        "model.loss_cls": {"type": "L1Loss"}
    }


# ------------------------------------------------------------------------------------------------ _base_ and merge


def test_base_files_merge_mmengine_style(tmp_path):
    write(
        tmp_path / "_base_" / "models" / "retinanet.py",
        """
        model = dict(
            bbox_head=dict(
                num_classes=80,
                loss_cls=dict(type="FocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
                loss_bbox=dict(type="L1Loss", loss_weight=1.0),
            )
        )
        """,
    )
    write(tmp_path / "_base_" / "schedule.json", '{"optim": {"lr": 0.01}}')
    config = write(
        tmp_path / "configs" / "retinanet_giou.py",
        """
        _base_ = ["../_base_/models/retinanet.py", "../_base_/schedule.json"]
        model = dict(
            bbox_head=dict(
                loss_cls=dict(gamma=1.5),
                loss_bbox=dict(_delete_=True, type="GIoULoss", loss_weight=2.0),
            )
        )
        """,
    )
    inside = write(
        tmp_path / "retinanet_giou.py",
        (tmp_path / "configs" / "retinanet_giou.py").read_text().replace("../_base_", "_base_"),
    )
    cfg = load_config(inside)
    # MMDetection's layout: the config's parent holds _base_, so its ../_base_ files are followed
    assert load_config(config) == cfg
    assert cfg["optim"] == {"lr": 0.01}
    assert cfg["model"]["bbox_head"]["num_classes"] == 80
    assert collect_losses(cfg) == {
        "model.bbox_head.loss_cls": dict(type="FocalLoss", use_sigmoid=True, gamma=1.5, alpha=0.25, loss_weight=1.0),
        "model.bbox_head.loss_bbox": dict(type="GIoULoss", loss_weight=2.0),  # replaced, not merged
    }


def test_base_of_a_base_resolves_relative_to_its_own_file(tmp_path):
    write(tmp_path / "a" / "b" / "leaf.py", "loss_cls = dict(type='FocalLoss')\n")
    write(tmp_path / "a" / "mid.py", "_base_ = 'b/leaf.py'\nloss_bbox = dict(type='L1Loss')\n")
    cfg = load_config(write(tmp_path / "top.py", "_base_ = ['a/mid.py']\n"))
    assert cfg == {"loss_cls": {"type": "FocalLoss"}, "loss_bbox": {"type": "L1Loss"}}


@pytest.mark.parametrize(
    "base",
    ["../outside.py", "sub/../../outside.py", "{abs}", "link.py"],
)
def test_base_outside_the_config_tree_is_refused(tmp_path, base):
    write(tmp_path / "outside.py", "loss_cls = dict(type='FocalLoss')\n")
    root = tmp_path / "configs"
    (root / "sub").mkdir(parents=True)
    (root / "link.py").symlink_to(tmp_path / "outside.py")  # a symlink leading out counts as outside
    base = base.replace("{abs}", str(tmp_path / "outside.py"))
    config = write(root / "det.py", f"_base_ = [{base!r}]\n")
    with pytest.raises(ConfigError, match="outside the config's directory"):
        load_config(config)


def test_base_cycles_duplicates_and_bad_values(tmp_path):
    write(tmp_path / "a.py", "_base_ = 'b.py'\n")
    write(tmp_path / "b.py", "_base_ = 'a.py'\n")
    with pytest.raises(ConfigError, match="include each other"):
        load_config(tmp_path / "a.py")
    write(tmp_path / "x.py", "loss_cls = dict(type='FocalLoss')\n")
    write(tmp_path / "y.py", "loss_cls = dict(type='L1Loss')\n")
    with pytest.raises(ConfigError, match="'loss_cls' is defined in both bases"):
        load_config(write(tmp_path / "c.py", "_base_ = ['x.py', 'y.py']\n"))
    with pytest.raises(ConfigError, match="_base_ must be a file path"):
        load_config(write(tmp_path / "d.py", "_base_ = 3\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(write(tmp_path / "e.py", "_base_ = 'missing.py'\n"))


def test_symlinked_config_uses_its_real_directory_as_the_tree(tmp_path):
    real = tmp_path / "real"
    write(real / "base.py", "loss_cls = dict(type='FocalLoss')\n")
    write(real / "det.py", "_base_ = 'base.py'\n")
    (tmp_path / "alias.py").symlink_to(real / "det.py")
    assert collect_losses(load_config(tmp_path / "alias.py")) == {"loss_cls": {"type": "FocalLoss"}}


def test_wheel_ships_the_recipes_and_the_console_script(tmp_path):
    """`--recipe retinanet` after a non-editable install: the built wheel holds losses/ as package data."""
    import shutil
    import subprocess
    import sys
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "visdet_export", src / "visdet_export", symlinks=True, ignore=ignore)
    shutil.copytree(REPO / "losses", src / "losses", ignore=ignore)
    shutil.copytree(REPO / "export_scripts" / "cpp", src / "export_scripts" / "cpp", ignore=ignore)
    assert (src / "visdet_export" / "recipes").is_symlink()  # built from the repository's layout
    assert (src / "visdet_export" / "cpp_project").is_symlink()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        cpp_sources = {
            n.split("/")[-1]: archive.read(n) for n in names if n.startswith("visdet_export/cpp_project/")
        }
    assert sorted(n.split("/")[-1][:-3] for n in names if n.startswith("visdet_export/recipes/")) == recipe_names()
    assert "visdet-export = visdet_export.cli:main" in entry_points
    # `visdet-export cpp` builds the C++ consumer from the sources shipped in the package (visdet_export.cpp).
    from visdet_export.cpp import SOURCE_FILES

    for name in SOURCE_FILES:
        assert cpp_sources.get(name) == (REPO / "export_scripts" / "cpp" / name).read_bytes(), name


_CONFIG_TOKENS = st.sampled_from(
    [*"dict()[]{}=,:'\"\\ \n\t#0123456789.eE+-_abcxyz*@!%&|^~<>/;`", "loss_cls", "type", "FocalLoss", "import os",
     "lambda", "__class__", "nan", "inf", "1e400", "True", "None", "_base_", "_delete_", "\x00", "\ufeff"]
)


@given(
    st.one_of(st.lists(_CONFIG_TOKENS, max_size=60).map("".join), st.text(max_size=80)),
    st.sampled_from([parse_python_config, parse_json, parse_toml, parse_loss_string]),
)
def test_any_text_parses_or_raises_config_error(text: str, parser) -> None:
    """Config-like token soup and arbitrary text, in every format: a parsed config or a ConfigError naming the
    problem, never another exception."""
    try:
        parser(text)
    except ConfigError:
        pass
