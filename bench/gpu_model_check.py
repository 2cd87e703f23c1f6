"""GPU check: the tiny model on CUDA in bf16 with KEYE_KERNELS=auto (Triton DSA + SDPA dense) vs the reference path
(same weights, a packed batch of 3 samples); prints loss and relative logit/gradient differences per attention mode."""

import json
import os
import sys
import time

sys.path.insert(0, ".")
import torch

from keye.model import build_model

out = {}
torch.manual_seed(0)
for mode in ("dense", "dsa"):
    res = {}
    for kern in ("reference", "auto"):
        os.environ["KEYE_KERNELS"] = kern
        m = build_model("tiny", vocab_size=512, seed=0, device="cuda", dtype=torch.bfloat16)
        m.set_attention_mode(mode)
        lens = [700, 333, 1024]
        ids = torch.randint(0, 500, (sum(lens),), device="cuda")
        cu = torch.tensor([0, 700, 1033, 2057], dtype=torch.int32, device="cuda")
        pos = (
            torch.cat([torch.arange(n, device="cuda") for n in lens]).unsqueeze(0).expand(3, -1).contiguous()
        )
        labels = ids.clone()
        m.train()
        t = time.time()
        o = m(input_ids=ids, position_ids=pos, cu_seqlens=cu, labels=labels)
        o.loss.backward()
        torch.cuda.synchronize()
        g = torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None])
        m.eval()
        with torch.no_grad():
            lg = m(input_ids=ids, position_ids=pos, cu_seqlens=cu, return_logits=True).logits.float()
        res[kern] = (float(o.loss.detach()), g, lg, time.time() - t)
    (l0, g0, lg0, _), (l1, g1, lg1, t1) = res["reference"], res["auto"]
    out[mode] = {
        "loss_ref": l0,
        "loss_auto": l1,
        "logit_rel_err": float((lg1 - lg0).norm() / lg0.norm()),
        "grad_rel_err": float((g1 - g0).norm() / g0.norm()),
    }
print(json.dumps(out, indent=1))

# Where the DSA difference comes from: replay every indexer_topk / sparse_attention call of the kernel path on the
# SAME inputs through the references. If each call agrees (identical selected sets up to near-ties, attention within
# bf16 rounding), the model-level gap is bf16 rounding upstream flipping near-tied top-k choices, amplified by the
# discrete selection, not a kernel error.
from keye.kernels import dispatch  # noqa: E402
from keye.kernels import dsa_reference as ref  # noqa: E402

calls = {"topk": [], "sparse": []}
orig_topk, orig_sparse = dispatch.indexer_topk, dispatch.sparse_attention


def rec_topk(*a, **kw):
    res = orig_topk(*a, **kw)
    calls["topk"].append(([x.detach().clone() if torch.is_tensor(x) else x for x in a], res[0].clone()))
    return res


def rec_sparse(*a, **kw):
    res = orig_sparse(*a, **kw)
    calls["sparse"].append(
        ([x.detach().clone() if torch.is_tensor(x) else x for x in a], res[0].detach().clone())
    )
    return res


dispatch.indexer_topk, dispatch.sparse_attention = rec_topk, rec_sparse
os.environ["KEYE_KERNELS"] = "auto"
m = build_model("tiny", vocab_size=512, seed=0, device="cuda", dtype=torch.bfloat16)
m.set_attention_mode("dsa")
m.eval()
torch.manual_seed(1)
lens = [700, 333, 1024]
ids = torch.randint(0, 500, (sum(lens),), device="cuda")
cu = torch.tensor([0, 700, 1033, 2057], dtype=torch.int32, device="cuda")
pos = torch.cat([torch.arange(n, device="cuda") for n in lens]).unsqueeze(0).expand(3, -1).contiguous()
with torch.no_grad():
    m(input_ids=ids, position_ids=pos, cu_seqlens=cu, return_logits=True)
dispatch.indexer_topk, dispatch.sparse_attention = orig_topk, orig_sparse
per_call = []
for (args, got), (sargs, sgot) in zip(calls["topk"], calls["sparse"], strict=False):
    qi, ki, w, cu_, k_ = args[:5]
    ridx, rsc = ref.indexer_topk_reference(qi, ki, w, cu_, k_)
    same_rows = float((got == ridx).all(1).float().mean())
    q, k, v, ind, scale = sargs
    ro, _ = ref.sparse_attention_reference(q.float(), k.float(), v.float(), ind, scale)
    per_call.append(
        {
            "topk_rows_identical": same_rows,
            "sparse_o_rel_err_same_inputs": float((sgot.float() - ro).norm() / ro.norm()),
        }
    )
print(json.dumps({"dsa_per_call_same_inputs": per_call}, indent=1))
