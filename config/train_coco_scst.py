# SCST on COCO, after the cross-entropy stage (config/train_coco.py): the run's best checkpoint, trained on
# the CIDEr-D of its own sampled captions.
# python train.py config/train_coco_scst.py                                    (one GPU)
# torchrun --standalone --nproc_per_node=8 train.py config/train_coco_scst.py  (eight)
# Not run here (COCO cannot be downloaded on the machine this was written on): the settings are the usual
# ones of SCST (5 samples per image, a learning rate well below the cross-entropy stage's), not tuned.
out_dir = 'out-coco-scst'
data_dir = 'data/coco'
init_from = 'out-coco/best.pt'  # the model and its weights; the model settings here are not used
objective = 'scst'
scst_samples = 5
batch_size = 32  # images per GPU, each with 5 sampled captions
epochs = 5
learning_rate = 2e-5
warmup_frac = 0.0
eval_interval = 1000
eval_captions = 5000
eval_images = 5000  # Karpathy's validation split: best.pt is the checkpoint of the best greedy CIDEr-D
