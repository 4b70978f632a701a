"""Hand a model (full precision or a packed billm checkpoint) to lm-evaluation-harness.

For users who already live in the harness: its own task registry (plus any ``include_path``
folder of YAML tasks), its own scoring and aggregation. Needs ``pip install 'billm[harness]'``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from ..errors import BillmError


def run_harness(model: nn.Module, tokenizer, tasks: Sequence[str], limit: Optional[int] = None,
                include_path: Optional[str] = None, batch_size: int = 16, device: Any = None) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` on harness ``tasks`` through ``lm_eval.simple_evaluate``.

    Returns:
        ``{task: {metric: value, metric + "_stderr": value}}`` (the harness's "none" filter).

    Raises:
        BillmError: lm-eval is not installed, or the harness rejects a task name.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise BillmError(f"--harness needs lm-evaluation-harness: pip install 'billm[harness]' ({e})") from None
    dev = str(device) if device is not None else str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=dev)
    manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                                      log_samples=False, bootstrap_iters=100)  # means: closed-form stderr
    except (KeyError, ValueError) as e:
        raise BillmError(f"lm-evaluation-harness rejected the tasks {list(tasks)}: {e}") from e
    results: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        results[task] = {k.split(",")[0]: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
    return results
