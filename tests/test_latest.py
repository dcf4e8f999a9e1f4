"""The latest readings in memory (edge_agent.store.latest) and the lazy DeviceRead they take."""

from __future__ import annotations

from drivers.base import BAD, GOOD, Batch, DeviceRead, Reading
from edge_agent.store.latest import Latest

NAMES = ("a", "b", "c")


def read(values: tuple[float, ...], ts: float, quality: str = GOOD) -> DeviceRead:
    return DeviceRead(NAMES, values, quality, ts)


def test_device_read_is_a_sequence_of_readings_made_once_and_only_when_asked() -> None:
    r = read((1.0, 2.0, 3.0), 10.0)
    assert r._readings is None and len(r) == 3 and r  # columns only until someone asks
    expected = [Reading("a", 1.0, GOOD, 10.0), Reading("b", 2.0, GOOD, 10.0), Reading("c", 3.0, GOOD, 10.0)]
    assert list(r) == expected and r == expected and expected == r and r == read((1.0, 2.0, 3.0), 10.0)
    assert r.readings is r.readings  # made once
    assert r[1] == expected[1] and r[-1].value == 3.0 and r[1:] == expected[1:] and isinstance(r[1:], list)
    assert r != read((1.0, 2.0, 4.0), 10.0) and r != expected[:2]
    assert Reading("b", 2.0, GOOD, 10.0) in r and r.index(expected[2]) == 2


def test_batch_iterates_its_reads_in_order_and_counts_them() -> None:
    batch = Batch()
    first, second = read((1.0, 2.0, 3.0), 10.0), [Reading("x", 5, BAD, 11.0)]
    batch.add(first)
    batch.add(second)
    assert len(batch) == 4 and batch.reads == [first, second]
    assert list(batch) == [*first, *second] and batch == [*first, *second] and batch[3] == second[0]
    assert first._readings is not None  # iterating made them
    assert not Batch() and Batch() == []


def test_latest_folds_device_reads_in_only_when_looked_up() -> None:
    latest = Latest()
    reads = [read((float(i), float(i), float(i)), float(i)) for i in range(5)]
    for r in reads:
        latest.take(r)
    assert all(r._readings is None for r in reads)  # nothing made while reads come in
    assert latest["a"] == Reading("a", 4.0, GOOD, 4.0) and latest.get("c") == Reading("c", 4.0, GOOD, 4.0)
    assert [r._readings is not None for r in reads] == [False, False, False, False, True]  # the newest only
    assert len(latest) == 3 and set(latest) == set(NAMES) and "b" in latest and latest.get("z") is None


def test_latest_keeps_the_order_of_arrival_between_reads_and_plain_readings() -> None:
    latest = Latest()
    latest.take(read((1.0, 1.0, 1.0), 1.0))
    latest.take([Reading("b", None, BAD, 2.0)])  # marked bad after the read: bad wins
    assert latest["b"] == Reading("b", None, BAD, 2.0) and latest["a"].value == 1.0
    latest.take(read((3.0, 3.0, 3.0), 3.0))  # a good read after that: the read wins
    latest.take([Reading("model.out", 7.5, GOOD, 3.5)])
    assert latest["b"] == Reading("b", 3.0, GOOD, 3.0) and latest["model.out"].value == 7.5
    latest.take(read((4.0, 4.0, 4.0), 4.0))
    latest["c"] = Reading("c", 9.0, GOOD, 5.0)  # set after the read (the writer's restore): it wins
    assert dict(latest) == {"a": Reading("a", 4.0, GOOD, 4.0), "b": Reading("b", 4.0, GOOD, 4.0),
                            "c": Reading("c", 9.0, GOOD, 5.0), "model.out": Reading("model.out", 7.5, GOOD, 3.5)}
    del latest["model.out"]
    assert "model.out" not in latest and len(latest) == 3
