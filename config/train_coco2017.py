# The reference implementation's own protocol, to compare with its published numbers like for like:
# trained on COCO train2017, scored on val2017, a constant learning rate after the warm-up, and as many
# caption samples as its 30 epochs of one random caption per image (COCO has 5 captions per image, and an
# epoch here is every caption once: 6 epochs). Prepare the features first (README, "The COCO recipe").
# What still differs: the reference drew one random caption per image per epoch (here every caption is
# seen once per epoch), and it scored with Hugging Face evaluate's BLEU and ROUGE-L on untokenised text,
# where eval_bleu.py uses coco-caption's PTB tokenisation, as COCO captioning papers do.
out_dir = 'out-coco2017'
data_dir = 'data/coco2017'
val_split = 'val'
text_model = 'gpt2'
epochs = 6
batch_size = 32
learning_rate = 1e-4
min_lr = 1e-4  # = learning_rate: the cosine decay stays flat, a constant rate after the warm-up
weight_decay = 1e-3
beta2 = 0.98
eval_interval = 2000
eval_captions = 5000
