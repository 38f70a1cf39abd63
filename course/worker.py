"""
The grader's worker, run in a folder that holds the starter, a submission's handout files, probes.py
and this file, never the tests' checks or the solution:

    python worker.py < requests.json      # [{"id": 0, "probe": "forward", "inputs": {...}}, ...]

It runs each probe on the submission and writes one JSON line per request to the file descriptor
ANSWER_FD names (3 by default):
{"id": 0, "value": ...} or {"id": 0, "error": "..."}. Tensors travel as {"__tensor__": [shape,
dtype, values]}. The grader (grade.py) judges the values; nothing here decides a score.
"""

import json
import os
import sys

DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "bool")


def encode(value):
    """value as JSON-ready data: dicts, lists, numbers, strings, None, and tensors as {"__tensor__": ...}."""
    import torch
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            t, dtype = t.float(), "float32"
        data = t.float() if dtype == "bfloat16" else t
        return {"__tensor__": [list(t.shape), dtype, data.reshape(-1).tolist()]}
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)[:200]


def decode(data, depth=0):
    """The values encode() wrote; what is not such data (too deep, a malformed tensor) is a ValueError."""
    import torch
    if depth > 20:
        raise ValueError("nested too deeply")
    if isinstance(data, dict):
        if set(data) == {"__tensor__"}:
            shape, dtype, values = data["__tensor__"]
            if dtype not in DTYPES or not all(type(n) is int and n >= 0 for n in shape):
                raise ValueError(f"not a tensor: {str(data)[:80]}")
            t = torch.tensor(values, dtype=torch.float32 if dtype == "bfloat16" else getattr(torch, dtype))
            return t.reshape(shape).to(getattr(torch, dtype))
        return {k: decode(v, depth + 1) for k, v in data.items()}
    if isinstance(data, list):
        return [decode(v, depth + 1) for v in data]
    return data


def main():
    requests = json.loads(sys.stdin.read())
    out = os.fdopen(int(os.environ.get("ANSWER_FD", "3")), "w")
    sys.path.insert(0, os.getcwd())
    for r in requests:
        try:
            import probes
            line = {"id": r["id"], "value": encode(getattr(probes, r["probe"])(**decode(r["inputs"])))}
        except BaseException as e:  # noqa: B036 (SystemExit and KeyboardInterrupt from a submission too)
            line = {"id": r["id"], "error": f"{type(e).__name__}: {e}"[:2000]}
        out.write(json.dumps(line) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
