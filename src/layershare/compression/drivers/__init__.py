"""Drivers walk the model for a method; the registry picks one by what the method declares
it needs (`Method.needs().driver`), never by its name."""
from __future__ import annotations

from layershare.compression.drivers.base import (
    Callback,
    Callbacks,
    GroupReport,
    Residency,
    StageContext,
    StageReport,
)
from layershare.compression.drivers.sequential import run_sequential
from layershare.compression.drivers.whole_model import run_whole_model

DRIVERS = {"sequential": run_sequential, "whole-model": run_whole_model}


def driver_for(method):
    needs = method.needs()
    try:
        return DRIVERS[needs.driver]
    except KeyError:
        raise ValueError(f"{method.name} asks for driver {needs.driver!r}; drivers: {', '.join(DRIVERS)}") from None


__all__ = ["Callback", "Callbacks", "DRIVERS", "GroupReport", "Residency", "StageContext", "StageReport", "driver_for"]
