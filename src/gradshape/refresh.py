"""Running a model over refresh batches and measuring what each selected convolution convolves.

A refresh observes, for every selected layer, the tensor its weight is convolved with.  It does
so **by operation**, not through module hooks: during an eval-mode, ``no_grad`` forward a
:class:`~torch.overrides.TorchFunctionMode` sees every call of ``conv1d``/``conv2d``/``conv3d``
and attributes it to a layer when the weight passed is that layer's weight (the Parameter
itself, a view of it, or the cached value of a ``torch.nn.utils.parametrize`` weight) or, for a
weight computed inside the layer's own ``forward`` (weight standardisation), when the call
happens inside that layer's forward with a weight of its shape.  So

* padding done before the operation counts: an input produced by ``F.pad`` (constant 0, or
  reflect/replicate/circular) is measured as the unpadded map with that padding added to the
  operation's own (timm's ``Conv2dSame``, causal ``Conv1d`` layers, ``nn.ZeroPad2d`` in front
  of a conv, ``padding_mode="reflect"``);
* a conv whose weight is passed straight to ``F.conv1d`` (its module never called) is measured;
* a conv that no refresh forward reaches (a branch run only in training, a fused kernel that
  bypasses ``F.conv*``) is reported as *unmeasured*, never an error.

**Masks.**  A dict batch with an ``attention_mask`` (non-zero = real, the Hugging Face
convention) or a ``padding_mask`` (True = padded, fairseq's) marks, per example, which steps of
a zero-padded sequence are real.  Each 1-D convolution's input length is followed from the
mask's length through the strides, padding and dilation of the convolutions before it, and each
example is measured as if it had been given alone, unpadded: the masked steps within the
conv's padding of a real step count as that padding (zeros), pixel pairs reaching further into
the masked region are left out, and an output step is real when its window reads only real
steps or padding.  G is then the same however far the examples were padded (exactly so where
the model itself zeroes or never reads the masked steps feeding real outputs).  A layer whose
input length cannot be followed (a pooling or resampling in between, or 2-D/3-D maps) is
measured without the mask and named in :attr:`Measurement.unmasked`.

**One forward pass when it fits.**  NMI needs two passes over the same pairs (global ranges,
then histograms).  The first pass keeps references to the captured inputs, up to ``cache_bytes``
in all, and the second pass reads them instead of running the model again; if they do not fit
(or a captured tensor was modified in place afterwards), the model runs a second time, streaming
as before.  Either way the integer histograms, hence S, are identical.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from . import batches as _batches
from .batches import batch_input, run_model, to_device
from .dependence import DependenceAccumulator, PairGeometry, make_accumulator
from .distributed import check_same_on_all_ranks, fail_together

__all__ = [
    "CACHE_FRACTION",
    "MASK_KEYS",
    "ConvCall",
    "Measurement",
    "OperationCapture",
    "SampledBatches",
    "default_cache_bytes",
    "measure_layers",
]

_CONV_OPS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_PAD_MODES = ("reflect", "replicate", "circular")
#: Dict-batch keys read as padding masks: ``attention_mask`` (non-zero = real step) and
#: ``padding_mask`` (True = padded step).
MASK_KEYS = ("attention_mask", "padding_mask")
#: Share of the memory available at the start of a refresh that the input cache may use.
CACHE_FRACTION = 0.25


@dataclass(frozen=True)
class ConvCall:
    """One convolution operation attributed to a layer.

    Attributes:
        layer: the layer's name.
        input: the unpadded map ``(N, C, *spatial)``.
        geometry: kernel, dilation and the padding the operation applies to ``input``
            (including any ``F.pad`` right before it).
        mask: ``(N, *spatial)`` bool, True at real pixels, or ``None``.
    """

    layer: str
    input: torch.Tensor
    geometry: PairGeometry
    mask: torch.Tensor | None


@dataclass
class Measurement:
    """What a refresh measured.

    Attributes:
        dependence: layer → ``(S, live)``: S ``(C, *kernel)`` and the live taps (kernel-shaped
            bool), for every measured layer.
        unmeasured: layer → why it was not measured (its G is left as it was).
        unmasked: layer → why a mask in the batches was not applied to it.
        second_forward: whether the model ran a second time (the cache did not hold the inputs).
    """

    dependence: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    unmeasured: dict[str, str] = field(default_factory=dict)
    unmasked: dict[str, str] = field(default_factory=dict)
    second_forward: bool = False


# ---- batches ---------------------------------------------------------------------------------
class SampledBatches(_batches.SampledBatches):
    """The refresh batches of :meth:`SpatialGradientScaling.maybe_refresh
    <gradshape.SpatialGradientScaling.maybe_refresh>`: :class:`gradshape.batches.SampledBatches`
    with each batch collated under its own seed, so the all-reduced refresh measures exactly
    the single-process draw under ``torch.distributed``."""

    def __init__(self, loader: torch.utils.data.DataLoader, count: int, seed: int) -> None:
        super().__init__(
            loader,
            count,
            seed,
            where="SpatialGradientScaling.maybe_refresh",
            setting="schedule.batches",
        )


def _valid_steps(inputs: Any) -> torch.Tensor | None:
    """``(N, T)`` bool (True = real step) from a dict batch's mask entry, or ``None``."""
    if not isinstance(inputs, Mapping):
        return None
    present = [k for k in MASK_KEYS if inputs.get(k) is not None]
    if len(present) > 1:
        raise ValueError(
            "refresh batch holds both 'attention_mask' and 'padding_mask': give one (attention_"
            "mask: non-zero = real step; padding_mask: True = padded step)"
        )
    if not present:
        return None
    key = present[0]
    mask = inputs[key]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(
            f"refresh batch {key!r} must be a (batch, length) tensor, got "
            f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}"
        )
    return mask != 0 if key == "attention_mask" else ~mask.bool()


# ---- capture ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Padded:
    """What ``F.pad`` made a tensor from: its source and per-dim ``(before, after)`` pads."""

    output: weakref.ref
    source: torch.Tensor
    pads: tuple[tuple[int, int], ...]
    mode: str  # "zeros" or one of _PAD_MODES


def _pad_record(out: torch.Tensor, args: tuple, kwargs: dict) -> _Padded | None:
    source = args[0] if args else kwargs.get("input")
    pad = args[1] if len(args) > 1 else kwargs.get("pad")
    mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
    value = args[3] if len(args) > 3 else kwargs.get("value")
    if not isinstance(source, torch.Tensor) or not isinstance(pad, (tuple, list)):
        return None
    spatial = source.dim() - 2
    if spatial < 1 or len(pad) % 2 or len(pad) > 2 * spatial or any(p < 0 for p in pad):
        return None  # pads the channel/batch dims, or crops: not a convolution's padding
    if mode == "constant":
        if value not in (None, 0, 0.0):
            return None
        mode = "zeros"
    elif mode not in _PAD_MODES:
        return None
    pairs = [(0, 0)] * spatial
    for i in range(len(pad) // 2):  # F.pad lists the last dimension first
        pairs[spatial - 1 - i] = (int(pad[2 * i]), int(pad[2 * i + 1]))
    return _Padded(weakref.ref(out), source, tuple(pairs), mode)


def _conv_arguments(args: tuple, kwargs: dict) -> tuple:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    rest = zip(names[len(args) :], defaults[len(args) :], strict=True)
    return (*args, *(kwargs.get(n, d) for n, d in rest))


def _own_padding(valid: torch.Tensor, geometry: PairGeometry) -> torch.Tensor:
    """Masked steps that an example of its own length would see as the conv's padding.

    ``after`` steps right after each real step and ``before`` steps right before one: in an
    unpadded example these positions are the conv's zero padding, so they are measured as zeros
    (pairs with them keep the paper's semantics) and every other masked step is left out.  This
    makes the measurement the same however far an example is padded.
    """
    (before, after) = geometry.padding[0]
    real = valid.float()[:, None]
    near = torch.zeros_like(valid)
    if after:
        near |= F.max_pool1d(F.pad(real, (after, 0)), after + 1, stride=1)[:, 0] > 0
    if before:
        near |= F.max_pool1d(F.pad(real, (0, before)), before + 1, stride=1)[:, 0] > 0
    return near & ~valid


def _output_mask(allowed: torch.Tensor, geometry: PairGeometry, stride: Any) -> torch.Tensor:
    """Real steps of a 1-D convolution's output: those whose window reads only real steps,
    the example's own padding (``allowed``) or the tensor's padding."""
    (before, after), (k,), (d,) = geometry.padding[0], geometry.kernel_size, geometry.dilation
    s = stride if isinstance(stride, int) else next(iter(stride))
    outside = F.pad((~allowed).float()[:, None], (before, after))
    hits = F.conv1d(outside, torch.ones(1, 1, k, dtype=outside.dtype), stride=s, dilation=d)
    return hits[:, 0] == 0


class OperationCapture(TorchFunctionMode):
    """Attributes convolution operations to layers and reports each as a :class:`ConvCall`.

    Args:
        layers: name → module whose weight is watched.
        on_call: called with each attributed :class:`ConvCall`.
        valid: ``(N, T)`` bool mask of the batch's real steps, or ``None``.

    Enter it (``with capture:``) around one batch's forward, inside
    ``torch.nn.utils.parametrize.cached()`` so a parametrized weight is one tensor per batch.
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module],
        on_call: Callable[[ConvCall], None],
        valid: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.layers = dict(layers)
        self.on_call = on_call
        self.unmasked: dict[str, str] = {}
        self._weights: dict[int, tuple[torch.Tensor, str]] = {}
        for name, module in self.layers.items():
            w = module.weight  # a parametrized weight: the cached value for this batch
            self._weights[id(w)] = (w, name)
        self._pads: dict[int, _Padded] = {}
        self._stack: list[str] = []
        self._hooks: list[Any] = []
        # sequence length -> valid steps (N, length); None where two paths disagree
        self._masks: dict[int, torch.Tensor | None] = {}
        if valid is not None:
            self._masks[valid.shape[1]] = valid

    def __enter__(self) -> OperationCapture:
        for name, module in self.layers.items():
            self._hooks.append(module.register_forward_pre_hook(self._enter_layer(name)))
            self._hooks.append(module.register_forward_hook(self._leave_layer, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._pads.clear()
        super().__exit__(*exc)

    def _enter_layer(self, name: str) -> Callable:
        def hook(_module, _args):
            self._stack.append(name)

        return hook

    def _leave_layer(self, _module, _args, _output) -> None:
        if self._stack:
            self._stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dims = _CONV_OPS.get(func)
        if dims is not None:  # measured before it runs: a bad input is named by its layer
            self._convolution(dims, _conv_arguments(args, kwargs))
        out = func(*args, **kwargs)
        if func is F.pad and isinstance(out, torch.Tensor):
            record = _pad_record(out, args, kwargs)
            if record is not None:
                self._pads[id(out)] = record
        return out

    def _attribute(self, weight: torch.Tensor) -> str | None:
        entry = self._weights.get(id(weight))
        if entry is not None and entry[0] is weight:
            return entry[1]
        base = weight._base
        if base is not None:
            entry = self._weights.get(id(base))
            if entry is not None and entry[0] is base and base.shape == weight.shape:
                return entry[1]
        if self._stack and not isinstance(weight, nn.Parameter):
            name = self._stack[-1]  # a weight computed in the layer's own forward
            if self.layers[name].weight.shape == weight.shape:
                return name
        return None

    def _unpad(self, x: torch.Tensor) -> _Padded | None:
        record = self._pads.get(id(x))
        return record if record is not None and record.output() is x else None

    def _convolution(self, dims: int, arguments: tuple) -> None:
        x, weight, _bias, stride, padding, dilation, _groups = arguments
        if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
            return
        if x.dim() == dims + 1:  # an unbatched call
            x = x.unsqueeze(0)
        kernel = tuple(weight.shape[2:])
        geometry = PairGeometry.create(kernel, dilation=dilation, padding=padding)
        padded = self._unpad(x) if x.dim() == dims + 2 else None
        if padded is not None:
            op_pads = geometry.padding
            if padded.mode == "zeros":
                pairs = zip(padded.pads, op_pads, strict=True)
                pads = tuple((a + c, b + d) for (a, b), (c, d) in pairs)
                geometry = PairGeometry.create(kernel, dilation=dilation, padding=pads)
                x = padded.source
            elif not any(p for pair in op_pads for p in pair):
                geometry = PairGeometry.create(
                    kernel, dilation=dilation, padding=padded.pads, padding_mode=padded.mode
                )
                x = padded.source
        layer = self._attribute(weight)
        followed = self._follow_mask(x, geometry, stride, dims, layer)
        if layer is not None:
            mask = None
            if followed is not None:
                valid, allowed = followed
                x, mask = torch.where(valid[:, None], x, 0.0), allowed
            self.on_call(ConvCall(layer, x, geometry, mask))

    def _follow_mask(
        self, x: torch.Tensor, geometry: PairGeometry, stride: Any, dims: int, layer: str | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(real steps, real steps and the example's own padding)`` of ``x``, or ``None``;
        registers the output's real steps under the output's length."""
        if not self._masks:
            return None
        valid = self._masks.get(x.shape[-1]) if dims == 1 else None
        if valid is None or valid.shape[0] != x.shape[0]:
            if layer is not None:
                self.unmasked[layer] = (
                    f"its {dims}-D input of length {x.shape[-1]} could not be followed from the "
                    "batch's mask through the convolutions before it"
                    if dims == 1
                    else f"masks are followed through 1-D convolutions only; its input is {dims}-D"
                )
            return None
        valid = valid.to(x.device)
        allowed = valid | _own_padding(valid, geometry)
        out = _output_mask(allowed, geometry, stride)
        known = self._masks.get(out.shape[1], out)
        self._masks[out.shape[1]] = out if known is not None and torch.equal(known, out) else None
        return valid, allowed


# ---- the measurement -------------------------------------------------------------------------
def default_cache_bytes(device: torch.device) -> int:
    """:data:`CACHE_FRACTION` of the memory available now on ``device`` (0 if unknown)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(CACHE_FRACTION * free)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0
    return int(CACHE_FRACTION * available)


class _Layer:
    """One layer's accumulator, the geometry it was first seen with, and why it failed."""

    def __init__(self, accumulator: DependenceAccumulator) -> None:
        self.accumulator = accumulator
        self.geometry: PairGeometry | None = None
        self.problem = ""


class _Cache:
    """Captured inputs kept between the passes, up to a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.used = 0
        self.calls: list[tuple[ConvCall, int]] | None = [] if budget > 0 else None

    def keep(self, call: ConvCall) -> None:
        if self.calls is None:
            return
        self.used += call.input.nbytes
        if self.used > self.budget:
            self.calls = None  # over budget: free everything, the second pass streams
        else:
            self.calls.append((call, call.input._version))

    def intact(self) -> bool:
        return self.calls is not None and all(c.input._version == v for c, v in self.calls)


def measure_layers(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    make: Callable[[str, PairGeometry], DependenceAccumulator],
    *,
    cache_bytes: int | None = None,
    where: str = "refresh",
) -> Measurement:
    """Measure the spatial dependence of what each of ``layers`` convolves over ``batches``.

    Args:
        model: runs in eval mode under ``torch.no_grad()``; every module's training flag is
            restored afterwards.
        layers: name → conv module to measure.
        batches: re-iterable when the measure takes two passes and the cache may not hold the
            inputs (a list, or :class:`SampledBatches`).
        make: ``(layer, geometry) -> accumulator`` for a layer's first call.
        cache_bytes: the cache budget (``None``: :func:`default_cache_bytes`; 0: always run the
            model again for the second pass).
        where: the caller's name, for messages.

    Under ``torch.distributed`` every rank must call this together; the set of measured layers
    must then be the same on every rank.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    state: dict[str, _Layer] = {}
    unmasked: dict[str, str] = {}
    cache = _Cache(default_cache_bytes(device) if cache_bytes is None else cache_bytes)

    def observe(call: ConvCall) -> None:
        entry = state.get(call.layer)
        if entry is None:
            entry = state[call.layer] = _Layer(make(call.layer, call.geometry))
            entry.geometry = call.geometry
        if entry.problem:
            return
        if call.geometry != entry.geometry:
            entry.problem = _geometry_change(entry.geometry, call.geometry)
            return
        expected = tuple(layers[call.layer].kernel_size)
        if call.geometry.kernel_size != expected:
            entry.problem = (
                f"its weight was convolved as a {call.geometry.kernel_size} kernel, not {expected}"
            )
            return
        entry.accumulator.observe(call.input, mask=call.mask)
        if entry.accumulator.passes > 1:
            cache.keep(call)

    def run(on_call: Callable[[ConvCall], None]) -> bool:
        seen = False
        for batch in batches:
            seen = True
            inputs = to_device(batch_input(batch, "refresh"), device)
            valid = _valid_steps(inputs)
            with parametrize.cached(), OperationCapture(layers, on_call, valid) as capture:
                run_model(model, inputs)
            unmasked.update(capture.unmasked)
        return seen

    result = Measurement(unmasked=unmasked)
    with _eval_mode(model), torch.no_grad():
        with fail_together(f"{where}"):
            if not run(observe):
                raise ValueError(f"{where}: the batch iterable is empty")
        for name in layers:
            entry = state.get(name)
            if entry is None:
                result.unmeasured[name] = (
                    "no convolution used its weight during the refresh forward (a branch run "
                    "only in training, or a kernel that bypasses F.conv1d/2d/3d)"
                )
            elif entry.problem:
                result.unmeasured[name] = entry.problem
        measured = [n for n in layers if n not in result.unmeasured]
        check_same_on_all_ranks(repr(measured), f"{where}: the layers its forward reached")
        for n in measured:
            state[n].accumulator.end_pass()
        if any(state[n].accumulator.passes > 1 for n in measured):
            if cache.intact():
                for call, _version in cache.calls:
                    if call.layer in measured:
                        state[call.layer].accumulator.observe(call.input, mask=call.mask)
            else:
                result.second_forward = True
                cache.calls = None
                targets = {n: layers[n] for n in measured}

                def count(call: ConvCall) -> None:
                    if call.layer in targets:
                        state[call.layer].accumulator.observe(call.input, mask=call.mask)

                with fail_together(f"{where}"):
                    run(count)
            for n in measured:
                state[n].accumulator.end_pass()
    for n in measured:
        acc = state[n].accumulator
        result.dependence[n] = (acc.result(), acc.live)
    return result


def _geometry_change(first: PairGeometry, later: PairGeometry) -> str:
    return (
        "its weight was convolved with different padding or dilation in one refresh "
        f"(padding {first.padding} then {later.padding}, dilation {first.dilation} then "
        f"{later.dilation}): their pixel pairs cannot be pooled into one G"
    )


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def make_accumulator_factory(
    measure: str, *, diag_removal: bool, engine: str
) -> Callable[[str, PairGeometry], DependenceAccumulator]:
    """``(layer, geometry) -> accumulator`` for :func:`measure_layers`."""

    def make(layer: str, geometry: PairGeometry) -> DependenceAccumulator:
        return make_accumulator(
            measure, geometry, diag_removal=diag_removal, layer=layer, engine=engine
        )

    return make
