import json
import os


def cfg_json(step):
    """The step's params slice as JSON: each rule gets only its own slice, so a change reruns only what uses it."""
    return json.dumps(config[step], sort_keys=True)
