"""Property-based tests: random and mutated IDX headers, truncated gzip streams and damaged
checkpoints reach the loaders; the only failure allowed is the project's own clear error."""

from __future__ import annotations

import gzip
import io
import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.data import parse_idx, read_idx
from shared.errors import CheckpointError, DataError
from shared.spec import ARCHS, init_params
from tests.conftest import idx_bytes

# FUZZ_EXAMPLES=5000 for a longer hunt; CI runs the default.
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
VALID = idx_bytes(np.arange(3 * 5 * 4, dtype=np.uint8).reshape(3, 5, 4))


def one_line(error: Exception) -> bool:
    return "\n" not in str(error) and len(str(error)) > 10


@FUZZ
@given(st.binary(max_size=64))
def test_random_bytes_parse_or_fail_cleanly(raw):
    try:
        array = parse_idx(raw, "fuzz.idx")
    except DataError as e:
        assert one_line(e)
    else:
        assert array.dtype == np.uint8 and array.size == len(raw) - 4 - 4 * array.ndim


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
    st.integers(0, len(VALID)),
)
def test_mutated_headers_and_lengths_parse_or_fail_cleanly(edits, cut):
    raw = bytearray(VALID[:cut])
    for position, value in edits:
        if position < len(raw):
            raw[position] = value
    try:
        array = parse_idx(bytes(raw), "fuzz.idx")
    except DataError as e:
        assert one_line(e)
    else:
        assert array.size == len(raw) - 4 - 4 * array.ndim


@FUZZ
@given(st.integers(0, 200), st.binary(max_size=8))
def test_truncated_or_damaged_gzip_fails_cleanly(tmp_path, cut, garbage):
    stream = gzip.compress(idx_bytes(np.zeros((40, 28, 28), np.uint8)))
    path = tmp_path / "x.gz"
    path.write_bytes(stream[: min(cut, len(stream) - 1)] + garbage)
    try:
        read_idx(path)
    except DataError as e:
        assert one_line(e) and str(path) in str(e)


def checkpoint_bytes() -> bytes:
    buffer = io.BytesIO()
    params = init_params(ARCHS["noconv"], "he", 0)
    np.savez(buffer, **params, meta=np.array('{"arch": "noconv", "epoch": 1}'))
    return buffer.getvalue()


CHECKPOINT = checkpoint_bytes()


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, len(CHECKPOINT) - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    st.integers(1, len(CHECKPOINT)),
)
def test_damaged_checkpoints_fail_cleanly(tmp_path, edits, cut):
    raw = bytearray(CHECKPOINT[:cut])
    for position, value in edits:
        if position < len(raw):
            raw[position] = value
    path = tmp_path / "c.npz"
    path.write_bytes(bytes(raw))
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        assert one_line(e) and str(path) in str(e)
    else:
        assert set(ckpt.params) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_a_saved_checkpoint_survives_the_loader(tmp_path):
    save_checkpoint(tmp_path / "c.npz", init_params(ARCHS["lab"], "he", 0), {"arch": "lab"})
    assert load_checkpoint(tmp_path / "c.npz").meta == {"arch": "lab"}
