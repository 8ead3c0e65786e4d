"""The whole-model driver: hands the method the model and the calibration batches once
(ffn-merge chooses its window by the whole model's calibration loss)."""
from __future__ import annotations

import time

import torch
from torch import nn

from layershare.adapters import Adapter
from layershare.compression.budget import Plan
from layershare.compression.drivers.base import StageContext, StageReport
from layershare.compression.finite import check_group


def run_whole_model(model: nn.Module, adapter: Adapter, method, batches: list[torch.Tensor],
                    groups: list[list[int]], plan: Plan, ctx: StageContext) -> StageReport:
    t0 = time.time()
    report = StageReport(method=method.name, plan=plan)
    report.extra = method.compress(model, adapter, batches, plan, ctx) or {}
    check_group(f"stage {ctx.stage + 1} ({method.name})", {"": model})
    model.to(ctx.device)  # what the method built (from CPU weights) joins the model's device
    report.seconds = time.time() - t0
    return report
