"""Layout planner: rank static layouts and (prefill, decode) pairs by predicted throughput.

models.py and hardware.py say what is planned for (the paper's models and devices, an HF
config, this machine measured), workload.py for which requests, cost_model.py predicts one
pair, ranking.py ranks them all. Model geometry and byte formulas come from model_spec.
"""
from seesaw_mc.planner.cost_model import CostModel, Estimate, paper_name
from seesaw_mc.planner.hardware import (GLOO_LINK, HARDWARE_PRESETS, SHM_LINK, Hardware, matmul_flops,
                                        measure_link, measure_machine, resolve_hardware)
from seesaw_mc.planner.models import MODEL_PRESETS, resolve_model
from seesaw_mc.planner.ranking import auto_layouts, candidate_layouts, format_plan, plan
from seesaw_mc.planner.workload import Workload, resolve_workload, shared_prefix_tokens

__all__ = ["CostModel", "Estimate", "paper_name", "GLOO_LINK", "HARDWARE_PRESETS", "SHM_LINK", "Hardware",
           "matmul_flops", "measure_link", "measure_machine", "resolve_hardware", "MODEL_PRESETS", "resolve_model",
           "auto_layouts",
           "candidate_layouts", "format_plan", "plan", "Workload", "resolve_workload",
           "shared_prefix_tokens"]
