"""Service settings: defaults < config file (TOML or JSON) < ``FACESTREAM_*`` environment < arguments.

Built in ``main()``/``create_app()``, never at import time. ``facestream serve --validate-config``
prints the effective settings (the token masked) or every problem found, without starting.
"""

from __future__ import annotations

import json
import tomllib
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from facestream.engines.backends import BACKENDS, DEFAULT_BACKEND
from facestream.engines.dis_flow import DEFAULT_FLOW, FLOWS
from facestream.engines.int8 import PRECISIONS
from facestream.engines.schedulers import SCHEDULERS, make_scheduler

MASK_FORMATS = ("png", "rle", "raw", "none")
CHOICES: dict[str, tuple[str, ...]] = {  # settings that take one of a fixed set of names
    "backend": BACKENDS,
    "flow": FLOWS,
    "correct_precision": PRECISIONS,
    "scheduler": tuple(SCHEDULERS),
    "mask_format": MASK_FORMATS,
    "rtsp_transport": ("tcp", "udp"),
    "log_level": ("critical", "error", "warning", "info", "debug"),
}

_file_values: ContextVar[dict[str, Any] | None] = ContextVar("facestream_config_file", default=None)


class SettingsError(ValueError):
    """Bad configuration: the message lists every problem and where it came from."""


class _ConfigFileSource(PydanticBaseSettingsSource):
    """The values read from the config file given to :func:`load_settings`."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return (_file_values.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_file_values.get() or {})


class ServiceSettings(BaseSettings):
    """Everything ``facestream serve`` can be told (env: ``FACESTREAM_<NAME>``)."""

    model_config = SettingsConfigDict(env_prefix="FACESTREAM_", extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    weights: str | None = Field(None, description="weights folder (default: the shipped weights)")
    backend: str = DEFAULT_BACKEND
    flow: str = DEFAULT_FLOW
    dis_size: int | None = Field(
        None, ge=16, le=1024, description="side of the face crops DIS sees (default: N's input, 256)"
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for inference")
    correct: bool = Field(
        True, description="run the warp corrector on non-key frames when the weights have one"
    )
    correct_precision: str = Field(
        "auto",
        description="the corrector on the onnxruntime CPU backend: int8, fp32 or auto (int8 when calibrated)",
    )
    scheduler: str = Field("fixed", description="default key scheduler of a new stream")
    knob: float | None = Field(None, description="the default scheduler's knob (tau, interval, ...)")
    mask_format: str = "png"
    max_fps: float | None = Field(None, gt=0, description="default per-stream frame-rate cap")
    max_frame_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(4096 * 2160, ge=64 * 64)
    max_streams: int = Field(16, ge=1)
    token: SecretStr | None = Field(None, description="bearer token for /streams and the WebSockets")
    subscriber_queue: int = Field(4, ge=1, description="results held for a slow WebSocket reader")
    rtsp_transport: str = "tcp"
    rtsp_open_timeout_s: float = Field(5.0, gt=0)
    rtsp_read_timeout_s: float = Field(5.0, gt=0)
    rtsp_backoff_max_s: float = Field(10.0, ge=0.5)
    rtsp_max_retries: int | None = Field(None, ge=1)
    log_level: str = "info"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _ConfigFileSource(settings_cls)

    @field_validator(*CHOICES)
    @classmethod
    def _one_of(cls, value: str, info: ValidationInfo) -> str:
        name = info.field_name or ""
        if name == "log_level":
            value = value.lower()
        choices = CHOICES[name]
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value

    @model_validator(mode="after")
    def _knob(self) -> ServiceSettings:
        make_scheduler(self.scheduler, self.knob)  # raises ValueError with the reason
        return self

    def public(self) -> dict[str, Any]:
        """The settings as JSON-ready values, the token masked."""
        values = self.model_dump(mode="json")
        values["token"] = "***" if self.token else None
        return values


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a ``.toml`` or ``.json`` file (a flat table; a ``[facestream]`` table is
    also accepted in TOML)."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            values = json.loads(text)
        elif path.suffix == ".toml":
            values = tomllib.loads(text)
            values = values.get("facestream", values)
        else:
            raise SettingsError(f"config file {path}: use a .toml or .json file")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"config file {path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(values, dict):
        raise SettingsError(f"config file {path} must hold a table of settings")
    return values


def _problem(error: Any) -> str:
    return f"{'.'.join(map(str, error['loc'])) or 'settings'}: {error['msg']}"


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> ServiceSettings:
    """Settings from defaults, ``config_file``, the environment and ``overrides`` (highest first:
    overrides, environment, file). Raises :class:`SettingsError` listing every problem."""
    values = read_config_file(config_file) if config_file else {}
    token = _file_values.set(values)
    try:
        return ServiceSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        where = f" (config file {config_file}, FACESTREAM_* environment, arguments)" if config_file else ""
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise SettingsError(f"invalid settings{where}: {problems}") from None
    finally:
        _file_values.reset(token)
