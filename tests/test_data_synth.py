"""The synthetic dataset: seeded, and its sound events coincide with visible bounces/flashes."""

import numpy as np

from avmt.data.synth import SynthSpec, class_sound, render


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
    sr, pitch = spec.sample_rate, class_sound(1)[0]
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
