"""The networks the service runs, loaded once and shared by every stream.

Two views of one set of networks: with the default DIS flow, F runs only for the schedulers that
read its Conv6 features (``rl``, ``dvsnet``), so a ``fixed`` stream does not pay for it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facestream.engines.backends import create_chosen_networks
from facestream.engines.dis_flow import DisFlowNetworks
from facestream.engines.int8 import build_precision
from facestream.engines.networks import Networks
from facestream.engines.pipeline import StreamSegmenter
from facestream.engines.schedulers import SCHEDULERS, Scheduler, check_scheduler, make_scheduler
from facestream.engines.weights import WeightSet, find_weights

log = logging.getLogger(__name__)


@dataclass
class ServiceEngine:
    """Shared networks plus what ``/readyz`` reports about them."""

    weights: WeightSet
    with_conv6: Networks
    without_conv6: Networks
    flow: str
    info: dict[str, Any] = field(default_factory=dict)
    correct: bool = True  # run the warp corrector on non-key frames (when the weights have one)

    @classmethod
    def load(
        cls,
        weights: str | None,
        backend: str,
        flow: str,
        threads: int | None = None,
        *,
        dis_size: int | None = None,
        correct: bool = True,
        correct_precision: str = "auto",
    ) -> ServiceEngine:
        start = time.perf_counter()
        found = find_weights(weights)
        networks, choice = create_chosen_networks(
            found,
            backend,
            threads=threads,
            flow=flow,
            conv6=True,
            dis_size=dis_size,
            correct_precision=build_precision(correct_precision, correct),
        )
        log.info("%s", choice.describe())
        engine = cls.around(found, networks, flow)
        engine.correct = correct
        engine.info["backend_choice"] = choice.to_json()
        engine.info["correction_precision"] = networks.correction_precision(correct)
        engine.info["load_seconds"] = round(time.perf_counter() - start, 3)
        return engine

    @classmethod
    def around(cls, weights: WeightSet, networks: Networks, flow: str) -> ServiceEngine:
        """An engine around networks built elsewhere (with ``flow="dis"``, ``networks`` is the
        :class:`DisFlowNetworks` that runs F for Conv6)."""
        if isinstance(networks, DisFlowNetworks):
            light: Networks = DisFlowNetworks(networks.inner, conv6=False, size=networks.size)
        else:
            light = networks
        return cls(weights, networks, light, flow)

    @property
    def backend(self) -> str:
        return self.with_conv6.backend

    def schedulers(self) -> list[str]:
        """The schedulers these weights can run (``rl`` and ``dvsnet`` need their networks)."""
        names = []
        for name in SCHEDULERS:
            try:
                check_scheduler(make_scheduler(name), self.with_conv6)
            except ValueError:
                continue
            names.append(name)
        return names

    def segmenter(self, scheduler: Scheduler) -> StreamSegmenter:
        """A new stream's state around the shared networks; ValueError when the weights lack a
        network ``scheduler`` needs."""
        networks = self.with_conv6 if scheduler.needs_conv6 else self.without_conv6
        return StreamSegmenter(networks, scheduler, correct=self.correct)

    def warm_up(self) -> None:
        """Run every network once (first calls allocate and tune), timing it for ``/readyz``."""
        start = time.perf_counter()
        cfg = self.with_conv6.segmentation_config
        size, fsize = cfg.input_size, self.with_conv6.flow_input_size
        rng = np.random.default_rng(0)
        features = self.with_conv6.features(rng.random((1, 3, size, size), dtype=np.float32))
        self.with_conv6.task(features)
        result = self.with_conv6.flow(rng.random((1, 6, fsize, fsize), dtype=np.float32))
        self.with_conv6.warp(features, result.flow, result.scale)
        correction = self.with_conv6.correction_config
        if self.correct and correction is not None:
            side = correction.image_size
            crops = rng.random((1, 3, side, side), dtype=np.float32)
            self.with_conv6.correct(crops, crops, result.flow, self.with_conv6.task(features))
        if self.with_conv6.has_policy:
            expert = np.zeros((1, self.with_conv6.expert_size), np.float32)
            self.with_conv6.key_probability(result.conv6, expert)
        if self.with_conv6.has_dvsnet:
            self.with_conv6.dvsnet_score(result.conv6)
        self.info["warm_up_seconds"] = round(time.perf_counter() - start, 3)
        log.info("networks warm (%s): %s", self.backend, self.info)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "flow": self.flow,
            "weights": str(self.weights.directory),
            "input_size": self.with_conv6.segmentation_config.input_size,
            "schedulers": self.schedulers(),
            "correction": self.correct and self.with_conv6.has_correction,
            **self.info,
        }
