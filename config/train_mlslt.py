# Sign-language translation on MLSLT (SP-10): a video of a signer -> the sentence in English. The same
# model as on COCO: the resampler reads every frame (up to 64, with its time embedding), the mapper
# reads their mean. Prepare the features first (README.md, Recipes: MLSLT), then:
# python train.py config/train_mlslt.py
# These hyperparameters are COCO's, with longer targets; they have not been tuned on SP-10.
out_dir = 'out-mlslt'
data_dir = 'data/mlslt'
val_split = 'dev'  # MLSLT's name for its validation split
text_model = 'gpt2'
epochs = 30
batch_size = 16  # videos: 16 x 64 frames x 50 CLIP tokens for the resampler to read
max_caption_tokens = 64  # sentences run longer than COCO captions
learning_rate = 1e-4
weight_decay = 1e-3
beta2 = 0.98
eval_interval = 1000
eval_captions = 2000
