"""Params: load ``params/<step>.yaml`` slices and validate them against ``avg/schemas/<step>.schema.json``.

The schemas ship inside the package (not under ``workflow/``) so that every reader validates the same
way: the Snakefile at start-up, and the CLI when DVC or a person runs a step by hand.
Errors name the file, the dotted key, the offending value and what is allowed.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml
from jsonschema import Draft202012Validator

from avg.errors import UserError


class ParamsError(UserError, ValueError):
    """A params file is missing, malformed or holds a value its schema does not allow."""


def schema_for(step: str) -> dict:
    try:
        text = resources.files("avg.schemas").joinpath(f"{step}.schema.json").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"no schema for step {step!r} (expected avg/schemas/{step}.schema.json)") from None
    return json.loads(text)


def known_steps() -> list[str]:
    return sorted(p.name.removesuffix(".schema.json") for p in resources.files("avg.schemas").iterdir()
                  if p.name.endswith(".schema.json"))


def _allowed(schema: dict) -> str:
    """Human wording of what a schema node accepts."""
    parts = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(json.dumps(v) for v in schema["enum"]))
    if "type" in schema:
        t = schema["type"]
        parts.append("type " + (" or ".join(t) if isinstance(t, list) else t))
    for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<")):
        if key in schema:
            parts.append(f"{word} {schema[key]}")
    if "minItems" in schema:
        parts.append(f"at least {schema['minItems']} item(s)")
    if "pattern" in schema:
        parts.append(f"matching /{schema['pattern']}/")
    if schema.get("additionalProperties") is False and "properties" in schema:
        parts.append("keys: " + ", ".join(schema["properties"]))
    return "; ".join(parts) or "see the schema"


def validate(step: str, cfg: Any, source: str) -> dict:
    """Validate one step's slice; raise :class:`ParamsError` listing every problem found."""
    schema = schema_for(step)
    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if not errors:
        return cfg
    lines = []
    for err in errors:
        key = ".".join([step, *map(str, err.absolute_path)])
        if err.validator == "additionalProperties":
            allowed = ", ".join(err.schema.get("properties", {}))
            lines.append(f"  {key}: {err.message} (allowed keys: {allowed})")
        elif err.validator == "required":
            lines.append(f"  {key}: {err.message}")
        else:
            lines.append(f"  {key} = {json.dumps(err.instance, default=str)}: {err.message} "
                         f"(allowed: {_allowed(err.schema)})")
    raise ParamsError(f"invalid params in {source}:\n" + "\n".join(lines) +
                      f"\nFix the key(s) above; params/{step}.yaml describes every key and what it does.")


def load_file(path: str | Path, step: str) -> dict:
    """Read ``params/<step>.yaml`` (one top-level key, the step name) and return the validated slice."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {path} not found (each step reads params/{step}.yaml)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or step not in doc:
        raise ParamsError(f"{path} must hold one top-level key {step!r}")
    extra = set(doc) - {step}
    if extra:
        raise ParamsError(f"{path}: unexpected top-level key(s) {sorted(extra)}; the file holds only {step!r}")
    return validate(step, doc[step], str(path))


def validate_config(config: dict, steps: Iterable[str], source: str = "params/") -> None:
    """Validate every step slice of a merged Snakemake config (params files + --configfile overrides).

    A top-level key that is no step (``trian:`` in an override file) is an error too: Snakemake would
    merge it silently and the run would use the defaults the user meant to change."""
    steps = list(steps)
    problems = []
    unknown = sorted(set(config) - set(steps))
    if unknown:
        import difflib

        hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, steps, 1)) else "")
                 for k in unknown]
        problems.append(f"unknown top-level key(s) {', '.join(hints)} in the config (a --configfile override or "
                        f"--config); the keys are the steps: {', '.join(steps)}")
    for step in steps:
        if step not in config:
            problems.append(f"missing top-level key {step!r} (params/{step}.yaml)")
            continue
        try:
            validate(step, config[step], f"params/{step}.yaml (or a --configfile override)")
        except ParamsError as exc:
            problems.append(str(exc))
    if problems:
        raise ParamsError("\n".join(problems))
