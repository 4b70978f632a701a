"""Hand a model (full precision or a packed billm checkpoint) to lm-evaluation-harness.

:func:`harness_lm` wraps a model object for the harness; billm's zero-shot tasks
(:mod:`billm.eval.zeroshot`) score through it. :func:`harness_lm_pretrained` is the route a harness
user takes, ``--model hf --model_args pretrained=FOLDER``: the harness loads the folder itself with
``from_pretrained``, which after ``import billm`` builds the packed model. :func:`run_harness` (the
harness's own task registry plus any ``include_path`` folder of YAML tasks) scores either.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..errors import BillmError

log = logging.getLogger(__name__)


def require_lm_eval(what: str = "--harness") -> None:
    """Raise a clear error when lm-evaluation-harness is missing.

    Raises:
        BillmError: ``lm_eval`` cannot be imported.
    """
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise BillmError(f"{what} needs lm-evaluation-harness (pip install lm-eval), a dependency of billm ({e})") from None


def harness_lm(model: nn.Module, tokenizer, batch_size: int = 16, device: Any = None):
    """The harness's ``HFLM`` around ``model``, moved to ``device`` first when given.

    The harness never moves a model it is handed (it runs where the model's parameters are), so
    the move is billm's. A model dispatched over several devices (``hf_device_map``) stays where it is.
    """
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    if device is not None:
        device = torch.device(device)
        spread = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
        if len(spread) > 1:
            log.warning("the model is dispatched over %s; not moving it to %s", ", ".join(sorted(spread)), device)
        else:
            model.to(device)
    model.eval()
    dev = str(next(model.parameters()).device)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=dev)


def harness_lm_pretrained(folder: str, batch_size: int = 16, device: Any = None, dtype: Optional[torch.dtype] = None):
    """The harness's ``HFLM`` with ``pretrained=folder``: the harness loads the model (packed, for a billm folder)."""
    require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), batch_size=batch_size, device=str(device or "cpu"),
                dtype=str(dtype).replace("torch.", "") if dtype is not None else "auto")


def run_harness(lm, tasks: Sequence[str], limit: Optional[int] = None,
                include_path: Optional[str] = None) -> dict[str, dict[str, float]]:
    """Evaluate ``lm`` (from :func:`harness_lm` or :func:`harness_lm_pretrained`) on harness ``tasks``.

    Returns:
        ``{task: {metric: value, metric + "_stderr": value}}`` (the harness's "none" filter).

    Raises:
        BillmError: lm-eval is not installed, or the harness rejects a task name.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = None
    if include_path:  # indexing the harness's own tasks takes seconds: not when include_path has them all
        manager = TaskManager(include_defaults=False, include_path=include_path)
        if not all(t in manager.all_tasks for t in tasks):
            manager = None
    manager = manager or TaskManager(include_path=include_path)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                                      log_samples=False, bootstrap_iters=100)  # means: closed-form stderr
    except (KeyError, ValueError) as e:
        raise BillmError(f"lm-evaluation-harness rejected the tasks {list(tasks)}: {e}") from e
    results: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
    return results
