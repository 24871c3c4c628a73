"""Trace mode selection and the recorder's file protocol (upstream §7)."""

import json

from tcmu_obd.config import load_image_config
from tcmu_obd.format.trace import TraceRecord, parse_trace
from tcmu_obd.image.source import BytesSource
from tcmu_obd.scheduler import TraceRecorder, replay_trace, trace_mode
from tcmu_obd.scheduler.prefetch import RecordingSource


def _cfg(tmp_path, **extra):
    p = tmp_path / "config.v1.json"
    p.write_text(json.dumps({"lowers": [{"file": "a"}, {"dir": str(tmp_path / "accel")}], **extra}))
    return load_image_config(p)


def test_trace_mode_follows_upstream(tmp_path):
    assert trace_mode(_cfg(tmp_path)) == (None, None)
    t = tmp_path / "trace"
    assert trace_mode(_cfg(tmp_path, recordTracePath=str(t))) == (None, None)  # missing → off
    t.write_bytes(b"")
    assert trace_mode(_cfg(tmp_path, recordTracePath=str(t))) == ("record", str(t))
    t.write_bytes(b"x")
    assert trace_mode(_cfg(tmp_path, recordTracePath=str(t))) == ("replay", str(t))
    (tmp_path / "accel").mkdir()
    assert trace_mode(_cfg(tmp_path, accelerationLayer=True)) == (None, None)
    (tmp_path / "accel" / "trace").write_bytes(b"x")
    assert trace_mode(_cfg(tmp_path, accelerationLayer=True)) == ("replay", str(tmp_path / "accel" / "trace"))


async def test_record_then_replay(tmp_path):
    path = str(tmp_path / "trace")
    rec = TraceRecorder(path)
    assert (tmp_path / "trace.lock").exists()
    layers = [RecordingSource(BytesSource(bytes(range(256)) * 64, f"l{i}"), i, rec) for i in range(2)]
    await layers[0].read_into(100, memoryview(bytearray(10)))
    await layers[1].read_into(4000, memoryview(bytearray(96)))
    rec.stop()
    assert not (tmp_path / "trace.lock").exists() and (tmp_path / "trace.ok").exists()
    records = parse_trace((tmp_path / "trace").read_bytes())
    assert records == [TraceRecord("R", 0, 10, 100), TraceRecord("R", 1, 96, 4000)]
    st = await replay_trace(records, [BytesSource(b"\0" * 16384), BytesSource(b"\0" * 4096)], 2)
    assert (st.records, st.bytes, st.failed, st.skipped) == (2, 106, 0, 0)
