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
