"""``describe``: the served model's spec and what it can do (tasks, explainers, attacks)."""

from __future__ import annotations

from typing import Any, Literal

from protocol.contract.parts import CONTRACT_VERSION, Strict
from protocol.contract.registry import register_task


class DescribeRequest(Strict):
    task: Literal["describe"] = "describe"


class DescribeResult(Strict):
    spec: dict[str, Any]
    tasks: list[str]
    explainers: list[str]
    attacks: list[str]
    contract_version: int = CONTRACT_VERSION


register_task(DescribeRequest, DescribeResult)
