"""The evaluated methods as recipes (``params/methods.yaml``), read by both front doors and the steps.

A recipe says how one row of the report is made, in one place:

* ``dense``: the two-tower baseline (the inner product of the features step's embeddings);
* ``generative``: a model trained from scratch with cross-entropy, on an identifier ``scheme``, with
  ``pseudo_queries`` or not and ``train`` overrides of params/train.yaml (dotted keys: what the model
  reads, corpus indexing, mixup, ...); its checkpoint is ``checkpoints/<name>``;
* ``discriminative``: the learning-to-rank stage continuing the generative recipe ``from`` (its scheme,
  data and overrides, plus its own ``train`` overrides);
* ``rerank``: the top beams of the trained recipe ``from`` reordered by the dense score;
* ``fusion``: the same beams ranked by log-probability + beta * dense score, beta chosen on validation;
* ``ensemble``: the trained recipes ``members`` (one identifier scheme, the same training data: in
  practice one recipe trained with several ``train.seed``) decoded as one model, each beam step ranking
  the mean of their log-probabilities (:class:`avg.decode.Ensemble`); rerank and fusion take it as ``from``.

``methods.evaluate`` lists the recipes the DAG builds and reports, in report order; the recipes they
stand on come with them. Snakemake (workflow/Snakefile) and workflow/dvc_stages.py derive their rules
and stages from :func:`load`; the train step applies :func:`train_config` itself when given a recipe, so
both front doors train a recipe from the same merged params.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from avg.params import ParamsError

FILE = "params/methods.yaml"
KINDS = ("dense", "generative", "discriminative", "rerank", "fusion", "ensemble")
TRAINED = ("generative", "discriminative")
SCHEMES = ("atomic", "kmeans", "rq", "avg")      # avg.identifiers.SCHEMES, in report order


@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str
    scheme: str | None = None            # identifier scheme (every kind but dense; inherited through `from`)
    source: str | None = None            # the recipe this one continues (discriminative) or re-ranks (rerank, fusion)
    pseudo_queries: bool = False         # trained on pseudo-queries (inherited through `from`)
    train: dict = field(default_factory=dict)   # dotted train overrides, inherited ones first
    about: str = ""
    members: tuple[str, ...] = ()        # ensemble: the trained recipes decoded together

    @property
    def trained(self) -> bool:
        return self.kind in TRAINED

    @property
    def uses_dense_score(self) -> bool:
        """Whether the ranking itself reads the dense score (design.md §6 labels such rows)."""
        return self.kind in ("dense", "rerank", "fusion")


@dataclass(frozen=True)
class Methods:
    recipes: dict[str, Recipe]           # every declared recipe
    evaluated: list[str]                 # what the DAG builds and reports, sources first

    def __getitem__(self, name: str) -> Recipe:
        return self.recipes[name]

    def of_kind(self, *kinds: str) -> list[str]:
        return [n for n in self.evaluated if self.recipes[n].kind in kinds]

    def checkpoints(self, name: str) -> list[str]:
        """The trained recipes whose checkpoints evaluating ``name`` decodes with: itself when trained, an
        ensemble's members, a rerank's none (it reads rankings only), a fusion's its source's."""
        r = self.recipes[name]
        if r.trained:
            return [name]
        if r.kind == "ensemble":
            return list(r.members)
        if r.kind == "fusion":
            return self.checkpoints(r.source)
        return []

    @property
    def schemes(self) -> list[str]:
        """Identifier schemes the evaluated recipes need, in :data:`SCHEMES` order."""
        used = {self.recipes[n].scheme for n in self.evaluated}
        return [s for s in SCHEMES if s in used]


def _bad(problem: str) -> ParamsError:
    return ParamsError(f"{FILE}: {problem}")


def load(config: dict) -> Methods:
    """Validated recipes of ``config["methods"]`` (inheritance through ``from`` resolved)."""
    if "methods" not in config:
        raise _bad("missing: the evaluated methods are declared there (methods.recipes, methods.evaluate)")
    declared = config["methods"]["recipes"]
    resolved: dict[str, Recipe] = {}

    def resolve(name: str, trail: tuple[str, ...] = ()) -> Recipe:
        if name in resolved:
            return resolved[name]
        if name in trail:
            raise _bad(f"methods.recipes.{name}: `from` goes round in a circle ({' -> '.join(trail + (name,))})")
        spec = declared[name]
        kind = spec["kind"]
        if kind == "dense":
            if name != "dense":
                raise _bad(f"methods.recipes.{name}: the dense baseline must be named `dense` (its eval files are dense.*)")
            r = Recipe(name, kind, about=spec.get("about", ""))
        elif kind == "generative":
            if "scheme" not in spec:
                raise _bad(f"methods.recipes.{name}: a generative recipe names its identifier `scheme` ({', '.join(SCHEMES)})")
            if "from" in spec:
                raise _bad(f"methods.recipes.{name}: a generative recipe trains from scratch; drop `from` "
                           "(or make it kind: discriminative)")
            r = Recipe(name, kind, spec["scheme"], None, bool(spec.get("pseudo_queries", False)),
                       dict(spec.get("train", {})), spec.get("about", ""))
        elif kind == "ensemble":
            r = ensemble(name, spec, lambda m: resolve(m, trail + (name,)))
        else:
            src = spec.get("from")
            if src not in declared:
                raise _bad(f"methods.recipes.{name}: kind {kind} needs `from`, the name of a declared recipe (got {src!r})")
            if "scheme" in spec or "pseudo_queries" in spec:
                raise _bad(f"methods.recipes.{name}: scheme and pseudo_queries come from `from` ({src}); drop them here")
            base = resolve(src, trail + (name,))
            want = ("generative",) if kind == "discriminative" else TRAINED + ("ensemble",)
            if base.kind not in want:
                raise _bad(f"methods.recipes.{name}: kind {kind} continues a {' or '.join(filter(None, [', '.join(want[:-1]), want[-1]]))} recipe, but {src} is {base.kind}")
            if kind != "discriminative" and spec.get("train"):
                raise _bad(f"methods.recipes.{name}: a {kind} recipe trains nothing; drop its `train` overrides")
            r = Recipe(name, kind, base.scheme, src, base.pseudo_queries, {**base.train, **spec.get("train", {})},
                       spec.get("about", ""))
        resolved[name] = r
        return r

    for name in declared:
        resolve(name)
    wanted = list(config["methods"]["evaluate"])
    unknown = [n for n in wanted if n not in declared]
    if unknown:
        raise _bad(f"methods.evaluate names {unknown}, which methods.recipes does not declare "
                   f"(declared: {', '.join(declared)})")
    evaluated: list[str] = []

    def add(name: str) -> None:
        if name in evaluated:
            return
        for dep in ([resolved[name].source] if resolved[name].source else []) + list(resolved[name].members):
            add(dep)
        evaluated.append(name)

    for name in wanted:
        add(name)
    for name in evaluated:            # every trained recipe's overrides must be params/train.yaml keys
        if resolved[name].trained and "train" in config:
            train_config(config, resolved[name])
    return Methods(resolved, evaluated)


def ensemble(name: str, spec: dict, resolve) -> Recipe:
    """An ensemble recipe from its declaration; ``resolve(member)`` resolves a member recipe."""
    where = f"methods.recipes.{name}"
    if extra := sorted(set(spec) & {"from", "scheme", "pseudo_queries", "train"}):
        raise _bad(f"{where}: an ensemble trains nothing and takes scheme and data from its `members`; drop {extra}")
    names = spec.get("members")
    if not isinstance(names, list) or len(names) < 2 or len(set(names)) != len(names):
        raise _bad(f"{where}: an ensemble lists `members`, two or more distinct trained recipes (got {names!r})")
    members = []
    for n in names:
        try:
            members.append(resolve(n))
        except KeyError:
            raise _bad(f"{where}.members: {n!r} is not a declared recipe") from None
    if bad := [m.name for m in members if not m.trained]:
        raise _bad(f"{where}.members: {bad} train nothing; an ensemble decodes generative or discriminative recipes")
    first = members[0]
    for m in members[1:]:
        if m.scheme != first.scheme:
            raise _bad(f"{where}.members: {m.name} decodes {m.scheme} identifiers, {first.name} {first.scheme}: the "
                       "members share one identifier table (the beams run over one trie)")
        if (m.pseudo_queries, learned_from(m)) != (first.pseudo_queries, learned_from(first)):
            raise _bad(f"{where}.members: {m.name} learned from {learned_from(m)}, {first.name} from "
                       f"{learned_from(first)}: the row's label must hold for every member")
    # the first member's overrides stand for what the row learned from (indexing), as the members agree on it
    return Recipe(name, "ensemble", first.scheme, None, first.pseudo_queries, dict(first.train),
                  spec.get("about", ""), tuple(names))


def set_dotted(cfg: dict, dotted: str, value, where: str, what: str = "params/train.yaml's train slice") -> None:
    """Set ``cfg[a][b] = value`` for ``dotted = "a.b"``; a key the slice lacks is an error naming ``where``."""
    *path, last = dotted.split(".")
    node = cfg
    for p in path:
        if not isinstance(node.get(p), dict):
            raise ParamsError(f"{where}: {dotted!r} is not a key of {what}")
        node = node[p]
    if last not in node:
        raise ParamsError(f"{where}: {dotted!r} is not a key of {what}")
    node[last] = value


def unread_train_keys(recipe: Recipe) -> list[str]:
    """Sub-slices of params/train.yaml a trained recipe's stage never reads: the other stage's, and
    ``pseudo_queries`` without pseudo-queries. Both front doors leave them out, so changing them reruns
    nothing here (a generative stage is not retrained for ``train.discriminative.lr``)."""
    other = "discriminative" if recipe.kind == "generative" else "generative"
    return [other] + ([] if recipe.pseudo_queries else ["pseudo_queries"])


def train_config(config: dict, recipe: Recipe | str) -> dict:
    """params/train.yaml's slice as ``recipe`` trains with it: its overrides applied, and what its stage
    does not read (:func:`unread_train_keys`) left out."""
    if isinstance(recipe, str):
        recipe = load(config)[recipe]
    if not recipe.trained:
        raise _bad(f"methods.recipes.{recipe.name} is kind {recipe.kind}: nothing to train")
    cfg = copy.deepcopy(config["train"])
    unread = unread_train_keys(recipe)
    for k, v in recipe.train.items():
        if k.split(".")[0] in unread:     # e.g. discriminative.* on a generative recipe: its child reads it
            continue
        set_dotted(cfg, k, v, f"{FILE}: methods.recipes.{recipe.name}.train")
    for k in unread:
        cfg.pop(k, None)
    from avg import params

    params.validate("train", cfg, f"{FILE} (methods.recipes.{recipe.name}.train over params/train.yaml)")
    return cfg


def learned_label(indexing: bool, pseudo_queries: bool) -> str:
    """What a trained model learned from, worded for tables (design.md §6); the report builds it from a
    checkpoint's train.json, the benches from a recipe."""
    return " + ".join(["train captions"] + (["corpus images (indexing)"] if indexing else [])
                      + (["pseudo-queries"] if pseudo_queries else []))


def learned_from(recipe: Recipe) -> str:
    """What a trained recipe learned from (:func:`learned_label`)."""
    return learned_label(bool(recipe.train.get("indexing")), recipe.pseudo_queries)


def chain_names(methods: Methods, name: str) -> list[str]:
    """``name`` and the recipes it continues, the generative one first: what its training depends on."""
    out = [name]
    while methods[out[-1]].source is not None:
        out.append(methods[out[-1]].source)
    return out[::-1]


def chain(config: dict, name: str, methods: Methods | None = None) -> dict:
    """A methods slice holding just ``name``'s chain (what the Snakemake rule hands the train step);
    ``methods``: ``load(config)`` when the caller holds it already."""
    m = methods or load(config)
    return {"evaluate": [name], "recipes": {n: config["methods"]["recipes"][n] for n in chain_names(m, name)}}
