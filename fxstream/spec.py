"""Command-line model SPECs and input shapes: ``torchvision.models:resnet50``, ``1x3x8192x8192``.

A SPEC names a model in one of three forms:

- ``package.module:callable``: import the module, call ``callable()`` with no arguments
  (``callable`` may be dotted, ``module:Class.factory``; an ``nn.Module`` instance is used as is);
- ``path/to/model.py:callable``: import that file by path (its directory goes first on
  ``sys.path``, as ``python path/to/model.py`` would do), then the same;
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False)``.

No weights are ever requested: a callable whose signature has a weights argument gets it
switched off (``weights=None``, ``weights_backbone=None``, ``pretrained=False``,
``pretrained_backbone=False``: torchvision's segmentation and detection builders default to a
pretrained backbone), and timm models are created with ``pretrained=False``. The model is
returned as constructed, i.e. usually in train mode; the CLI switches it to eval mode.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import importlib.util
import os
import re
import sys

from .errors import SpecError

FORMS = "expected 'package.module:callable', 'path/to/model.py:callable' or 'timm:NAME'"
_SHAPE = re.compile(r"^\s*\d+(\s*[xX]\s*\d+)*\s*$")


def load_model(spec: str):
    """Build the ``nn.Module`` a SPEC names; every failure is one-line :class:`SpecError`.

    Args:
        spec: ``package.module:callable``, ``path/to/model.py:callable`` or ``timm:NAME``.
    Returns:
        the ``nn.Module`` (in whatever train/eval mode its constructor left it).

    Example:
        >>> load_model("torch.nn:Identity")
        Identity()
    """
    import torch.nn as nn  # lazy: keeps `fxstream --help` fast

    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise SpecError(f"bad model SPEC {spec!r}: {FORMS}")
    if where == "timm":
        model = _create_timm(attr)
    else:
        module = _import_file(where) if _is_path(where) else _import_module(where)
        obj = _get_attr(module, where, attr)
        model = obj if isinstance(obj, nn.Module) else _call(obj, spec)
    if not isinstance(model, nn.Module):
        raise SpecError(f"model SPEC {spec!r} returned {type(model).__name__}, not an "
                        f"nn.Module; {FORMS}")
    return model


def parse_input(text: str) -> tuple[int, ...]:
    """Parse an input shape such as ``1x3x8192x8192`` into ``(1, 3, 8192, 8192)``.

    Args:
        text: sizes joined by ``x``: batch, channels, then at least one spatial size.
    Returns:
        the shape as a tuple of positive ints.

    Example:
        >>> parse_input("1x3x512x256")
        (1, 3, 512, 256)
    """
    dims = _parse_sizes(text, "--input")
    if dims is None or len(dims) < 3:
        raise SpecError(f"bad --input {text!r}: expected N x C x spatial sizes joined by 'x', "
                        "e.g. 1x3x8192x8192")
    return dims


def parse_tile(text: str) -> int | tuple[int, ...]:
    """Parse a tile size: ``2048`` (every axis) or ``2048x1024`` (one per spatial axis).

    Example:
        >>> parse_tile("2048"), parse_tile("2048x1024")
        (2048, (2048, 1024))
    """
    dims = _parse_sizes(text, "--tile")
    if dims is None:
        raise SpecError(f"bad --tile {text!r}: expected one size or one per spatial axis joined "
                        "by 'x', e.g. 2048 or 2048x1024")
    return dims[0] if len(dims) == 1 else dims


def _parse_sizes(text: str, flag: str) -> tuple[int, ...] | None:
    if not _SHAPE.match(text or ""):
        return None
    dims = tuple(int(p) for p in re.split(r"[xX]", text))
    if any(d <= 0 for d in dims):
        raise SpecError(f"bad {flag} {text!r}: every size must be positive")
    return dims


def _is_path(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def _import_file(path: str):
    if not os.path.isfile(path):
        raise SpecError(f"model file {path!r} not found; {FORMS}")
    full = os.path.abspath(path)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
    name = f"fxstream_user_{stem}"
    spec = importlib.util.spec_from_file_location(name, full)
    if spec is None or spec.loader is None:
        raise SpecError(f"cannot import model file {path!r}: not a Python source file")
    module = importlib.util.module_from_spec(spec)
    directory = os.path.dirname(full)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise SpecError(f"importing model file {path!r} failed: {_one_line(e)}") from e
    return module


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            raise SpecError(f"no module named {e.name!r} (from model SPEC '{name}:...'); "
                            f"{FORMS}") from e
        raise SpecError(f"importing {name!r} failed: {_one_line(e)}") from e
    except Exception as e:
        raise SpecError(f"importing {name!r} failed: {_one_line(e)}") from e


def _get_attr(module, where: str, attr: str):
    obj = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([where] + attr.split(".")[:i])
            close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")],
                                              n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SpecError(f"{owner!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    return obj


# arguments that would download weights, and the value that keeps them off
NO_WEIGHTS = {"weights": None, "weights_backbone": None, "pretrained": False,
              "pretrained_backbone": False}


def _call(obj, spec: str):
    if not callable(obj):
        raise SpecError(f"model SPEC {spec!r} names a {type(obj).__name__}, neither a callable "
                        "nor an nn.Module")
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):  # builtins without a signature
        params = {}
    kwargs = {k: v for k, v in NO_WEIGHTS.items() if k in params}
    try:
        return obj(**kwargs)
    except Exception as e:
        raise SpecError(f"calling {spec.rpartition(':')[2]}() from model SPEC {spec!r} "
                        f"raised {_one_line(e)}") from e


def _create_timm(name: str):
    try:
        import timm
    except ImportError as e:
        raise SpecError(f"model SPEC 'timm:{name}' needs timm: pip install timm") from e
    try:
        return timm.create_model(name, pretrained=False)
    except Exception as e:
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SpecError(f"timm.create_model({name!r}) failed: {_one_line(e)}{hint}") from e


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
