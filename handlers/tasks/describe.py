"""``describe``: the served model's spec, the tasks it serves, its explainers and attacks."""

from __future__ import annotations

from handlers.attacks import available_attacks
from handlers.explainers import available_explainers
from handlers.tasks.registry import RUNNERS, runs
from handlers.tasks.served import ServedModel
from protocol import contract


@runs(contract.DescribeRequest)
def run(served: ServedModel, request: contract.DescribeRequest) -> contract.DescribeResult:
    return contract.DescribeResult(
        spec=served.spec.model_dump(), tasks=list(RUNNERS),
        explainers=available_explainers(), attacks=available_attacks(),
    )
