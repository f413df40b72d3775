"""Lazy inputs and dense outputs of a generated module: what streaming from an array and writing
into one require of the model.

A lazily read image (:class:`fxstream.images.Image`) is only ever read tile by tile by the
streamed passes, so the head must not read the image itself. A dense output is written tile by
tile by the pass that computes it (:func:`fxstream.runtime.writing_into`), so the model's output
must be exactly one map of the stem, which the head returns as it is.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.fx as fx

from .errors import UnsupportedError
from .images import ImageError, Writer, output
from .images.outputs import as_torch_dtype

PASS_PREFIX = "fxstream_pass_"


def _is_pass(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith(PASS_PREFIX)


def check_lazy_input(driver: fx.GraphModule) -> None:
    """Raise :class:`UnsupportedError` when anything but a streamed pass's tiles reads the image
    (the head, or a pass that reads it whole)."""
    image = next(n for n in driver.graph.nodes if n.op == "placeholder")
    readers = [u for u in image.users
               if not (_is_pass(u) and u.args[0] is image and image not in u.args[1:])]
    if readers:
        names = ", ".join(f"'{u.name}'" for u in readers[:4])
        raise UnsupportedError(
            f"the model reads the image itself outside the streamed stem ({names}), so it "
            f"cannot take a lazily read image (fxstream.image): only the stem's tiles are read "
            f"from it. Pass the image as a tensor (img.read() loads it whole), or change the "
            f"model so that its head reads only the stem's outputs")


def output_map(built) -> tuple[str, tuple[int, ...], torch.dtype]:
    """``(node name, shape, dtype)`` of the stem map that a fully convolutional model returns,
    or :class:`UnsupportedError` saying what the head does instead."""
    driver = built.driver
    out = next(n for n in driver.graph.nodes if n.op == "output")
    value = out.args[0]
    model = built.analysis.model
    if not (isinstance(value, fx.Node) and value.op == "call_function"
            and value.target is operator.getitem and _is_pass(value.args[0])
            and len(value.users) == 1):
        what = (f"returns {type(value).__name__}" if not isinstance(value, fx.Node)
                else f"computes its output in the head ('{value.name}': "
                     f"{value.format_node()})")
        raise UnsupportedError(
            f"writing a dense output tile by tile needs a fully convolutional model whose "
            f"output is one map of the streamed stem, but {model} {what}. Hint: call the "
            f"streamed model without out= to get the output as a tensor")
    name = value.name
    node = next(n for n in built.analysis.graph_module.graph.nodes if n.name == name)
    meta = node.meta.get("tensor_meta")
    shape = tuple(int(s) for s in meta.shape)
    if len(shape) != len(built.plan.input_shape):
        raise UnsupportedError(f"the model's output '{name}' has shape {shape}, not (N, C, "
                               f"*spatial) like its input {built.plan.input_shape}: it cannot "
                               f"be written as a dense image")
    return name, shape, meta.dtype


def open_output(out, shape, dtype: torch.dtype, layout: str | None = None) -> Writer:
    """A :class:`Writer` for ``out`` (a Writer, or an array-like checked by
    :func:`fxstream.images.output`), checked to hold ``shape`` and values of ``dtype``."""
    if isinstance(out, Writer):
        if layout is not None:
            raise ImageError("layout= is for a plain output array: a Writer from "
                             "fxstream.output(...) already has its layout")
        writer = out
        if tuple(writer.shape) != tuple(shape):
            raise ImageError(f"the output writer has logical shape {tuple(writer.shape)}, but "
                             f"the model's output is {tuple(shape)} (N, C, *spatial)")
    else:
        target = getattr(out, "dtype", None)
        if target is None:
            raise ImageError(f"cannot write an output into a {type(out).__name__}: pass a zarr "
                             f"array, numpy memmap or array, torch tensor, or fxstream.output(...)")
        target = target if isinstance(target, torch.dtype) else as_torch_dtype(np.dtype(target))
        writer = output(out, shape, target, layout)
    if not torch.can_cast(dtype, writer.dtype):
        raise ImageError(f"the model's output is {dtype} but the output array holds "
                         f"{writer.dtype}: values would change kind; use a floating array "
                         f"(e.g. float32)")
    return writer


__all__ = ["check_lazy_input", "open_output", "output_map"]
