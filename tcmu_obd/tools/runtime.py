"""Shared runtime for the one-shot commands: a scheduler only when the image has remote lowers."""

from __future__ import annotations

import contextlib
import os

from ..config import GlobalConfig, load_image_config, local_layer_candidates
from ..image.stack import Image, open_image


def needs_remote(config_path: str, gcfg: GlobalConfig) -> bool:
    cfg = load_image_config(config_path, gcfg)
    return any(
        lower.digest and not any(os.path.exists(p) for p in local_layer_candidates(lower)) for lower in cfg.lowers
    )


@contextlib.asynccontextmanager
async def maybe_scheduler(config_path: str, gcfg: GlobalConfig):
    """Yield a running Scheduler if some lower must come from a registry, else None."""
    if not needs_remote(config_path, gcfg):
        yield None
        return
    from ..scheduler import Scheduler

    scheduler = await Scheduler.create(gcfg)
    try:
        yield scheduler
    finally:
        await scheduler.aclose()


@contextlib.asynccontextmanager
async def opened_image(config_path: str, gcfg: GlobalConfig, *, read_only: bool = False,
                       background_fill: bool = True):
    """Open an image with a scheduler when it needs one; close both on exit (image first)."""
    async with maybe_scheduler(config_path, gcfg) as scheduler:
        image: Image = await open_image(config_path, gcfg, scheduler=scheduler, read_only=read_only,
                                        background_fill=background_fill)
        try:
            yield image
        finally:
            await image.aclose()
