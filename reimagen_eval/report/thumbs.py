"""Thumbnails of a report, written once per image content (named by hash) so that a reference used by 40 prompts,
or a sample shown in two models' columns, is one file; a rebuild reuses the previous site's thumbnails."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from evaluation.features import file_digest

THUMB_DIR = "thumbs"
MAX_SIDE = 256  # larger images (1024 px SR output, contact sheets) are downscaled; smaller ones copied as they are
SHEET_SIDE = 1600  # contact sheets: wide, kept readable


class Thumbs:
    """``add(path) -> "thumbs/<hash>.<ext>"`` (relative to the site) or None when the image is missing or
    unreadable; those are collected in ``missing`` (path -> reason) for the page to list."""

    def __init__(self, site: Path, previous: Optional[Path] = None):
        self.site, self.previous = site, previous
        (site / THUMB_DIR).mkdir(parents=True, exist_ok=True)
        self.by_path: dict[tuple[str, int], Optional[str]] = {}
        self.missing: dict[str, str] = {}
        self.written = self.reused = 0

    def add(self, path: str | Path | None, max_side: int = MAX_SIDE) -> Optional[str]:
        if not path:
            return None
        key = (str(path), max_side)
        if key not in self.by_path:
            self.by_path[key] = self._make(Path(path), max_side)
        return self.by_path[key]

    def _make(self, path: Path, max_side: int) -> Optional[str]:
        from PIL import Image, UnidentifiedImageError

        if not path.is_file():
            self.missing[str(path)] = "missing"
            return None
        digest = f"{file_digest(path, 20)}-{max_side}"
        for ext in (".png", ".jpg"):
            rel = f"{THUMB_DIR}/{digest}{ext}"
            if (self.site / rel).exists():
                return rel
            if self.previous is not None and (self.previous / rel).is_file():
                _link_or_copy(self.previous / rel, self.site / rel)
                self.reused += 1
                return rel
        try:
            with Image.open(path) as im:
                im.load()
                small = max(im.size) <= max_side
                if small and im.format in ("PNG", "JPEG"):  # already small: the original bytes
                    rel = f"{THUMB_DIR}/{digest}{'.png' if im.format == 'PNG' else '.jpg'}"
                    shutil.copyfile(path, self.site / rel)
                else:
                    im = im.convert("RGB")
                    im.thumbnail((max_side, max_side))
                    rel = f"{THUMB_DIR}/{digest}.jpg"
                    im.save(self.site / rel, quality=88)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            self.missing[str(path)] = f"unreadable ({type(err).__name__})"
            return None
        self.written += 1
        return rel


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


__all__ = ["Thumbs", "THUMB_DIR", "MAX_SIDE", "SHEET_SIDE"]
