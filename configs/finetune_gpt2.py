# Fine-tune published GPT-2 weights on your own text:
#   python train.py configs/finetune_gpt2.py --init_from=path/to/gpt2 --data_dir=data/mycorpus
# init_from is a local Hugging Face GPT-2 directory (config.json + model.safetensors), e.g. one
# downloaded with `huggingface-cli download openai-community/gpt2 --local-dir path/to/gpt2`; the
# model's shape comes from it. Set it on the command line: there is no sensible default path.
data_dir = "data/shakespeare"
out_dir = "out/finetune_gpt2"

block_size = 512  # training window; GPT-2's context is 1024, half of it halves activation memory
dropout = 0.1  # a small corpus overfits quickly without it

micro_batch_size = 4
grad_accum_steps = 8  # 16K tokens per step
max_steps = 300
warmup_steps = 30
learning_rate = 3e-5  # ~20x below pre-training: adjust the weights, don't overwrite them
min_lr = 3e-6
weight_decay = 0.1
grad_clip = 1.0

eval_interval = 50
eval_steps = 10
log_interval = 10
ckpt_interval = 100

mixed_precision = "auto"  # bf16 where the hardware runs it natively, else fp32
