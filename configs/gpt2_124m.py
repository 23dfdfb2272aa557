# GPT-2 124M from scratch on FineWeb-style shards, on a GPU node. Prepare the data with
#   python prepare_data.py --hf_dataset HuggingFaceFW/fineweb-edu --hf_config sample-10BT --out data/fineweb_edu
# (or use llm.c / modded-nanogpt FineWeb shards as they are), then
#   accelerate launch train.py configs/gpt2_124m.py
# The recipe is GPT-3 Small's (Brown et al. 2020, table 2.1) at GPT-2's shape, as llm.c reproduces it.
data_dir = "data/fineweb_edu"
out_dir = "out/gpt2_124m"

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024

micro_batch_size = 32  # per GPU; about 40 GB of activations in bf16. Halve it (accumulation grows) if OOM
tokens_per_step = 524_288  # 2**19, ~0.5M tokens per optimizer step; grad_accum_steps follows from GPUs
max_steps = 19_073  # 10B tokens (sample-10BT) / 524,288
warmup_steps = 715  # 375M warmup tokens (GPT-3) / 524,288
learning_rate = 6e-4  # GPT-3 Small's peak
min_lr = 6e-5  # cosine down to 10% of the peak
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 250
eval_steps = 20
log_interval = 10
ckpt_interval = 1000
keep_last_ckpts = 3

mixed_precision = "bf16"
compile = True
peak_flops = 989e12  # H100 SXM dense bf16; set your GPU's figure for a true MFU
