# Ablation of the reference's results table: the mapping network alone (787,712 trained parameters).
exec(open('config/train_coco.py').read())
out_dir = 'out-coco-mapper'
enable_resampler_xattn = False
