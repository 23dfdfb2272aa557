# The README's main run: a small GPT-2 trained on the built-in Shakespeare corpus
# (python prepare_data.py --dataset shakespeare --out data/shakespeare) that learns the shape of a
# play (speaker names, verse lines) within minutes on a 2-core CPU. On a GPU, raise
# micro_batch_size and max_steps freely.
data_dir = "data/shakespeare"
out_dir = "out/small"

# 4 layers of width 128: most of the compute is the 50257-way output layer, so the width is kept
# small; the blocks are cheap next to it. (6 layers, or 256-token windows, learned less per
# minute in the same token budget.)
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128  # a few verse lines of context
dropout = 0.0  # less than one epoch is seen: nothing to regularise against

micro_batch_size = 8
grad_accum_steps = 1  # 1,024 tokens per step: with this little compute, more small steps learn faster
max_steps = 1450  # ~1.48M tokens, 98% of the corpus: one pass, no token seen twice (the curve: docs/benchmarks.md)
warmup_steps = 50
learning_rate = 1.5e-3  # small models take a high peak rate; twice this diverged less gracefully (docs/benchmarks.md)
min_lr = 1.5e-4
weight_decay = 0.1
grad_clip = 1.0
# Muon for the blocks' matrices, AdamW (at learning_rate) for the rest: over the whole run it ends well
# below AdamW alone in about the same time (docs/benchmarks.md, AdamW against Muon). 6e-3 led a sweep of
# 1.5e-3, 3e-3 and 6e-3 at step 100 of shortened runs. optimizer="adamw" gives the earlier demo.
optimizer = "muon"
muon_lr = 6e-3

eval_interval = 200
eval_steps = 8  # 8 x 8 x 128 = 8K val tokens: a stable estimate in about a second
log_interval = 50
ckpt_interval = 400
keep_last_ckpts = 2

mixed_precision = "auto"  # bf16 where it is faster here (CUDA; a CPU where it measured so), else fp32
