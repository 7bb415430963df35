"""An RTSP test camera: GStreamer's RTSP server serving an MP4 clip's H.264 video, looped forever.

The compose stack's ``rtsp-source`` container runs it (deploy/rtsp-source/Dockerfile) so that
``docker compose up`` has a camera for the service to read, and the integration tests run it
with the system Python (tests/rtsp_server.py, ``--host 127.0.0.1``)::

    python3 rtsp_source.py --clip clip.mp4 [--host 0.0.0.0] [--port 8554] [--path /face]
    python3 rtsp_source.py --check      # exit 1 and name each missing Debian package

It reads the clip's access units once (``filesrc ! qtdemux ! h264parse ! appsink``) and serves
them at ``rtsp://HOST:PORT/PATH``, each client from the first frame, at the clip's frame rate with
its own timestamps shifted per loop, without re-encoding (``appsrc ! h264parse ! clocksync !
rtph264pay``). Prints ``READY <port>`` once it listens. Needs Debian's python3-gi,
gir1.2-gst-rtsp-server-1.0 and gstreamer1.0-plugins-{base,good,bad}.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

Unit = tuple[bytes, int, int, int, bool]  # data, pts, dts, duration (ns), is a delta unit
ELEMENTS = {  # GStreamer element -> the Debian package that provides it
    "appsrc": "gstreamer1.0-plugins-base",
    "appsink": "gstreamer1.0-plugins-base",
    "clocksync": "libgstreamer1.0-0",  # GStreamer core, a dependency of the packages above
    "qtdemux": "gstreamer1.0-plugins-good",
    "rtph264pay": "gstreamer1.0-plugins-good",
    "h264parse": "gstreamer1.0-plugins-bad",
}


def import_gst() -> tuple[Any, Any, Any]:
    import gi

    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    return Gst, GstRtspServer, GLib


def check() -> int:
    """Print each missing piece with its Debian package; 0 when nothing is missing."""
    try:
        Gst, _, _ = import_gst()
    except ImportError as exc:
        print(f"python3-gi missing ({exc})")
        return 1
    except ValueError as exc:  # gi.require_version: the typelib is not installed
        print(f"gir1.2-gst-rtsp-server-1.0 missing ({exc})")
        return 1
    missing = [name for name in ELEMENTS if Gst.ElementFactory.find(name) is None]
    for name in missing:
        print(f"{ELEMENTS[name]} missing (no {name} element)")
    return 1 if missing else 0


def read_access_units(Gst: Any, clip: Path) -> tuple[Any, list[Unit]]:
    """The clip's H.264 caps and access units."""
    pipeline = Gst.parse_launch(
        "filesrc name=file ! qtdemux ! h264parse config-interval=-1 "
        "! video/x-h264,stream-format=byte-stream,alignment=au ! appsink name=sink sync=false"
    )
    pipeline.get_by_name("file").set_property("location", str(clip))
    sink = pipeline.get_by_name("sink")
    pipeline.set_state(Gst.State.PLAYING)
    caps, units = None, []
    while (sample := sink.emit("try-pull-sample", 10 * Gst.SECOND)) is not None:
        caps = sample.get_caps()
        buffer = sample.get_buffer()
        delta = buffer.has_flags(Gst.BufferFlags.DELTA_UNIT)
        units.append(
            (buffer.extract_dup(0, buffer.get_size()), buffer.pts, buffer.dts, buffer.duration, delta)
        )
    error = pipeline.get_bus().pop_filtered(Gst.MessageType.ERROR)
    pipeline.set_state(Gst.State.NULL)
    if error is not None or not units:
        raise SystemExit(f"cannot read H.264 from {clip}: {error.parse_error() if error else 'no frames'}")
    return caps, units


class LoopFeeder:
    """Pushes the access units into one client's appsrc, looped, timestamps shifted per loop."""

    def __init__(self, Gst: Any, units: list[Unit], frame_ns: int) -> None:
        self.Gst, self.units, self.index = Gst, units, 0
        times = [t for _, pts, dts, _, _ in units for t in (pts, dts) if t != Gst.CLOCK_TIME_NONE]
        self.base = min(times)
        self.loop_ns = len(units) * frame_ns

    def need_data(self, appsrc: Any, _length: int) -> None:
        loop, position = divmod(self.index, len(self.units))
        data, pts, dts, duration, delta = self.units[position]
        buffer = self.Gst.Buffer.new_wrapped(data)
        shift = loop * self.loop_ns - self.base
        buffer.pts = pts + shift
        buffer.dts = dts + shift if dts != self.Gst.CLOCK_TIME_NONE else pts + shift
        buffer.duration = duration
        if delta:
            buffer.set_flags(self.Gst.BufferFlags.DELTA_UNIT)
        self.index += 1
        appsrc.emit("push-buffer", buffer)


def serve(host: str, port: int, clip: Path, path: str) -> int:
    """Serve ``clip`` looped at rtsp://host:port/path until SIGTERM or SIGINT."""
    Gst, GstRtspServer, GLib = import_gst()
    caps, units = read_access_units(Gst, clip)
    has_rate, numerator, denominator = caps.get_structure(0).get_fraction("framerate")
    frame_ns = Gst.SECOND * denominator // numerator if has_rate and numerator else units[0][3]

    def configure(_factory: Any, media: Any) -> None:
        appsrc = media.get_element().get_by_name("src")
        appsrc.set_property("caps", caps)
        appsrc.connect("need-data", LoopFeeder(Gst, units, frame_ns).need_data)

    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        "( appsrc name=src format=time ! h264parse config-interval=-1 ! clocksync "
        "! rtph264pay name=pay0 pt=96 config-interval=-1 )"
    )
    factory.set_shared(False)  # each client gets its own pipeline, from the first (key) frame
    factory.connect("media-configure", configure)
    server = GstRtspServer.RTSPServer()
    server.set_address(host)
    server.set_service(str(port))
    server.get_mount_points().add_factory(path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on {host}:{port}", file=sys.stderr)
        return 2
    loop = GLib.MainLoop()
    for number in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, number, loop.quit)
    print(f"READY {port}", flush=True)
    print(f"serving {clip} ({len(units)} frames) at rtsp://{host}:{port}{path}", file=sys.stderr, flush=True)
    loop.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, help="an MP4 with an H.264 video track")
    parser.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=8554, help="TCP port (default 8554)")
    parser.add_argument("--path", default="/face", help="mount point (default /face)")
    parser.add_argument("--check", action="store_true", help="only check that the needed packages exist")
    args = parser.parse_args(argv)
    if args.check:
        return check()
    if args.clip is None:
        parser.error("--clip is required (or --check)")
    if not args.clip.is_file():
        parser.error(f"--clip {args.clip} is not a file (mount the clip into the container)")
    path = args.path if args.path.startswith("/") else f"/{args.path}"
    return serve(args.host, args.port, args.clip.resolve(), path)


if __name__ == "__main__":
    os.environ.setdefault("GST_DEBUG", "1")
    os.environ.setdefault("GST_DEBUG_NO_COLOR", "1")
    sys.exit(main())
