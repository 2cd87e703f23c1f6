"""The pipeline's stages in order: each stage's flow, the output it adds and the outputs it reads (one row per
stage; flows/pipeline.py runs the rows a config lists)."""

from __future__ import annotations

from flows import agent_rl, caption, evaluate, ingest, mopd, pack, shard, specialists, train, video_rl

STEPS = (  # (stage, its flow, the output it adds, the outputs it reads) in pipeline order
    ("ingest", ingest.ingest, "videoset", ()),
    ("caption", caption.caption, "captionset", ("videoset",)),
    ("shard", shard.shard, "shardset", ("captionset",)),
    ("pack", pack.pack, "packset", ("shardset",)),
    ("train", train.train, "checkpoint", ("packset",)),
    ("video_rl", video_rl.video_rl, "checkpoint", ("checkpoint", "videoset")),
    ("specialists", specialists.specialists, "teacherset", ("checkpoint", "videoset", "packset")),
    ("mopd", mopd.mopd, "checkpoint", ("checkpoint", "teacherset", "videoset")),
    # a branch: the agent-RL checkpoint does not become the mainline the eval scores on the benchmarks (its own
    # held-out agent tasks go into the eval's report and the summary)
    ("agent_rl", agent_rl.agent_rl, "agent_checkpoint", ("checkpoint", "videoset")),
    ("eval", evaluate.evaluate, "eval", ("checkpoint", "videoset", "agent_checkpoint")),
)
