"""Command line: `python -m musetalk prepare|reprepare|render|list|delete|from-config`.

Environment: MUSETALK_MODELS_DIR (default ./models), MUSETALK_AVATARS_DIR (default
./avatars), MUSETALK_DEVICE (auto|cpu|cuda).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loguru import logger

from musetalk.config import (
    LANDMARK_CHOICES,
    PrepareSettings,
    avatars_dir_from_env,
    load_realtime_config,
    models_dir_from_env,
    runtime_from_env,
)
from musetalk.errors import MuseTalkError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m musetalk", description="MuseTalk v1.5 lip-sync avatars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="prepare an avatar from a video of a face")
    p.add_argument("video", type=Path)
    p.add_argument("--name", required=True, help="avatar name (letters, digits, _ and -)")
    p.add_argument("--bbox-shift", type=int, default=0, help="move the mouth-mask line down (+) or up (-), pixels")
    p.add_argument("--extra-margin", type=int, default=10, help="pixels added below the chin (v1.5)")
    p.add_argument("--parsing-mode", choices=["jaw", "raw", "polygon"], default="jaw")
    p.add_argument("--cheek-width", type=int, default=90)
    _add_fidelity_flags(p)

    rp = sub.add_parser(
        "reprepare", help="prepare an avatar again with the current rules, from its source video (old avatars too)"
    )
    rp.add_argument("name")
    rp.add_argument("--video", type=Path, default=None, help="the source video, when the stored one is gone")
    _add_fidelity_flags(rp)

    r = sub.add_parser("render", help="lip-sync an audio file onto an avatar -> mp4")
    r.add_argument("name")
    r.add_argument("audio", type=Path)
    r.add_argument("-o", "--output", type=Path, required=True)
    r.add_argument("--batch-size", type=int, default=None)

    ls = sub.add_parser("list", help="list prepared avatars")
    ls.add_argument("--json", action="store_true")

    d = sub.add_parser("delete", help="delete a prepared avatar")
    d.add_argument("name")

    c = sub.add_parser("from-config", help="prepare the avatars of a realtime.yaml marked preparation: True")
    c.add_argument("--config", type=Path, default=Path("configs/inference/realtime.yaml"))
    return parser


def _add_fidelity_flags(p: argparse.ArgumentParser) -> None:
    defaults = PrepareSettings()
    p.add_argument(
        "--max-side", type=int, default=defaults.max_side,
        help=f"videos whose long side is larger are scaled down to it (default {defaults.max_side}); smaller stay native",
    )  # fmt: skip
    p.add_argument(
        "--landmarks", choices=LANDMARK_CHOICES, default=defaults.landmarks,
        help="auto: DWPose (official) when models/dwpose holds its weights, else the offline face mesh",
    )  # fmt: skip


def _progress_bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="%", bar_format="{l_bar}{bar}| {n:.0f}/{total} [{elapsed}<{remaining}]")


def _load_models():
    from musetalk.config import ModelPaths
    from musetalk.models import load_models

    return load_models(ModelPaths(models_dir_from_env()), runtime_from_env())


def cmd_prepare(args: argparse.Namespace) -> int:
    from musetalk.avatar.prepare import prepare_avatar
    from musetalk.avatar.store import AvatarStore, validate_name

    validate_name(args.name)
    settings = PrepareSettings(
        bbox_shift=args.bbox_shift, extra_margin=args.extra_margin, parsing_mode=args.parsing_mode,
        cheek_width=args.cheek_width, max_side=args.max_side, landmarks=args.landmarks,
    )  # fmt: skip
    models = _load_models()
    bar = _progress_bar(100, "prepare")
    try:
        manifest = prepare_avatar(
            models, AvatarStore(avatars_dir_from_env()), args.video, args.name, settings, progress=_bar_progress(bar)
        )
    finally:
        bar.close()
    _print_prepared(manifest)
    return 0


def cmd_reprepare(args: argparse.Namespace) -> int:
    from musetalk.avatar.prepare import reprepare_avatar
    from musetalk.avatar.store import AvatarStore

    store = AvatarStore(avatars_dir_from_env())
    old = store.manifest(args.name)  # fails early, before loading models, when there is no such avatar
    models = _load_models()
    bar = _progress_bar(100, "reprepare")
    try:
        manifest = reprepare_avatar(
            models, store, args.name, video_path=args.video, progress=_bar_progress(bar),
            max_side=args.max_side, landmarks=args.landmarks,
        )  # fmt: skip
    finally:
        bar.close()
    print(f"re-prepared {args.name}: format {old.format_version} -> {manifest.format_version}")
    _print_prepared(manifest)
    return 0


def _bar_progress(bar):
    def progress(fraction: float, message: str) -> None:
        bar.set_description(message[:40])
        bar.update(100 * fraction - bar.n)

    return progress


def _print_prepared(manifest) -> None:
    from musetalk.avatar.prepare import SOURCE_LABELS

    prep = manifest.preparation
    print(f"avatar {manifest.name}: {manifest.frame_count} frames, {manifest.frame_size[0]}x{manifest.frame_size[1]}")
    rng = prep["bbox_shift_range"]
    print(f"bbox_shift range for this face: {rng[0]} .. {rng[1]} (used {prep['bbox_shift']})")
    print(f"landmarks: {SOURCE_LABELS.get(prep.get('landmark_source'), prep.get('landmark_source'))}")
    for note in manifest.notes:
        print(f"note: {note}")


def cmd_render(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from musetalk.avatar.store import AvatarStore
    from musetalk.render import render

    avatar = AvatarStore(avatars_dir_from_env()).load(args.name)
    models = _load_models()
    bar = tqdm(desc="render", unit="frame")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        result = render(models, avatar, args.audio, args.output, batch_size=args.batch_size, progress=progress)
    finally:
        bar.close()
    print(
        f"wrote {result.path} ({result.frames} frames, {result.video_seconds:.2f} s video for {result.audio_seconds:.2f} s audio)"
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from musetalk.avatar.store import AvatarStore

    store = AvatarStore(avatars_dir_from_env())
    manifests = store.list()
    if args.json:
        print(json.dumps([asdict(m) for m in manifests], indent=2))
        return 0
    damaged = store.damaged()
    for entry in damaged:
        print(f"{entry.name}\tDAMAGED: {entry.reason} (remove it: python -m musetalk delete {entry.name})")
    if not manifests and not damaged:
        print(f"no avatars in {avatars_dir_from_env()} (prepare one: python -m musetalk prepare VIDEO --name NAME)")
    for m in manifests:
        w, h = m.frame_size
        print(
            f"{m.name}\t{m.frame_count} frames\t{w}x{h}\t{m.fps} fps\tbbox_shift {m.preparation.get('bbox_shift')}"
            f"\t{m.disk_bytes / 1e6:.1f} MB\t{m.created}"
        )
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from musetalk.avatar.store import AvatarStore

    AvatarStore(avatars_dir_from_env()).delete(args.name)
    print(f"deleted avatar {args.name}")
    return 0


def cmd_from_config(args: argparse.Namespace) -> int:
    from musetalk.avatar.prepare import prepare_avatar
    from musetalk.avatar.store import AvatarStore

    entries = load_realtime_config(args.config)
    store = AvatarStore(avatars_dir_from_env())
    todo = [e for e in entries if e.preparation]
    models = _load_models() if todo else None
    for entry in entries:
        if entry.preparation:
            logger.info("Preparing {} from {}", entry.name, entry.video_path)
            prepare_avatar(models, store, entry.video_path, entry.name, PrepareSettings(bbox_shift=entry.bbox_shift))
        elif not store.exists(entry.name):
            raise MuseTalkError(f"{args.config}: avatar {entry.name} has preparation: False but is not prepared yet.")
        print(f"{entry.name}: ready")
    return 0


COMMANDS = {
    "prepare": cmd_prepare,
    "reprepare": cmd_reprepare,
    "render": cmd_render,
    "list": cmd_list,
    "delete": cmd_delete,
    "from-config": cmd_from_config,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except MuseTalkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
