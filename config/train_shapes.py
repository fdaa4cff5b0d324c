# The offline demo: prepare_shapes.py's pictures of coloured shapes, a few minutes on a laptop CPU.
# python prepare_shapes.py (pictures, stand-in models, features), then:
# python train.py config/train_shapes.py
out_dir = 'out-shapes'
data_dir = 'data/shapes_clip'
text_model = 'data/shapes/gpt2'  # a tiny random stand-in saved by prepare_shapes.py (CLIP's: meta.json names it)
# With real GPT-2 the language model stays frozen: it already knows English. The demo's GPT-2 is random
# (nothing can be downloaded), so it has to learn the captions' language too: all of it trains, the
# embeddings included. (Frozen random embeddings are too small for the tied LM head to ever be sure
# of a word: with them the loss cannot fall far below that of a uniform guess.)
unfreeze_layers = 4
train_embeddings = True
# a smaller bridge for a small problem
num_latents = 32
resampler_depth = 2
heads = 4
batch_size = 32
epochs = 2
learning_rate = 3e-3
eval_interval = 100
eval_captions = 500
log_interval = 20
