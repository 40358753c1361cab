"""The download sources: folder parsing and its error cases, the seeded split, the Tux Paint .deb reader."""
import io
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from avg.datasets import folder, source_module, table, tuxpaint
from avg.errors import UserError
from conftest import draw, make_folder_dataset

SPLIT = {"seed": 0, "val_fraction": 0.2, "test_fraction": 0.2}


def _prepare(root, tmp_path, on_bad="error"):
    raw = tmp_path / "raw"
    stats = folder.prepare({"path": str(root), "on_bad": on_bad}, raw, tmp_path / "cache", split_cfg=SPLIT)
    return raw, stats


def test_folder_normalises_and_splits_by_image(folder_dataset, tmp_path):
    raw, stats = _prepare(folder_dataset, tmp_path)
    t = pd.read_csv(raw / "captions.csv")
    assert list(t.columns) == ["image", "caption", "split"]
    assert len(t) == 48 and t["image"].nunique() == 24
    assert (t.groupby("image")["split"].nunique() == 1).all()  # every caption of an image in one split
    assert all((raw / p).exists() for p in t["image"])
    assert stats["splits"]["test"]["images"] == round(24 * 0.2) and stats["splits"]["total"]["captions"] == 48


def test_folder_keeps_given_split(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n_images=10, with_split=True)
    raw, stats = _prepare(root, tmp_path)
    t = pd.read_csv(raw / "captions.csv")
    src = pd.read_csv(root / "captions.csv")
    assert sorted(t["split"]) == sorted(src["split"])


def test_split_is_seeded_and_order_independent():
    imgs = [f"i{k}" for k in range(100)]
    a = table.split_by_image(imgs, 3, 0.1, 0.2)
    b = table.split_by_image(list(reversed(imgs)), 3, 0.1, 0.2)
    c = table.split_by_image(imgs, 4, 0.1, 0.2)
    assert a == b and a != c
    assert sum(v == "test" for v in a.values()) == 20 and sum(v == "val" for v in a.values()) == 10


def test_split_fractions_leaving_no_train_are_refused():
    with pytest.raises(UserError, match="val_fraction"):
        table.split_by_image(["a", "b"], 0, 0.5, 0.5)


def test_missing_csv(tmp_path):
    with pytest.raises(UserError, match=r"captions.csv not found.*data.folder.path"):
        _prepare(tmp_path / "nothing", tmp_path)


def test_bad_header(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "captions.csv").write_text("file,text\na.png,hello\n")
    with pytest.raises(UserError, match=r"expected image,caption.*missing: image, caption"):
        _prepare(tmp_path / "d", tmp_path)


@pytest.mark.parametrize("problem", ["empty caption", "missing", "corrupt", "bad split", "escape"])
def test_bad_rows_error_or_skip(tmp_path, problem):
    root = make_folder_dataset(tmp_path / "d", n_images=6, captions_per_image=1)
    lines = (root / "captions.csv").read_text().splitlines()
    if problem == "empty caption":
        lines[2] = lines[2].split(",")[0] + ","
    elif problem == "missing":
        lines[2] = "img/nope.png,a ghost"
    elif problem == "corrupt":
        (root / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 40)
        lines[2] = "img/bad.png,a broken picture"
    elif problem == "bad split":
        lines = ["image,caption,split"] + [l + ",train" for l in lines[1:]]
        lines[2] = lines[2].rsplit(",", 1)[0] + ",holdout"
    else:
        lines[2] = "../outside.png,sneaky"
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"line 3: .*on_bad: skip"):
        _prepare(root, tmp_path)
    raw, stats = _prepare(root, tmp_path, on_bad="skip")
    assert sum(stats["skipped"].values()) == 1
    assert stats["splits"]["total"]["captions"] == 5


def test_truncated_image_is_caught(tmp_path):
    root = make_folder_dataset(tmp_path / "d", n_images=4, captions_per_image=1)
    p = root / "img" / sorted(x.name for x in (root / "img").iterdir())[0]
    draw("circle", (1, 2, 3), size=256).save(p.with_suffix(".jpg"), quality=95)
    data = p.with_suffix(".jpg").read_bytes()
    p.write_bytes(data[: len(data) // 3])  # JPEG bytes cut short under a .png name
    assert folder.check_image(p) is not None


def test_unknown_source_names_the_key():
    with pytest.raises(UserError, match="data.source"):
        source_module("imagenet")


# --- Tux Paint: a synthetic .deb with the real layout exercises the reader without apt -----------------

def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, data in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += header + data + (b"\n" if len(data) % 2 else b"")
    return out


def make_deb(path: Path, stamps: dict[str, str | None], svgs=()) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        def add(name, data):
            info = tarfile.TarInfo("./usr/share/tuxpaint/stamps/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for stem, caption in stamps.items():
            png = io.BytesIO()
            draw("circle", (200, 10, 10), size=16).save(png, format="PNG")
            add(stem + ".png", png.getvalue())
            if caption is not None:
                add(stem + ".txt", f"{caption}\nfr.utf8=traduction\n".encode())
        for stem in svgs:
            add(stem + ".svg", b"<svg/>")
    path.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": b"", "data.tar.xz": buf.getvalue()}))
    return path


STAMPS = {"food/apple": "A red apple.", "food/pear": "A pear.", "plants/rose": "A flower.",
          "plants/tulip": "A flower.", "plants/tulip_mirror": None, "misc/nocap": None}


@pytest.mark.parametrize("policy,kept", [("keep_first", 3), ("drop", 2), ("keep", 4)])
def test_tuxpaint_reader_rules(tmp_path, policy, kept):
    deb = make_deb(tmp_path / "t.deb", STAMPS, svgs=["food/apple", "shapes/star"])
    raw = tmp_path / "raw"
    stats = tuxpaint.prepare({"deb": str(deb), "version": None, "sha256": None, "duplicate_captions": policy},
                             raw, tmp_path / "cache", split_cfg={"seed": 0, "val_fraction": 0.0, "test_fraction": 0.25})
    t = pd.read_csv(raw / "captions.csv")
    assert len(t) == kept and t["caption"].is_unique == (policy != "keep")
    assert "fr.utf8" not in " ".join(t["caption"])  # only the English first line
    sel = stats["selection"]
    assert sel["skipped_mirror"] == 1 and sel["skipped_no_caption"] == 1
    assert sel["svg_skipped"] == 2 and sel["svg_with_png_twin"] == 1
    if policy == "keep_first":
        assert "images/plants/rose.png" in set(t["image"]) and "images/plants/tulip.png" not in set(t["image"])


def test_tuxpaint_checksum_mismatch(tmp_path):
    deb = make_deb(tmp_path / "t.deb", STAMPS)
    with pytest.raises(UserError, match="expected 0{64}.*delete"):
        tuxpaint.prepare({"deb": str(deb), "version": None, "sha256": "0" * 64, "duplicate_captions": "keep"},
                         tmp_path / "raw", tmp_path, split_cfg=SPLIT)


def test_tuxpaint_not_a_deb(tmp_path):
    bad = tmp_path / "bad.deb"
    bad.write_bytes(b"hello")
    with pytest.raises(UserError, match="not a Debian package"):
        tuxpaint.read_stamps(bad)


def test_tuxpaint_without_apt_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get anywhere
    with pytest.raises(UserError, match=r"apt-get not found.*data.tuxpaint.deb"):
        tuxpaint.fetch_deb(tmp_path / "cache", "1.0")


def test_tuxpaint_empty_apt_lists_says_run_apt_get_update(tmp_path, monkeypatch):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "apt-get").write_text("#!/bin/sh\necho 'E: Unable to locate package tuxpaint-stamps-default' >&2\nexit 100\n")
    (fake / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:/usr/bin:/bin")
    with pytest.raises(UserError, match=r"apt-get update"):
        tuxpaint.fetch_deb(tmp_path / "cache", "1.0")
