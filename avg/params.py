"""Params: load ``params/<step>.yaml`` slices and validate them against ``avg/schemas/<step>.schema.json``.

The schemas ship inside the package (not under ``workflow/``) so that every reader validates the same
way: the Snakefile at start-up, and the CLI when DVC or a person runs a step by hand.
Errors name the file, the dotted key, the offending value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

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


def _max_k(cfg: dict) -> int:
    return max(cfg.get("ks") or [0])


def cross_checks(step: str, cfg: dict) -> list[tuple[str, str]]:
    """(dotted key, problem) for combinations the schema cannot express; run with the schema, so both
    ``snakemake -n`` and a step run by hand stop before any work."""
    out: list[tuple[str, str]] = []
    if step == "data":
        if cfg.get("source") and cfg["source"] not in cfg:
            out.append((f"data.{cfg['source']}", f"missing: data.source is {cfg['source']!r}, whose settings live under "
                                                  f"data.{cfg['source']} (params/data.yaml holds every source's block)"))
        split = cfg.get("split") or {}
        total = float(split.get("val_fraction", 0)) + float(split.get("test_fraction", 0))
        if total >= 1:
            out.append(("data.split", f"val_fraction + test_fraction = {total:g} leaves no training images; "
                                      "keep their sum below 1"))
    if step == "evaluate":
        k = _max_k(cfg)
        if "depth" in cfg and cfg["depth"] < k:
            out.append(("evaluate.depth", f"{cfg['depth']} is below the largest of evaluate.ks ({k}): Recall@{k} "
                                          "would under-count; raise depth"))
        beams = (cfg.get("generative") or {}).get("num_beams")
        if beams is not None and beams < k:
            out.append(("evaluate.generative.num_beams", f"{beams} is below the largest of evaluate.ks ({k}): the "
                                                         "beam is the generative ranking's depth; raise num_beams"))
        rerank = (cfg.get("rerank") or {}).get("depth")
        if rerank is not None and beams is not None and rerank > beams:
            out.append(("evaluate.rerank.depth", f"{rerank} is above evaluate.generative.num_beams ({beams}): a "
                                                 "rerank reorders the beam's candidates; lower it or raise num_beams"))
    if step == "train":
        val = (cfg.get("validation") or {}).get("num_beams")
        disc = (cfg.get("discriminative") or {}).get("num_beams")
        if disc is not None and disc < 2:
            out.append(("train.discriminative.num_beams", f"{disc}: the listwise loss ranks the gold identifier "
                                                          "against the beam's others; use at least 2"))
        if val is not None and val < 1:
            out.append(("train.validation.num_beams", f"{val}: validation decodes at least one beam"))
        model = cfg.get("model") or {}
        hidden, heads = model.get("decoder_hidden"), model.get("decoder_heads")
        if model.get("backbone") == "minilm" and hidden and heads and hidden % heads:
            out.append(("train.model.decoder_hidden", f"{hidden} is not divisible by train.model.decoder_heads ({heads}): "
                                                      "each attention head gets decoder_hidden / decoder_heads dimensions"))
        if cfg.get("indexing_gap") and not cfg.get("indexing"):
            out.append(("train.indexing_gap", "moves the corpus-indexing rows, but train.indexing is false: turn "
                                              "indexing on, or indexing_gap off"))
        augment = cfg.get("augment") or {}
        feeds = [k for k, on in (("train.indexing", cfg.get("indexing")),
                                 ("train.augment.mixup_prob", (augment.get("mixup_prob") or 0) > 0),
                                 ("train.augment.noise", (augment.get("noise") or 0) > 0)) if on]
        if feeds and model.get("reads", "tokens") == "tokens":
            out.append(("train.model.reads", f"is 'tokens', but {' and '.join(feeds)} {'feeds' if len(feeds) == 1 else 'feed'} the query EMBEDDING, which "
                                             "such a model does not read: set reads to embedding or both, or turn them off"))
        pq = cfg.get("pseudo_queries") or {}
        if pq.get("source") == "file" and not pq.get("file"):
            out.append(("train.pseudo_queries.file", "is null but train.pseudo_queries.source is 'file': give the CSV "
                                                     "(columns image, caption) or json, or use source: knn"))
    return out


def refuse_combinations(step: str, cfg: dict, source: str) -> None:
    """Raise :class:`ParamsError` naming every :func:`cross_checks` problem of an already-built slice (a step
    run as a library gets the same refusal as one whose params went through :func:`validate`)."""
    problems = cross_checks(step, cfg)
    if problems:
        raise ParamsError(f"{source}: " + "; ".join(f"{key}: {problem}" for key, problem in problems))


def validate(step: str, cfg: Any, source: str, origin=None) -> dict:
    """Validate one step's slice; raise :class:`ParamsError` listing every problem found.

    ``origin(dotted_key) -> str`` names the file a value came from (an override file rather than
    params/<step>.yaml), so the message points at the file to edit."""
    schema = schema_for(step)
    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    lines = []
    where = (lambda key: f" [set in {origin(key)}]" if origin and origin(key) else "")
    for err in errors:
        key = ".".join([step, *map(str, err.absolute_path)])
        if err.validator == "additionalProperties":
            allowed = ", ".join(err.schema.get("properties", {}))
            lines.append(f"  {key}: {err.message} (allowed keys: {allowed}){where(key)}")
        elif err.validator == "required":
            lines.append(f"  {key}: {err.message}")
        else:
            lines.append(f"  {key} = {json.dumps(err.instance, default=str)}: {err.message} "
                         f"(allowed: {_allowed(err.schema)}){where(key)}")
    if not errors and isinstance(cfg, dict):
        lines += [f"  {key}: {problem}{where(key)}" for key, problem in cross_checks(step, cfg)]
    if not lines:
        return cfg
    raise ParamsError(f"invalid params in {source}:\n" + "\n".join(lines) +
                      f"\nFix the key(s) above; params/{step}.yaml describes every key and what it does.")


def check_yaml(path: str | Path) -> dict:
    """Parse one YAML file; a syntax error names the file, line and column (Snakemake's own message names
    neither)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"params file {path} not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamsError(f"{path} is not valid YAML{at}: {problem}. Fix the file (indentation with spaces, "
                          "closed brackets and quotes)") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path} is not UTF-8 text ({exc})") from None
    if doc is not None and not isinstance(doc, dict):
        raise ParamsError(f"{path} must be a mapping of step names to their keys, not a {type(doc).__name__}")
    return doc or {}


def _has_key(doc: dict, dotted: str) -> bool:
    node: Any = doc
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


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


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def source_overlaps(data_cfg: dict, data_dir: str | Path) -> str | None:
    """Why the dataset's own files would be deleted, or None: the download step's output folder (and
    everything Snakemake or DVC removes before rerunning a step) lies under ``data/<name>/``, so a source
    folder there is lost on the next rerun."""
    source = data_cfg.get("source")
    sub = data_cfg.get(source) or {}
    key = {"folder": "path", "hf": "path", "tuxpaint": "deb", "flickr30k": "images_url"}.get(source)
    value = sub.get(key) if key else None
    if not value or "://" in str(value):
        return None
    if _inside(Path(str(value)).expanduser(), Path(data_dir)):
        return (f"data.{source}.{key} = {value} lies inside {data_dir}/, which the pipeline rebuilds: a rerun of "
                f"download (or `dvc repro`, `snakemake --forcerun`) would delete it. Move the dataset outside "
                f"{data_dir}/ (e.g. to datasets/{Path(str(value)).name}) and point data.{source}.{key} at it")
    return None


def validate_config(config: dict, steps: Iterable[str], source: str = "params/",
                    overrides: Iterable[str | Path] = ()) -> None:
    """Validate every step slice of a merged Snakemake config (params files + --configfile overrides).

    A top-level key that is no step (``trian:`` in an override file) is an error too: Snakemake would
    merge it silently and the run would use the defaults the user meant to change. A value that an
    override file sets is reported with that file's name."""
    steps = list(steps)
    problems = []
    docs = [(str(p), check_yaml(p)) for p in overrides]

    def origin(key: str) -> str | None:
        for name, doc in reversed(docs):     # the last file given wins, as in Snakemake's merge
            if _has_key(doc, key):
                return name
        return None

    unknown = sorted(set(config) - set(steps))
    if unknown:
        import difflib

        hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, steps, 1)) else "")
                 + (f" [in {origin(k)}]" if origin(k) else "") for k in unknown]
        problems.append(f"unknown top-level key(s) {', '.join(hints)} in the config (a --configfile override or "
                        f"--config); the keys are the steps: {', '.join(steps)}")
    for step in steps:
        if step not in config:
            problems.append(f"missing top-level key {step!r} (params/{step}.yaml)")
            continue
        files = [name for name, doc in docs if step in doc]
        where = f"params/{step}.yaml" + (f" + {', '.join(files)}" if files else "")
        try:
            validate(step, config[step], where, origin)
        except ParamsError as exc:
            problems.append(str(exc))
    data = config.get("data")
    if isinstance(data, dict) and data.get("name"):
        overlap = source_overlaps(data, Path("data") / str(data["name"]))
        if overlap:
            problems.append(overlap)
    if problems:
        raise ParamsError("\n".join(problems))


# ---------------------------------------------------------------------- config objects

def build(cls, values: Mapping[str, Any], where: str, **given):
    """The config dataclass ``cls`` from a validated params slice ``values``, plus ``given`` (values the
    step knows only at run time, e.g. the width of its input).

    The dataclasses declare no defaults: ``params/<step>.yaml`` (with its comments) and its schema are the
    only places a value or a rule lives, so a key here that is no field, or a field without a value, is a
    :class:`ParamsError` naming the dotted key (``where`` is the slice's dotted path, e.g. ``train.model``).
    A list becomes a tuple where the field is one.
    """
    names = [f.name for f in dataclasses.fields(cls)]
    values = {**values, **given}
    unknown = sorted(set(values) - set(names))
    missing = [n for n in names if n not in values]
    problems = [f"  {where}.{k}: is not a setting here (known: {', '.join(names)})" for k in unknown]
    problems += [f"  {where}.{k}: missing" for k in missing]
    if problems:
        step = where.split(".")[0]
        raise ParamsError(f"{cls.__name__} cannot be built from the params given:\n" + "\n".join(problems) +
                          f"\nparams/{step}.yaml lists every key with its meaning; copy the missing ones from it")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name in names:
        value = values[name]
        kwargs[name] = tuple(value) if typing.get_origin(hints.get(name)) is tuple and isinstance(value, list) else value
    return cls(**kwargs)


def build_split(classes: Sequence[type], values: Mapping[str, Any], where: str) -> tuple:
    """One params slice read by several config dataclasses (``train.discriminative``: the optimiser's keys and
    the ranking loss's): each gets its own fields; a key no class has is an error, as in :func:`build`."""
    fields_of = [{f.name for f in dataclasses.fields(cls)} for cls in classes]
    owned = set().union(*fields_of)
    stray = sorted(set(values) - owned)
    if stray:
        raise ParamsError(f"{where}: {', '.join(stray)} is not a setting here (known: {', '.join(sorted(owned))}); "
                          f"params/{where.split('.')[0]}.yaml lists every key")
    return tuple(build(cls, {k: v for k, v in values.items() if k in names}, where)
                 for cls, names in zip(classes, fields_of))
