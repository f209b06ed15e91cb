"""Every weight file MuseTalk Live knows about, in one table: `build_registry()`.

Where each file comes from (a model-hub repo and file name, the mediapipe wheel on the
package index, or Google Drive), where it goes inside the models folder, whether it is
required, its size and sha256 where they are published, what the user loses without an
optional one, and whether `models.load_models` reads it. `musetalk.weights` checks and
fetches these files; `models.check_weights` checks the ones the models load.
"""

from __future__ import annotations

from dataclasses import dataclass

from musetalk import face_models

SOURCES = ("hub", "wheel", "gdrive")
PIPER_DIR = "piper"  # inside the models folder: the download_dir to give PiperTTSService
PIPER_VOICE = "en_US-lessac-medium"  # its voice (settings voice / voice_id)


@dataclass(frozen=True)
class WeightFile:
    """One weight file: where it comes from, where it goes, and how to recognise a good copy."""

    target: str  # path inside the models folder
    part: str  # what it is, for people
    source: str  # hub | wheel (mediapipe wheel via musetalk.face_models) | gdrive
    required: bool = True
    repo: str | None = None  # hub repo id
    filename: str | None = None  # file name inside the hub repo
    revision: str = "main"
    gdrive_id: str | None = None
    size: int | None = None  # bytes, where published
    sha256: str | None = None  # where published
    alternates: tuple[str, ...] = ()  # other accepted files in the same folder (e.g. .bin for .safetensors)
    approx: str = ""  # rough size for people, before anything is fetched
    without: str = ""  # what the user loses without it (optional files)
    loaded: bool = True  # `models.load_models` reads it (False: DWPose at preparation, Piper by the TTS)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown weight source {self.source!r}")
        if self.source == "hub" and not (self.repo and self.filename):
            raise ValueError(f"{self.target}: a hub file needs repo and filename")
        if self.source == "gdrive" and not self.gdrive_id:
            raise ValueError(f"{self.target}: a Google Drive file needs gdrive_id")

    @property
    def origin(self) -> str:
        if self.source == "hub":
            return f"{self.repo}/{self.filename}"
        if self.source == "wheel":
            return "mediapipe 0.10.21 wheel (package index)"
        return f"Google Drive {self.gdrive_id}"


def build_registry() -> tuple[WeightFile, ...]:
    """Every weight file MuseTalk Live knows about, required ones first."""
    face = face_models.MODELS  # sizes and hashes from the module that extracts them (one source of truth)
    files = [
        WeightFile("musetalkV15/musetalk.json", "MuseTalk v1.5 UNet config", "hub",
                   repo="TMElyralab/MuseTalk", filename="musetalkV15/musetalk.json", approx="1 KB"),
        WeightFile("musetalkV15/unet.pth", "MuseTalk v1.5 UNet", "hub",
                   repo="TMElyralab/MuseTalk", filename="musetalkV15/unet.pth", approx="3.4 GB"),
        WeightFile("sd-vae/config.json", "SD VAE (ft-mse) config", "hub",
                   repo="stabilityai/sd-vae-ft-mse", filename="config.json", approx="1 KB"),
        WeightFile("sd-vae/diffusion_pytorch_model.safetensors", "SD VAE (ft-mse)", "hub",
                   repo="stabilityai/sd-vae-ft-mse", filename="diffusion_pytorch_model.safetensors",
                   alternates=("diffusion_pytorch_model.bin",), approx="335 MB"),
        WeightFile("whisper/config.json", "Whisper tiny config", "hub",
                   repo="openai/whisper-tiny", filename="config.json", approx="2 KB"),
        WeightFile("whisper/preprocessor_config.json", "Whisper tiny feature extractor", "hub",
                   repo="openai/whisper-tiny", filename="preprocessor_config.json", approx="185 KB"),
        WeightFile("whisper/model.safetensors", "Whisper tiny (audio features)", "hub",
                   repo="openai/whisper-tiny", filename="model.safetensors",
                   alternates=("pytorch_model.bin",), approx="151 MB"),
    ]  # fmt: skip
    for name, (_, size, sha) in face.items():
        label = "Face detector" if "detection" in name else "Face landmarks (mesh)"
        files.append(
            WeightFile(f"face-landmarks/{name}", label, "wheel", size=size, sha256=sha, approx=f"{size >> 10} KB")
        )
    files += [
        WeightFile(
            "face-parse-bisent/79999_iter.pth", "BiSeNet face parsing", "gdrive", required=False,
            gdrive_id="154JgKpzCPW82qINcVieuPH3fZ2e0P812", approx="53 MB",
            without="the jaw and raw blend masks: avatars use the landmark-polygon mask",
        ),
        WeightFile(
            "dwpose/dw-ll_ucoco_384.onnx", "DWPose landmarks", "hub", required=False,
            repo="yzd-v/DWPose", filename="dw-ll_ucoco_384.onnx", approx="134 MB", loaded=False,
            without="MuseTalk's own landmark model: landmarks come from the built-in offline face mesh instead",
        ),
    ]  # fmt: skip
    # Piper voice: the model and its config (Piper reads `<model>.json`). models/piper is
    # PiperTTSService's download_dir and PIPER_VOICE its voice: with both files there it loads, no download.
    piper_without = "Piper voice for tts.service: piper (a local neural voice); without it use espeak"
    files += [
        WeightFile(
            f"{PIPER_DIR}/{PIPER_VOICE}.onnx", "Piper voice (en_US lessac, medium)", "hub", required=False,
            repo="rhasspy/piper-voices", filename=f"en/en_US/lessac/medium/{PIPER_VOICE}.onnx", approx="63 MB",
            without=piper_without, loaded=False,
        ),
        WeightFile(
            f"{PIPER_DIR}/{PIPER_VOICE}.onnx.json", "Piper voice config", "hub", required=False,
            repo="rhasspy/piper-voices", filename=f"en/en_US/lessac/medium/{PIPER_VOICE}.onnx.json", approx="5 KB",
            without=piper_without, loaded=False,
        ),
    ]  # fmt: skip
    return tuple(files)
