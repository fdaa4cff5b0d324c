# Ablation of the reference's results table: the Perceiver Resampler and gated cross-attention alone
# (38,238,744 trained parameters).
exec(open('config/train_coco.py').read())
out_dir = 'out-coco-resampler'
enable_mapper = False
