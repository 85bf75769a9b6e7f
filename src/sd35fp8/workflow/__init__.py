"""ComfyUI prompt executor: API/UI workflow parsing, validation, node set, cached execution.

    from sd35fp8.workflow import ModelFolders, PromptExecutor, validate_prompt, object_info
"""

from __future__ import annotations

from sd35fp8.workflow.batch import BATCHABLE_SAMPLERS, batch_key
from sd35fp8.workflow.executor import ExecutionResult, InterruptProcessing, PromptExecutor, PromptJob, PromptValidationError
from sd35fp8.workflow.folders import ModelFolders
from sd35fp8.workflow.graph import CycleError, execution_order, parse_prompt, topological_order
from sd35fp8.workflow.nodes import NODE_CLASS_MAPPINGS, Node, NodeContext, object_info
from sd35fp8.workflow.run import run_workflow
from sd35fp8.workflow.ui_convert import is_ui_workflow, ui_to_api
from sd35fp8.workflow.validate import validate_prompt

__all__ = [
    "BATCHABLE_SAMPLERS", "NODE_CLASS_MAPPINGS", "CycleError", "ExecutionResult", "InterruptProcessing", "ModelFolders", "Node",
    "NodeContext", "PromptExecutor", "PromptJob", "batch_key", "PromptValidationError", "execution_order", "is_ui_workflow", "object_info",
    "parse_prompt", "run_workflow", "topological_order", "ui_to_api", "validate_prompt",
]
