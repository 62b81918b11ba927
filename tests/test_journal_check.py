"""The journal's check of a batch's records (`format.check_records`), the journaller's per-record
Python, against the slow walk that explains what is wrong (`_explain_bad_run`): the fast loop must
accept exactly the runs the reference accepts, with the same last index and term; so must the
strided check of a run of one record size (`_check_uniform`), which takes such runs first."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

import sequencer.journal.format as format_module
from sequencer.journal import JournalError
from sequencer.journal.format import (
    UNIFORM_RUN_RECORDS_MIN,
    _check_uniform,
    _explain_bad_run,
    check_records,
)
from sequencer.record import (
    RECORD_HEADER_BYTES,
    RECORD_KEY,
    RecordType,
    encode_command,
    encode_record,
)

# (offset in the record, struct format) of each field a mutation may change
_FIELDS = {"length": (0, "<I"), "type": (4, "<H"), "index": (8, "<Q"), "term": (16, "<Q")}


def _run(terms: list[int], sizes: list[int], first_index: int) -> bytearray:
    run = bytearray()
    for number, (term, size) in enumerate(zip(terms, sizes, strict=True)):
        index = first_index + number
        run += encode_record(RecordType.COMMAND, 1, index, term, index, 1, index,
                             encode_command(index, b"x" * size))  # fmt: skip
    return run


def _outcome(check, run: memoryview, first_index: int, term_before: int) -> object:
    try:
        return check(run, first_index, term_before)
    except JournalError as error:
        return ("refused", str(error))


@settings(max_examples=400, deadline=None)
@given(
    terms=st.lists(st.integers(1, 4), min_size=0, max_size=12).map(sorted),
    data=st.data(),
    first_index=st.integers(1, 1 << 40),
    term_before=st.integers(0, 3),
)
def test_fast_record_check_accepts_exactly_what_the_slow_walk_accepts(terms, data, first_index, term_before):
    sizes = data.draw(st.lists(st.integers(0, 40), min_size=len(terms), max_size=len(terms)))
    run = _run(terms, sizes, first_index)
    mutation = data.draw(st.sampled_from(["none", "field", "cut", "extend", "padding"]))
    if run and mutation == "field":
        starts = [0]
        while starts[-1] < len(run):
            (length,) = struct.unpack_from("<I", run, starts[-1])
            starts.append(starts[-1] + ((length + 7) & -8))
        start = data.draw(st.sampled_from(starts[:-1]))
        offset, layout = _FIELDS[data.draw(st.sampled_from(sorted(_FIELDS)))]
        value = data.draw(st.integers(0, (1 << (8 * struct.calcsize(layout))) - 1))
        struct.pack_into(layout, run, start + offset, value)
    elif run and mutation == "cut":
        del run[data.draw(st.integers(1, len(run))) * -1 :]
    elif mutation == "extend":
        run += bytes(data.draw(st.integers(1, 60)))
    elif run and mutation == "padding":
        struct.pack_into("<H", run, 4, int(RecordType.PADDING))
    view = memoryview(bytes(run))
    assert _outcome(check_records, view, first_index, term_before) == _outcome(
        _explain_bad_run, view, first_index, term_before
    )


def test_fast_record_check_returns_the_last_index_and_term_of_a_good_run():
    run = memoryview(bytes(_run([1, 1, 2, 5], [0, 3, 17, 40], 7)))
    assert check_records(run, 7, 1) == (10, 5)
    assert check_records(memoryview(b""), 7, 3) == (6, 3)
    assert RECORD_KEY.unpack_from(run, 0)[2] == 7


# A run of records that all take one aligned size (80 bytes: payloads of 17 to 24 bytes), long
# enough for `_check_uniform`, with its lengths equal or differing within the alignment.
_UNIFORM_SIZES = st.integers(17, 24)
_RECORD_BYTES = 80


def _near(value: int) -> st.SearchStrategy[int]:
    return st.sampled_from([max(value - 1, 0), value + 1, max(value - 8, 0), value + 8, 0])


@settings(max_examples=500, deadline=None)
@given(
    count=st.integers(UNIFORM_RUN_RECORDS_MIN, 3 * UNIFORM_RUN_RECORDS_MIN),
    data=st.data(),
    first_index=st.integers(1, 1 << 40),
    term_before=st.integers(0, 3),
)
def test_strided_check_of_a_uniform_run_accepts_exactly_what_the_slow_walk_accepts(count, data, first_index, term_before):
    terms = sorted(data.draw(st.lists(st.integers(1, 3), min_size=count, max_size=count)))
    same = data.draw(st.booleans())
    sizes = [data.draw(_UNIFORM_SIZES)] * count if same else data.draw(st.lists(_UNIFORM_SIZES, min_size=count, max_size=count))
    run = _run(terms, sizes, first_index)
    assert len(run) == count * _RECORD_BYTES
    start = data.draw(st.integers(0, count - 1)) * _RECORD_BYTES
    mutation = data.draw(st.sampled_from(["none", "field", "near", "length", "padding", "every_length"]))
    if mutation in ("field", "near"):
        offset, layout = _FIELDS[data.draw(st.sampled_from(sorted(_FIELDS)))]
        (value,) = struct.unpack_from(layout, run, start + offset)
        bound = (1 << (8 * struct.calcsize(layout))) - 1
        value = data.draw(st.integers(0, bound) if mutation == "field" else _near(value))
        struct.pack_into(layout, run, start + offset, min(value, bound))
    elif mutation == "length":  # at and around the bounds of the alignment and of the header
        struct.pack_into("<I", run, start, data.draw(st.sampled_from([47, 48, 71, 72, 73, 79, 80, 81, 88])))
    elif mutation == "padding":
        struct.pack_into("<H", run, start + 4, int(RecordType.PADDING))
    elif mutation == "every_length":  # all at once: the first record's too
        length = data.draw(st.sampled_from([41, 47, 48, 71, 72, 73, 79, 80, 81]))
        for at in range(0, len(run), _RECORD_BYTES):
            struct.pack_into("<I", run, at, length)
    view = memoryview(bytes(run))
    assert _outcome(check_records, view, first_index, term_before) == _outcome(
        _explain_bad_run, view, first_index, term_before
    )


def test_strided_check_takes_uniform_runs_and_leaves_the_others_to_the_loop():
    count = UNIFORM_RUN_RECORDS_MIN
    same = memoryview(bytes(_run([1] * count, [20] * count, 5)))
    within = memoryview(bytes(_run([1] * (count - 1) + [2], [17 + n % 8 for n in range(count)], 5)))
    assert _check_uniform(same, 5, 1) == check_records(same, 5, 1) == (4 + count, 1)
    assert _check_uniform(within, 5, 0) == check_records(within, 5, 0) == (4 + count, 2)
    two_sizes = memoryview(bytes(_run([1] * count, [20, 28] * (count // 2), 5)))
    short = memoryview(bytes(_run([1] * (count - 1), [20] * (count - 1), 5)))
    assert _check_uniform(two_sizes, 5, 1) is None
    assert _check_uniform(short, 5, 1) is None
    assert check_records(two_sizes, 5, 1) == (4 + count, 1)


def test_strided_check_refuses_a_length_below_the_header_in_a_run_of_header_only_records():
    # 48-byte records (no payload): a length of 41 to 47 aligns to 48 too, but is no record.
    count = UNIFORM_RUN_RECORDS_MIN
    run = bytearray()
    for index in range(5, 5 + count):
        run += encode_record(RecordType.COMMAND, 1, index, 1, index, 1, index, b"")
    assert len(run) == count * 48
    assert check_records(memoryview(bytes(run)), 5, 1) == (4 + count, 1)
    struct.pack_into("<I", run, 48 * (count // 2), 47)
    view = memoryview(bytes(run))
    assert _outcome(check_records, view, 5, 1) == _outcome(_explain_bad_run, view, 5, 1)
    assert _outcome(check_records, view, 5, 1)[0] == "refused"
    # Every record's length the same under the header (the review's case: the first record's
    # length, aligned, is a header's, and every length equals it).
    for length in range(41, 48):
        for start in range(0, len(run), 48):
            struct.pack_into("<I", run, start, length)
        view = memoryview(bytes(run))
        assert _outcome(check_records, view, 5, 1)[0] == "refused", length


def test_strided_check_of_lengths_differing_within_the_alignment_at_every_kind_of_size():
    # The lengths' one translate (`_length_spread`) holds where the spread of a size's lengths
    # shares its upper bytes with the size and none of them lies in it (104, 1040); elsewhere
    # (256: the spread crosses a byte; 264 and 520: an upper byte lies in it) the lengths are
    # compared as a list. Either way: every good run taken, every length out of the spread refused.
    count = UNIFORM_RUN_RECORDS_MIN
    for size in (104, 256, 264, 520, 1040):
        payloads = [size - 56 - 7 + n % 8 for n in range(count)]  # a COMMAND: 56 bytes before its payload
        run = _run([1] * count, payloads, 5)
        assert len(run) == count * size, (size, len(run))
        view = memoryview(bytes(run))
        assert _check_uniform(view, 5, 1) == (4 + count, 1), size
        for length in (size - 8, size - 7, size, size + 1, size + 8, size + 256, size + (1 << 16), 47):
            for start in (0, size * (count // 2), size * (count - 1)):
                bad = bytearray(run)
                struct.pack_into("<I", bad, start, length)
                bad_view = memoryview(bytes(bad))
                outcome = _outcome(check_records, bad_view, 5, 1)
                assert outcome == _outcome(_explain_bad_run, bad_view, 5, 1), (size, length, start)
                if not size - 7 <= length <= size:
                    assert outcome[0] == "refused", (size, length, start)


def _lengths_near(size: int) -> set[int]:
    """Every length a record of `size` is near: each byte of size's moved by -2..+2, size moved
    by multiples of 256, 65,536 and 2**24, and everything from 0 to 600."""
    near = set(range(601))
    for shift in (0, 8, 16, 24):
        for delta in range(-2, 3):
            near.add(size + (delta << shift))
    for step in (256, 1 << 16, 1 << 24):
        for k in range(-3, 4):
            for low in range(-9, 2):
                near.add(size + k * step + low)
    return {length for length in near if 0 <= length < 1 << 32}


def test_the_length_translation_accepts_exactly_the_lengths_of_one_aligned_size():
    """`_length_spread`'s rule, directly: a u32 length translated equals size's four bytes iff the
    length lies in [max(size - 7, 48), size], wherever size's upper bytes fall (sizes whose upper
    byte equals the low byte, 2,056 = 08 08 and 524,296 = 08 00 08 00, are where a check of too few
    bytes would pass a length of another size); an unusable size gives no table."""
    sizes = [*range(48, 4104, 8), 2056, 65544, 524296, 16843016, 0x08080808, 1 << 20, (1 << 24) + 48]
    sizes += [k * 256 + delta for k in (1, 2, 4, 255, 256, 257, 65535, 65536) for delta in (0, 8, 16, 248)]
    usable = 0
    for size in sorted(set(sizes)):
        table, size_bytes = format_module._length_spread(size)
        if not table:
            continue
        usable += 1
        low = max(size - 7, RECORD_HEADER_BYTES)
        for length in _lengths_near(size):
            translated = length.to_bytes(4, "little").translate(table) == size_bytes
            assert translated == (low <= length <= size), (size, length)
    assert usable > 400, usable  # most sizes take the translation (489 of these)
