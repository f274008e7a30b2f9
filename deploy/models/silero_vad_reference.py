"""Upstream silero VAD's speech probabilities and speech timestamps for a WAV file, as the fixture
the Rust speech gate is checked against (daemon/tests/vad.rs).

Runs the wheel's own code (silero_vad.utils_vad: `OnnxWrapper`, which keeps the 64-sample
context and the recurrent state between windows, and `get_speech_timestamps` with its defaults)
with onnxruntime on `silero_vad_op18_ifless.onnx`, the model the daemon runs in tract.

    bash deploy/models/fetch_silero_vad.sh       # the model, and the wheel unpacked beside it
    ~/.cache/outpost/venv/bin/python deploy/models/silero_vad_reference.py \
        --out daemon/tests/fixtures/silero-vad/speech_probs.json

Needs torch, numpy and onnxruntime (all in deploy/models/requirements.txt).
"""

import argparse
import hashlib
import json
import os
import sys
import wave

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VERSION = "6.2.3"


def main():
    cache = os.path.expanduser("~/.cache/outpost/silero-vad")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(cache, "silero_vad_op18_ifless.onnx"))
    parser.add_argument("--upstream", default=os.path.join(cache, f"silero-vad-{VERSION}"),
                        help="the unpacked silero-vad wheel (fetch_silero_vad.sh leaves it beside the model)")
    parser.add_argument("--wav", default=os.path.join(ROOT, "daemon/media/speech.wav"))
    parser.add_argument("--windows", type=int, default=0, help="keep the first N probabilities (0: all)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    sys.path.insert(0, args.upstream)
    import torch
    from silero_vad.utils_vad import OnnxWrapper, get_speech_timestamps

    with wave.open(args.wav) as w:
        if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, 16000):
            sys.exit(f"{args.wav}: expected 16 kHz mono 16-bit")
        samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    # As torchaudio reads 16-bit PCM: s / 32768.
    audio = torch.from_numpy(samples.astype(np.float32) / 32768.0)

    model = OnnxWrapper(args.model, force_onnx_cpu=True)
    # get_speech_timestamps' own loop: 512-sample windows from a fresh state, the last one padded
    # with zeros.
    model.reset_states()
    probs = []
    for start in range(0, len(audio), 512):
        window = audio[start:start + 512]
        if len(window) < 512:
            window = torch.nn.functional.pad(window, (0, 512 - len(window)))
        probs.append(float(model(window, 16000).item()))
    speeches = get_speech_timestamps(audio, model, sampling_rate=16000)
    if args.windows:
        probs = probs[:args.windows]

    with open(args.model, "rb") as f:
        model_sha256 = hashlib.sha256(f.read()).hexdigest()
    import onnxruntime
    result = {
        "source": "deploy/models/silero_vad_reference.py",
        "silero_vad": VERSION,
        "onnxruntime": onnxruntime.__version__,
        "model": os.path.basename(args.model),
        "model_sha256": model_sha256,
        "wav": os.path.relpath(args.wav, ROOT),
        "sample_rate": 16000,
        "window": 512,
        "context": 64,
        "samples": len(samples),
        "probabilities": [round(p, 7) for p in probs],
        "speech_timestamps_defaults": {
            "threshold": 0.5, "min_speech_duration_ms": 250, "min_silence_duration_ms": 100,
            "speech_pad_ms": 30, "max_speech_duration_s": None,
        },
        "speech_timestamps": [{"start": int(s["start"]), "end": int(s["end"])} for s in speeches],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"{args.out}: {len(probs)} probabilities, speech {result['speech_timestamps']}", file=sys.stderr)


if __name__ == "__main__":
    main()
