# The reference model and hyperparameters on COCO (Karpathy split): CLIP ViT-B/32 + GPT-2 (124M), a
# mapping network and a Perceiver Resampler with gated cross-attention before every GPT-2 block.
# Prepare the features first (README.md, Recipes: COCO), then:
# python train.py config/train_coco.py                                    (one GPU)
# torchrun --standalone --nproc_per_node=8 train.py config/train_coco.py  (eight)
out_dir = 'out-coco'
data_dir = 'data/coco'
text_model = 'gpt2'  # (vision_model: the CLIP that made the features, named in data_dir/meta.json)
epochs = 30
batch_size = 32  # per GPU; the reference trained with 32 on one GPU
learning_rate = 1e-4
weight_decay = 1e-3
beta2 = 0.98
eval_interval = 2000
eval_captions = 5000
