"""``_semantics``: Paddle's conventions as pure functions (float32 constants, modes, layouts)."""

from __future__ import annotations

import pytest
import torch

from syncbn.paddle_compat import _semantics
from syncbn.paddle_compat._semantics import (
    BATCH_NO_UPDATE,
    BATCH_UPDATE,
    LAYOUT_1D,
    LAYOUT_2D,
    LAYOUT_3D,
    LAYOUT_BATCHNORM,
    LAYOUT_SYNC,
    RUNNING,
    LayoutRule,
    StatsMode,
    conventions,
    from_channels_first,
    statistics_mode,
    to_channels_first,
    to_float32,
)


def test_float32_constants_as_paddle_stores_them() -> None:
    assert to_float32(0.9) == 0.8999999761581421
    assert to_float32(1e-5) == 9.999999747378752e-06
    assert to_float32(0.5) == 0.5
    c = conventions(0.9, 1e-5, "BatchNorm2D")
    assert (c.decay, c.eps) == (0.8999999761581421, 9.999999747378752e-06)
    assert isinstance(c.decay, float) and isinstance(c.eps, float)
    assert _semantics.UNBIASED_RUNNING_VAR is False
    assert _semantics.SINGLE_VALUE == "identity"


@pytest.mark.parametrize(
    ("momentum", "epsilon", "error", "match"),
    [
        (1.5, 1e-5, ValueError, r"BatchNorm2D: expected momentum in \[0, 1\], got 1\.5.*"
                                r"Fix: pass e\.g\. momentum=0\.9"),
        (-0.1, 1e-5, ValueError, r"expected momentum in \[0, 1\]"),
        ("0.9", 1e-5, TypeError, r"expected momentum to be a real number, got str"),
        (True, 1e-5, TypeError, r"expected momentum to be a real number, got bool"),
        (0.9, -1.0, ValueError, r"expected a finite epsilon >= 0, got -1\.0"),
        (0.9, float("nan"), ValueError, r"expected a finite epsilon >= 0, got nan"),
        (0.9, None, TypeError, r"expected epsilon to be a real number, got NoneType"),
    ],
    ids=["momentum>1", "momentum<0", "momentum-str", "momentum-bool", "epsilon<0", "epsilon-nan",
         "epsilon-none"],
)
def test_conventions_errors(momentum: object, epsilon: object, error: type[Exception],
                            match: str) -> None:
    with pytest.raises(error, match=match):
        conventions(momentum, epsilon, "BatchNorm2D")


# Every row of the tables: (training, use_global_stats, trainable_statistics,
# track_running_stats) -> mode.
MODES = {
    "nd-none-train": (True, None, None, True, BATCH_UPDATE),
    "nd-none-eval": (False, None, None, True, RUNNING),
    "nd-true-train": (True, True, None, True, RUNNING),
    "nd-true-eval": (False, True, None, True, RUNNING),
    "nd-false-train": (True, False, None, True, BATCH_UPDATE),
    "nd-false-eval": (False, False, None, True, BATCH_UPDATE),
    "old-default-train": (True, False, False, True, BATCH_UPDATE),
    "old-default-eval": (False, False, False, True, RUNNING),
    "old-global-train": (True, True, False, True, RUNNING),
    "old-global-eval": (False, True, False, True, RUNNING),
    "old-trainable-eval": (False, False, True, True, BATCH_UPDATE),
    "old-trainable-train": (True, False, True, True, BATCH_UPDATE),
    "old-global-wins-over-trainable": (False, True, True, True, RUNNING),
    "sync-untracked-train": (True, None, None, False, BATCH_NO_UPDATE),
    "sync-untracked-eval": (False, None, None, False, BATCH_NO_UPDATE),
}


@pytest.mark.parametrize(("training", "use_global", "trainable", "tracked", "expected"),
                         MODES.values(), ids=MODES.keys())
def test_statistics_mode_table(training: bool, use_global: bool | None, trainable: bool | None,
                               tracked: bool, expected: StatsMode) -> None:
    assert statistics_mode(training=training, use_global_stats=use_global,
                           trainable_statistics=trainable,
                           track_running_stats=tracked) == expected


LAYOUTS = {
    "1d-NC": (LAYOUT_1D, "NC", False),
    "1d-NCL": (LAYOUT_1D, "NCL", False),
    "1d-NLC": (LAYOUT_1D, "NLC", True),
    "1d-alias-NHWC": (LAYOUT_1D, "NHWC", True),
    "2d-NCHW": (LAYOUT_2D, "NCHW", False),
    "2d-NHWC": (LAYOUT_2D, "NHWC", True),
    "3d-NCDHW": (LAYOUT_3D, "NCDHW", False),
    "3d-NDHWC": (LAYOUT_3D, "NDHWC", True),
    "sync-NCL": (LAYOUT_SYNC, "NCL", False),
    "sync-NDHWC": (LAYOUT_SYNC, "NDHWC", True),
    "old-NHWC": (LAYOUT_BATCHNORM, "NHWC", True),
    # Paddle's old BatchNorm hands data_layout to its C++ operator, which upper-cases it
    "old-nhwc": (LAYOUT_BATCHNORM, "nhwc", True),
    "old-Nhwc": (LAYOUT_BATCHNORM, "Nhwc", True),
    "old-nchw": (LAYOUT_BATCHNORM, "nchw", False),
    "old-nChW": (LAYOUT_BATCHNORM, "nChW", False),
}


@pytest.mark.parametrize(("rule", "fmt", "last"), LAYOUTS.values(), ids=LAYOUTS.keys())
def test_layout_channel_axis(rule: LayoutRule, fmt: str, last: bool) -> None:
    assert rule.channel_last(fmt) is last


@pytest.mark.parametrize(
    ("rule", "fmt", "match"),
    [
        (LAYOUT_1D, "NCHW_", r"BatchNorm1D: expected NC, NCL or NLC for data_format, got "
                             r"'NCHW_'\..*Fix: pass one of 'NC', 'NCL', 'NLC'"),
        (LAYOUT_2D, "nhwc", r"BatchNorm2D: expected NCHW or NHWC for data_format, got 'nhwc'\. "
                            r"Did you mean 'NHWC'\? Fix"),
        (LAYOUT_3D, "NCHW3", r"BatchNorm3D: expected NCDHW or NDHWC for data_format"),
        (LAYOUT_SYNC, "CHWN", r"SyncBatchNorm: expected NCDHW, NDHWC, NCL, NLC, NC, NCHW or NHWC "
                              r"for data_format, got 'CHWN'"),
        (LAYOUT_BATCHNORM, "NDHWC", r"BatchNorm: expected NCHW or NHWC for data_layout"),
        (LAYOUT_BATCHNORM, "nhwc_", r"BatchNorm: expected NCHW or NHWC for data_layout, got "
                                    r"'nhwc_'\. Did you mean 'NHWC'\? Fix: pass one of 'NCHW', "
                                    r"'NHWC' in any letter case"),
        # the case-insensitivity is ASCII's, as C's toupper: a dotless ı is no i
        (LAYOUT_BATCHNORM, "nchw\u0131", r"BatchNorm: expected NCHW or NHWC"),
        # 1D/2D/3D and SyncBatchNorm compare with == in Python: the case matters there
        (LAYOUT_1D, "nlc", r"BatchNorm1D: expected NC, NCL or NLC for data_format, got 'nlc'"),
        (LAYOUT_3D, "ndhwc", r"BatchNorm3D: expected NCDHW or NDHWC for data_format"),
        (LAYOUT_SYNC, "nhwc", r"SyncBatchNorm: expected .* for data_format, got 'nhwc'\. "
                              r"Did you mean 'NHWC'\? Fix: pass one of 'NCDHW'.*'NHWC' \("),
    ],
    ids=["1d", "2d-lowercase", "3d", "sync", "old", "old-typo", "old-non-ascii", "1d-lowercase",
         "3d-lowercase", "sync-lowercase"],
)
def test_layout_rejects_unknown_format(rule: LayoutRule, fmt: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rule.channel_last(fmt)


def test_layout_rejects_non_str() -> None:
    with pytest.raises(TypeError, match=r"BatchNorm: expected data_layout to be a str .*got int"):
        LAYOUT_BATCHNORM.channel_last(4)


@pytest.mark.parametrize(
    ("rule", "ndim", "match"),
    [
        (LAYOUT_1D, 4, r"^expected 2D or 3D input \(got 4D input\): BatchNorm1D takes .*"
                       r"Fix: use BatchNorm2D for 4-D input\.$"),
        (LAYOUT_2D, 3, r"^expected 4D input \(got 3D input\): .*Fix: use BatchNorm1D for 3-D"),
        (LAYOUT_3D, 4, r"^expected 5D input \(got 4D input\): .*Fix: use BatchNorm2D"),
        (LAYOUT_SYNC, 6, r"^expected 2D to 5D input \(got 6D input\): .*Fix: reshape the input"),
        (LAYOUT_BATCHNORM, 1, r"^expected 2D to 5D input \(got 1D input\)"),
    ],
    ids=["1d", "2d", "3d", "sync", "old"],
)
def test_rank_errors(rule: LayoutRule, ndim: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rule.check_rank(ndim)


def test_channel_last_view_is_torch_channels_last_without_copy() -> None:
    x = torch.randn(2, 5, 6, 3)  # NHWC, contiguous
    view = to_channels_first(x, True)
    assert view.shape == (2, 3, 5, 6)
    assert view.is_contiguous(memory_format=torch.channels_last)
    assert view.data_ptr() == x.data_ptr()
    x5 = torch.randn(2, 4, 5, 6, 3)
    assert to_channels_first(x5, True).is_contiguous(memory_format=torch.channels_last_3d)
    x3 = torch.randn(4, 5, 3)  # NLC: no torch memory format, viewed as (N·L, C)
    view3 = to_channels_first(x3, True)
    assert view3.shape == (20, 3) and view3.data_ptr() == x3.data_ptr()
    back = from_channels_first(view3, True, (4, 5, 3))
    assert back.shape == (4, 5, 3) and back.is_contiguous() and torch.equal(back, x3)
    assert from_channels_first(view, True, tuple(x.shape)).data_ptr() == x.data_ptr()


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [("float32", torch.float32), ("float64", torch.float64), ("float16", torch.float32),
     (torch.float64, torch.float64)],
    ids=["float32", "float64", "float16-keeps-float32", "torch-dtype"],
)
def test_parameter_dtype(dtype: object, expected: torch.dtype) -> None:
    assert _semantics.parameter_dtype(dtype, "BatchNorm") == expected


def test_parameter_dtype_errors() -> None:
    with pytest.raises(ValueError, match=r"BatchNorm: expected dtype 'float32', 'float64' or "
                                         r"'float16'.*got 'int8'"):
        _semantics.parameter_dtype("int8", "BatchNorm")
    with pytest.raises(TypeError, match=r"expected dtype to be .* got int \(3\)"):
        _semantics.parameter_dtype(3, "BatchNorm")
