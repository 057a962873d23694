"""Choosing a setting from a sweep table (synthetic rows, expected picks worked out by hand), target parsing, and
threshold placement at margin quantiles."""

from __future__ import annotations

import numpy as np
import pytest

from dynllava.calib.select import Target, parse_target, quality_metric, select
from dynllava.calib.sweep import Row, threshold_for_share
from dynllava.errors import InputError


def _row(rate, t, kv, text_keep, agreement, kl=0.0, accuracy=None, **kw) -> Row:
    return Row(rate, t, image_keep=rate, text_keep=text_keep, kv_bytes=kv, agreement=agreement, kl=kl,
               accuracy=accuracy, **kw)


KEEP_ALL = _row(1.0, -3.0, 1000, 1.0, 1.0, accuracy=0.90, keep_all=True)
ROWS = [
    KEEP_ALL,
    _row(1.0, 0.0, 900, 0.50, 0.97, 0.01, accuracy=0.90),
    _row(0.5, -3.0, 800, 1.00, 0.95, 0.02, accuracy=0.88),
    _row(0.5, 0.0, 700, 0.50, 0.93, 0.03, accuracy=0.86, trained=True),
    _row(0.5, 1.0, 650, 0.25, 0.90, 0.05, accuracy=0.80),
    _row(0.2, 0.0, 500, 0.50, 0.85, 0.08, accuracy=0.70),
    _row(0.2, 1.0, 450, 0.25, 0.80, 0.10, accuracy=0.60),
]


@pytest.mark.parametrize("target, metric, expected", [
    # best accuracy within 800 bytes: 0.88 at 800
    (Target("kv_bytes", 800), "accuracy", (0.5, -3.0)),
    # within 700: 0.86 (trained)
    (Target("kv_bytes", 749), "accuracy", (0.5, 0.0)),
    (Target("kv_bytes", 10_000), "accuracy", (1.0, 0.0)),  # ties keep-all's 0.90 with fewer bytes
    # text keep <= 0.5: the best accuracy is 0.90 at (1.0, 0.0)
    (Target("text_keep", 0.5), "accuracy", (1.0, 0.0)),
    (Target("text_keep", 0.3), "accuracy", (0.5, 1.0)),
    # by agreement: text keep <= 0.3 -> 0.90 at (0.5, 1.0)
    (Target("text_keep", 0.3), "agreement", (0.5, 1.0)),
    # accuracy within 0.05 of 0.90: >= 0.85 -> the fewest bytes is 700 (0.86)
    (Target("quality_drop", 0.05), "accuracy", (0.5, 0.0)),
    (Target("quality_drop", 0.0), "accuracy", (1.0, 0.0)),
    (Target("quality_drop", 1.0), "accuracy", (0.2, 1.0)),
    # agreement within 0.06 of 1.0: >= 0.94 -> 800
    (Target("quality_drop", 0.06), "agreement", (0.5, -3.0)),
])
def test_select_picks_the_setting_that_meets_the_target(target, metric, expected):
    chosen = select(ROWS, KEEP_ALL, target, metric)
    assert (chosen.vision_keep_rate, chosen.threshold) == expected
    if target.kind == "kv_bytes":
        assert chosen.kv_bytes <= target.value
    if target.kind == "text_keep":
        assert chosen.text_keep <= target.value


@pytest.mark.parametrize("target, message", [
    (Target("kv_bytes", 449), "the smallest is 450 (vision keep rate 0.2"),
    (Target("text_keep", 0.2), "the lowest is 25.0%"),
])
def test_an_unreachable_target_names_the_nearest_setting(target, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(".", r"\.")):
        select(ROWS, KEEP_ALL, target, "accuracy")


def test_an_unreachable_quality_drop():
    rows = [r for r in ROWS if r is not KEEP_ALL and r.accuracy < 0.9]
    with pytest.raises(InputError, match="within 0.01 of keep-all's accuracy"):
        select(rows, KEEP_ALL, Target("quality_drop", 0.01), "accuracy")


@pytest.mark.parametrize("kwargs, message", [
    ({"kv_bytes": 100, "text_keep": 0.5}, "give one target, not --target-kv-bytes and --target-text-keep"),
    ({"kv_bytes": 0}, "--target-kv-bytes must be > 0"),
    ({"kv_bytes": float("nan")}, "--target-kv-bytes must be a number"),
    ({"text_keep": 0}, r"--target-text-keep must be a share of generated tokens in \(0, 1\]"),
    ({"text_keep": 1.5}, "--target-text-keep must be"),
    ({"quality_drop": -0.1}, r"--max-quality-drop must be in \[0, 1\]"),
    ({"quality_drop": 2}, "--max-quality-drop must be"),
])
def test_bad_targets_are_clear_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        parse_target(**kwargs)


def test_no_target_is_none_and_a_good_one_parses():
    assert parse_target() is None
    assert parse_target(text_keep=0.5) == Target("text_keep", 0.5)


def test_quality_metric_follows_the_data():
    no_answers = [_row(1.0, 0.0, 10, 1.0, 1.0)]
    assert quality_metric(ROWS) == "accuracy" and quality_metric(no_answers) == "agreement"
    with pytest.raises(InputError, match="needs calibration data with answers"):
        quality_metric(no_answers, "accuracy")
    with pytest.raises(InputError, match="unknown quality metric"):
        quality_metric(ROWS, "bleu")


@pytest.mark.parametrize("share, kept", [(1.0, 6), (0.5, 3), (0.34, 2), (0.0, 0)])
def test_threshold_for_share_keeps_that_share(share, kept):
    margins = np.array([0.3, -1.2, 2.5, 0.0, -0.4, 1.1])
    t = threshold_for_share(margins, share)
    assert int((margins > t).sum()) == kept
    assert t not in margins  # strictly between margins: a tie cannot decide
