"""The GPU smoke check runs end to end (tiny sizes, CPU) and records throughput per device."""
import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


def test_gpu_smoke_script_on_cpu(tmp_path):
    import gpu_smoke

    out = tmp_path / "smoke.json"
    rec = gpu_smoke.main(["--tiny", "--device", "cpu", "--precision", "fp32", "--image-batch", "2", "--image-batches", "2",
                          "--train-batch", "2", "--steps", "2", "--out", str(out)])
    assert rec["features_clip_vit_l14_336"]["images_per_s"] > 0 and rec["training"]["samples_per_s"] > 0
    saved = json.loads(out.read_text())
    assert list(saved) == ["cpu (fp32, tiny)"] and saved["cpu (fp32, tiny)"]["training"]["steps"] == 2
