"""The bundled detector loss recipes: one MMDetection-style config per detector family.

The recipes live in the repository's top-level ``losses/`` folder. ``visdet_export/recipes`` is a symlink to it,
so the wheel ships them as package data (``visdet_export/recipes/*.py``) without a second copy in git, and
``--recipe retinanet`` works from a source checkout, an editable install and an installed wheel alike. Recipes
are configs, read with :mod:`visdet_export.config` and never imported or executed.

>>> "gfl" in recipe_names()
True
>>> sorted(recipe_losses("gfl"))
['loss_bbox', 'loss_cls', 'loss_dfl']
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from .config import load_config, losses_from_file
from .validation import ConfigError

_NAME = re.compile(r"[a-z0-9_]+")


#: The installed package's folder.
PACKAGE_DIR = Path(__file__).resolve().parent


def recipe_dir() -> Path:
    """The folder that holds the bundled recipes: inside the installed package, else (a source checkout without
    symbolic links, where ``recipes`` is a text file) the top-level ``losses/`` beside it."""
    for folder in (PACKAGE_DIR / "recipes", PACKAGE_DIR.parent / "losses"):
        if folder.is_dir():
            return folder
    raise ConfigError(
        f"the bundled recipes are missing ({PACKAGE_DIR / 'recipes'} is not a folder): this copy of visdet-export "
        "was built from a git checkout without symbolic links (git config core.symlinks false), which leaves them "
        "out of the wheel; install it from a checkout with symlinks (git clone -c core.symlinks=true)"
    )


def recipe_names() -> list[str]:
    """The names of the bundled recipes, sorted (``retinanet``, ``fcos``, ...)."""
    folder = recipe_dir()
    return sorted(p.stem for p in folder.glob("*.py") if _NAME.fullmatch(p.stem) and not p.stem.startswith("_"))


def recipe_path(name: str) -> Path:
    """The file of the recipe ``name``; unknown names raise :class:`ConfigError` with close matches."""
    names = recipe_names()
    key = name.strip().lower().replace("-", "_")
    key = key.removesuffix(".py")
    if key not in names:
        close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown recipe {name!r}.{hint} Bundled recipes: {', '.join(names) or '(none found)'}")
    return recipe_dir() / f"{key}.py"


def recipe_config(name: str) -> dict[str, Any]:
    """The whole parsed config of a recipe."""
    return load_config(recipe_path(name))


def recipe_losses(name: str) -> dict[str, dict[str, Any]]:
    """The loss configs of a recipe by dotted path (``loss_cls``, ``roi_head.bbox_head.loss_bbox``, ...)."""
    return losses_from_file(recipe_path(name))


def recipe_description(name: str) -> str:
    """The detector a recipe is for, from its leading comment: ``RetinaNet (Lin et al., 2017)``."""
    lines = []
    for line in recipe_path(name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    return text.split(": ", 1)[0] if ": " in text else text


__all__ = [
    "PACKAGE_DIR", "recipe_config", "recipe_description", "recipe_dir", "recipe_losses", "recipe_names", "recipe_path",
]
