"""train: the token-to-voken model (caption → image identifier), one stage per run.

``--stage generative`` trains from scratch with cross-entropy on (train caption → identifier of its
image). ``--stage discriminative --init-from <generative checkpoint>`` continues with the paper's
learning-to-rank loss over constrained beams. Two runs, two checkpoints, so "AVG with and without the
discriminative stage" are both evaluable.

Model selection: after every epoch, Recall@K of beam search constrained to the VAL images'
identifiers, with val captions as queries (the test corpus is never looked at); the best epoch's
weights are the output. The evaluate step later decodes under the TEST images' trie.

Inputs: ``--features`` (captions.csv/images.csv and their splits), ``--identifiers`` (<scheme>.tsv; its
sibling <scheme>.json gives position_sizes and <scheme>.codebook.npy initialises the voken
embeddings). Output ``--out``: a save_pretrained folder (config, weights, tokenizer, avg_vokens.json)
plus ``train.json`` (stage, best epoch, validation metrics, per-epoch history, sacred_run_id).
Resume: state is saved atomically after every epoch under ``--state-dir`` (default ``<out>.resume``);
rerunning the same command after an interruption continues from the last finished epoch. The state
folder is removed once ``--out`` is written.

GPUs: ``precision`` (auto = bf16/fp16 on CUDA, fp32 on CPU) and ``grad_accum_steps`` (per stage) in
params/train.yaml. Several GPUs: launch the same command with torchrun, e.g.
``torchrun --nproc_per_node 4 -m avg train --stage generative ...``; ``batch_size`` stays the global
batch (split across ranks), so results match a one-GPU run. Only rank 0 writes ``--out`` and the
resume state.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from avg import featurestore, safe_io, params
from avg.errors import UserError
from avg.trie import position_sizes_of, read_identifiers
from avg.metrics import l2_normalise

STEP = "train"
STAGES = ("generative", "discriminative")
logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--features", type=Path, required=True, help="feature store folder, e.g. data/tuxpaint/features")
    p.add_argument("--identifiers", type=Path, required=True,
                   help="identifier table, e.g. data/tuxpaint/identifiers/avg.tsv (its .json and .codebook.npy siblings are read too)")
    p.add_argument("--codebook", type=Path, default=None,
                   help="codebook [levels, K, d] for voken init (default: <identifiers>.codebook.npy beside the table)")
    p.add_argument("--stage", choices=STAGES, default="generative", help="which training stage this run is")
    p.add_argument("--init-from", type=Path, default=None,
                   help="checkpoint to start from (required for --stage discriminative: the generative checkpoint)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint folder to write, e.g. data/tuxpaint/checkpoints/avg-gen")
    p.add_argument("--state-dir", type=Path, default=None, help="resume state folder (default: <out>.resume)")
    p.add_argument("--pseudo-queries", action="store_true",
                   help="also train on pseudo-queries for the images of train.pseudo_queries.splits (labelled in "
                        "every table); a --recipe sets this itself")
    p.add_argument("--recipe", default=None,
                   help="train this method recipe of params/methods.yaml: its overrides over the train params, its "
                        "pseudo-queries; its kind must match --stage (what Snakemake and dvc.yaml run)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--methods", type=Path, default=None, help="methods file for --recipe (default params/methods.yaml)")
    src.add_argument("--methods-json", default=None, help="the methods slice as JSON (Snakemake passes the recipe's chain)")


def resolve_params(cfg: dict, *, recipe: str | None = None, methods: Path | None = None,
                   methods_json: str | None = None, **flags) -> tuple[dict, dict]:
    """With ``recipe``: the train slice as that recipe trains with it (:func:`avg.methods.train_config`) and
    the flags :func:`run` takes, ``pseudo_queries`` set by the recipe; ``methods`` / ``methods_json`` (where
    the recipe is declared) are consumed here. Without: the slice and flags as given."""
    from avg import methods as recipes

    if recipe is None:
        if methods is not None or methods_json is not None:
            raise UserError("--methods / --methods-json only say where --recipe is declared: pass --recipe NAME too")
        return cfg, {"recipe": None, **flags}
    if methods_json is not None:
        try:
            slice_ = params.validate("methods", json.loads(methods_json), "--methods-json")
        except json.JSONDecodeError as exc:
            raise params.ParamsError(f"--methods-json is not valid JSON: {exc}") from None
    else:
        slice_ = params.load_file(methods or Path("params") / "methods.yaml", "methods")
    config = {"train": cfg, "methods": slice_}
    m = recipes.load(config)
    if recipe not in m.recipes:
        raise UserError(f"--recipe {recipe}: params/methods.yaml declares no such recipe "
                        f"(trained ones: {', '.join(n for n in m.recipes if m[n].trained)})")
    r = m[recipe]
    stage = flags.get("stage", "generative")
    if r.kind != stage:
        raise UserError(f"--recipe {recipe} is kind {r.kind!r} in params/methods.yaml, but --stage is {stage!r}: "
                        "train it with --stage " + (r.kind if r.trained else "(none: it trains nothing)"))
    if flags.get("pseudo_queries", False) and not r.pseudo_queries:
        raise UserError(f"--pseudo-queries given, but recipe {recipe} trains without them "
                        "(params/methods.yaml: pseudo_queries); drop the flag or use a -pq recipe")
    return recipes.train_config(config, r), {**flags, "recipe": recipe, "pseudo_queries": r.pseudo_queries}


def sacred_paths(*, features: Path, identifiers: Path, out: Path, codebook: Path | None = None,
                 stage: str = "generative", init_from: Path | None = None, state_dir: Path | None = None,
                 pseudo_queries: bool = False, recipe: str | None = None, params: Path | None = None) -> dict:
    """The inputs, output and what was trained (``state_dir`` and the ``--params`` file are not recorded)."""
    return {"features": str(features), "identifiers": str(identifiers),
            "codebook": str(codebook) if codebook else None, "stage": stage,
            "init_from": str(init_from) if init_from else None, "out": str(out),
            "use_pseudo_queries": bool(pseudo_queries), "recipe": recipe}


# ---------------------------------------------------------------------- inputs
def split_pairs(feats: featurestore.Features, image_codes: dict[str, np.ndarray], split: str):
    """Captions of ``split``, the codes of their images, gold = index into the split's images, and those images' codes."""
    part = feats.split(split)
    names = part.images["image"].tolist()
    lacking = [n for n in names if n not in image_codes]
    if lacking:
        raise UserError(f"{len(lacking)} {split} image(s) have no identifier (e.g. {lacking[0]}): the identifier "
                        "table and the feature store come from different runs; rerun `avg identifiers`")
    corpus = np.stack([image_codes[n] for n in names]) if names else np.zeros((0, 0), dtype=np.int64)
    gold = part.captions["image_index"].to_numpy()
    return part.captions["caption"].astype(str).tolist(), corpus[gold] if len(gold) else corpus, gold, corpus


def with_pseudo_queries(train: tuple, train_images: list[str], table, image_codes: dict[str, np.ndarray]) -> tuple:
    """``train`` (captions, targets, gold, corpus) of :func:`split_pairs` plus one pair per pseudo-query.

    ``train_images`` names the rows of the train corpus. The training corpus (the trie the discriminative
    stage draws negatives from) grows by the pseudo-queried images it lacks, appended after the train images.
    """
    caps, targets, gold, corpus = train
    row = {n: i for i, n in enumerate(train_images)}
    names = [n for n in dict.fromkeys(table["image"]) if n not in row]
    lacking = [n for n in names if n not in image_codes]
    if lacking:
        raise UserError(f"{len(lacking)} pseudo-queried image(s) have no identifier (e.g. {lacking[0]}): rerun `avg identifiers`")
    extra = np.stack([image_codes[n] for n in names]) if names else np.zeros((0, corpus.shape[1]), np.int64)
    row.update({n: len(corpus) + i for i, n in enumerate(names)})
    pq_gold = np.array([row[n] for n in table["image"]], dtype=np.int64)
    all_corpus = np.concatenate([corpus, extra])
    return (caps + table["caption"].tolist(), np.concatenate([targets, all_corpus[pq_gold]]),
            np.concatenate([gold, pq_gold]), all_corpus)


def caption_vectors(feats: featurestore.Features, captions: list[str]) -> np.ndarray:
    """``[n, d]`` embeddings of ``captions`` as the features step made them: the store's own row for a
    caption it holds (the same deterministic encoder gives the same vector, so this is a lookup, not a
    use of that caption's split), the rest (file pseudo-queries) embedded now with the store's encoder."""
    row = {c: i for i, c in reversed(list(enumerate(feats.captions["caption"].astype(str))))}
    out = np.zeros((len(captions), feats.text.shape[1]), np.float32)
    have = np.array([c in row for c in captions], bool)
    if have.any():
        out[have] = feats.text[[row[c] for c, h in zip(captions, have) if h]]
    if (~have).any():
        from avg.query_features import embed_queries

        logger.info("embedding %d pseudo-queries the feature store does not hold, with its encoder", int((~have).sum()))
        out[~have] = embed_queries(feats.meta, [c for c, h in zip(captions, have) if not h])
    return out


def with_indexing(train: tuple, corpus_names: list[str], feats: featurestore.Features,
                  image_codes: dict[str, np.ndarray]) -> tuple[tuple, list[str]]:
    """``train`` plus one corpus-indexing row per image of the corpus (every split): empty caption, the
    image's embedding as its query (:func:`pair_vectors`), its identifier as the target (DSI's indexing,
    GRACE's memorisation). No caption of any split is involved. ``corpus_names`` names the rows of
    ``train``'s corpus; images it lacks are appended. Returns the grown tuple and its corpus names."""
    caps, targets, gold, corpus = train
    row = {n: i for i, n in enumerate(corpus_names)}
    names = feats.images["image"].tolist()
    lacking = [n for n in names if n not in image_codes]
    if lacking:
        raise UserError(f"{len(lacking)} corpus image(s) have no identifier (e.g. {lacking[0]}): rerun `avg identifiers`")
    new = [n for n in names if n not in row]
    extra = np.stack([image_codes[n] for n in new]) if new else np.zeros((0, corpus.shape[1]), np.int64)
    row.update({n: len(corpus) + i for i, n in enumerate(new)})
    ix_gold = np.array([row[n] for n in names], dtype=np.int64)
    all_corpus = np.concatenate([corpus, extra])
    grown = (caps + [""] * len(names), np.concatenate([targets, all_corpus[ix_gold]]),
             np.concatenate([gold, ix_gold]), all_corpus)
    return grown, list(corpus_names) + new


def modality_gap(feats: featurestore.Features) -> np.ndarray:
    """Mean offset from an image's embedding to its caption's, over the TRAIN captions only.

    In a two-tower space captions and images sit in two cones apart (the modality gap: Liang et al.,
    NeurIPS 2022, "Mind the Gap"); on the embedded Tux Paint store the offset has norm ~0.57 and moving
    the test images by it lifts their mean cosine to their own captions from 0.31 to 0.43. An image
    moved by it looks, to a decoder that reads query embeddings, like a caption of that image."""
    train = feats.split("train")      # never empty here: _pairs has refused a train split without captions
    gold = train.captions["image_index"].to_numpy()
    return (train.text.astype(np.float64) - train.image[gold].astype(np.float64)).mean(0).astype(np.float32)


def pair_vectors(feats: featurestore.Features, split: str, captions: list[str], gold: np.ndarray,
                 corpus_names: list[str], n_indexing: int, gap: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Query embeddings and mixup partners of training/validation rows.

    Rows are: the split's own captions (their store rows), then pseudo-queries (looked up or embedded),
    then ``n_indexing`` corpus-indexing rows (query = the image's own embedding, no partner: NaN; with
    ``gap`` (:func:`modality_gap`) the image's embedding moved by it and renormalised).
    Partner = the gold image's embedding (``corpus_names[gold]``)."""
    n_text = len(captions) - n_indexing
    own = feats.split(split).text
    queries = [own, caption_vectors(feats, captions[len(own):n_text])]
    image_of = {n: i for i, n in enumerate(feats.images["image"])}
    partners = feats.image[[image_of[corpus_names[g]] for g in gold]].astype(np.float32) if len(gold) \
        else np.zeros((0, feats.image.shape[1]), np.float32)
    if n_indexing:
        ix = partners[n_text:].copy()
        if gap is not None:
            ix = l2_normalise(ix + gap)
        queries.append(ix)
        partners[n_text:] = np.nan
    return np.concatenate(queries).astype(np.float32), partners


def fingerprint(cfg: dict, stage: str, pseudo_queries: bool, files: list[Path]) -> str:
    """Identity of a run (config, stage and input contents): resume state is only reused for the same one."""
    h = hashlib.sha256(json.dumps({"cfg": cfg, "stage": stage, "pq": bool(pseudo_queries)},
                                  sort_keys=True, default=str).encode())
    for f in files:
        if f is not None and Path(f).is_file():
            h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------- run
def _device(cfg: dict):
    """This process's device and precision check; under torchrun, joins the process group first."""
    from avg import training as T
    from avg.device import autocast_dtype, resolve_device

    try:
        device = resolve_device(cfg["device"])
        if T.launched_world_size() > 1 and device.type == "cuda" and device.index is not None:
            raise ValueError(f"device {cfg['device']!r} pins every torchrun rank to one GPU: set the `device` key "
                             "of params/train.yaml to 'auto' or 'cuda' (each rank takes the GPU of its LOCAL_RANK)")
        autocast_dtype(cfg.get("precision", "auto"), device)
    except ValueError as exc:
        raise UserError(f"params/train.yaml: {exc}") from None
    return T.init_distributed(device)


def _state_dir(out: Path, state_dir: Path | None) -> Path:
    """``--state-dir``, by default ``<out>.resume`` beside the checkpoint."""
    out = Path(out)
    return Path(state_dir) if state_dir else out.with_name(out.name + ".resume")


def _codebook_file(identifiers: Path, codebook: Path | None) -> Path:
    """``--codebook``, by default ``<identifiers>.codebook.npy`` beside the table."""
    return Path(codebook) if codebook else Path(str(identifiers)[:-len(".tsv")] + ".codebook.npy")


def _model(cfg: dict, feats: featurestore.Features, sizes: list[int], identifiers: Path, codebook: Path | None,
           init_from: Path | None, device):
    """The model to train and where its voken embeddings came from: the ``init_from`` checkpoint (checked
    against the identifiers and ``train.model.reads``), else a new one (vokens from the scheme's codebook
    when ``voken_init`` asks for it and there is one)."""
    from avg import model as M

    voken_init_used = "from --init-from"
    if init_from is not None:
        vm = M.VokenModel.load(init_from, device=device)
        if vm.spec.position_sizes != sizes:
            raise UserError(f"{init_from} was trained for position_sizes {vm.spec.position_sizes}, "
                            f"but {identifiers} has {sizes}: use a checkpoint of the same identifier scheme")
        if vm.config.reads != cfg["model"]["reads"]:
            raise UserError(f"{init_from} reads {vm.config.reads!r} but train.model.reads is {cfg['model']['reads']!r}: "
                            "the discriminative stage continues the generative model; train both with the same reads")
    else:
        mcfg = params.build(M.ModelConfig, cfg["model"], "train.model",
                            query_dim=int(feats.text.shape[1]) if cfg["model"]["reads"] != "tokens" else 0)
        codebook_array = None
        if mcfg.voken_init == "codebook":
            cb_path = _codebook_file(identifiers, codebook)
            if cb_path.exists():
                codebook_array = np.load(cb_path)
            elif codebook is not None:
                raise UserError(f"--codebook {cb_path} does not exist")
            else:
                # schemes without code vectors (atomic) write no codebook: nothing to initialise from
                logger.warning("no codebook beside %s: voken embeddings start random (voken_init_used: random)",
                               identifiers)
                mcfg.voken_init = "random"
        voken_init_used = mcfg.voken_init
        vm = M.build_model(mcfg, sizes, codebook_array, seed=cfg["seed"]).to(device)
    return vm, voken_init_used


def _pseudo_query_table(cfg: dict, feats: featurestore.Features):
    """The pseudo-queries to train on (:func:`avg.pseudo_queries.build`) and their description."""
    from avg import pseudo_queries as PQ

    if "pseudo_queries" not in cfg:
        raise UserError("--pseudo-queries needs the train.pseudo_queries slice of params/train.yaml (source, per_image, "
                        "file, splits); it is missing from the params given")
    pq_table = PQ.build(feats, cfg["pseudo_queries"])
    pq_info = PQ.describe(cfg["pseudo_queries"], pq_table, feats)
    logger.info("pseudo-queries (%s): %d for %d images %s", pq_info["source"], pq_info["n_queries"],
                pq_info["n_images"], pq_info["queries_per_split"])
    return pq_table, pq_info


def _pairs(split: str, vm, feats: featurestore.Features, image_codes: dict[str, np.ndarray], pq_table, indexing: bool,
           indexing_gap: bool = False):
    """The training (or validation) pairs of ``split``: its captions, then (train) the pseudo-queries and
    the corpus-indexing rows (moved by the train captions' modality gap when ``indexing_gap``), with their
    targets, the split's trie and (an embedding-reading model) their query vectors and mixup partners."""
    from avg import training as T
    from avg.decode import token_trie

    part = split_pairs(feats, image_codes, split)
    if not part[0]:
        raise UserError(f"split {split!r} has no captions: training needs train and val captions")
    names = feats.split(split).images["image"].tolist()
    n_indexing = 0
    if split == "train" and pq_table is not None:
        part = with_pseudo_queries(part, names, pq_table, image_codes)
        have = set(names)     # the images with_pseudo_queries appended, in its order
        names = names + [n for n in dict.fromkeys(pq_table["image"]) if n not in have]
    if split == "train" and indexing:
        part, names = with_indexing(part, names, feats, image_codes)
        n_indexing = len(feats.images)
    caps, targets, gold, corpus = part
    queries = partners = None
    if vm.reads_embedding:
        gap = modality_gap(feats) if n_indexing and indexing_gap else None
        queries, partners = pair_vectors(feats, split, caps, gold, names, n_indexing, gap)
    return T.Pairs(caps, vm.spec.codes_to_tokens(targets), gold, token_trie(vm, corpus), queries, partners)


def stage_configs(cfg: dict, stage: str) -> tuple:
    """``(OptimConfig, RankConfig or None)`` of ``stage`` from the train slice: ``train.<stage>`` plus
    ``train.precision``; the discriminative slice also holds the ranking loss's keys."""
    from avg import training as T

    if stage not in cfg:
        raise UserError(f"--stage {stage} needs the train.{stage} slice of params/train.yaml; it is missing "
                        "from the params given")
    d = {**cfg[stage], "precision": cfg["precision"]}
    if stage == "generative":
        return params.build(T.OptimConfig, d, "train.generative"), None
    # label smoothing is a term of the generative cross-entropy only; the ranking stage has no such key
    return params.build_split((T.OptimConfig, T.RankConfig), {**d, "label_smoothing": None}, "train.discriminative")


def _train_stage(vm, train, val, cfg: dict, stage: str, log, ckpt, augment):
    """Train ``stage`` (:func:`avg.training.train_generative` / ``train_discriminative``); its result and
    the validation settings it selected the best epoch with."""
    from avg import training as T

    val_cfg = params.build(T.ValConfig, cfg["validation"], "train.validation")
    optim, rank_cfg = stage_configs(cfg, stage)
    if stage == "generative":
        result = T.train_generative(vm, train, val, optim, val_cfg, log, ckpt, cfg["seed"], augment)
    else:
        result = T.train_discriminative(vm, train, val, optim, rank_cfg, val_cfg, log, ckpt, cfg["seed"], augment)
    return result, val_cfg


def _write_checkpoint(out: Path, vm, meta: dict, pq_table) -> None:
    """``out``: the model's save_pretrained folder with ``train.json`` (and ``pseudo_queries.csv``), at once."""
    with safe_io.atomic_path(out) as tmp:
        vm.save(tmp)
        safe_io.write_json(tmp / "train.json", meta)
        if pq_table is not None:     # the exact extra training pairs, for inspection
            safe_io.write_csv(tmp / "pseudo_queries.csv", pq_table)


def run(*, cfg: dict, log, run_id: str, features: Path, identifiers: Path, out: Path, codebook: Path | None = None,
        stage: str = "generative", init_from: Path | None = None, state_dir: Path | None = None,
        pseudo_queries: bool = False, recipe: str | None = None) -> dict:
    import torch

    from avg import model as M
    from avg import training as T

    if stage == "discriminative" and init_from is None:
        raise UserError("--stage discriminative needs --init-from <generative checkpoint>, e.g. data/tuxpaint/checkpoints/avg-gen")
    params.refuse_combinations("train", cfg, "params/train.yaml")     # also when called as a library, not via the CLI
    # before any work: the checkpoint replaces --out and the resume state is removed after training,
    # so neither may be a folder of the user's
    safe_io.refuse_foreign(out, (M.VOKENS_FILE, "train.json"), "--out", "an avg checkpoint")
    safe_io.refuse_foreign(_state_dir(out, state_dir), ("last", "best"), "--state-dir", "avg train's resume state")
    device = _device(cfg)
    rank, world = T.rank_and_world()
    torch.manual_seed(cfg["seed"])
    feats = featurestore.load(features)
    table, codes, declared, id_stats = read_identifiers(identifiers)
    sizes = position_sizes_of(codes, declared)
    image_codes = dict(zip(table["image"], codes))
    vm, voken_init_used = _model(cfg, feats, sizes, identifiers, codebook, init_from, device)

    pq_info = None
    pq_table = None
    if pseudo_queries:
        pq_table, pq_info = _pseudo_query_table(cfg, feats)

    indexing = bool(cfg["indexing"])
    augment = params.build(T.AugmentConfig, cfg["augment"], "train.augment")

    train = _pairs("train", vm, feats, image_codes, pq_table, indexing, bool(cfg["indexing_gap"]))
    val = _pairs("val", vm, feats, image_codes, pq_table, indexing)
    logger.info("train: %d captions over %d images; val: %d captions over %d images; %s",
                len(train.captions), len(train.trie), len(val.captions), len(val.trie), M.describe(vm))
    out = Path(out)
    state_dir = _state_dir(out, state_dir)
    fp = fingerprint(cfg, stage, pseudo_queries, [
        identifiers, _codebook_file(identifiers, codebook), Path(features) / "captions.csv",
        Path(init_from) / "train.json" if init_from else None,
        Path(cfg["pseudo_queries"]["file"]) if pq_table is not None and cfg["pseudo_queries"].get("file") else None])
    ckpt = T.Checkpointer(state_dir, fp)
    result, val_cfg = _train_stage(vm, train, val, cfg, stage, log, ckpt, augment)

    meta = {**result, "sacred_run_id": run_id, "recipe": recipe, "identifiers": str(identifiers),
            "scheme": id_stats.get("scheme"), "identifiers_run_id": id_stats.get("sacred_run_id"),
            "features_run_id": feats.meta.get("sacred_run_id"), "init_from": str(init_from) if init_from else None,
            "position_sizes": sizes, "voken_init_used": voken_init_used, "n_train_captions": len(train.captions), "n_val_captions": len(val.captions),
            "n_val_images": len(val.trie), "model": M.describe(vm), "device": str(device),
            "validation_corpus": "val images (trie over their identifiers); val captions as queries",
            "pseudo_queries": pq_info, "reads": vm.config.reads,
            "indexing": {"images": int(len(feats.images)), "splits": sorted(set(feats.images["split"])),
                         "gap": bool(cfg["indexing_gap"])} if indexing else None,
            "augment": dataclasses.asdict(augment) if vm.reads_embedding else None}
    if rank == 0:   # the other ranks hold the same weights; one writer
        _write_checkpoint(out, vm, meta, pq_table)
        shutil.rmtree(state_dir, ignore_errors=True)
    if world > 1 and T.launched_world_size() > 1:   # the group torchrun had this step join
        import torch.distributed as dist

        dist.destroy_process_group()
    logger.info("%s: best epoch %s, val %s %.3f -> %s", stage, result["best_epoch"], val_cfg.select_metric,
                result.get(f"val_{val_cfg.select_metric}", float("nan")), out)
    return {k: v for k, v in meta.items() if isinstance(v, (int, float, str)) or v is None}
