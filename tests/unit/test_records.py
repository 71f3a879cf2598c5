"""The records kept between runs (records.py) stay inside the cache's tagged folder: $CONVLLAVA_EDGE_CACHE may
name any folder of the user's, and a folder under the cache's name that is not ours gets nothing."""

from __future__ import annotations


from convllava_edge import records
from convllava_edge.cache import ROOT_NAME


# -- records inside the tagged folder only -------------------------------------------------------------------
def test_native_records_stay_inside_the_caches_tagged_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVLLAVA_EDGE_CACHE", str(tmp_path))  # the sweep's CONVLLAVA_EDGE_CACHE=/ at a safe place
    (tmp_path / "mine.txt").write_text("the user's")
    records.write_record("probe-test.json", {"ok": True})
    assert sorted(p.name for p in tmp_path.iterdir()) == [ROOT_NAME, "mine.txt"]
    assert (tmp_path / ROOT_NAME / "CACHEDIR.TAG").is_file()
    assert (tmp_path / ROOT_NAME / records.RECORDS / "probe-test.json").is_file()
    assert records.read_record("probe-test.json")["ok"] is True
    theirs = tmp_path / "theirs"
    (theirs / ROOT_NAME).mkdir(parents=True)  # a folder under our name without our tag: never written into
    monkeypatch.setenv("CONVLLAVA_EDGE_CACHE", str(theirs))
    records.write_record("probe-test.json", {"ok": True})
    assert [p.name for p in theirs.iterdir()] == [ROOT_NAME] and list((theirs / ROOT_NAME).iterdir()) == []
    assert records.read_record("probe-test.json") is None


# -- claims: one background job per record ------------------------------------------------------------------
def test_a_claim_is_held_while_its_process_lives_and_taken_over_after(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    monkeypatch.setenv("CONVLLAVA_EDGE_CACHE", str(tmp_path))
    assert records.claim("job.calibrating", os.getpid())
    assert records.claim_holder("job.calibrating") == os.getpid()
    assert not records.claim("job.calibrating", 12345)  # held by a live process (this one)
    records.release("job.calibrating")
    assert records.claim_holder("job.calibrating") is None
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=30)  # a PID whose process has ended
    assert records.claim("job.calibrating", gone.pid)
    assert records.claim_holder("job.calibrating") is None
    assert records.claim("job.calibrating", os.getpid())  # taken over from the dead one
    assert records.claim_holder("job.calibrating") == os.getpid()
    records.release("job.calibrating")
