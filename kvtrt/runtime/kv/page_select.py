"""Quest page selection on the host as one small ONNX Runtime graph (the CPU path of ``pages.select_pages``).

A FreeKV step selects pages for every layer and KV head (30 x 3 on SmolLM2) twice: speculatively in
the worker and again for the heads its correction re-selects. In numpy that is ~90 small BLAS calls
per matmul plus a softmax and a sort, ~2.5 ms for 30 layers, on a 2-core host where the worker's
share competes with the decode graph. The same computation as one graph call (batched
``FusedMatMul``, ``Softmax``, ``ReduceMean``, ``TopK``) takes ~0.4 ms (``docs/results/page_select.md``).

    page_ids = select_pages_host(query, kmin, kmax, n_pages, k, "softmax")   # [..., B, Hkv, k], -1 padded

Same rules as ``pages.select_pages``: pages ``>= n_pages[b]`` never selected, missing entries ``-1``
at the end, ties to the lower page id (ONNX ``TopK``'s rule, as the numpy path's stable sort). Scores
are the same float32 computation; ORT's GEMM and exp may round differently from numpy's in the last
bit, which can swap two pages whose scores tie to within it.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np

from ..onnx_bytes import BOOL, FLOAT, INT64, graph, model, node, value

#: threads for a selection the decode step waits for (FreeKV's correction, a fresh range's selection);
#: the worker's selection, which runs beside the decode graph, takes one
CRITICAL_PATH_THREADS = min(2, os.cpu_count() or 1)
_LOCK = threading.Lock()
_SESSIONS: dict[tuple[str, int], object] = {}
_NEG_INF = np.array([-np.inf], np.float32)


def select_pages_host(query: np.ndarray, kmin: np.ndarray, kmax: np.ndarray, n_pages, k: int,
                      combine: str = "softmax", threads: int = 1) -> np.ndarray:
    """Top-``k`` pages per (sequence, KV head), int64 ``[..., B, Hkv, k]``.

    ``query`` ``[..., B, H, D]``; ``kmin``/``kmax`` ``[..., B, Hkv, C, D]`` page summaries (the pool's float16,
    read as float32: this path runs only where the C page ops cannot; all ``C`` allocated pages: the ones
    past ``n_pages[b]`` are masked); ``n_pages`` ``[B]``. ``threads``: ONNX Runtime threads (1 beside a
    running decode graph, as FreeKV's worker; more where the step waits for the selection).
    """
    *lead, bsz, heads, dim = query.shape
    hkv, cap = kmin.shape[-3], kmin.shape[-2]
    n_pages = np.asarray(n_pages, dtype=np.int64).reshape(bsz)
    rows = int(np.prod(lead)) if lead else 1
    out = np.full((rows, bsz, hkv, k), -1, np.int64)
    kk = min(k, cap)
    if kk == 0 or not n_pages.size or n_pages.max() == 0:
        return out.reshape(*lead, bsz, hkv, k)
    q = np.ascontiguousarray(query, dtype=np.float32).reshape(rows, bsz, hkv, heads // hkv, dim)
    kmin = np.ascontiguousarray(kmin, dtype=np.float32).reshape(rows, bsz, hkv, cap, dim)
    kmax = np.ascontiguousarray(kmax, dtype=np.float32).reshape(rows, bsz, hkv, cap, dim)
    valid = (np.arange(cap)[None, :] < n_pages[:, None]).reshape(1, bsz, 1, cap)
    feeds = {"q": q, "kmin": kmin, "kmax": kmax, "valid": valid, "valid5": valid[:, :, :, None], "k": np.array([kk], np.int64),
             "scale": np.array([1.0 / math.sqrt(dim)], np.float32), "neg_inf": _NEG_INF}
    if combine == "mean":
        del feeds["scale"]
    values, index = _session(combine, threads).run(None, feeds)
    out[..., :kk] = np.where(np.isneginf(values), -1, index)
    return out.reshape(*lead, bsz, hkv, k)


def _session(combine: str, threads: int):
    with _LOCK:
        if (combine, threads) not in _SESSIONS:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # the decode graph runs next
            _SESSIONS[combine, threads] = ort.InferenceSession(model_bytes(combine), options,
                                                               providers=["CPUExecutionProvider"])
        return _SESSIONS[combine, threads]


def model_bytes(combine: str = "softmax") -> bytes:
    """ModelProto of the selection. Inputs: ``q`` ``[L,B,Hkv,g,D]``, ``kmin``/``kmax`` ``[L,B,Hkv,C,D]``,
    ``valid`` ``[1,B,1,C]`` bool (and as ``valid5`` ``[1,B,1,1,C]``), ``k`` ``[1]`` int64, ``neg_inf`` ``[1]`` and, for ``softmax``,
    ``scale`` ``[1]`` (1/sqrt(D)). Outputs: ``values``, ``index`` ``[L,B,Hkv,k]``.

    scores = q+ @ kmax^T + q- @ kmin^T (Quest's upper bound, [L,B,Hkv,g,C]); ``softmax``: each query
    head's softmax over the valid pages (scores x scale), averaged over the group's heads; ``mean``:
    the scores averaged over the group's heads; invalid pages -inf; TopK.
    """
    if combine not in ("softmax", "mean"):
        raise ValueError(f"combine={combine!r}; use softmax or mean")
    nodes = [
        node("Relu", ["q"], ["q_pos"]),
        node("Neg", ["q"], ["q_flip"]), node("Relu", ["q_flip"], ["q_neg_abs"]),
        node("Neg", ["q_neg_abs"], ["q_neg"]),                                    # min(q, 0)
        node("FusedMatMul", ["q_pos", "kmax"], ["upper_pos"], domain="com.microsoft", transB=1),
        node("FusedMatMul", ["q_neg", "kmin"], ["upper_neg"], domain="com.microsoft", transB=1),
        node("Add", ["upper_pos", "upper_neg"], ["scores"]),                      # [L,B,Hkv,g,C]
    ]
    if combine == "softmax":
        nodes += [node("Mul", ["scores", "scale"], ["logits"]),
                  node("Where", ["valid5", "logits", "neg_inf"], ["masked"]),
                  node("Softmax", ["masked"], ["probs"], axis=-1),
                  node("ReduceMean", ["probs"], ["combined"], axes=[3], keepdims=0)]
    else:
        nodes += [node("ReduceMean", ["scores"], ["combined"], axes=[3], keepdims=0)]
    nodes += [node("Where", ["valid", "combined", "neg_inf"], ["ranked"]),        # [L,B,Hkv,C]
              node("TopK", ["ranked", "k"], ["values", "index"], axis=-1, largest=1, sorted=1)]
    inputs = [value("q", FLOAT, ["L", "B", "Hkv", "g", "D"]), value("kmin", FLOAT, ["L", "B", "Hkv", "C", "D"]),
              value("kmax", FLOAT, ["L", "B", "Hkv", "C", "D"]), value("valid", BOOL, [1, "B", 1, "C"]),
              value("valid5", BOOL, [1, "B", 1, 1, "C"]),
              value("k", INT64, [1]), value("neg_inf", FLOAT, [1])]
    if combine == "softmax":
        inputs.append(value("scale", FLOAT, [1]))
    outputs = [value("values", FLOAT, ["L", "B", "Hkv", "K"]), value("index", INT64, ["L", "B", "Hkv", "K"])]
    return model(graph(f"page_select_{combine}", nodes, inputs, outputs), {"": 17, "com.microsoft": 1})
