# A model small enough to train for a few steps in seconds on a CPU: used by the tests and for
# trying a change quickly. It learns little; configs/small.py is the one that learns.
data_dir = "data/shakespeare"
out_dir = "out/tiny"

n_layer = 2
n_head = 2
n_embd = 64
block_size = 64  # short windows keep each step fast

micro_batch_size = 4
grad_accum_steps = 2
max_steps = 20
warmup_steps = 5
learning_rate = 1e-3
min_lr = 1e-4

eval_interval = 10
eval_steps = 2
log_interval = 5
ckpt_interval = 10
