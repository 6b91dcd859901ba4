"""avmt.data.manifest: every record checked once against the schema, with the line and field named."""

from __future__ import annotations

import json

import pytest

from avmt.data.manifest import load_manifest


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not valid JSON"),
        ('["a list"]', "line 2: expected a JSON object, got list"),
        ('{"path": "v.mp4"}', "line 2: field 'label' is missing"),
        ('{"path": "v.mp4", "label": "x", "label_index": 0, "start": 0, "end": 4, "duration": 4}', "line 2: field 'fps' is missing"),
        ("GOOD|modalities=audio", "line 2: field 'modalities'='audio': expected a non-empty list"),
        ("GOOD|fps=0", "line 2: fields duration=.*fps=0.*expected numbers > 0"),
        ("GOOD|duration=nan", "line 2: field 'duration'=nan: expected a number > 0"),
        ("GOOD|end=-1", "line 2: fields .*end=-1.*0 <= start < end"),
        ("GOOD", "line 2: .*v.mp4 is listed again .first on line 1"),
    ],
)
def test_manifest_records_are_checked_once_with_the_line_and_field(tmp_path, line, message):
    good = {"path": "v.mp4", "audio": "a.flac", "label": "x", "label_index": 0, "start": 0.0, "end": 4.0}
    good |= {"duration": 4.0, "fps": 25.0, "sample_rate": 16000}
    if line.startswith("GOOD"):
        rec = dict(good)
        for kv in line.split("|")[1:]:
            k, v = kv.split("=")
            rec[k] = v if k == "modalities" else float(v)
        line = json.dumps(rec)
    (tmp_path / "manifest.jsonl").write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text(json.dumps(good) + "\n")
    (rec,) = load_manifest(tmp_path / "manifest.jsonl")
    assert rec["path"] == str(tmp_path.resolve() / "v.mp4")  # relative paths: relative to the manifest


def test_records_need_the_fields_of_their_modalities_only(tmp_path):
    base = {"path": "a.wav", "label": "x", "label_index": 0, "start": 0.0, "end": 5.0, "duration": 5.0}
    audio_only = base | {"modalities": ["audio"], "audio": "a.flac", "sample_rate": 16000}  # no fps, no video fields
    video_only = base | {"path": "v.avi", "modalities": ["video"], "audio": None, "fps": 25.0}  # no FLAC
    (tmp_path / "manifest.jsonl").write_text(json.dumps(audio_only) + "\n" + json.dumps(video_only) + "\n")
    a, v = load_manifest(tmp_path)
    assert a["audio"] == str(tmp_path.resolve() / "a.flac") and v["audio"] is None
    (tmp_path / "manifest.jsonl").write_text(json.dumps(base | {"modalities": ["audio"]}) + "\n")
    with pytest.raises(ValueError, match="line 1: field 'audio' is missing"):
        load_manifest(tmp_path)
