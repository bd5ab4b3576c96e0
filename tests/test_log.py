"""The pure partition log: offsets, commits, trimming, bounds."""

from daskinfer.connectors.embedded.log import PartitionLog


def test_offsets_and_reads():
    log = PartitionLog(max_messages=10)
    assert log.append([b"a", b"b", b"c"]) == 0
    assert log.append([b"d"]) == 3
    assert log.read(0, 2) == (0, [b"a", b"b"])
    assert log.read(2, 10) == (2, [b"c", b"d"])
    assert log.read(4, 10) == (4, [])
    assert len(log) == 4 and log.room() == 6


def test_commit_trims_only_what_every_group_finished():
    log = PartitionLog(max_messages=5)
    log.subscribe("pipeline")
    log.subscribe("audit")
    log.append([b"%d" % i for i in range(5)])
    assert log.room() == 0
    log.commit("pipeline", 3)
    assert len(log) == 5, "audit has not read anything: nothing may be dropped"
    log.commit("audit", 2)
    assert log.start == 2 and len(log) == 3 and log.room() == 2
    assert log.read(0, 10) == (2, [b"2", b"3", b"4"]), "a read below the start begins at the oldest message held"
    # commits never go backwards nor past the end
    assert log.commit("audit", 1) == 2
    assert log.commit("audit", 99) == 5


def test_messages_are_kept_until_a_group_subscribes():
    log = PartitionLog(max_messages=3)
    log.append([b"x", b"y", b"z"])
    assert log.room() == 0
    assert log.subscribe("late") == 0, "a new group starts at the oldest message held"
    log.commit("late", 3)
    assert log.room() == 3


def test_long_run_compacts_and_stays_correct():
    log = PartitionLog(max_messages=100)
    log.subscribe("g")
    pos = 0
    for i in range(20_000):
        log.append([b"%d" % i])
        off, msgs = log.read(pos, 10)
        assert msgs == [b"%d" % i] and off == i
        pos = off + 1
        log.commit("g", pos)
    assert len(log) == 0 and log.start == 20_000
    assert log.bytes == 0, "dropped messages are released"
