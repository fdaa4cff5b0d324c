# The reference implementation's own protocol, to compare with its published numbers like for like:
# trained on COCO train2017, scored on val2017, a constant learning rate after the warm-up, and as many
# caption samples as its 30 epochs of one random caption per image (COCO has 5 captions per image, and an
# epoch here is every caption once: 6 epochs).
# What still differs: the reference drew one random caption per image per epoch (here every caption is
# seen once per epoch), and it scored with Hugging Face evaluate's BLEU and ROUGE-L on untokenised text,
# where eval_bleu.py uses coco-caption's PTB tokenisation, as COCO captioning papers do.
# The features first, then training and scoring:
# wget -P coco http://images.cocodataset.org/zips/train2017.zip http://images.cocodataset.org/zips/val2017.zip \
#     http://images.cocodataset.org/annotations/annotations_trainval2017.zip
# (cd coco && unzip -q train2017.zip && unzip -q val2017.zip && unzip -q annotations_trainval2017.zip)
# python prepare_coco.py --captions=coco/annotations/captions_train2017.json --images=coco/train2017 \
#     --out_dir=data/coco2017
# python prepare_coco.py --captions=coco/annotations/captions_val2017.json --images=coco/val2017 \
#     --out_dir=data/coco2017
# torchrun --standalone --nproc_per_node=8 train.py config/train_coco2017.py
# python eval_bleu.py --out_dir=out-coco2017 --data_dir=data/coco2017 --split=val
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
