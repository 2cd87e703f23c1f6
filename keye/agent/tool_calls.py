"""Reading the model's tool calls (Qwen / Hermes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`) and
checking them against the offered tools' JSON Schemas.

Why a parser that never raises: during a rollout a broken call is the model's mistake, not the trainer's. Malformed
JSON, an unknown tool, missing / extra / mistyped arguments each become a `ToolCallError` whose message the
environment returns to the model as an error tool turn, so the model can correct itself and the loop goes on.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from keye.data.tokenizer import TOOL_CALL_END, TOOL_CALL_START

_BLOCK = re.compile(re.escape(TOOL_CALL_START) + r"(.*?)(" + re.escape(TOOL_CALL_END) + r"|$)", re.S)
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
    "object": (dict,),
    "null": (type(None),),
}


@dataclass
class ToolCall:
    """A well-formed call of an offered tool with arguments that fit its schema."""

    name: str
    arguments: dict[str, Any]
    id: str = ""


@dataclass
class ToolCallError:
    """A call the environment cannot run; `message` is what the model is told."""

    message: str
    raw: str
    name: str | None = None
    id: str = ""


@dataclass
class ParsedTurn:
    content: str  # the text outside the tool-call blocks, stripped
    calls: list[ToolCall | ToolCallError] = field(default_factory=list)

    @property
    def has_calls(self) -> bool:
        return bool(self.calls)


def tool_name(spec: Mapping[str, Any]) -> str:
    """The name of an OpenAI tool spec ({"type": "function", "function": {"name", ...}}) or a bare function spec."""
    return str(spec.get("function", spec).get("name", ""))


def tool_parameters(spec: Mapping[str, Any]) -> dict[str, Any]:
    return dict(spec.get("function", spec).get("parameters") or {"type": "object", "properties": {}})


def _type_ok(value: Any, kind: str | list[str]) -> bool:
    kinds = [kind] if isinstance(kind, str) else list(kind)
    for k in kinds:
        want = _JSON_TYPES.get(k)
        if want is None:
            return True  # a type this checker does not know is not held against the model
        if k in ("integer", "number") and isinstance(value, bool):
            continue
        if k == "integer" and isinstance(value, float) and value.is_integer():
            return True
        if isinstance(value, want):
            return not (isinstance(value, float) and not math.isfinite(value))
    return False


def validate_arguments(schema: Mapping[str, Any], args: Any, where: str = "arguments") -> list[str]:
    """Problems of `args` under the JSON Schema subset tools use (type, properties, required,
    additionalProperties, enum, minimum / maximum, items); [] when it fits."""
    errors: list[str] = []
    kind = schema.get("type")
    if kind is not None and not _type_ok(args, kind):
        return [f"{where} must be of type {kind}, got {type(args).__name__} {json.dumps(args)[:40]}"]
    if "enum" in schema and args not in schema["enum"]:
        errors.append(f"{where} must be one of {schema['enum']}, got {json.dumps(args)[:40]}")
    if isinstance(args, (int, float)) and not isinstance(args, bool):
        if "minimum" in schema and args < schema["minimum"]:
            errors.append(f"{where} must be >= {schema['minimum']}, got {args}")
        if "maximum" in schema and args > schema["maximum"]:
            errors.append(f"{where} must be <= {schema['maximum']}, got {args}")
    if isinstance(args, dict):
        props = schema.get("properties") or {}
        for name in schema.get("required") or []:
            if name not in args:
                errors.append(f"{where}: missing required argument {name!r}")
        if schema.get("additionalProperties", True) is False:
            extra = sorted(set(args) - set(props))
            if extra:
                errors.append(f"{where}: unexpected argument(s) {extra}; accepted: {sorted(props)}")
        for name, value in args.items():
            if name in props:
                errors.extend(validate_arguments(props[name], value, f"{where}.{name}"))
    if isinstance(args, list) and isinstance(schema.get("items"), Mapping):
        for i, v in enumerate(args):
            errors.extend(validate_arguments(schema["items"], v, f"{where}[{i}]"))
    return errors


def _one(raw: str, tools: Mapping[str, Mapping[str, Any]] | None) -> ToolCall | ToolCallError:
    body = raw.strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        return ToolCallError(f"the tool call is not valid JSON ({e.msg} at character {e.pos})", raw)
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return ToolCallError('a tool call must be a JSON object {"name": ..., "arguments": {...}}', raw)
    name = obj["name"]
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some models write the arguments as a JSON string, as the OpenAI wire does
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return ToolCallError(f"the arguments of {name!r} are not valid JSON ({e.msg})", raw, name)
    if not isinstance(args, dict):
        return ToolCallError(f"the arguments of {name!r} must be a JSON object", raw, name)
    extra_keys = sorted(set(obj) - {"name", "arguments"})
    if extra_keys:
        return ToolCallError(f"unexpected key(s) {extra_keys} in the call of {name!r}", raw, name)
    if tools is not None:
        if name not in tools:
            return ToolCallError(f"unknown tool {name!r}; available: {sorted(tools)}", raw, name)
        problems = validate_arguments(tool_parameters(tools[name]), args)
        if problems:
            return ToolCallError(f"wrong arguments for {name!r}: " + "; ".join(problems), raw, name)
    return ToolCall(name, args)


def parse_tool_calls(
    text: str,
    tools: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]] | None = None,
    id_prefix: str = "call",
) -> ParsedTurn:
    """The calls in one assistant turn, in order, each checked against `tools` (OpenAI specs, a list or a
    {name: spec} map; None checks only the form). A block without its closing tag is an error call."""
    by_name = None
    if tools is not None:
        by_name = dict(tools) if isinstance(tools, Mapping) else {tool_name(t): t for t in tools}
    text = text or ""
    calls: list[ToolCall | ToolCallError] = []
    for k, m in enumerate(_BLOCK.finditer(text)):
        if not m.group(2):
            call: ToolCall | ToolCallError = ToolCallError(
                f"the tool call was not closed with {TOOL_CALL_END}", m.group(1)
            )
        else:
            call = _one(m.group(1), by_name)
        call.id = f"{id_prefix}_{k}"
        calls.append(call)
    content = _BLOCK.sub("", text).strip()
    return ParsedTurn(content, calls)


def error_text(err: ToolCallError) -> str:
    """The tool turn the model reads for a call that could not run."""
    return f"Error: {err.message}. Write one call per block as {TOOL_CALL_START}" + (
        '{"name": <tool>, "arguments": {...}}' + f"{TOOL_CALL_END}."
    )
