"""``fxstream.compile``: a model in, a :class:`StreamingModule` out.

The pipeline is :func:`build`: trace → shapes → geometry → boundary → plan → rewrite → engines,
for one mode of the model and one input. A :class:`StreamingModule` runs it again whenever it
meets a mode (``train()``/``eval()``, anything that flips a module's ``training`` flag) or an
input shape it has not seen, and caches the result: torch.fx specialises the code it traces on
``self.training``, and a plan (and the memory budget it keeps) holds for one input shape only.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from . import calls, dense, hostmem
from .analysis import Analysis, analyze_traced, check_input_shape, param_dtype
from .batchnorm import check_streamable, freeze_batchnorm
from .budget import parse_bytes
from .errors import FxStreamWarning, GeometryError, UnsupportedError
from .images import Image
from .planner import AUTO, PlanOptions, Situation, make_plan
from .plans import Plan
from .progress import TileProgress
from .rewrite import build_driver
from .runtime import PassEngine, writing_into
from .segments import resolve_cuts
from .tiling import tile_sizes
from .tracing import probe_shape, trace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileOptions:
    """The arguments of :func:`compile`, checked once."""

    plan: PlanOptions
    split: str | None = None
    leaf_modules: tuple = ()
    progress: bool = False


@dataclass(frozen=True)
class Built:
    """The pipeline's result for one mode and input: its analysis, plan and generated module."""

    analysis: Analysis
    plan: Plan
    driver: fx.GraphModule = field(compare=False, repr=False)


def build(model: nn.Module, options: CompileOptions, input_shape, dtype: torch.dtype,
          situation: Situation, extra_inputs=None, observer=None) -> Built:
    """The whole pipeline for the model's current mode and one input shape (``observer``: called
    by the engines per tile, see :class:`fxstream.progress.TileProgress`)."""
    # 1. trace the model in its current train/eval mode
    gm = trace(model, options.leaf_modules)
    # 2-4. shapes, work and geometry of every node at this input shape; the stem's boundary
    analysis = analyze_traced(gm, type(model).__name__, input_shape, dtype, options.split,
                              extra_inputs)
    check_streamable(analysis)
    calls.check_stem_arguments(analysis)
    # 5. the plan: cuts, segments, tiles, and what each pass keeps, pools or recomputes
    plan = make_plan(analysis, options.plan, situation)
    hostmem.give_back()  # what planning left: the step starts from the baseline it counted
    # 6. one engine per pass, and the generated module that runs them and then the head
    device = torch.device(situation.device)
    engines = [PassEngine(p, device, options.plan.cudnn_benchmark, observer)
               for p in plan.passes]
    driver = build_driver(model, analysis, plan, engines)
    return Built(analysis, plan, driver)


class StreamingModule(nn.Module):
    """The user's model with its local stem streamed tile by tile.

    Calling it runs the generated module for the model's current mode and the input's shape
    (built on first use, then cached): ``sm.code`` shows the last one used. Its parameters,
    buffers, submodules and ``state_dict`` keys are the model's own (shared, not copied), so
    optimisers and checkpoints work unchanged; ``train()``/``eval()`` switch the model's mode.
    ``sm.plan(shape)`` is the :class:`~fxstream.plans.Plan` for an input shape and
    ``sm.analysis`` the analysis of the last one used. It pickles as the model and the compile
    options (``torch.save(sm)`` works; plans are made again after loading).

    The image may be a tensor or a lazily read :class:`fxstream.images.Image`
    (``fxstream.image(path_or_array)``): each tile's region is then read from it when the tile
    runs, in the stored dtype (the model's own ``x.float() / 255`` is part of the stem), and the
    image is never whole in memory nor counted by a memory budget. ``sm.infer(image, out)``
    writes a fully convolutional model's output tile by tile into an array.
    """

    def __init__(self, model: nn.Module, options: CompileOptions):
        super().__init__()
        object.__setattr__(self, "_modules", model._modules)
        object.__setattr__(self, "_parameters", model._parameters)
        object.__setattr__(self, "_buffers", model._buffers)
        object.__setattr__(self, "_non_persistent_buffers_set",
                           model._non_persistent_buffers_set)
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "options", options)
        object.__setattr__(self, "_built", {})
        object.__setattr__(self, "_last", None)
        object.__setattr__(self, "_warned", set())
        object.__setattr__(self, "_reported", set())  # plan keys already logged and warned
        object.__setattr__(self, "_expect", None)  # (rank, channels) seen by compile's probe
        object.__setattr__(self, "progress", TileProgress() if options.progress else None)
        self.training = model.training

    # -- pickling: the model and the options; plans are made again -------------------------
    def __getstate__(self):
        return {"model": self.model, "options": self.options}

    def __setstate__(self, state):
        StreamingModule.__init__(self, state["model"], state["options"])

    def train(self, mode: bool = True):
        super().train(mode)
        self.model.training = mode
        return self

    # -- what the user inspects ---------------------------------------------------------------
    @property
    def analysis(self) -> Analysis | None:
        return self._last.analysis if self._last is not None else None

    @property
    def last_plan(self) -> Plan | None:
        """The :class:`~fxstream.plans.Plan` of the last call (or of compile's input shape)."""
        return self._last.plan if self._last is not None else None

    @property
    def engines(self) -> tuple:
        """The :class:`~fxstream.runtime.PassEngine` of each pass of the last plan used."""
        if self._last is None or self._last.driver is None:
            return ()
        return tuple(m for name, m in self._last.driver.named_children()
                     if name.startswith("fxstream_pass_"))

    @property
    def code(self) -> str:
        """The generated forward of the last plan used (or built)."""
        return self._last.driver.code if self._last is not None else ""

    def plan(self, input_shape, dtype: torch.dtype | None = None, *args, **kwargs) -> Plan:
        """The plan for an input of this shape in the model's current mode (built if needed);
        ``args``/``kwargs``: the model's other arguments, as in a call, where the stem reads
        them (``sm.plan(x.shape, x.dtype, scale)``)."""
        image = torch.empty(tuple(input_shape), dtype=dtype or param_dtype(self.model),
                            device="meta")
        return self._get(image, args, kwargs, resident=False).plan

    # -- running ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if not args:
            raise UnsupportedError("the streamed model takes the image as its first argument")
        built = self._get(args[0], args[1:], kwargs, resident=True)
        self._check_hooks(built)
        return built.driver(*args, **kwargs)

    def infer(self, image, out=None, layout: str | None = None):
        """Run the model without gradients; with ``out``, write its dense output there tile by
        tile, so that it is never whole in memory.

        Args:
            image: a tensor or a lazily read :class:`fxstream.images.Image`.
            out: None (return the output tensor), or where the output goes: a
                :class:`fxstream.images.Writer` from ``fxstream.output(target, shape, dtype,
                layout)``, or a zarr array, ``numpy.memmap``, array or tensor of the output's
                shape (see :meth:`dense_output`). Its dtype may differ from the model's within
                a kind (float64 into float32, not float into uint8). The model must be fully
                convolutional: its output is one map of the stem, the head does nothing to it.
            layout: with a plain ``out``, how it stores its axes (``"CHW"``, ``"HWC"``; default
                ``(N, C, *spatial)``).
        Returns:
            the output tensor, or ``out``.

        Example:
            >>> import numpy as np, torch, torch.nn as nn, fxstream
            >>> net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1)).double()
            >>> sm = fxstream.compile(net, tile_size=32, memory_budget=None)
            >>> img = fxstream.image(np.ones((100, 80, 3)), layout="HWC")
            >>> out = np.zeros((100, 80, 2), np.float32)
            >>> _ = sm.infer(img, out, layout="HWC")
            >>> bool(np.allclose(out[:, :, 0], sm.infer(img.read())[0, 0].float().numpy()))
            True
        """
        with torch.no_grad():
            if out is None:
                return self(image)
            built = self._get(image, (), {}, resident=True, written=True)
            self._check_hooks(built)
            name, shape, dtype = dense.output_map(built)
            writer = dense.open_output(out, shape, dtype, layout)
            with writing_into({name: writer}):
                built.driver(image)
            if writer is not out:
                writer.close()
            return out

    def dense_output(self, image) -> tuple[tuple[int, ...], torch.dtype]:
        """The ``(shape, dtype)`` of the model's output for ``image`` (a tensor, an
        :class:`~fxstream.images.Image` or a meta tensor), for :meth:`infer`'s ``out``: the
        model must be fully convolutional (its output is one map of the stem)."""
        built = self._get(image, (), {}, resident=True, written=True)
        _, shape, dtype = dense.output_map(built)
        return shape, dtype

    def _get(self, image, rest, kwargs, resident: bool, written: bool = False) -> Built:
        lazy = isinstance(image, Image)
        if not lazy and not isinstance(image, torch.Tensor):
            raise UnsupportedError(
                f"the image must be a tensor or a lazily read image, got "
                f"{type(image).__name__}: wrap arrays, memmaps, zarr arrays and slide files "
                f"with fxstream.image(source, layout=..., level=..., region=...)")
        self._check_image(image)
        extra = calls.extra_inputs(self.model, image, rest, kwargs)
        device = calls.model_device(self.model, image)
        # the image's gradient counts in a memory budget, not in a plain plan
        grad = not lazy and bool(image.requires_grad) and \
            self.options.plan.memory_budget is not None and \
            (self.options.plan.tile_size is None or self.options.plan.memory_budget != AUTO)
        key = (calls.mode(self.model), tuple(image.shape), image.dtype, str(device), grad,
               calls.signature(extra), lazy, written)
        built = self._built.get(key)
        if built is None:
            situation = Situation(device=str(device), image_resident=resident and not lazy,
                                  image_grad=grad, image_lazy=lazy, output_written=written)
            built = build(self.model, self.options, tuple(image.shape), image.dtype,
                          situation, extra, observer=self.progress)
            if lazy:
                dense.check_lazy_input(built.driver)
            self._built[key] = built
        if key not in self._reported:  # also a plan compile made (input_shape=): told once
            self._reported.add(key)
            self._report(built)
        object.__setattr__(self, "_last", built)
        return built

    def _check_image(self, image):
        if self._expect is None:
            return
        rank, channels = self._expect
        if len(image.shape) != rank:
            raise UnsupportedError(f"expected an image with {rank} dims (N, C, "
                                   f"{', '.join('spatial' for _ in range(rank - 2))}), "
                                   f"got shape {tuple(image.shape)}")
        if channels is not None and image.shape[1] != channels:
            raise UnsupportedError(f"expected {channels} channels, got {image.shape[1]} "
                                   f"(image shape {tuple(image.shape)})")

    def _report(self, built: Built):
        """Log the plan once per input shape; warn once about what the user gets less of."""
        plan = built.plan
        log.info("fxstream: input %s %s: %d passes, %s tiles of %s, cuts %s%s",
                 plan.input_shape, plan.dtype, len(plan.passes),
                 [p.num_tiles for p in plan.passes], [p.tile_size for p in plan.passes],
                 list(plan.cuts), "" if plan.estimate is None else
                 f", estimated peak {plan.estimate.peak / 2**30:.2f} GiB")
        for note in plan.notes:
            if note not in self._warned:
                self._warned.add(note)
                warnings.warn(f"fxstream: {note}", FxStreamWarning, stacklevel=4)

    def _check_hooks(self, built: Built):
        """Hooks on stem modules see tiles, not the image: say so once per set of modules."""
        hooked = calls.hooked_stem_modules(built.analysis)
        if hooked and tuple(hooked) not in self._warned:
            self._warned.add(tuple(hooked))
            warnings.warn(
                f"fxstream: hooks on stem modules ({', '.join(hooked[:6])}"
                f"{', ...' if len(hooked) > 6 else ''}) run once per tile on tile-sized "
                "tensors (and again in the backward's recompute), not once on the whole "
                "image. To see whole maps, compile with split='<module>' so that its output "
                "is handed to the head, or hook a module of the head.",
                FxStreamWarning, stacklevel=3)


def compile(model: nn.Module, tile_size=None, split: str | None = None, leaf_modules=(),
            input_shape=None, cuts=None, memory_budget=AUTO, offload: bool = False,
            cudnn_benchmark: bool = False, progress=False) -> StreamingModule:
    """Compile ``model`` into a :class:`StreamingModule` that streams its local stem.

    Plans are made per input shape (and mode): without ``tile_size`` or ``memory_budget`` each
    input shape gets the fastest plan under the default budget (``"auto"``: 28% of the full
    image's estimated peak memory, at least 512 MiB above what the process holds, at most
    90% of the memory available).

    Args:
        model: an ``nn.Module`` traceable by torch.fx. Global statistics in the stem
            (squeeze-excitation, GroupNorm, InstanceNorm, train-mode BatchNorm) are streamed as
            reductions at the price of extra passes; :func:`freeze_batchnorm` avoids them for
            BatchNorm.
        tile_size: the largest input tile edge in pixels (int, or one per spatial axis). Given
            without ``memory_budget``, every input is streamed in tiles of this size (no cuts
            unless ``cuts`` is given).
        split: a node name or module qualname: stream only up to its output.
        leaf_modules: module classes or qualnames to keep as single calls when tracing.
        input_shape: an example ``(N, C, *spatial)``: the plan for it is made now (errors show
            here). Without it the channels are read from the first layer, if it tells them, and
            a 1024-pixel probe is analysed now; every plan is made for the input it serves. A
            stem that reads another argument of ``forward`` (without a default, or with None)
            is planned at the calls that pass it.
        cuts: node names or module qualnames (``["layer1", "layer2"]``) after which the stem is
            cut: each segment is streamed on the stored full output of the one before, so the
            tiles' overlap nearly vanishes at the price of storing those maps.
        memory_budget: bytes, a string like ``"8GiB"``, ``"auto"`` (the default, see above) or
            None (plain plans of ``tile_size``). For each input shape the planner chooses the
            cuts and tile sizes that minimise the estimated work under this peak memory; an
            explicit ``tile_size`` or ``cuts`` is kept. On the CPU the budget is the process's
            peak resident memory; for a model on CUDA the device's peak allocated memory.
            Plans count the memory in use when they are made (the image included when it is
            loaded).
        offload: with the model on CUDA, keep the stored cut maps in pinned host memory.
        cudnn_benchmark: with the model on CUDA, turn on ``torch.backends.cudnn.benchmark``
            inside the tile loops (restored after). Off by default: cuDNN may then pick
            algorithms whose workspace no memory budget counts (on an H200, ResNet-18 at 4096²
            under a 1.75 GiB budget peaked at 33 GiB with it).
        progress: True to draw a progress bar per streamed pass on stderr (tiles done, rate,
            time left), or a :class:`fxstream.progress.TileProgress` to draw them with (e.g.
            one adding its bars to the caller's own rich ``Progress``).
    Returns:
        a :class:`StreamingModule` computing what ``model`` computes.

    Example:
        >>> import torch, torch.nn as nn, fxstream
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        >>> sm = fxstream.compile(net, tile_size=32)
        >>> x = torch.randn(1, 3, 100, 100)
        >>> torch.allclose(sm(x), net(x), atol=1e-6)
        True
    """
    # the options, checked once
    options = _options(tile_size, split, leaf_modules, cuts, memory_budget, offload,
                       cudnn_benchmark, progress)
    sm = StreamingModule(model, options)
    if isinstance(progress, TileProgress):
        object.__setattr__(sm, "progress", progress)
    # the pipeline, now, for the shape given (or a probe shape): errors show here
    if input_shape is None:
        input_shape = probe_shape(model, options.leaf_modules)
        probe = input_shape is not None
    else:
        input_shape, probe = check_input_shape(input_shape), False
    if input_shape is not None:
        dtype = param_dtype(model)
        situation = Situation(device=str(calls.model_device(model, torch.empty(0))))
        try:
            if probe and options.plan.tile_size is None and options.plan.cuts is None:
                built = _analysis_only(model, options, input_shape, dtype)
            else:
                built = build(model, options, input_shape, dtype, situation,
                              observer=sm.progress)
                sm._built[(calls.mode(model), tuple(input_shape), dtype, situation.device, False,
                           (), False, False)] = built
            object.__setattr__(sm, "_last", built)
        except GeometryError as e:
            # the stem reads another argument compile has no value for: plans wait for it
            if e.missing_argument is None:
                raise
        object.__setattr__(sm, "_expect", (len(input_shape), input_shape[1]))
    else:
        trace(model, options.leaf_modules)  # untraceable models fail here, not at first call
    return sm


def _analysis_only(model, options, input_shape, dtype) -> Built:
    """A probe's analysis (trace, shapes, geometry, boundary) without a plan: the errors of a
    model that cannot be streamed at all show at compile."""
    gm = trace(model, options.leaf_modules)
    analysis = analyze_traced(gm, type(model).__name__, input_shape, dtype, options.split)
    check_streamable(analysis)
    if options.plan.cuts:
        resolve_cuts(analysis, options.plan.cuts)
    return Built(analysis, None, None)


def _options(tile_size, split, leaf_modules, cuts, memory_budget, offload, cudnn_benchmark,
             progress=False):
    if tile_size is not None:
        tile_sizes(tile_size, len(tile_size) if isinstance(tile_size, (tuple, list)) else 1)
        tile_size = tuple(tile_size) if isinstance(tile_size, (tuple, list)) else tile_size
    if memory_budget is not None and memory_budget != AUTO:
        parse_bytes(memory_budget)
    if isinstance(cuts, str):
        cuts = (cuts,)
    return CompileOptions(
        plan=PlanOptions(tile_size=tile_size, cuts=tuple(cuts) if cuts is not None else None,
                         memory_budget=memory_budget, offload=bool(offload),
                         cudnn_benchmark=bool(cudnn_benchmark)),
        split=split, leaf_modules=tuple(leaf_modules), progress=bool(progress))


__all__ = ["Built", "CompileOptions", "StreamingModule", "build", "compile", "freeze_batchnorm"]
