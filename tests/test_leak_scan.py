"""The leak scan's matching, on digests written the way the copy jobs write them: a scan
that never finds a leak proves nothing, so these tests plant some."""

import hashlib

import numpy as np

from dataops.tasks.anonymize.leak_scan import Workspace, partition_bits


def _d(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()[24:32]


def test_partition_bits_grow_with_the_values():
    assert partition_bits(10) == 0
    assert partition_bits(3_000_000) == 2
    assert partition_bits(10**12) == 16


def test_written_values_equal_to_any_source_value_are_counted_per_column():
    col_a, col_b = (0).to_bytes(2, "little"), (1).to_bytes(2, "little")
    with Workspace(5_000_000) as ws:  # several partitions
        assert ws.bits >= 2
        one, two = ws.collector("job1"), ws.collector("job2")
        for i in range(20_000):
            one.add_source(_d(f"source-{i}"))
        one.add_source(_d("source-7"))  # duplicates in the source are fine
        for i in range(5_000):
            two.add_output(_d(f"masked-{i}"), col_a)
        two.add_output(_d("source-7"), col_a)  # leaks: two in column 0, one in column 1
        two.add_output(_d("source-19999"), col_a)
        two.add_output(_d("source-123"), col_b)
        one.flush(final=True)
        two.flush(final=True)
        pool = np.frombuffer(_d("source-5") + _d("not-in-source") + _d("source-6"), dtype="<u8")
        leaks, pooled, seen = ws.match(3, {2: pool})
    assert leaks.tolist() == [2, 1, 0]
    assert pooled.tolist() == [0, 0, 2]
    assert seen == 20_001


def test_no_written_value_in_the_source_is_no_leak():
    with Workspace(100) as ws:
        c = ws.collector("job")
        for i in range(1_000):
            c.add_source(_d(f"s{i}"))
            c.add_output(_d(f"o{i}"), (0).to_bytes(2, "little"))
        c.flush(final=True)
        leaks, pooled, seen = ws.match(1, {0: np.frombuffer(_d("x"), dtype="<u8")})
    assert leaks.tolist() == [0] and pooled.tolist() == [0] and seen == 1_000
