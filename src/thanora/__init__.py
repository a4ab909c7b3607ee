"""thanora: multi-task, mergeable LoRA fine-tuning (ThanoRA, arXiv 2505.18640) and its peer methods.

The public API::

    model = thanora.prepare_model(model, {"csqa": csqa_batches, "obqa": obqa_batches}, thanora.ThanoraConfig())
    loss = task_loss + cfg.spr_lambda * thanora.spr_loss(model)     # in any training loop
    thanora.export_adapter(model, "adapter/")                       # stock PEFT adapter on the original base
    thanora.merge_(model)                                           # zero-overhead inference
"""

from thanora.adapters.export import export_adapter
from thanora.adapters.guard import ResidualBaseError
from thanora.adapters.merge import is_merged, merge_, save_merged, unmerge_
from thanora.adapters.record import ThanoraAdapter, adapter_of
from thanora.core.allocation import RankBudgetError, RankPlan, allocate_ranks, normalized_entropy
from thanora.core.covariance import CovarianceFitter, CovarianceStats, collect_covariances
from thanora.core.hasi_config import ThanoraConfig
from thanora.core.spectra import SingularCovarianceError, Spectrum, task_aware_svd
from thanora.core.targets import Target, find_targets
from thanora.methods.thanora import plan_ranks, prepare_model, spr_loss

__version__ = "0.1.0"

__all__ = [
    "CovarianceFitter",
    "CovarianceStats",
    "RankBudgetError",
    "RankPlan",
    "ResidualBaseError",
    "SingularCovarianceError",
    "Spectrum",
    "Target",
    "ThanoraAdapter",
    "ThanoraConfig",
    "__version__",
    "adapter_of",
    "allocate_ranks",
    "collect_covariances",
    "export_adapter",
    "find_targets",
    "is_merged",
    "merge_",
    "normalized_entropy",
    "plan_ranks",
    "prepare_model",
    "save_merged",
    "spr_loss",
    "task_aware_svd",
    "unmerge_",
]
