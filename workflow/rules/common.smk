import json
import os


def cfg_json(step):
    """The step's params slice as JSON: each rule gets only its own slice, so a change reruns only what uses it."""
    return json.dumps(config[step], sort_keys=True)


def GPU(step):
    """One GPU for a step whose device asks for CUDA (Slurm's gpu resource), none otherwise."""
    device = config[step].get("device") or config[step].get("generative", {}).get("device", "cpu")
    return 1 if str(device).startswith("cuda") else 0
