#!/usr/bin/env python3
"""Keep one facestream replica's cameras open: the camera sharding of deploy/ (compose and k8s).

A camera is stateful (its key-frame cache, its reconnect state), so exactly one replica reads it.
A cameras file maps replica names to cameras; on Kubernetes the replica names are the
StatefulSet's pod names (``facestream-0``, ``facestream-1``, ...), see deploy/k8s/cameras.yaml::

    {"facestream-0": [{"name": "lobby", "url": "rtsp://cam-lobby/stream1", "scheduler": "rl"}],
     "facestream-1": [{"name": "gate", "url": "rtsp://cam-gate/stream1"}]}

Each entry is a ``POST /streams`` body (url, name, scheduler, knob, mask_format, max_fps); ``name``
is required, it is how a camera is recognised. This program runs beside its replica (a sidecar
container on Kubernetes, a service in compose), reads its own entry (``--owner``, default
``$POD_NAME``, else the host name) and every ``--interval`` seconds makes the replica's camera
streams match it: ``POST /streams`` for a missing camera, ``DELETE`` and ``POST`` for a ``failed``
one and, with ``--prune``, ``DELETE`` for a camera stream that is no longer assigned. It re-reads
the file each time (a mounted ConfigMap changes in place) and waits for ``/readyz`` first, so a
restarted replica gets its cameras back. Standard library only; the container images install it
as ``facestream-assign-cameras``.

    facestream-assign-cameras --service http://127.0.0.1:8000 --cameras cameras.json \
        [--owner facestream-0] [--interval 15] [--prune] [--once] [--token SECRET]

The token defaults to ``$FACESTREAM_TOKEN`` (the service's own setting). Exit status with
``--once``: 0 when every assigned camera is open, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger("facestream-assign-cameras")

CAMERA_KEYS = frozenset({"url", "name", "scheduler", "knob", "mask_format", "max_fps"})
"""The fields of the service's ``POST /streams`` body (service/app.py, ``CameraRequest``)."""


class AssignmentError(ValueError):
    """The cameras file is unreadable or malformed; the message says where."""


def load_assignment(path: str | Path, owner: str) -> list[dict[str, Any]]:
    """The cameras ``owner`` must read, validated; [] when the file names no cameras for it."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AssignmentError(f"cannot read the cameras file {path}: {exc}") from None
    if not isinstance(table, dict):
        raise AssignmentError(f"{path}: expected an object mapping replica names to camera lists")
    cameras = table.get(owner, [])
    if not isinstance(cameras, list):
        raise AssignmentError(f"{path}: {owner!r} must map to a list of cameras")
    names: set[str] = set()
    for index, camera in enumerate(cameras):
        where = f"{path}: {owner}[{index}]"
        if not isinstance(camera, dict) or not isinstance(camera.get("url"), str):
            raise AssignmentError(f"{where}: a camera is an object with at least url and name")
        unknown = set(camera) - CAMERA_KEYS
        if unknown:
            raise AssignmentError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(CAMERA_KEYS)})")
        name = camera.get("name")
        if not isinstance(name, str) or not name:
            raise AssignmentError(f"{where}: name is required (it identifies the camera)")
        if name in names:
            raise AssignmentError(f"{where}: camera name {name!r} appears twice")
        names.add(name)
    return cameras


class Service:
    """The few calls of the facestream HTTP API this program makes."""

    def __init__(self, base: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.base, self.token, self.timeout = base.rstrip("/"), token, timeout

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                return exc.code, json.loads(text)
            except json.JSONDecodeError:
                return exc.code, text

    def ready(self) -> bool:
        try:
            return self.call("GET", "/readyz")[0] == 200
        except (OSError, ValueError):
            return False

    def cameras(self) -> dict[str, dict[str, Any]]:
        """Open camera streams by name."""
        status, body = self.call("GET", "/streams")
        if status != 200:
            raise RuntimeError(f"GET /streams answered {status}: {body}")
        return {s["name"]: s for s in body["streams"] if s.get("kind") == "camera"}


def reconcile(service: Service, cameras: list[dict[str, Any]], prune: bool = False) -> list[str]:
    """One pass: open what is missing, reopen what failed, prune what is gone; what it did."""
    actions: list[str] = []
    open_now = service.cameras()
    wanted = {camera["name"]: camera for camera in cameras}
    for name, stream in list(open_now.items()):
        gone = prune and name not in wanted
        if gone or stream.get("state") == "failed":
            status, body = service.call("DELETE", f"/streams/{stream['id']}")
            actions.append(f"deleted {name} ({'unassigned' if gone else 'failed'}): {status}")
            if status == 200:
                del open_now[name]
    for name, camera in wanted.items():
        if name in open_now:
            continue
        status, body = service.call("POST", "/streams", camera)
        detail = body.get("state") if status == 201 and isinstance(body, dict) else body
        actions.append(f"opened {name}: {status} {detail}")
    return actions


def run_once(service: Service, args: argparse.Namespace) -> bool:
    """One reconcile pass when the replica is ready; True when every assigned camera is open."""
    if not service.ready():
        log.info("waiting for %s/readyz", service.base)
        return False
    cameras = load_assignment(args.cameras, args.owner)
    for action in reconcile(service, cameras, args.prune):
        log.info("%s", action)
    missing = {c["name"] for c in cameras} - set(service.cameras())
    if missing:
        log.warning("not open: %s", ", ".join(sorted(missing)))
    return not missing


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--service", default="http://127.0.0.1:8000", help="the replica's base URL")
    parser.add_argument("--cameras", required=True, type=Path, help="JSON: replica name -> cameras")
    parser.add_argument(
        "--owner",
        default=os.environ.get("POD_NAME") or socket.gethostname(),
        help="this replica's name in the cameras file (default: $POD_NAME, else the host name)",
    )
    parser.add_argument("--interval", type=float, default=15.0, help="seconds between passes")
    parser.add_argument("--prune", action="store_true", help="close camera streams no longer assigned")
    parser.add_argument("--once", action="store_true", help="one pass (after waiting for readiness)")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="--once: wait this long")
    parser.add_argument("--token", default=os.environ.get("FACESTREAM_TOKEN") or None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = Service(args.service, args.token)
    stop = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stop.set())
    load_assignment(args.cameras, args.owner)  # a malformed file fails at start, loudly
    log.info("replica %s, cameras file %s, service %s", args.owner, args.cameras, args.service)
    waited = 0.0
    while not stop.is_set():
        try:
            done = run_once(service, args)
        except (OSError, RuntimeError, AssignmentError) as exc:  # keep going: the next pass retries
            log.warning("pass failed: %s", exc)
            done = False
        if args.once and (done or waited >= args.ready_timeout):
            return 0 if done else 1
        pause = min(args.interval, 2.0) if args.once else args.interval
        waited += pause
        stop.wait(pause)
    return 0


if __name__ == "__main__":
    sys.exit(main())
