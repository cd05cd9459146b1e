"""Property-based tests: random and mutated IDX headers, truncated gzip streams and damaged
checkpoints reach the loaders; the only failure allowed is the project's own clear error."""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import tracemalloc
import zipfile
from datetime import timedelta
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.backend import IMPLEMENTATIONS
from shared.checkpoint import HISTORY_FIELDS, Checkpoint, load_checkpoint, save_checkpoint
from shared.config import FIELDS
from shared.errors import CheckpointError, DataError, UsageError
from shared.idx import MAX_IDX_BYTES, IdxExpect, parse_idx, read_idx
from shared.kinds import KINDS, output_shape
from shared.layers import INPUT_SHAPE as NETWORK_INPUT
from shared.spec import (
    MAX_LAYER_OUTPUT,
    MAX_PARAMETERS,
    PRESETS,
    get_arch,
    init_params,
    param_shapes,
)
from tests.conftest import idx_bytes
from tests.test_checkpoint import checkpoint_members, meta_npy, npy_header, write_zip

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


# Declared dims: anything a 32-bit field holds, often a size that matters to the loader.
DIM = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 28, 32, 10_000, 60_000, 60_001]))


@settings(FUZZ, deadline=timedelta(seconds=2))  # whatever a header claims, a quick answer
@given(
    dims=st.lists(DIM, min_size=1, max_size=4),
    extra=st.one_of(st.integers(-2, 2), st.just(4 << 20)),  # body bytes beyond those declared
    compress=st.booleans(),
    expect=st.sampled_from([None, IdxExpect("images", NETWORK_INPUT[1:], 60_000)]),
)
def test_declared_sizes_fail_fast_in_bounded_memory(tmp_path, dims, extra, compress, expect):
    declared = math.prod(dims)
    header = bytes([0, 0, 0x08, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
    raw = header + bytes(max(0, min(declared, 1 << 20) + extra))
    path = tmp_path / ("x.gz" if compress else "x.idx")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    tracemalloc.start()  # numpy reports its arrays to tracemalloc too
    try:
        array = read_idx(path, expect)
    except DataError as e:
        assert one_line(e) and str(path) in str(e)
    else:
        assert array.shape == tuple(dims) and len(raw) == len(header) + declared
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    # Never more than the declared body (itself capped), however much the file holds.
    assert peak < min(declared, MAX_IDX_BYTES) + (4 << 20)


def checkpoint_bytes() -> bytes:
    buffer = io.BytesIO()
    params = init_params(get_arch("noconv"), "he", 0)
    np.savez(buffer, **params, meta=np.array('{"arch": "noconv", "epoch": 1}'))
    return buffer.getvalue()


CHECKPOINT = checkpoint_bytes()


def load_cleanly(path: Path) -> Checkpoint | None:
    """The checkpoint at `path`, or None after a one-line CheckpointError that names it."""
    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        assert one_line(e) and str(e).startswith(f"{path}: "), str(e)
        return None


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
    ckpt = load_cleanly(path)
    if ckpt is not None:
        assert set(ckpt.params) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_an_unterminated_npy_header_fails_cleanly(tmp_path):
    # numpy tokenizes a header it cannot parse; an open bracket there raised TokenError.
    at = CHECKPOINT.index(b"), }")
    path = tmp_path / "c.npz"
    path.write_bytes(CHECKPOINT[:at] + b"), (" + CHECKPOINT[at + 4 :])
    assert load_cleanly(path) is None


def test_a_saved_checkpoint_survives_the_loader(tmp_path):
    save_checkpoint(tmp_path / "c.npz", init_params(get_arch("lab"), "he", 0), {"arch": "lab"})
    assert load_checkpoint(tmp_path / "c.npz").meta == {"arch": "lab"}


# A valid noconv checkpoint with momentum buffers, member by member, for the tests to edit.
MEMBERS = checkpoint_members()
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
HISTORY_ENTRY = st.dictionaries(st.sampled_from(HISTORY_FIELDS), st.integers() | st.floats() | JSON)
# A stored setting: any field of a run's configuration, of any JSON value, huge ints included.
CONFIG = st.dictionaries(
    st.sampled_from(sorted(FIELDS)) | st.text(max_size=8),
    st.integers() | st.integers(10**300, 10**400) | st.floats() | JSON,
    max_size=4,
)
# Each field usually of its own type, sometimes any JSON value; arch mostly there.
META_FIELDS = {
    "epoch": st.integers(-1, 3) | JSON,
    "impl": st.sampled_from(IMPLEMENTATIONS) | JSON,
    "dataset": st.just("fashion-mnist") | JSON,
    "config": CONFIG | JSON,
    "history": st.lists(HISTORY_ENTRY, max_size=3) | JSON,
    "data": st.dictionaries(st.text(max_size=8), JSON, max_size=3) | JSON,
}


# The network of MEMBERS by name and by spec, other networks, files (never read), no network.
META_ARCHS = ["noconv", "noconv", "flatten-fc128-relu-fc10", "lab", "flatten-fc64-relu-fc10"]
META_ARCHS += ["conv4-bn-relu-flatten-fc10", "noconv.json", "/etc/passwd.toml", "vgg", "", None]


@FUZZ
@given(st.fixed_dictionaries({}, optional=META_FIELDS), st.sampled_from(META_ARCHS) | JSON)
def test_random_metadata_loads_or_fails_cleanly(tmp_path, fields, arch):
    meta = fields if arch is None else {"arch": arch, **fields}
    path = write_zip(tmp_path / "c.npz", (MEMBERS | {"meta.npy": meta_npy(meta)}).items())
    ckpt = load_cleanly(path)
    if ckpt is not None:
        assert get_arch(ckpt.meta["arch"], files=False).layers == get_arch("noconv").layers
        if "history" in ckpt.meta:
            assert len(ckpt.meta["history"]) == ckpt.meta["epoch"]


MEMBER_NAMES = st.sampled_from(
    [*MEMBERS, "meta", "fc1.weight", "conv.weight.npy", "optimizer/", "velocity/meta.npy", "x.npy"]
) | st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), min_size=1)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["rename", "drop", "add", "copy"]),
            st.integers(0, 2 * len(MEMBERS)),
            MEMBER_NAMES,
            st.binary(max_size=64),
        ),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]),
)
def test_renamed_added_or_removed_members_fail_cleanly(tmp_path, edits, compression):
    entries = list(MEMBERS.items())
    for action, index, name, content in edits:
        i = index % len(entries) if entries else 0
        if action == "add" or not entries:
            entries.append((name, content))
        elif action == "rename":
            entries[i] = (name, entries[i][1])
        elif action == "drop":
            del entries[i]
        else:  # another member's content under `name` (perhaps its own: a duplicate)
            entries.append((name, entries[i][1]))
    path = write_zip(tmp_path / "c.npz", entries, compression)
    if load_cleanly(path) is not None:
        names = sorted(name for name, _ in entries)
        assert names in (sorted(MEMBERS), sorted(n for n in MEMBERS if "optimizer/" not in n))


def npy_data(raw: bytes) -> bytes:
    """What follows the header of the .npy file `raw`."""
    buffer = io.BytesIO(raw)
    np.lib.format.read_magic(buffer)
    np.lib.format.read_array_header_1_0(buffer)
    return raw[buffer.tell() :]


# What the tensors hold (often), other floats, foreign dtypes, and strings of any claimed size.
NPY_DTYPES = ("<f4", "<f4", ">f4", "<f8", "<f2", "<i8", "|O", "|b1", "<c8", "|V4", "<M8[s]")
NPY_DTYPES += ("<U8", "<U1000000", "<U2000000000")


@FUZZ
@given(
    member=st.sampled_from(list(MEMBERS)),
    descr=st.sampled_from(NPY_DTYPES),
    shape=st.sampled_from([(128, 784), (128,), (10, 128), (10,), ()])
    | st.lists(st.integers(-1, 2**64), max_size=3).map(tuple),
    fortran=st.sampled_from([False, False, False, True]),
    version=st.sampled_from([(1, 0), (2, 0)]),
    extra=st.sampled_from([0, 0, -1, 1]) | st.integers(-4096, 4096),
)
def test_npy_headers_claiming_any_size_fail_cleanly(
    tmp_path, member, descr, shape, fortran, version, extra
):
    data = npy_data(MEMBERS[member])
    data = data[: len(data) + extra] if extra < 0 else data + bytes(extra)
    content = npy_header(descr, shape, fortran, version) + data
    path = write_zip(tmp_path / "c.npz", (MEMBERS | {member: content}).items())
    ckpt = load_cleanly(path)
    if ckpt is not None:
        expected = param_shapes(get_arch("noconv"))
        assert {k: v.shape for k, v in ckpt.params.items()} == expected


# --- network specs --------------------------------------------------------------------------

SMALL = st.integers(0, 9) | st.sampled_from([14, 28, 29, 9999999])


def option(letter: str) -> st.SearchStrategy[str]:
    return st.just("") | SMALL.map(lambda n: f"{letter}{n}")


CONV = st.builds(
    lambda c, k, s, p: f"conv{c}{k}{s}{p}",
    st.integers(0, 8) | st.sampled_from([2000, 9999999]),
    option("k"),
    option("s"),
    option("p"),
)
POOL = st.builds(
    lambda op, k, s: f"{op}pool{k}{s}", st.sampled_from(["max", "avg"]), SMALL, option("s")
)
FC = (st.integers(0, 40) | st.sampled_from([10, 10, 128, 100_000, 9999999])).map(lambda n: f"fc{n}")
# Drop probabilities as a user writes them (the canonical form keeps every digit).
DROPOUT = st.sampled_from(["0", "0.3", ".5", "0.25", "0.99", "1", "1.5", "0.001"]).map(
    lambda p: f"dropout{p}"
)
PLAIN = st.sampled_from(["bn", "relu", "tanh", "sigmoid"])
GARBAGE = st.sampled_from(["", "flatten", "conv", "fc", "bn2", "Relu", "pool2", "conv8k", "fc1 0"])
SPATIAL = st.lists(CONV | POOL | PLAIN | DROPOUT, max_size=6)
FLAT = st.lists(FC | PLAIN | DROPOUT, max_size=4)


@st.composite
def specs(draw) -> str:
    """Mostly the shape of a network (spatial layers, flatten, flat layers, fc10), sometimes
    with a part missing, a layer out of place or a token that is no layer."""
    tokens = [*draw(SPATIAL), "flatten", *draw(FLAT), "fc10"]
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(tokens)))
        if draw(st.booleans()) and at < len(tokens):
            del tokens[at]
        else:
            tokens.insert(at, draw(CONV | POOL | FC | GARBAGE | st.text(max_size=4)))
    return "-".join(tokens)


@FUZZ
@given(specs() | st.text(max_size=40) | st.sampled_from(list(PRESETS)))
def test_any_spec_builds_a_bounded_network_or_fails_in_one_line(text):
    try:
        arch = get_arch(text, files=False)
    except UsageError as e:
        assert one_line(e) and str(e).startswith("--arch: "), str(e)
        return
    # The canonical spec rebuilds the very network, and is its own canonical form.
    again = get_arch(arch.spec, files=False)
    assert again.layers == arch.layers and again.spec == arch.spec
    assert arch.name == (text if text in PRESETS else arch.spec)
    assert arch.label == text if text in PRESETS else arch.label == again.label
    names = [layer.name for layer in arch.layers]
    assert len(set(names)) == len(names)
    shape = NETWORK_INPUT
    for layer in arch.layers:
        shape = output_shape(layer, shape)
        assert math.prod(shape) <= MAX_LAYER_OUTPUT
    assert shape == (10,)
    assert sum(math.prod(s) for s in param_shapes(arch).values()) <= MAX_PARAMETERS


# A spec file's entries: tokens (one layer each) or tables of any option, some of any JSON.
TABLE = st.fixed_dictionaries(
    {"type": st.sampled_from(list(KINDS))},
    optional={
        key: st.integers(-1, 30) | st.floats(0, 1) | st.booleans() | JSON
        for key in {o.name for kind in KINDS.values() for o in kind.options} | {"x"}
    },
)
TOKEN = CONV | POOL | FC | PLAIN | DROPOUT
# An entry may also hold several layers as one string ("conv4-relu"), read as those layers.
ENTRY = TOKEN | st.lists(TOKEN, min_size=2, max_size=3).map("-".join) | GARBAGE | TABLE | JSON


@FUZZ
@given(
    st.lists(ENTRY, max_size=8).map(lambda layers: {"layers": [*layers, "flatten", "fc10"]})
    | st.lists(ENTRY, max_size=8).map(lambda layers: {"layers": layers})
    | JSON,
    st.sampled_from(["json", "toml"]),
)
def test_any_spec_file_builds_a_network_or_fails_in_one_line(tmp_path, document, suffix):
    path = tmp_path / f"net.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(document))
    else:
        path.write_text(toml_text(document))
    try:
        arch = get_arch(str(path))
    except UsageError as e:
        assert one_line(e) and str(e).startswith(f"--arch {path}"), str(e)
    else:
        shape = NETWORK_INPUT
        for layer in arch.layers:
            shape = output_shape(layer, shape)
        assert shape == (10,) and get_arch(arch.spec, files=False).spec == arch.spec


def toml_text(document) -> str:
    """`document` as TOML where it can be (a table of layers), else some text TOML refuses or
    reads as no network."""
    if not isinstance(document, dict) or not isinstance(document.get("layers"), list):
        return json.dumps(document)  # mostly not TOML at all

    def value(item) -> str:
        if isinstance(item, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(v)}" for k, v in item.items()) + "}"
        if isinstance(item, list):
            return "[" + ", ".join(value(v) for v in item) + "]"
        if isinstance(item, bool):
            return str(item).lower()
        if item is None or (isinstance(item, float) and not math.isfinite(item)):
            return '"null"'
        return json.dumps(item)

    return f"layers = {value(document['layers'])}\n"
