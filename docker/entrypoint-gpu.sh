#!/bin/sh
# The GPU image's entry point: check the engine cache, then run `facestream "$@"` (default: serve).
#
# `facestream serve --backend auto` builds the TensorRT engines itself on its first start (minutes:
# /healthz answers meanwhile, /readyz says 503 until they are built) into
# $FACESTREAM_CACHE/trt/<key of GPU, TensorRT version, weights>/ and reuses them on every later
# start. Mount a volume there, or every container start builds them again.
set -eu
cache="${FACESTREAM_CACHE:-/var/cache/facestream}"
if ! mkdir -p "$cache/trt" 2>/dev/null || [ ! -w "$cache/trt" ]; then
    echo "facestream: the engine cache $cache is not writable by uid $(id -u): mount a writable volume there" >&2
    exit 1
fi
if [ -z "$(ls -A "$cache/trt")" ]; then
    echo "facestream: no TensorRT engines in $cache/trt yet: this first start builds them (minutes)" >&2
fi
exec facestream "$@"
