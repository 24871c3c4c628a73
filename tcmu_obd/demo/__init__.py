"""`tcmu-obd demo`: the whole story on one machine, in about a minute, leaving nothing behind.

    build.py     a small ext4 root disk (mkfs.ext4 -d), then a two-layer overlaybd image made
                 by the project's own writer (build_layer_from_raw, WritableLayer.commit)
    registry.py  a local registry serving the blobs: Debian's docker-registry when installed,
                 else an in-process aiohttp one (GET/HEAD /v2/<repo>/blobs/<digest>, Range)
    link.py      an in-process TCP proxy adding RTT and a shared rate cap (an approximation;
                 bench/fill_bench.py measures on a TUN delay line in network namespaces)
    nbdclient.py a minimal NBD client (fixed newstyle, OPT_GO, READ) for timed file reads
    run.py       the orchestration: registry → link → open_image + Scheduler → NBDServer →
                 lazy file reads while the filler runs → upstream-like baseline → summary

Only run.py knows the order; everything it serves and reads goes through the product's own
modules (image.stack, scheduler, remote, cache, frontends.nbd).
"""
