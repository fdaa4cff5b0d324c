# SCST after the quick start: its best checkpoint, trained on the CIDEr-D of its own sampled captions.
# python train.py config/train_shapes_scst.py
out_dir = 'out-shapes-scst'
data_dir = 'data/shapes_clip'
init_from = 'out-shapes/best.pt'  # the model and its weights; the model settings here are not used
objective = 'scst'
scst_samples = 5
batch_size = 16  # images, each with 5 sampled captions
epochs = 1
learning_rate = 1e-4
warmup_frac = 0.05
eval_interval = 50
eval_captions = 500
eval_images = 250  # the whole validation split: best.pt is the checkpoint of the best greedy CIDEr-D
log_interval = 10
