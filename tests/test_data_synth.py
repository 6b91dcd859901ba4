"""The synthetic dataset: seeded, and its sound events coincide with visible bounces/flashes."""

import numpy as np

from avmt.data.synth import SynthSpec, class_color, class_sound, render


def test_render_is_seeded_and_events_are_audio_visual():
    spec = SynthSpec(seconds=6.0, size=48, fps=10, sample_rate=8000, num_classes=4, format="mp4", seed=3)
    frames, audio, meta = render(2, 1, spec)
    frames2, audio2, _ = render(2, 1, spec)
    assert np.array_equal(frames, frames2) and np.array_equal(audio, audio2)
    assert not np.array_equal(render(3, 1, spec)[1], audio)
    assert frames.shape == (60, 48, 48, 3) and frames.dtype == np.uint8 and audio.shape == (48000,)
    assert meta["events"], "the target never bounced"
    white = (frames == 255).all(axis=-1).sum(axis=(1, 2))  # the flashing target is the only pure-white object
    ev_frames = [round(t * spec.fps) for t in meta["events"]]
    assert all(white[f] > 0 for f in ev_frames)
    flashing = np.zeros(len(frames), bool)
    for f in ev_frames:
        flashing[f : f + 2] = True
    assert (white[~flashing] == 0).all()
    # Right after an event the audio is loud and its spectral peak sits on a harmonic of the class pitch.
    sr, pitch = spec.sample_rate, class_sound(1, spec.num_classes)[0]
    on_pitch = []
    for t in meta["events"]:
        seg = audio[int(t * sr) : int(t * sr) + 800]
        if len(seg) < 800:
            continue
        assert np.sqrt(np.mean(seg**2)) > 0.05
        spectrum = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
        peak = np.fft.rfftfreq(len(seg), 1 / sr)[np.argmax(spectrum)]
        on_pitch.append(min(abs(peak - h * pitch) for h in range(1, 5)) < 25)
    assert on_pitch and np.mean(on_pitch) >= 0.75  # a distractor beep may overlap an event now and then


def test_every_class_has_its_own_pitch():
    for classes in (2, 8, 12, 48):
        pitches = [class_sound(c, classes)[0] for c in range(classes)]
        assert len(set(pitches)) == classes and min(pitches) == 220.0 and max(pitches) < 220.0 * 16


def test_only_the_target_carries_the_class_colour():
    colours = np.stack([class_color(c, 12) for c in range(12)])
    gaps = np.linalg.norm(colours[:, None] - colours[None], axis=-1) + np.eye(12) * 1e9
    assert gaps.min() > 40  # distinct hues, whatever the class count
    spec = SynthSpec(seconds=2.0, size=48, fps=10, sample_rate=8000, num_classes=6, format="mp4", seed=0)
    for label in range(6):
        frames, _, _ = render(label, label, spec)
        f = frames.astype(np.float32)
        saturated = f.max(-1) - f.min(-1) > 60  # the grey distractor and the flickering background never are
        assert saturated.any()
        assert np.abs(f[saturated] - class_color(label, 6)).max() < 1.0


def test_cli_writes_containers_and_a_labelled_manifest(tmp_path):
    import csv

    import av

    from avmt.data.synth import main

    out = tmp_path / "synth"
    # 44.1 kHz is not an Opus rate: the webm writer resamples to 48 kHz.
    main(
        [
            "--out",
            str(out),
            "--count",
            "3",
            "--classes",
            "2",
            "--seconds",
            "2",
            "--size",
            "32",
            "--fps",
            "8",
            "--sample-rate",
            "44100",
            "--format",
            "webm",
            "--workers",
            "2",
        ]
    )
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert [r["label"] for r in rows] == ["class00_disk", "class01_square", "class00_disk"]
    for r in rows:
        with av.open(str(out / r["path"])) as c:
            v, a = c.streams.video[0], c.streams.audio[0]
            assert (v.codec_context.name, a.codec_context.name, a.codec_context.sample_rate) == ("vp9", "opus", 48000)
            assert (v.codec_context.width, v.codec_context.height) == (32, 32)
            assert sum(1 for _ in c.decode(video=0)) == 16
