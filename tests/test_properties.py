"""Property-based tests of the SGS refresh: random geometry, dtype, memory layout and content.

Every draw must give a G that is finite, strictly positive, kernel-shaped and of mean 1, that
is bit-identical when recomputed, for contiguous / non-contiguous / channels_last copies of the
same input, and for both NMI engines.  Inputs with NaN or inf must raise a ValueError naming the
layer.  Hypothesis runs derandomized (a fixed sequence of examples) so CI is deterministic; the
example counts are the ``EXAMPLES_*`` constants below.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import gradshape as gs
from gradshape import _kernels
from gradshape.dependence import spatial_dependence

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

ENGINES = ["torch"] + (["compiled"] if _kernels.available() else [])
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
CONTENTS = ["normal", "relu", "zeros", "constant", "one_pixel", "huge", "tiny", "denormal", "max"]

EXAMPLES_MODEL = 500
EXAMPLES_FUNCTIONAL = 600
EXAMPLES_NONFINITE = 100

DETERMINISTIC = dict(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---- draws ----------------------------------------------------------------------------------
@dataclass
class Case:
    dims: int
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: int
    padding: int | str | tuple[int, ...]
    padding_mode: str
    c_in: int
    c_out: int
    groups: int
    batch: int
    spatial: tuple[int, ...]
    dtype: torch.dtype
    content: str
    seed: int

    def pad_per_dim(self) -> tuple[int, ...]:
        """Symmetric padding per dim for int/tuple padding, the larger side for 'same'."""
        if self.padding == "valid":
            return (0,) * self.dims
        if self.padding == "same":
            return tuple(
                d * (k - 1) - d * (k - 1) // 2
                for d, k in zip(self.dilation, self.kernel, strict=True)
            )
        if isinstance(self.padding, int):
            return (self.padding,) * self.dims
        return tuple(self.padding)


@st.composite
def cases(draw, for_model: bool = True) -> Case:
    dims = draw(st.sampled_from([1, 2, 3]))
    top = {1: 6, 2: 5, 3: 3}[dims]
    kernel = tuple(draw(st.lists(st.integers(1, top), min_size=dims, max_size=dims)))
    if all(k == 1 for k in kernel):  # SGS acts on kernels larger than 1 only
        kernel = (*kernel[:-1], 2)
    dilation = tuple(draw(st.lists(st.integers(1, 2), min_size=dims, max_size=dims)))
    if for_model:
        # torch 2.13's CPU Conv2d segfaults on channels_last input of width 1 with a kernel
        # width 1, dilation 2 and stride 2 along it; the dilation of a size-1 kernel dim is
        # inert anyway (the functional draws, which run no conv, keep it).
        dilation = tuple(1 if k == 1 else d for k, d in zip(kernel, dilation, strict=True))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if padding_kind == "int":
        padding: int | str | tuple[int, ...] = draw(st.integers(0, 2))
    elif padding_kind == "tuple":
        padding = tuple(draw(st.lists(st.integers(0, 2), min_size=dims, max_size=dims)))
    else:
        padding = padding_kind
    stride = 1 if padding == "same" else draw(st.integers(1, 2))
    padding_mode = "zeros"
    if not isinstance(padding, str) and any(padding if isinstance(padding, tuple) else [padding]):
        padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    groups = draw(st.sampled_from([1, 1, 2]))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    case = Case(
        dims=dims,
        kernel=kernel,
        dilation=dilation,
        stride=stride,
        padding=padding,
        padding_mode=padding_mode,
        c_in=c_in,
        c_out=c_out,
        groups=groups,
        batch=draw(st.integers(1, 3)),
        spatial=(),
        dtype=draw(st.sampled_from(DTYPES)),
        content=draw(st.sampled_from(CONTENTS)),
        seed=draw(st.integers(0, 2**16)),
    )
    pads = case.pad_per_dim()
    sizes = []
    for k, d, p in zip(kernel, dilation, pads, strict=True):
        # The conv needs size + 2p >= d(k-1)+1; reflect needs p < size, circular p <= size.
        low = max(1, d * (k - 1) + 1 - 2 * p) if for_model else 1
        if padding_mode == "reflect":
            low = max(low, p + 1)
        elif padding_mode == "circular":
            low = max(low, p)
        sizes.append(draw(st.integers(low, low + {1: 8, 2: 5, 3: 2}[dims])))
    case.spatial = tuple(sizes)
    return case


def make_input(case: Case) -> torch.Tensor:
    """An input of ``case``'s shape and content, built in float64 and cast to its dtype."""
    g = torch.Generator().manual_seed(case.seed)
    shape = (case.batch, case.c_in, *case.spatial)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    info = torch.finfo(case.dtype)
    content = case.content
    if content == "relu":
        x = base.clamp(min=0)
    elif content == "zeros":
        x = torch.zeros(shape, dtype=torch.float64)
    elif content == "constant":
        x = torch.full(shape, 0.75, dtype=torch.float64)
    elif content == "one_pixel":
        x = torch.zeros(shape, dtype=torch.float64)
        x.view(-1)[case.seed % x.numel()] = 2.5
    elif content == "huge":
        x = base * min(1e30, info.max / 8)
    elif content == "tiny":
        x = base * max(1e-30, info.tiny * 4)
    elif content == "denormal":  # below the smallest normal number of the dtype
        x = base.clamp(-1, 1) * info.tiny / 2
    elif content == "max":  # values spanning almost the whole finite range
        x = base.clamp(-1, 1) * info.max * 0.99
    else:
        x = base
    out = x.to(case.dtype)
    assert torch.isfinite(out).all()
    return out


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values as contiguous, non-contiguous and (2-D/3-D) channels_last tensors."""
    spread = torch.empty(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    spread[..., ::2] = x
    out = {"contiguous": x.contiguous(), "strided": spread[..., ::2]}
    assert not out["strided"].is_contiguous() or x.shape[-1] == 1
    if x.dim() == 4:
        out["channels_last"] = x.contiguous(memory_format=torch.channels_last)
    elif x.dim() == 5:
        out["channels_last"] = x.contiguous(memory_format=torch.channels_last_3d)
    return out


def exact_power_of_two_scaling(x: torch.Tensor, exponent: int | None) -> torch.Tensor | None:
    """``x·2^exponent`` if that is exact (scaling back restores ``x``), else None.

    ``exponent=None`` picks the power of two that brings max|x| into [0.5, 1).
    """
    top = x.abs().max().item()
    if top == 0:
        return None
    if exponent is None:
        exponent = -math.frexp(top)[1]
    first, second = exponent // 2, exponent - exponent // 2  # 2^exponent may not be a double
    scaled = x * 2.0**first * 2.0**second
    back = scaled * 2.0**-first * 2.0**-second
    return scaled if torch.isfinite(scaled).all() and torch.equal(back, x) else None


def one_conv(case: Case) -> nn.Module:
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][case.dims - 1]
    torch.manual_seed(0)
    layer = conv(
        case.c_in,
        case.c_out,
        case.kernel,
        stride=case.stride,
        padding=case.padding,
        dilation=case.dilation,
        groups=case.groups,
        padding_mode=case.padding_mode,
    )
    return nn.Sequential(layer).to(case.dtype)


def assert_valid_scaling(g: torch.Tensor, kernel: tuple[int, ...]) -> None:
    assert tuple(g.shape) == kernel
    assert torch.isfinite(g).all(), g
    assert (g > 0).all(), g
    # G = m / mean(m) in float64, then rounded to float32: the mean is 1 up to that rounding.
    tol = 4 * torch.finfo(g.dtype).eps
    assert abs(g.double().mean().item() - 1.0) <= tol, g


def refreshed(model: nn.Module, x: torch.Tensor, engine: str, measure: str = "nmi") -> torch.Tensor:
    # any kernel and stride: the policy on even and patchify convs is tested elsewhere
    sgs = gs.SpatialGradientScaling(
        model, measure=measure, engine=engine, even_kernels=True, patchify=True
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # degenerate layers say so
            sgs.refresh([x])
        return sgs.scalings["0"]
    finally:
        sgs.remove()


# ---- properties ------------------------------------------------------------------------------
@settings(max_examples=EXAMPLES_MODEL, **DETERMINISTIC)
@given(case=cases(for_model=True), measure=st.sampled_from(["nmi", "nmi", "autocorrelation"]))
def test_refresh_of_a_one_conv_model(case: Case, measure: str):
    model = one_conv(case)
    x = make_input(case)
    results = {}
    engines = ENGINES if measure == "nmi" else ["torch"]
    for engine in engines:
        for layout, xl in layouts(x).items():
            results[engine, layout] = refreshed(model, xl, engine, measure)
    first = next(iter(results.values()))
    assert_valid_scaling(first, case.kernel)
    again = refreshed(model, x, engines[0], measure)
    assert torch.equal(again, first)  # deterministic
    for key, g in results.items():
        assert torch.equal(g, first), key
    # A constant padded map (zero padding of a non-zero constant excepted) has no measurable
    # dependence: G is exactly 1.
    zero_padded = case.padding_mode == "zeros" and any(case.pad_per_dim())
    if case.content == "zeros" or (case.content == "constant" and not zero_padded):
        assert torch.equal(first, torch.ones(case.kernel))


@settings(max_examples=EXAMPLES_FUNCTIONAL, **DETERMINISTIC)
@given(
    case=cases(for_model=False),
    measure=st.sampled_from(["nmi", "nmi", "autocorrelation"]),
    diag_removal=st.booleans(),
    k=st.sampled_from([0.5, 1.0, 5.0, 40.0]),
    exponent=st.sampled_from([None, None, -1000, -500, 500, 1000]),
)
def test_spatial_dependence_and_scaling(
    case: Case, measure: str, diag_removal: bool, k: float, exponent: int | None
):
    x = make_input(case)
    padding = case.padding
    kw = dict(
        measure=measure,
        dilation=case.dilation,
        padding=padding,
        padding_mode=case.padding_mode,
        diag_removal=diag_removal,
    )
    engines = ENGINES if measure == "nmi" else ["torch"]
    scalings = {}
    for engine in engines:
        for layout, xl in layouts(x).items():
            s = spatial_dependence(xl, case.kernel, engine=engine, **kw)
            assert tuple(s.shape) == (case.c_in, *case.kernel)
            finite = s[~torch.isnan(s)]
            assert ((finite >= 0) & (finite <= 1 + 1e-12)).all(), s
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                scalings[engine, layout] = gs.dependence_to_scaling(s, k)
    first = next(iter(scalings.values()))
    assert first.dtype == torch.float64
    assert_valid_scaling(first, case.kernel)
    for key, g in scalings.items():
        assert torch.equal(g, first), key

    # Scale invariance: both measures are invariant to x -> 2^e·x (e = None: the power of two
    # that brings max|x| to [0.5, 1), from denormal or near-overflow content); when that
    # scaling is exact in float64, NMI bins are bit-identical.
    scaled = exact_power_of_two_scaling(x, exponent) if case.dtype == torch.float64 else None
    if scaled is not None:
        for engine in engines:
            s = spatial_dependence(scaled, case.kernel, engine=engine, **kw)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                g = gs.dependence_to_scaling(s, k)
            if measure == "nmi":
                assert torch.equal(g, first), engine
            else:
                torch.testing.assert_close(g, first, rtol=1e-9, atol=0)


@pytest.mark.parametrize("measure", ["nmi", "autocorrelation"])
@settings(max_examples=EXAMPLES_NONFINITE, **DETERMINISTIC)
@given(case=cases(for_model=True), bad=st.sampled_from([math.nan, math.inf, -math.inf]))
def test_nan_or_inf_input_raises_naming_the_layer(measure: str, case: Case, bad: float):
    model = one_conv(case)
    x = make_input(case)
    x.view(-1)[case.seed % x.numel()] = bad
    sgs = gs.SpatialGradientScaling(model, measure=measure, even_kernels=True, patchify=True)
    with pytest.raises(ValueError, match="'0' contains NaN or inf"):
        sgs.refresh([x])
    assert torch.equal(sgs.scalings["0"], torch.ones(case.kernel))  # unchanged
    sgs.remove()


# ---- the overflow cases the draws above found, pinned as plain tests --------------------------
def scale_invariance_inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 9, 9, generator=g, dtype=torch.float64)
    return x / x.abs().max()  # |x| <= 1, so x·2^1023 is finite


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("factor", [2.0**-1060, 2.0**-1030, 2.0**1000, 2.0**1023])
def test_nmi_is_invariant_to_power_of_two_scaling(engine, factor):
    # Binning (v - lo)·B/(hi - lo) is exactly invariant under v -> 2^e·v; this must survive
    # denormal widths (B/width overflows) and ranges wider than the largest double.
    x = scale_invariance_inputs()
    ref = spatial_dependence(x, (3, 3), padding=1, engine=engine)
    assert torch.isfinite(ref).all()
    got = spatial_dependence(x * factor, (3, 3), padding=1, engine=engine)
    if factor < 2.0**-1022:  # denormal: x·factor rounds, so bins may move slightly
        torch.testing.assert_close(got, ref, rtol=0, atol=0.05)
    else:
        assert torch.equal(got, ref)


@pytest.mark.parametrize("factor", [2.0**-1060, 2.0**-600, 2.0**600, 2.0**1020])
def test_autocorrelation_is_invariant_to_scaling(factor):
    # |r| is scale-invariant; the moment sums must neither overflow nor underflow.
    x = scale_invariance_inputs()
    ref = spatial_dependence(x, (3, 3), padding=1, measure="autocorrelation")
    got = spatial_dependence(x * factor, (3, 3), padding=1, measure="autocorrelation")
    atol = 1e-3 if factor < 2.0**-1022 else 1e-12
    torch.testing.assert_close(got, ref, rtol=0, atol=atol)
