"""The journal's check of a batch's records (`format.check_records`), the journaller's per-record
Python, against the slow walk that explains what is wrong (`_explain_bad_run`): the fast loop must
accept exactly the runs the reference accepts, with the same last index and term."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from sequencer.journal import JournalError
from sequencer.journal.format import _explain_bad_run, check_records
from sequencer.record import RECORD_KEY, RecordType, encode_command, encode_record

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
