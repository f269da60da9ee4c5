"""Microcontroller targets of ``soundshard compile-edge``: named flash and RAM budgets.

A profile gives the device's flash and RAM and what is set aside on it for everything that is not
the model: the TensorFlow Lite Micro runtime and its int8 kernels, the feature code, the
application, the stack and the audio buffers. The edge artifact fits a target when

- flash: model bytes + feature tables (``soundshard_features.h``) + ``reserved_flash_bytes``
  <= ``flash_bytes``
- RAM: tensor arena (measured, with its margin) + feature working buffers
  + ``reserved_ram_bytes`` <= ``ram_bytes``.

The reserves are stated assumptions, not measurements: TFLite Micro's core is about 16 KiB of code
on a Cortex-M and each int8 kernel (CMSIS-NN) a few KiB more; the cortex-m reserves leave room for
that, a DMA double buffer of audio and an 8 KiB stack. Change them by adding a profile here.
"""

from __future__ import annotations

import dataclasses
import difflib

from soundshard.schemas.errors import ConfigError

KIB = 1024


@dataclasses.dataclass(frozen=True)
class TargetProfile:
    """A device's memory budget. Validated on construction.

    Attributes:
        name: Profile name as given to ``--target``.
        description: The device class it stands for.
        flash_bytes: Flash (read-only memory) available to the firmware.
        ram_bytes: RAM available to the firmware.
        reserved_flash_bytes: Flash set aside for the runtime, kernels, feature code and app.
        reserved_ram_bytes: RAM set aside for the stack, runtime state and audio buffers.
    """

    name: str
    description: str
    flash_bytes: int
    ram_bytes: int
    reserved_flash_bytes: int
    reserved_ram_bytes: int

    def __post_init__(self) -> None:
        for field in ("flash_bytes", "ram_bytes", "reserved_flash_bytes", "reserved_ram_bytes"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"target {self.name!r}: {field}={value!r} must be a non-negative int")
        if self.reserved_flash_bytes >= self.flash_bytes:
            raise ConfigError(
                f"target {self.name!r}: reserved_flash_bytes={self.reserved_flash_bytes} leaves no flash "
                f"of flash_bytes={self.flash_bytes}"
            )
        if self.reserved_ram_bytes >= self.ram_bytes:
            raise ConfigError(
                f"target {self.name!r}: reserved_ram_bytes={self.reserved_ram_bytes} leaves no RAM "
                f"of ram_bytes={self.ram_bytes}"
            )

    def to_dict(self) -> dict:
        """Plain dict of every field (JSON-serialisable)."""
        return dataclasses.asdict(self)


TARGETS: dict[str, TargetProfile] = {
    profile.name: profile
    for profile in (
        TargetProfile(
            name="cortex-m4-256k",
            description="Cortex-M4F with 256 KiB flash and 64 KiB RAM (STM32L4/nRF52 class)",
            flash_bytes=256 * KIB,
            ram_bytes=64 * KIB,
            reserved_flash_bytes=64 * KIB,
            reserved_ram_bytes=12 * KIB,
        ),
        TargetProfile(
            name="cortex-m4-512k",
            description="Cortex-M4F with 512 KiB flash and 64 KiB RAM (the ESC-CNN-microcontroller budget)",
            flash_bytes=512 * KIB,
            ram_bytes=64 * KIB,
            reserved_flash_bytes=64 * KIB,
            reserved_ram_bytes=12 * KIB,
        ),
        TargetProfile(
            name="cortex-m7-1m",
            description="Cortex-M7 with 1 MiB flash and 256 KiB RAM (STM32F7/i.MX RT class)",
            flash_bytes=1024 * KIB,
            ram_bytes=256 * KIB,
            reserved_flash_bytes=96 * KIB,
            reserved_ram_bytes=24 * KIB,
        ),
        TargetProfile(
            name="esp32-s3",
            description="ESP32-S3 module with 8 MiB flash and 512 KiB internal SRAM, no PSRAM",
            flash_bytes=8 * 1024 * KIB,
            ram_bytes=512 * KIB,
            reserved_flash_bytes=1024 * KIB,  # ESP-IDF, Wi-Fi stack and partition table
            reserved_ram_bytes=192 * KIB,  # caches, Wi-Fi and FreeRTOS
        ),
    )
}


def target_profile(name: str) -> TargetProfile:
    """The named target profile.

    Raises:
        ConfigError: unknown name (the message lists the known ones and the closest match).
    """
    if name in TARGETS:
        return TARGETS[name]
    close = difflib.get_close_matches(name, sorted(TARGETS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"--target {name!r} is not a known target{hint}; targets: {sorted(TARGETS)}")
