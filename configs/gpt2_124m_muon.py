# GPT-2 124M from scratch with Muon for the blocks' matrices and AdamW for the rest, on a GPU node
# (DDP; train.py refuses optimizer=muon under FSDP). Same data and command as configs/gpt2_124m.py:
#   accelerate launch train.py configs/gpt2_124m_muon.py
#
# The rates are those of the modded-nanogpt speedrun record of 10/11/24, "Muon improvements"
# (record 4 in the README of github.com/KellerJordan/modded-nanogpt: 22.3 minutes on 8xH100, val loss
# 3.2785 on FineWeb after 6,200 steps of 524,288 tokens; code and log in
# records/track_1_short/2024-10-10_Muon/). It is the last record whose model is still GPT-2's (tied
# embeddings, GELU MLP, fused q,k,v); it used rotary positions and weightless RMSNorm where GPT-2 has
# learned positions and LayerNorm. Its settings:
#   - Adam (betas 0.9, 0.95, no weight decay) at 0.0036 for the tied embedding/head;
#   - Muon at 0.00036 x sqrt(max(rows, cols)) per matrix (an update of RMS 0.00036 for every matrix),
#     momentum 0.95, Nesterov, no weight decay, for every matrix in the blocks;
#   - no warmup, the rates flat, then a linear decay to 0 over the last 1,800 steps.
# Here:
#   - muon_adjust_lr="match_rms_adamw" scales by 0.2 x sqrt(max(rows, cols)) (Liu et al. 2025), so
#     muon_lr = 0.00036 / 0.2 = 0.0018 gives the record's update size;
#   - learned positions, biases and LayerNorm, which the record did not have, go to AdamW at its 0.0036;
#   - train.py's schedule is warmup + cosine, not the record's flat-then-linear one: 100 warmup steps
#     (for those extra AdamW parameters; the record had none) and a cosine to 0 over the whole run;
#   - the record orthogonalised q, k and v as three 768 x 768 matrices; torch.optim.Muon orthogonalises
#     the fused 2304 x 768 c_attn as one.
# Expect the record's loss only roughly: its model and schedule differ as said. Untested here (no GPU).
data_dir = "data/fineweb_edu"
out_dir = "out/gpt2_124m_muon"

n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024

micro_batch_size = 32  # per GPU, as configs/gpt2_124m.py
tokens_per_step = 524_288  # the record's 8 x 64 sequences of 1,024 tokens; grad_accum_steps follows from GPUs
max_steps = 6_200  # the record's 3.25B tokens
warmup_steps = 100
learning_rate = 0.0036  # AdamW: the record's Adam rate
min_lr = 0.0  # the record decayed to 0
weight_decay = 0.0  # the record's Adam had none
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # the record did not clip; kept as configs/gpt2_124m.py has it, for the AdamW parameters it lacked

optimizer = "muon"
muon_lr = 0.0018  # x 0.2 sqrt(max(rows, cols)): the record's 0.00036 x sqrt(max(rows, cols))
muon_adjust_lr = "match_rms_adamw"
muon_momentum = 0.95
muon_nesterov = True
muon_weight_decay = 0.0

eval_interval = 250
eval_steps = 20
log_interval = 10
ckpt_interval = 1000
keep_last_ckpts = 3

mixed_precision = "bf16"
compile = True
peak_flops = 989e12  # H100 SXM dense bf16; set your GPU's figure for a true MFU
